"""Benchmark of distributed interest discovery: W gloo ranks on one machine vs one process.

``run_mid_dist_benchmark`` spawns the ranks (each generates only its shard of a seeded Gaussian mixture,
see :func:`shard_tokens`) and then a single process on the whole pool, each in a fresh interpreter so
``ru_maxrss`` is its own; it returns a JSON-able dict with wall seconds, per-phase timings, peak RSS
and bytes communicated per rank, and how the distributed labels compare with the single-process ones.
Set ``OMP_NUM_THREADS`` (``threads``) so the ranks do not oversubscribe the cores.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from missrec.bench.mid import adjusted_rand_index
from missrec.interests import InterestConfig, discover_interests
from missrec.interests.distributed import discover_interests_distributed
from missrec.io import atomic_open, write_json
from missrec.train.dist import child_threads, free_port, init_loopback_gloo

logger = logging.getLogger(__name__)

GIB = float(1 << 30)
BLOCK = 4096  # rows per independently seeded generation block


def shard_tokens(
    n: int,
    dim: int,
    start: int,
    stop: int,
    seed: int = 0,
    points_per_centre: int = 50,
    spread: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start:stop`` of a seeded mixture of ``n // points_per_centre`` Gaussians (centres ~ N(0, I),
    points = centre + spread * N(0, I)) of ``n`` tokens: tokens [stop - start, dim] float32 and the
    generating component [stop - start] int64. Blocks of BLOCK rows have their own seeded streams, so any
    slice is generated without the rest and equals the same rows of the whole pool."""
    ncent = max(1, n // points_per_centre)
    centres = np.random.default_rng([seed, 0]).standard_normal((ncent, dim), dtype=np.float32)
    x = np.empty((max(0, stop - start), dim), dtype=np.float32)
    comp = np.empty(max(0, stop - start), dtype=np.int64)
    for b in range(start // BLOCK, -(-stop // BLOCK) if stop > start else 0):
        b0, b1 = b * BLOCK, min(n, (b + 1) * BLOCK)
        rng = np.random.default_rng([seed, 1, b])
        cb = rng.integers(0, ncent, b1 - b0)
        xb = rng.standard_normal((b1 - b0, dim), dtype=np.float32)
        xb *= spread
        xb += centres[cb]
        lo, hi = max(start, b0), min(stop, b1)
        x[lo - start : hi - start] = xb[lo - b0 : hi - b0]
        comp[lo - start : hi - start] = cb[lo - b0 : hi - b0]
    return x, comp


def _rss_now() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return 0


def _bounds(n: int, world: int) -> np.ndarray:
    return np.linspace(0, n, world + 1).round().astype(np.int64)


def _rank_main(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(job["threads"]))
    init_loopback_gloo(rank, world, port, timeout_s=3600)
    try:
        b = _bounds(job["tokens"], world)
        x, _ = shard_tokens(job["tokens"], job["dim"], int(b[rank]), int(b[rank + 1]), job["seed"])
        rss_before = _rss_now()
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        res = discover_interests_distributed(x, InterestConfig(**job["cfg"]), chunk_rows=job["chunk_rows"])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        _dump(Path(job["out"]), f"rank{rank}", res, wall, cpu, rss_before, save_labels=True)
    finally:
        dist.destroy_process_group()


def _single_main(_: int, job: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(int(job["threads"]))
    x, _ = shard_tokens(job["tokens"], job["dim"], 0, job["tokens"], job["seed"])
    rss_before = _rss_now()
    t0, c0 = time.perf_counter(), time.process_time()
    res = discover_interests(x, InterestConfig(**job["cfg"]))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    _dump(Path(job["out"]), "single", res, wall, cpu, rss_before, save_labels=True)


def _dump(out: Path, tag: str, res: Any, wall: float, cpu: float, rss_before: int, save_labels: bool) -> None:
    if save_labels:
        with atomic_open(out / f"{tag}.npz", "wb") as fh:
            np.savez(fh, labels=res.labels, centres=res.centres)
    info = {
        key: v for key, v in res.info.items() if isinstance(v, (int, float, str, bool, list)) or v is None
    }
    write_json(
        out / f"{tag}.json",
        {
            "seconds_wall": wall,
            "seconds_cpu": cpu,  # this process' CPU time in the call (less sensitive to a busy machine)
            "seconds": res.timings,
            "rss_before_gib": rss_before / GIB,
            "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
            "info": info,
        },
    )



def run_mid_dist_benchmark(
    tokens: int = 100_000,
    dim: int = 300,
    world_size: int = 2,
    clusters_ratio: float = 0.02,
    knn: float = 5,
    seed: int = 0,
    *,
    threads: int = 1,
    chunk_rows: int = 8192,
    single: bool = True,
    **config: Any,
) -> dict[str, Any]:
    """Run DPC-KNN (or ``method="kmeans"`` in ``config``) on ``world_size`` gloo ranks and, if ``single``,
    in one process, on the same ``tokens`` x ``dim`` pool; ``threads`` torch / OpenMP threads each.

    ``config``: further :class:`InterestConfig` fields. Returns per-rank and single-process wall seconds,
    phase timings, peak RSS (``ru_maxrss``, and the RSS after generating the tokens), bytes sent and
    received per rank, and label agreement (identical labels / centres, ARI) with the single process
    and with the planted mixture components.
    """
    import torch.multiprocessing as mp

    cfg = dict(cluster_ratio=float(clusters_ratio), knn=knn, seed=int(seed), **config)
    with child_threads(threads), tempfile.TemporaryDirectory(prefix="mid_dist_") as tmp:
        job = {
            "tokens": int(tokens),
            "dim": int(dim),
            "seed": int(seed),
            "cfg": cfg,
            "threads": int(threads),
            "chunk_rows": int(chunk_rows),
            "out": tmp,
        }
        t0 = time.perf_counter()
        mp.spawn(_rank_main, args=(world_size, free_port(), job), nprocs=world_size, join=True)
        dist_wall = time.perf_counter() - t0
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world_size)]
        parts = []
        for r in range(world_size):  # each rank saved the labels of its own shard
            with np.load(Path(tmp) / f"rank{r}.npz") as z:
                parts.append(z["labels"])
                centres = z["centres"]
        labels = np.concatenate(parts)
        _, planted = shard_tokens(int(tokens), int(dim), 0, int(tokens), int(seed))
        out: dict[str, Any] = {
            "tokens": int(tokens),
            "dim": int(dim),
            "world_size": int(world_size),
            "threads_per_process": int(threads),
            "config": cfg,
            "clusters": int(centres.shape[0]),
            "distributed": {
                "seconds_wall_max": max(r["seconds_wall"] for r in ranks),
                "seconds_with_spawn": dist_wall,
                "ranks": ranks,
                "ari_vs_planted": adjusted_rand_index(labels, planted),
            },
        }
        if single:
            t0 = time.perf_counter()
            mp.spawn(_single_main, args=(job,), nprocs=1, join=True)
            one = json.loads((Path(tmp) / "single.json").read_text())
            one["seconds_with_spawn"] = time.perf_counter() - t0
            with np.load(Path(tmp) / "single.npz") as z:
                one["ari_vs_planted"] = adjusted_rand_index(z["labels"], planted)
                out["same_labels"] = bool(np.array_equal(z["labels"], labels))
                out["same_centres"] = bool(np.array_equal(z["centres"], centres))
                out["ari_dist_vs_single"] = adjusted_rand_index(z["labels"], labels)
            out["single"] = one
    logger.info("mid dist benchmark: %s", out)
    return out
