"""Throughput of feature extraction with the Ray actor pool: items/second with 1 and 2 actors.

A synthetic catalogue (items with images) is encoded by the tiny open_clip model, each actor on one CPU
with one torch thread; the rate is over the encoding phase (actors ready -> last chunk written), so the
Ray start-up and model loading, reported separately, do not dilute it. Scaling efficiency is
``rate(2 actors) / (2 * rate(1 actor))``; an in-process single-thread rate is the no-Ray baseline.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from missrec.data.synthetic import SyntheticConfig, generate_catalogue
from missrec.features.clip import make_tiny_clip
from missrec.features.encode import EncoderSpec
from missrec.features.job import ExtractConfig, extract_features
from missrec.features.pool import PoolConfig

log = logging.getLogger(__name__)

DOMAIN = "Kitchen"


def run_extract_benchmark(
    items: int = 3000,
    actors: Sequence[int] = (1, 2),
    chunk_size: int = 128,
    batch_size: int = 64,
    workdir: str | Path | None = None,
    address: str | None = None,
    in_process: bool = True,
    progress: bool = False,
) -> dict:
    """Encode ``items`` synthetic items with each pool size in ``actors`` (fresh output each time).
    Returns a JSON-able dict with per-run rates, start-up times and the 1 -> 2 actor scaling efficiency.
    Without ``workdir`` everything goes to a temporary folder removed at the end."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
            return run_extract_benchmark(items, actors, chunk_size, batch_size, tmp, address, in_process, progress)
    work = Path(workdir)
    generate_catalogue(work / "catalogue", SyntheticConfig(
        items_per_domain=items, users_per_domain=10, domains=(DOMAIN,), target_domains=(), proxy_features=False))
    cfg_path, ckpt = make_tiny_clip(work / "model")
    spec = EncoderSpec(backend="open_clip", model=cfg_path.stem, pretrained=str(ckpt), model_config=str(cfg_path),
                       batch_size=batch_size, device="cpu", torch_threads=1)
    ddir = str(work / "catalogue" / DOMAIN)
    runs = {}
    for n in actors:
        pool = PoolConfig(num_actors=n, num_cpus_per_actor=1.0, address=address)
        meta = extract_features(ExtractConfig(ddir, DOMAIN, spec, pool, out_dir=str(work / f"out-{n}"),
                                              chunk_size=chunk_size, keep_chunks=False, progress=progress))
        runs[str(n)] = _summary(meta)
        log.info("%d actor(s): %s", n, runs[str(n)])
    if in_process:
        meta = extract_features(ExtractConfig(ddir, DOMAIN, spec, None, out_dir=str(work / "out-in-process"),
                                              chunk_size=chunk_size, keep_chunks=False, progress=progress))
        runs["in_process"] = _summary(meta)
    out = {
        "items": items, "chunk_size": chunk_size, "batch_size": batch_size, "model": cfg_path.stem,
        "cpu_count": os.cpu_count(), "torch_threads_per_actor": 1, "runs": runs,
        "items_per_second": {k: v["encode_items_per_second"] for k, v in runs.items()},
    }
    if "1" in runs and "2" in runs:
        out["scaling_efficiency"] = round(runs["2"]["encode_items_per_second"]
                                          / (2 * runs["1"]["encode_items_per_second"]), 3)
    return out


def _summary(meta: dict) -> dict:
    run = meta["run"]
    return {"encode_items_per_second": meta["encode_items_per_second"], "encode_seconds": run["encode_seconds"],
            "startup_seconds": run["startup_seconds"], "wall_seconds": meta["wall_seconds"],
            "end_to_end_items_per_second": meta["items_per_second"], "images_encoded":
            meta["counts"]["images_encoded"]}


__all__ = ["run_extract_benchmark"]
