"""Exact O(N^2) DPC-KNN, for tests and benchmark checks on small pools.

Same definitions as :mod:`missrec.interests.dpc_knn` (scaled distances, log-density ordering with
index tie-break, parent-chain assignment), but every distance comes from a dense float64
``torch.cdist`` of a block of rows against all N tokens: no FAISS, no kNN shortcuts.
Memory is O(block * N); time O(N^2 D).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from missrec.interests.config import ClusterResult, as_token_matrix, resolve_k
from missrec.interests.dpc_knn import (
    assign_by_parent,
    density_rank,
    mean_centroids,
    pair_d2,
    select_centres,
    sort_neighbours,
)


def dpc_knn_exact(
    x: np.ndarray | torch.Tensor,
    num_clusters: int,
    k: float = 5,
    *,
    scale_by_dim: bool = True,
    block: int = 1024,
) -> ClusterResult:
    """Exact DPC-KNN of tokens ``x`` [N, D] into ``num_clusters`` clusters with ``k`` neighbours."""
    xn = as_token_matrix(x)
    n, d = xn.shape
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in 1..{n}, got {num_clusters}")
    k = resolve_k(n, k)
    scale = float(d) if scale_by_dim else 1.0
    timings: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    xt = torch.from_numpy(xn).double()  # [N, D]

    # kNN from full rows of the distance matrix
    nbr = np.empty((n, k), dtype=np.int64)
    for s in range(0, n, block):
        e = min(n, s + block)
        dist = torch.cdist(xt[s:e], xt)  # [b, N]
        dist[torch.arange(e - s), torch.arange(s, e)] = float("inf")  # exclude self
        nbr[s:e] = torch.topk(dist, k, dim=1, largest=False).indices.numpy()
    rows = np.arange(n, dtype=np.int64)
    d2, nbr = sort_neighbours(pair_d2(xn, rows, nbr), nbr)
    log_rho = -d2.mean(axis=1) / scale
    order, rank = density_rank(log_rho)
    timings["knn"] = time.perf_counter() - t0

    # delta: masked row minimum over all denser tokens
    t0 = time.perf_counter()
    rank_t = torch.from_numpy(rank)
    parent = np.empty(n, dtype=np.int64)
    for s in range(0, n, block):
        e = min(n, s + block)
        dist = torch.cdist(xt[s:e], xt)  # [b, N]
        not_denser = rank_t[None, :] >= rank_t[s:e, None]  # [b, N]
        dist.masked_fill_(not_denser, float("inf"))
        parent[s:e] = dist.argmin(dim=1).numpy()
    top = int(order[0])
    parent[top] = top
    delta = np.sqrt(pair_d2(xn, rows, parent[:, None])[:, 0] / scale)
    delta[top] = np.delete(delta, top).max()
    timings["delta"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    centres = select_centres(log_rho, delta, order, num_clusters)
    labels = assign_by_parent(parent, centres)
    centroids = mean_centroids(xn, labels, num_clusters)
    timings["assign"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    return ClusterResult(
        labels=labels,
        centres=centres,
        centroids=centroids,
        rho=np.exp(log_rho),
        delta=delta,
        timings=timings,
        method="dpc_knn_exact",
        info={"k": k},
    )
