"""Serving a run with a history affinity at catalogue scale: index + history neighbours against full ranking.

The run's catalogue is grown with synthetic items (inductive MISSRec only: each is a random real item's features
plus Gaussian noise, missing modalities kept missing), so that the exact full ranking has to score many items
that lie close to the users' history items. For each catalogue size and index kind it reports, over test
histories: the full ranking's milliseconds per user, and for each candidate factor the pooled path's
milliseconds per user and its top-k agreement with the full ranking (:func:`missrec.serve.agreement.topk_agreement`),
with the history items' neighbours pooled (the default) and without (the user's index candidates alone).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from missrec.errors import InputError
from missrec.serve.agreement import topk_agreement
from missrec.serve.index import IndexConfig
from missrec.serve.recommend import Recommender, ServeConfig

log = logging.getLogger(__name__)


def grow_catalogue(rec: Recommender, extra: int, noise: float = 0.3, seed: int = 0, chunk: int = 20_000) -> float:
    """Append ``extra`` synthetic items to ``rec`` (inductive MISSRec): real items' features plus Gaussian noise of
    ``noise`` × each dimension's standard deviation. Returns the seconds it took (adapting, interests, index)."""
    rng = np.random.default_rng(seed)
    model = rec.model
    names = rec.feature_names or tuple(f"feat{m}" for m in range(model.num_modalities))
    real = [t.float().cpu().numpy() for t in model.items.rows(slice(1, None))]  # [N, d_m] each
    std = [r[np.abs(r).sum(1) > 0].std(0, keepdims=True) for r in real]
    t0 = time.perf_counter()
    for lo in range(0, extra, chunk):
        n = min(chunk, extra - lo)
        src = rng.integers(0, real[0].shape[0], n)
        feats = {}
        for name, r, s in zip(names, real, std, strict=True):
            base = r[src]
            feats[name] = np.where(np.abs(base).sum(1, keepdims=True) > 0,
                                   base + noise * s * rng.standard_normal(base.shape), 0).astype(np.float32)
        rec.add_items(feats, [f"synthetic-{lo + i}" for i in range(n)])
    return time.perf_counter() - t0


def run_serve_benchmark(
    run_dir: str | Path,
    extra_items: Sequence[int] = (0, 100_000),
    kinds: Sequence[str] = ("flat", "hnsw"),
    users: int = 500,
    k: int = 10,
    factors: Sequence[int] = (1, 2, 5, 10),
    noise: float = 0.3,
    data_root: str | None = None,
    affinity_weight: float | None = None,
) -> dict[str, Any]:
    """Full ranking against index + history neighbours (and the index alone) for each catalogue size and index
    kind; JSON-able. ``affinity_weight``: serve with this weight instead of the one the run chose."""
    out: dict[str, Any] = {"run": str(run_dir), "k": k, "users": users, "noise": noise, "threads": torch.get_num_threads(),
                           "results": []}
    for extra in extra_items:
        for kind in kinds:
            cfg = ServeConfig(index=IndexConfig(kind=kind), progress=False)
            t0 = time.perf_counter()
            rec = Recommender.from_run(run_dir, cfg, data_root=data_root)
            if affinity_weight is not None:
                rec.policy = replace(rec.policy, affinity_weight=float(affinity_weight))
            if rec.policy.affinity_weight == 0:
                raise InputError(f"{run_dir} scores no history affinity (its weight is 0): nothing to benchmark")
            grow = grow_catalogue(rec, extra, noise) if extra else 0.0
            hist = rec.split_histories("test", users)
            t1 = time.perf_counter()
            rec.neighbours.index  # noqa: B018 (built now, so its time is not in the first query)
            aff_build = time.perf_counter() - t1
            pooled = topk_agreement(rec, hist, k, factors=factors)
            rec.cfg = replace(cfg, history_neighbours=False)
            alone = topk_agreement(rec, hist, k, factors=factors)
            row = {"items": rec.num_items, "index": kind, "affinity_weight": rec.policy.affinity_weight,
                   "total_seconds": round(time.perf_counter() - t0, 2), "grow_seconds": round(grow, 2),
                   "item_index_seconds": round(rec.index_seconds, 2), "affinity_index_seconds": round(aff_build, 2),
                   "full_ms_per_user": pooled["exact_ms_per_user"],
                   "with_neighbours": pooled["factors"], "index_alone": alone["factors"]}
            log.info("serve %d items, %s: %s", rec.num_items, kind, row)
            out["results"].append(row)
    return out


__all__ = ["grow_catalogue", "run_serve_benchmark"]
