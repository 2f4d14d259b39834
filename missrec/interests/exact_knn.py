"""Brute-force kNN: the exact neighbours of a few rows, and the recall of an approximate search against them.

Used where an approximate index comes back short of neighbours (:mod:`missrec.interests.knn`) and to report an
index's recall (``InterestConfig.recall_sample``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from missrec.interests.knn import KnnSearcher


def exact_knn_sample(
    x: np.ndarray, rows: np.ndarray, k: int, budget: int = 1 << 25
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force kNN (self excluded) of rows ``rows`` of ``x`` [N, D]: ``(dist2 [n, k], idx [n, k])``.

    Memory O(budget) floats for the [chunk, N] distance tiles.
    """
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    norms = (xt * xt).sum(1)  # [N]
    chunk = max(1, budget // xt.shape[0])
    outs_d, outs_i = [], []
    if len(rows) == 0:
        return np.empty((0, k), dtype=np.float32), np.empty((0, k), dtype=np.int64)
    for s in range(0, len(rows), chunk):
        r = torch.from_numpy(np.asarray(rows[s : s + chunk], dtype=np.int64))
        q = xt[r]  # [c, D]
        d2 = norms[r, None] + norms[None, :] - 2.0 * (q @ xt.T)  # [c, N]
        d2[torch.arange(len(r)), r] = float("inf")
        v, i = torch.topk(d2, k, dim=1, largest=False)
        outs_d.append(v.clamp_min_(0).numpy())
        outs_i.append(i.numpy())
    return np.concatenate(outs_d), np.concatenate(outs_i)


def knn_recall(searcher: KnnSearcher, k: int, sample: int = 1000, seed: int = 0) -> float:
    """Recall@k of ``searcher`` against brute force on ``sample`` random rows (1.0 for a flat index)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(searcher.n, min(sample, searcher.n), replace=False))
    _, approx = searcher.search_rows(rows, k, desc="recall")
    _, exact = exact_knn_sample(searcher.x, rows, approx.shape[1])
    hits = sum(len(np.intersect1d(a, e)) for a, e in zip(approx, exact))
    return hits / float(exact.size)
