"""How fast a model's training consumes sequences (for comparison with the reader's rate)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from missrec.config import SASRecConfig
from missrec.data.shards import ShardSource
from missrec.models.build import build_sasrec


def sasrec_training_rate(
    folder: str | Path, batch_size: int = 512, steps: int = 0, max_len: int = 50, seed: int = 0,
) -> dict:
    """Train SASRec (paper settings) on the shards in ``folder`` for one whole epoch (or ``steps`` steps
    after two warm-up steps; batches vary in length, so a few steps are not representative) and return
    sequences per second. The reader runs in-process, so its time is included."""
    torch.manual_seed(seed)
    src = ShardSource(folder)
    model = build_sasrec(SASRecConfig(), src.num_items, max_len)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    batches = src.batches(
        "train", batch_size, seed=seed, max_len=max_len, group_by_length=True
    )
    seqs = done = 0
    t0 = time.perf_counter() if not steps else None
    for batch in batches:
        if steps and done == 2 and t0 is None:  # two warm-up steps
            t0, seqs = time.perf_counter(), 0
        loss = model.loss(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seqs += len(batch)
        done += 1
        if steps and done >= steps + 2:
            break
    dt = time.perf_counter() - t0 if t0 is not None else float("nan")
    return {
        "objective": "last", "batch_size": batch_size, "steps": done - 2 if steps else done, "sequences": seqs,
        "seconds": round(dt, 3), "sequences_per_second": round(seqs / dt, 1), "threads": torch.get_num_threads(),
    }
