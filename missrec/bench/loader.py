"""Throughput of the shard reader: sequences/second for one pass over the train split, no model."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from missrec.data.shards import ShardSource

log = logging.getLogger(__name__)


def run_loader_benchmark(
    folder: str | Path,
    batch_size: int = 512,
    num_workers: int = 2,
    epochs: int = 2,
    max_len: int = 50,
    seed: int = 0,
) -> dict:
    """Read every train batch of ``folder`` (a :func:`~missrec.data.shards.write_domain_shards` folder)
    for ``epochs`` epochs and time it. Each epoch builds a fresh pipeline (and, with ``num_workers > 0``,
    fresh worker processes: the start-up is included, as it is in training). Returns a JSON-able dict;
    ``sequences_per_second`` is over all epochs, ``epochs_detail`` has the per-epoch numbers."""
    src = ShardSource(folder)
    rows = src.num_rows("train")
    detail = []
    total_seqs = 0
    total_time = 0.0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        first = None
        seqs = batches = 0
        for b in src.batches("train", batch_size, epoch=epoch, seed=seed, max_len=max_len, num_workers=num_workers):
            if first is None:
                first = time.perf_counter() - t0
            seqs += len(b)
            batches += 1
        dt = time.perf_counter() - t0
        if seqs != rows:
            log.warning("epoch %d read %d sequences, the manifest lists %d train rows", epoch, seqs, rows)
        detail.append({
            "epoch": epoch,
            "sequences": seqs,
            "batches": batches,
            "seconds": round(dt, 4),
            "first_batch_seconds": round(first or 0.0, 4),
            "sequences_per_second": round(seqs / dt, 1) if dt > 0 else None,
        })
        log.info("loader epoch %d: %d sequences in %.2fs (%.0f/s)", epoch, seqs, dt, seqs / max(dt, 1e-9))
        total_seqs += seqs
        total_time += dt
    return {
        "folder": str(folder),
        "domain": src.name,
        "train_rows": rows,
        "train_shards": len(src.shard_paths("train")),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "epochs": epochs,
        "max_len": max_len,
        "cpu_count": os.cpu_count(),
        "sequences": total_seqs,
        "seconds": round(total_time, 4),
        "sequences_per_second": round(total_seqs / total_time, 1) if total_time > 0 else None,
        "epochs_detail": detail,
    }
