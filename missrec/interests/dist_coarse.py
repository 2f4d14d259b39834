"""Coarse cells of the approximate distributed kNN, trained across ranks.

The single-process index (:class:`missrec.interests.knn.KnnSearcher`) trains ``nlist ~ 4 sqrt(N)``
k-means centroids on ``max(20 nlist, 1000)`` sampled tokens, then splits cells holding over twice the
target share of the sample. Here the sample is drawn from every shard in proportion to its size and
stays where it is: Lloyd iterations all-reduce float64 per-cell sums and counts (each rank assigns its
part), so the training work is split over the ranks; only the members of oversized cells are gathered,
and rank 0 splits them and broadcasts the new centroids. Every rank ends with the same centroids.
"""

from __future__ import annotations

import math

import numpy as np

from missrec.interests.config import InterestConfig
from missrec.interests.dist_comm import Comm
from missrec.interests.dist_dense import cluster_sums
from missrec.interests.knn import DEFAULT_CHUNK, import_faiss, seeded_kmeans


def _quotas(total: int, sizes: np.ndarray) -> np.ndarray:
    """Split ``total`` over ranks in proportion to ``sizes`` [W] (largest remainder; sums to total)."""
    share = total * sizes / max(1, int(sizes.sum()))
    q = np.floor(share).astype(np.int64)
    q[np.argsort(-(share - q), kind="stable")[: total - int(q.sum())]] += 1
    return np.minimum(q, sizes)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid [n] of each row of ``x`` [n, D] (FAISS flat search)."""
    faiss = import_faiss()
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    out = np.empty(x.shape[0], dtype=np.int64)
    for s in range(0, x.shape[0], DEFAULT_CHUNK):
        out[s : s + DEFAULT_CHUNK] = index.search(x[s : s + DEFAULT_CHUNK], 1)[1][:, 0]
    return out


def _refill_empty(centroids: np.ndarray, counts: np.ndarray, eps: float = 1e-4) -> None:
    """Give each empty cell half of the currently largest one: the two centroids become symmetric
    perturbations of it (in place; deterministic, the same on every rank)."""
    counts = counts.astype(np.float64).copy()
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    for e in np.flatnonzero(counts == 0):
        big = int(np.argmax(counts))
        if counts[big] < 2:
            break
        centroids[e] = centroids[big] * (1 + eps * sign)
        centroids[big] = centroids[big] * (1 - eps * sign)
        counts[e] = counts[big] = counts[big] / 2


def train_global_centroids(
    comm: Comm,
    x: np.ndarray,
    offsets: np.ndarray,
    cfg: InterestConfig,
    *,
    niter: int = 10,
    split_rounds: int = 4,
    train_per_list: int = 20,
) -> np.ndarray:
    """Coarse-cell centroids [nlist', D] float32 of the pool sharded as ``offsets`` [W + 1] (this rank:
    ``x``), the same on every rank. Collective. ``nlist = cfg.nlist or 4 sqrt(N)`` (at most N / 4)
    trained on ``max(train_per_list * nlist, 1000)`` seeded samples; oversized cells then split."""
    n, d = int(offsets[-1]), x.shape[1]
    nlist = max(1, min(int(cfg.nlist or round(4 * math.sqrt(n))), n // 4))
    ntrain = min(n, max(train_per_list * nlist, 1000))
    quota = _quotas(ntrain, np.diff(offsets))
    sample_offsets = np.concatenate([[0], np.cumsum(quota)]).astype(np.int64)
    rng = np.random.default_rng([int(cfg.seed), 17, comm.rank])
    sample = np.ascontiguousarray(x[np.sort(rng.choice(x.shape[0], int(quota[comm.rank]), replace=False))])
    start = np.sort(np.random.default_rng(int(cfg.seed)).choice(ntrain, nlist, replace=False))
    centroids = comm.fetch_rows(sample, sample_offsets, start).astype(np.float32)  # [nlist, D]
    for _ in range(niter):
        sums, counts = cluster_sums(sample, _nearest(sample, centroids), nlist)
        sums, counts = comm.all_reduce_sum(sums), comm.all_reduce_sum(counts)
        filled = counts > 0
        centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        _refill_empty(centroids, counts)
    target = ntrain / nlist
    for r in range(split_rounds):
        lab = _nearest(sample, centroids)
        counts = comm.all_reduce_sum(np.bincount(lab, minlength=centroids.shape[0]).astype(np.int64))
        big = np.flatnonzero(counts > max(2.0 * target, 8))
        if big.size == 0:
            break
        inside = np.isin(lab, big)
        members = comm.all_gather_concat(sample[inside])  # the members of oversized cells, [m, D]
        member_cell = comm.all_gather_concat(lab[inside])
        new = None
        if comm.rank == 0:
            keep = np.ones(centroids.shape[0], dtype=bool)
            keep[big] = False
            subs = [
                seeded_kmeans(
                    members[member_cell == c], math.ceil(counts[c] / target), cfg.seed + r * 7919 + c
                )
                for c in big
            ]
            new = np.concatenate([centroids[keep], *subs]).astype(np.float32)
        centroids = comm.broadcast_rows(new, d, np.float32)
    return np.ascontiguousarray(centroids)
