"""Interest discovery across ``torch.distributed`` ranks: DPC-KNN (or k-means) of a token pool that is
sharded over the ranks, without any rank holding the N x N problem or the whole pool.

    from missrec.interests.distributed import discover_interests_distributed
    res = discover_interests_distributed(my_tokens, InterestConfig(cluster_ratio=0.02))  # [n_r, D]
    res.labels      # [N] on every rank: the cluster of each token of the global pool
    res.centroids   # [C, D]

The global pool is the concatenation of the rank shards in rank order (sizes may differ, and may be 0).
Without an initialised process group, or with one rank, this is :func:`discover_interests`. Works with
any backend: tensors travel on :func:`missrec.interests.dist_comm.comm_device` (CUDA for NCCL, CPU for
gloo); clustering itself runs on CPU (FAISS on GPU when ``use_gpu`` asks for it and it has GPUs).

DPC-KNN, phase by phase (N tokens, W ranks, shard n_r, k neighbours, C clusters):

1. sizes all-gathered -> global offsets; C and k from global N exactly as :func:`discover_interests`.
2. kNN (:func:`missrec.interests.dist_knn.ring_knn`): each rank indexes its shard (FAISS flat; when
   N >= ``approx_threshold``, coarse cells trained by all ranks together and shared, so each rank scans
   only its members of a query's probed cells, see :mod:`missrec.interests.dist_index`); query blocks of
   ``chunk_rows`` rows travel the ring, every rank merges its shard's top-(k+1) into the block's running
   list by (float32 distance, global id), the list returns to the owner, which drops self and sorts by
   exact float64 distance (computed by the rank holding the neighbour). Memory O(chunk_rows * D) for
   the travelling block; traffic (W - 1) / W * N * D floats per rank.
3. density: local log-rho; the N values are all-gathered and ranked identically on every rank.
4. delta / parent: first denser token among the kNN; on the approximate path, wider ring searches for
   the rest (``peak_expand``: each shard proposes its nearest denser token among its ``ke`` nearest and
   the nearest proposal wins, so the candidates are the union of the per-shard lists); the few left get
   a distributed brute force over denser tokens
   (:func:`missrec.interests.dist_dense.nearest_denser_distributed`: each rank scans its own denser
   tokens, then a min-reduction with the single-process tie-break: smaller density position).
5. centres: ``select_centres`` on the all-gathered log-rho and delta (identical on every rank); labels by
   following the all-gathered parents, or nearest centre (centre vectors gathered in chunks); centroids
   from all-reduced float64 per-cluster sums and counts.

On the exact path the result equals the single-process one: labels, centres, rho and delta identically
(the kNN lists reproduce FAISS' own tie-break and kernel choice, see :mod:`missrec.interests.dist_knn`),
centroids to float64 rounding. Where the single process used float32 BLAS products (FAISS blocks with
``rows * D >= faiss.cvar.distance_compute_blas_threshold``, the brute-force peak search, nearest-centre
assignment) their rounding depends on the block layout, so candidates whose float32 distances tie to
rounding may be ordered differently; with exactly duplicated tokens and k + 1 >= 100 (FAISS' reservoir
collector) ties may also break differently. On the approximate path each shard's search is approximate
and the merge exact; the result is close to, not equal to, the single-process one (``recall_sample``
is not measured here).

k-means (``method="kmeans"``): an exact distributed Lloyd (:mod:`missrec.interests.dist_kmeans`); it
does not reproduce the single-process ``faiss.Kmeans`` result.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from missrec.interests import discover_interests
from missrec.interests.config import ClusterResult, InterestConfig, resolve_k, resolve_num_clusters
from missrec.interests.dist_comm import Comm, is_distributed
from missrec.interests.dist_dense import (
    assign_nearest_centre_distributed,
    mean_centroids_distributed,
    nearest_denser_distributed,
)
from missrec.interests.dist_index import ShardSearcher
from missrec.interests.dist_knn import NO_ID, ring_knn
from missrec.interests.dpc_knn import (
    assign_by_parent,
    density_rank,
    dpc_result,
    first_denser,
    select_centres,
    settle_top,
)

logger = logging.getLogger(__name__)

__all__ = ["discover_interests_distributed"]


def discover_interests_distributed(
    local_tokens: np.ndarray | torch.Tensor,
    cfg: InterestConfig | None = None,
    group: Any = None,
    *,
    chunk_rows: int | None = None,
) -> ClusterResult:
    """Cluster the pool sharded over the ranks of ``group`` (this rank's tokens ``local_tokens`` [n_r, D],
    n_r may be 0) into C interests; collective, every rank gets the same global result.

    Returns labels [N], centres [C] (global token ids), centroids [C, D] float32, rho / delta [N]
    (DPC-KNN), per-phase timings of this rank and info (``world_size``, ``shard_sizes``, bytes this rank
    sent / received, peak counts). ``chunk_rows``: query rows per travelling kNN block (None: about
    64 MiB of vectors). Raises the same
    ValueError on every rank for bad tokens (non-finite values, mismatched widths, fewer than 2 tokens,
    C > N). Falls back to :func:`discover_interests` when not distributed (or one rank).
    """
    cfg = cfg or InterestConfig()
    if not is_distributed(group):
        return discover_interests(local_tokens, cfg)
    t_all = time.perf_counter()
    comm = Comm(group)
    x, sizes = _validated_shard(comm, local_tokens)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [W + 1]
    n = int(offsets[-1])
    c = resolve_num_clusters(n, cfg)
    if cfg.method == "kmeans":
        from missrec.interests.dist_kmeans import kmeans_distributed

        res = kmeans_distributed(comm, x, offsets, c, cfg)
    else:
        res = _dpc_knn_distributed(comm, x, offsets, c, resolve_k(n, cfg.knn), cfg, chunk_rows)
    res.timings["total"] = time.perf_counter() - t_all
    res.info.update(
        distributed=True,
        world_size=comm.world,
        rank=comm.rank,
        shard_sizes=[int(v) for v in sizes],
        bytes_sent=int(comm.bytes["sent"]),
        bytes_received=int(comm.bytes["received"]),
    )
    logger.info(
        "distributed %s (rank %d/%d): %d tokens -> %d clusters in %.1fs (%s); %.1f MiB sent",
        res.method,
        comm.rank,
        comm.world,
        n,
        c,
        res.timings["total"],
        ", ".join(f"{key}={val:.1f}s" for key, val in res.timings.items() if key != "total"),
        comm.bytes["sent"] / 2**20,
    )
    return res


# ---------------------------------------------------------------------------- validation
def _validated_shard(comm: Comm, tokens: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """This rank's tokens as C-contiguous float32 [n_r, D] and all shard sizes [W]. Every rank checks
    every rank's shard (shape, width, finiteness) and raises the same error, so none is left waiting."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(tokens, dtype=np.float32)
    if x.ndim == 1 and x.size == 0:
        x = np.empty((0, 0), dtype=np.float32)
        width = -1  # an empty 1-D shard: the width comes from the other ranks
    else:
        width = x.shape[1] if x.ndim == 2 else -2
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1)) if x.ndim == 2 and x.size else np.empty(0, np.int64)
    meta = comm.all_gather_scalars(
        x.shape[0] if x.ndim >= 1 else 0, width, bad.size, bad[0] if bad.size else -1
    )
    sizes, widths, nbad, first = meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3]
    if (widths == -2).any():
        r = int(np.flatnonzero(widths == -2)[0])
        raise ValueError(f"tokens must be a 2-D [n, D] array on every rank; rank {r} passed another shape")
    known = widths[widths >= 0]
    if known.size == 0 or (known != known[0]).any():
        raise ValueError(f"token widths differ across ranks: {widths.tolist()} (-1: empty shard)")
    d = int(known[0])
    if d < 1:
        raise ValueError("tokens have width 0")
    n = int(sizes.sum())
    if n < 2:
        raise ValueError(f"need at least 2 tokens to cluster, got {n}")
    if nbad.sum():
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        r = int(np.flatnonzero(nbad)[0])
        raise ValueError(
            f"{int(nbad.sum())} token(s) contain NaN or inf; first bad row is {int(offsets[r] + first[r])}"
            f" (row {int(first[r])} of rank {r})"
        )
    if x.shape[0] == 0:
        x = np.empty((0, d), dtype=np.float32)
    return x, sizes.astype(np.int64)


