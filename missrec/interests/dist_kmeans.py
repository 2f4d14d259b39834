"""Distributed k-means interests: an exact Lloyd iteration over a pool sharded across ranks.

Seeded start (C distinct tokens drawn with ``cfg.seed`` from the global pool, gathered from their
owners), then ``cfg.kmeans_niter`` rounds of: each rank assigns its tokens to the nearest centroid,
float64 per-cluster sums and counts are all-reduced, non-empty centroids move to their means (empty
ones stay). Memory O(C * D) per rank, no token leaves its rank except the C start tokens. Unlike the
single-process ``faiss.Kmeans`` (which subsamples at most 256 points per centroid for training) every
token counts, so the two results differ; both are valid k-means solutions.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from missrec.interests.config import ClusterResult, InterestConfig
from missrec.interests.dist_comm import Comm
from missrec.interests.dist_dense import cluster_sums


def _nearest(x: np.ndarray, cen: torch.Tensor, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row of ``x`` [n, D]: (labels [n] int64, squared distances [n] float32)."""
    cn = (cen * cen).sum(1)
    labels = np.empty(x.shape[0], dtype=np.int64)
    dist2 = np.empty(x.shape[0], dtype=np.float32)
    for s in range(0, x.shape[0], chunk):
        q = torch.from_numpy(x[s : s + chunk])
        d2 = torch.addmm(cn[None, :], q, cen.T, alpha=-2.0)  # [Q, C] up to |q|^2
        v, j = d2.min(1)
        labels[s : s + len(q)] = j.numpy()
        dist2[s : s + len(q)] = (v + (q * q).sum(1)).clamp_min(0).numpy()
    return labels, dist2


def kmeans_distributed(
    comm: Comm, x: np.ndarray, offsets: np.ndarray, num_clusters: int, cfg: InterestConfig
) -> ClusterResult:
    """k-means of the sharded pool (this rank: ``x`` [n_r, D], global rows ``offsets[r]:offsets[r+1]``)
    into ``num_clusters``. Collective; every rank gets its labels [n_r], and the same centres [C] (the member nearest each
    centroid, -1 if empty, ties to the smaller id), centroids [C, D] (member means; the k-means centroid
    when empty)."""
    n = int(offsets[-1])
    lo = int(offsets[comm.rank])
    c = int(num_clusters)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    start = np.sort(np.random.default_rng(cfg.seed).choice(n, c, replace=False))
    cen = torch.from_numpy(comm.fetch_rows(x, offsets, start)).double()  # [C, D]
    objective = None
    for _ in range(int(cfg.kmeans_niter)):
        labels, dist2 = _nearest(x, cen.float())
        sums, counts = cluster_sums(x, labels, c)
        sums = torch.from_numpy(comm.all_reduce_sum(sums))
        counts = torch.from_numpy(comm.all_reduce_sum(counts))
        objective = float(comm.all_reduce_sum(np.array([dist2.sum(dtype=np.float64)]))[0])
        filled = counts > 0
        cen[filled] = sums[filled] / counts[filled, None].double()
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    km_centroids = cen.float()
    labels, dist2 = _nearest(x, km_centroids)
    # nearest member of each cluster: per rank, then the smallest (distance, global id) over ranks
    best_d = np.full(c, np.inf)
    best_i = np.full(c, np.iinfo(np.int64).max, dtype=np.int64)
    if labels.size:
        srt = np.lexsort((dist2, labels))
        first = np.ones(len(srt), dtype=bool)
        first[1:] = labels[srt][1:] != labels[srt][:-1]
        best_d[labels[srt][first]] = dist2[srt][first]
        best_i[labels[srt][first]] = lo + srt[first]
    both = comm.all_gather_list(
        np.stack([best_d, best_i.astype(np.float64)])[None], np.ones(comm.world, np.int64)
    )
    cand_d = np.stack([b[0, 0] for b in both])  # [W, C]
    cand_i = np.stack([b[0, 1] for b in both])
    win = np.lexsort((cand_i, cand_d), axis=0)[0]
    cols = np.arange(c)
    centres = np.where(np.isfinite(cand_d[win, cols]), cand_i[win, cols], -1).astype(np.int64)
    sums, counts = cluster_sums(x, labels, c)
    sums = comm.all_reduce_sum(sums)
    counts = comm.all_reduce_sum(counts)
    centroids = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    empty = counts == 0
    centroids[empty] = km_centroids.numpy()[empty]
    timings["assign"] = time.perf_counter() - t0
    return ClusterResult(
        labels=labels,
        centres=centres,
        centroids=centroids,
        timings=timings,
        method="kmeans",
        info={"niter": int(cfg.kmeans_niter), "objective": objective, "empty_clusters": int(empty.sum())},
    )
