"""A record of which training rows each rank trained on, step by step (``PretrainConfig.trace_samples``).

Each run attempt writes its own file, ``RUN/trace/rank<R>-from<GLOBAL STEP>.tsv``, named by the global
step it started at (0 for a fresh run, the checkpoint's step after ``--resume``), one line per step:
``epoch  global_step  step_in_epoch  domain  row,row,...  pass,pass,...`` (a row's pass: how many times its
stream had already gone through the domain in that epoch). Lines are flushed as they are written, so a
killed rank leaves every step it started. Reading the attempts in order, each cut at the step where
the next one starts, gives the rows that went into the final parameters: the resume tests check that
within an epoch's pass every row appears once, in the order of an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import numpy as np

TRACE_DIR = "trace"


class SampleTrace:
    """Append-only per-rank trace of trained rows; a no-op when ``enabled`` is false."""

    def __init__(self, run_dir: str | Path, rank: int, start_global_step: int, enabled: bool) -> None:
        self._fh: TextIO | None = None
        if enabled:
            folder = Path(run_dir) / TRACE_DIR
            folder.mkdir(parents=True, exist_ok=True)
            self._fh = open(folder / f"rank{rank}-from{start_global_step:08d}.tsv", "w", encoding="utf-8")  # noqa: SIM115

    def step(self, epoch: int, global_step: int, step: int, domain: int, rows: np.ndarray, passes: np.ndarray) -> None:
        if self._fh is None:
            return
        self._fh.write(f"{epoch}\t{global_step}\t{step}\t{domain}\t{','.join(map(str, rows.tolist()))}\t"
                       f"{','.join(map(str, passes.tolist()))}\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


Step = tuple[int, int, int, int, tuple[int, ...], tuple[int, ...]]


def read_trace(run_dir: str | Path, rank: int) -> list[Step]:
    """The effective trace of ``rank``: its attempts in order, each cut where the next one starts.

    Returns ``(epoch, global_step, step_in_epoch, domain, rows, passes)`` per step."""
    files = sorted(Path(run_dir, TRACE_DIR).glob(f"rank{rank}-from*.tsv"))
    starts = [int(f.stem.split("-from")[1]) for f in files]
    out: list[Step] = []
    for i, f in enumerate(files):
        stop = starts[i + 1] if i + 1 < len(files) else None
        for line in f.read_text(encoding="utf-8").splitlines():
            ep, gs, st, d, rows, passes = line.split("\t")
            if stop is not None and int(gs) >= stop:
                break
            out.append((int(ep), int(gs), int(st), int(d), tuple(int(r) for r in rows.split(",")),
                        tuple(int(p) for p in passes.split(","))))
    return out
