"""How often index retrieval + exact re-ranking gives the model's exact full-ranking top-k, and its cost.

For each candidate factor ``f`` the recommender fetches ``k * f`` candidates from the index and
re-ranks them exactly. With an exact (flat) index the re-ranked top-k contains every exact top-k item
that made it into the pool, so the overlap can only grow with ``f`` and is complete once the pool
covers the catalogue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from missrec.serve.recommend import Recommender

log = logging.getLogger(__name__)


def topk_agreement(
    rec: Recommender,
    histories: Sequence[Sequence[int]],
    k: int = 10,
    factors: Sequence[int] = (1, 2, 5, 10),
    exclude_history: bool = False,
) -> dict[str, Any]:
    """Compare index+re-rank top-``k`` with the exact full ranking over ``histories`` (0-based indices).

    Returns ``{"k", "users", "exact_ms_per_user", "factors": {f: {"equal", "overlap", "ms_per_user"}}}``:
    ``equal`` = fraction of users whose top-k lists are identical (same items, same order), ``overlap`` =
    mean fraction of the exact top-k found; times are wall-clock per user, batched queries."""
    if not histories:
        raise ValueError("topk_agreement needs at least one history")
    n = len(histories)
    t0 = time.perf_counter()
    ref, _ = rec.topk(histories, k, exclude_history=exclude_history, full_ranking=True)
    exact_ms = 1000 * (time.perf_counter() - t0) / n
    out: dict[str, Any] = {"k": k, "users": n, "exact_ms_per_user": round(exact_ms, 4), "factors": {}}
    for f in factors:
        t0 = time.perf_counter()
        got, _ = rec.topk(histories, k, exclude_history=exclude_history, candidate_factor=int(f))
        ms = 1000 * (time.perf_counter() - t0) / n
        equal = float(np.mean(np.all(got == ref, axis=1)))
        overlap = float(np.mean([len(set(g[g >= 0]) & set(r[r >= 0])) / max(int((r >= 0).sum()), 1)
                                 for g, r in zip(got, ref, strict=True)]))
        out["factors"][int(f)] = {"equal": round(equal, 4), "overlap": round(overlap, 4), "ms_per_user": round(ms, 4)}
        log.info("top-%d agreement, candidate factor %d: equal %.4f, overlap %.4f, %.3f ms/user",
                 k, f, equal, overlap, ms)
    return out


__all__ = ["topk_agreement"]
