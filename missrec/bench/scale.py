"""Pre-training at growing catalogue sizes: what a rank's memory, its step rate and interest discovery cost as the
catalogue grows from 100 k to millions of items.

For each size, a synthetic catalogue of two domains (2 modalities, 512-d clustered features stored as float16,
random histories of 1 to 20 items) is written as shard folders (cached under the work folder), then
``launcher/pretrain.py`` runs one epoch of a fixed number of steps on 2 gloo ranks (torchrun, one thread each,
one DataLoader worker each) with interest discovery at its start. Measured:

- ``peak_rss_gib``: per rank, the peak over the run of the anonymous memory of the rank and its DataLoader
  workers (proportional set size of anonymous pages, ``Pss_Anon``: shared pages counted once, file pages, i.e.
  the page cache holding feature tables, shards and scratch files, left out), sampled every 0.25 s; the larger
  of the two ranks;
- ``seq_per_s``: sequences per second over the steps (``metrics.json``, data wait included);
- ``mid_seconds``: the epoch's interest discovery (adapting every item, distributed DPC-KNN, writing the index);
- ``shard_read_per_s``: rows per second one reader (no worker) streams and assembles into full batches (feature
  rows gathered, interests looked up), from the run's own index.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

import numpy as np

from missrec.data.atomic import Domain, Split
from missrec.data.pretrain_stream import PretrainData
from missrec.data.shard_writer import write_domain_shards
from missrec.data.shards import shards_exist
from missrec.errors import StageFailedError
from missrec.train.dist import free_port

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
GIB = float(1 << 30)
DIM = 512


def _features(path: Path, n: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """Clustered float16 features [n, 512] in a raw file (a Gaussian mixture, 64 items per component)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(16, n // 64), DIM), dtype=np.float32)
    out = np.memmap(path, dtype="<f2", mode="w+", shape=(n, DIM))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        block = centres[rng.integers(0, len(centres), e - s)] + 0.35 * rng.standard_normal((e - s, DIM),
                                                                                             dtype=np.float32)
        out[s:e] = block.astype(np.float16)
    out.flush()
    return np.memmap(path, dtype="<f2", mode="r", shape=(n, DIM))


def _split(rng: np.random.Generator, rows: int, items: int, users: int):
    lens = rng.integers(1, 21, rows)
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return Split(rng.integers(0, users, rows), rng.integers(0, items, rows), offsets,
                 rng.integers(0, items, int(offsets[-1])))


def _write_domain(args: tuple[str, str, int, int, int]) -> str:
    folder, name, items, rows, seed = args
    out = Path(folder)
    tmp = out.parent / f".{name}.features"
    tmp.mkdir(parents=True, exist_ok=True)
    feats = {s: _features(tmp / s, items, seed + k) for k, s in enumerate(("feat1CLS", "feat3CLS"))}
    rng = np.random.default_rng(seed)
    users = max(1, rows // 5)
    splits = {"train": _split(rng, rows, items, users), "valid": _split(rng, 1000, items, users),
              "test": _split(rng, 1000, items, users)}
    dom = Domain(name, out, items, users, splits, features=feats)
    write_domain_shards(dom, out, samples_per_shard=50_000, feature_suffixes=list(feats), show_progress=False,
                        feature_dtype="float16")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return str(out)


def build_catalogue(folder: Path, items: int, rows: int, seed: int = 0) -> list[Path]:
    """Two domain shard folders of ``items // 2`` items and ``rows // 2`` training rows each (written once; a
    complete folder is reused)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for d in range(2):
        out = folder / f"Scale{d}"
        if not shards_exist(out):
            jobs.append((str(out), f"Scale{d}", items // 2 + (items % 2 if d == 0 else 0), rows // 2, seed + 17 * d))
    if jobs:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(len(jobs)) as pool:
            list(pool.map(_write_domain, jobs))
        log.info("catalogue of %d items, %d rows written in %.0fs", items, rows, time.perf_counter() - t0)
    return [folder / f"Scale{d}" for d in range(2)]


# ---------------------------------------------------------------------------------------------- memory
def _pss_anon(pid: int) -> int:
    """Proportional anonymous memory of a process, in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


class RankMemory:
    """Samples, for each rank process under ``root`` (a process running launcher/pretrain.py whose parent does
    not), the anonymous memory of the rank and its children; keeps each rank's peak."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        import psutil

        self.psutil, self.root, self.interval = psutil, root, interval
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ranks(self) -> list[Any]:
        try:
            procs = self.psutil.Process(self.root).children(recursive=True)
        except self.psutil.Error:
            return []
        runs = {p.pid: p for p in procs if any("pretrain.py" in a for a in _cmdline(p))}
        return [p for p in runs.values() if p.ppid() not in runs]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for rank in self._ranks():
                try:
                    pids = [rank.pid] + [c.pid for c in rank.children(recursive=True)]
                except self.psutil.Error:
                    continue
                total = sum(_pss_anon(p) for p in pids)
                self.peaks[rank.pid] = max(self.peaks.get(rank.pid, 0), total)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _cmdline(p: Any) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # noqa: BLE001 - a process that just ended
        return []


# ---------------------------------------------------------------------------------------------- runs
def _reader_rate(folders: list[Path], run: Path, batch_size: int, steps: int, hidden: int) -> float:
    """Rows per second of one reader assembling full batches (this process, no worker)."""
    data = PretrainData(folders, ("feat1CLS", "feat3CLS"), batch_size=batch_size, world_size=2, rank=0, seed=1,
                        max_len=20, drop_prob=0.2)
    index = run / "interests" / "epoch0000"
    t0 = time.perf_counter()
    n = 0
    for batch in data.loader(0, index, steps=steps):
        n += len(batch)
    return n / (time.perf_counter() - t0)


def run_case(folders: list[Path], out: Path, *, steps: int, batch_size: int, hidden: int,
             extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One 2-rank pre-training of ``steps`` steps with interest discovery; returns its figures."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    sets = [f"batch_size={batch_size}", "epochs=1", f"max_steps_per_epoch={steps}", "threads=1",
            "num_workers=1", f"missrec.hidden={hidden}", "missrec.inner=256", "max_len=20", "progress=false",
            "log_every=10", "features=[feat1CLS,feat3CLS]", *extra]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "launcher" / "pretrain.py"), "--deepspeed_config",
           str(REPO / "cluster_configs" / "zero2.json"), "--data", ",".join(map(str, folders)), "--output-dir",
           str(out), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with RankMemory(proc.pid) as mem:
        output, _ = proc.communicate()
    if proc.returncode != 0:
        raise StageFailedError(f"pre-training failed ({proc.returncode}):\n{output[-5000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"peak_rss_gib": round(max(mem.peaks.values(), default=0) / GIB, 3),
            "peak_rss_gib_per_rank": [round(v / GIB, 3) for v in mem.peaks.values()],
            "seq_per_s": m["seq_per_second"], "mid_seconds": m["time_seconds"]["mid"],
            "time_seconds": m["time_seconds"], "job_seconds": round(time.perf_counter() - t0, 1)}


def summary_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("items", "rows", "peak_rss_gib", "seq_per_s", "mid_seconds", "shard_read_per_s")
    return [{k: r[k] for k in keys} for r in runs]


def run_scale_benchmark(items: tuple[int, ...] = (100_000, 1_000_000, 4_000_000), steps: int = 30,
                        batch_size: int = 256, hidden: int = 128, workdir: str | None = None,
                        extra: tuple[str, ...] = (), rows: int | None = None) -> dict[str, Any]:
    """Every size of ``items`` in turn (catalogue, 2-rank run, reader rate); returns ``{"runs": [...], ...}``
    with the ratios the targets are stated in (largest against smallest). Training rows: 10 per item for
    catalogues under 2 M items, 10 M above (``rows`` sets one number for every size)."""
    work = Path(workdir or (REPO / "runs" / "bench-scale"))
    runs = []
    fixed_rows = rows
    for n in items:
        rows = fixed_rows or (max(10 * n, 1_000_000) if n < 2_000_000 else 10_000_000)
        folders = build_catalogue(work / f"items{n}-rows{rows}", n, rows)
        out = work / f"items{n}-rows{rows}" / "run"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        case = run_case(folders, out, steps=steps, batch_size=batch_size, hidden=hidden, extra=extra)
        case["shard_read_per_s"] = round(_reader_rate(folders, out, batch_size, 40, hidden), 1)
        runs.append({"items": n, "rows": rows, **case})
        log.info("scale %d items: %s", n, runs[-1])
    first, last = runs[0], runs[-1]
    tokens = [2 * r["items"] for r in runs]
    nlogn = (tokens[-1] * math.log(tokens[-1])) / (tokens[0] * math.log(tokens[0]))
    if len(runs) == 1:
        return {"runs": summary_rows(runs), "details": runs}
    summary = {
        "runs": summary_rows(runs),
        "details": runs,
        "settings": {"ranks": 2, "threads_per_rank": 1, "workers_per_rank": 1, "steps": steps,
                     "batch_size_per_rank": batch_size, "hidden": hidden, "feature_dim": DIM, "modalities": 2,
                     "feature_dtype": "float16"},
        "ratios": {
            "peak_rss": round(last["peak_rss_gib"] / first["peak_rss_gib"], 3),
            "seq_per_s": round(last["seq_per_s"] / first["seq_per_s"], 3),
            "mid_seconds": round(last["mid_seconds"] / first["mid_seconds"], 2),
            "n_log_n": round(nlogn, 2),
        },
    }
    summary["targets_met"] = {
        "peak_rss_at_most_1.5x": summary["ratios"]["peak_rss"] <= 1.5,
        "seq_per_s_within_15pct": abs(summary["ratios"]["seq_per_s"] - 1) <= 0.15,
        "mid_no_faster_than_n_log_n": summary["ratios"]["mid_seconds"] <= nlogn,
    }
    return summary