# ---------------------------------------------------------------------------- DPC-KNN
def _dpc_knn_distributed(
    comm: Comm,
    x: np.ndarray,
    offsets: np.ndarray,
    c: int,
    k: int,
    cfg: InterestConfig,
    chunk_rows: int | None,
) -> ClusterResult:
    n_r, d = x.shape
    n = int(offsets[-1])
    lo = int(offsets[comm.rank])
    scale = float(d) if cfg.scale_by_dim else 1.0
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    approximate = n >= cfg.approx_threshold
    searcher = ShardSearcher(comm, x, offsets, approximate=approximate, cfg=cfg)
    ring = {"chunk_rows": chunk_rows, "show_progress": cfg.show_progress}
    local = np.arange(n_r, dtype=np.int64)
    d2, nbr = ring_knn(comm, x, offsets, local, k, searcher, **ring)  # [n_r, k] each
    short = np.flatnonzero((nbr == NO_ID).any(axis=1))  # approximate shards can leave lists short
    short_total = int(comm.all_gather_scalars(short.size).sum())
    if short_total:
        d2[short], nbr[short] = ring_knn(comm, x, offsets, short, k, searcher, exact=True, **ring)
    timings["knn"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log_rho = comm.all_gather_concat(-d2.mean(axis=1) / scale)  # [N]
    order, rank = density_rank(log_rho)
    timings["density"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows_g = lo + local
    parent = np.full(n_r, -1, dtype=np.int64)
    delta2 = np.zeros(n_r, dtype=np.float64)
    col, found = first_denser(rank, rows_g, nbr)
    parent[found] = nbr[found, col[found]]
    delta2[found] = d2[found, col[found]]
    del d2, nbr, col
    top = int(order[0])
    unresolved = np.flatnonzero(~found)
    unresolved = unresolved[unresolved != top - lo]
    counts = comm.all_gather_scalars(unresolved.size)
    info: dict[str, Any] = dict(
        searcher.info, k=k, peaks_after_knn=int(counts.sum()), short_lists=short_total
    )
    if approximate:
        for ke in cfg.peak_expand:
            if counts.sum() == 0 or ke <= k:
                continue
            wide = {"nprobe_factor": cfg.peak_nprobe_factor, "denser_rank": rank, "desc": f"peaks k={ke}"}
            ed2, ei = ring_knn(comm, x, offsets, unresolved, ke, searcher, **wide, **ring)  # [m, 1] each
            f2 = ei[:, 0] != NO_ID
            hit = unresolved[f2]
            parent[hit] = ei[f2, 0]
            delta2[hit] = ed2[f2, 0]
            unresolved = unresolved[~f2]
            counts = comm.all_gather_scalars(unresolved.size)
            info[f"peaks_after_k{ke}"] = int(counts.sum())
    if counts.sum():
        peaks = comm.all_gather_concat(lo + unresolved, counts)  # global ids, the same on every rank
        device = str(comm.device) if comm.device.type == "cuda" else "cpu"
        par, pd2 = nearest_denser_distributed(
            comm, x, offsets, peaks, order, rank, device=device, show_progress=cfg.show_progress
        )
        mine = slice(int(counts[: comm.rank].sum()), int(counts[: comm.rank + 1].sum()))
        parent[unresolved] = par[mine]
        delta2[unresolved] = pd2[mine]
    info["peaks_bruteforce"] = int(counts.sum())
    delta = comm.all_gather_concat(np.sqrt(delta2 / scale))  # [N]
    parent = comm.all_gather_concat(parent)  # [N]
    settle_top(delta, parent, top)
    timings["delta"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    centres = select_centres(log_rho, delta, order, c)
    if cfg.assign == "nearest_centre":
        labels = comm.all_gather_concat(assign_nearest_centre_distributed(comm, x, offsets, centres))
    else:
        labels = assign_by_parent(parent, centres)
    centroids, _ = mean_centroids_distributed(comm, x, labels[lo : lo + n_r], c)
    timings["assign"] = time.perf_counter() - t0
    return dpc_result(labels, centres, centroids, log_rho, delta, timings, info)
