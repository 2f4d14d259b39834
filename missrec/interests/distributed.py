"""Interest discovery across ``torch.distributed`` ranks: DPC-KNN (or k-means) of a token pool that is
sharded over the ranks; every per-token array stays sharded, so no rank holds the N x N problem, the whole
pool, or any array of the pool's size.

    from missrec.interests.distributed import discover_interests_distributed
    res = discover_interests_distributed(my_tokens, InterestConfig(cluster_ratio=0.02))  # [n_r, D]
    res.labels      # [n_r]: the cluster of each of this rank's tokens (res.info["offset"]: their first global id)
    res.centres     # [C] global token ids, the same on every rank
    res.centroids   # [C, D], the same on every rank

The global pool is the concatenation of the rank shards in rank order (sizes may differ, and may be 0).
``my_tokens`` may be a memory map (:mod:`missrec.interests.scratch`): it is read in blocks, never copied
whole. Without an initialised process group, or with one rank, this is :func:`discover_interests` (whose
labels cover the whole pool). Works with any backend: tensors travel on
:func:`missrec.interests.dist_comm.comm_device` (CUDA for NCCL, CPU for gloo); clustering runs on CPU
(FAISS on the rank's GPU when ``use_gpu`` asks for it and it has GPUs).

DPC-KNN, phase by phase (N tokens, W ranks, shard n_r, k neighbours, C clusters); what a rank holds is
O(n_r * k) for its kNN lists (in scratch files when large), O(n_r) per-token values, O(C * D) centroids:

1. sizes all-gathered -> global offsets; C and k from global N exactly as :func:`discover_interests`.
2. kNN (:func:`missrec.interests.dist_knn.ring_knn`): each rank indexes its shard (FAISS flat; when
   N >= ``approx_threshold``, coarse cells trained by all ranks together and shared, so each rank scans
   only its members of a query's probed cells, see :mod:`missrec.interests.dist_index`); query blocks of
   ``chunk_rows`` rows travel the ring, every rank merges its shard's top-(k+1) into the block's running
   list by (float32 distance, global id), the list returns to the owner, which drops self and sorts by
   exact float64 distance (computed by the rank holding the neighbour). Memory O(chunk_rows * D) for
   the travelling block; traffic (W - 1) / W * N * D floats per rank.
3. density: local log-rho; the global density maximum by one all-gather of each rank's own.
4. delta / parent: the first denser token among the kNN, the neighbours' densities fetched from their
   owners (:meth:`~missrec.interests.dist_comm.Comm.fetch_values`; denser = larger log-rho, ties to the
   smaller id, :func:`~missrec.interests.dist_centres.denser`); on the approximate path, wider ring searches
   for the rest (``peak_expand``: each shard proposes its nearest denser token among its ``ke`` nearest, the
   query's density travelling with it); the few left get a distributed brute force over denser tokens
   (:func:`missrec.interests.dist_dense.nearest_denser_distributed`).
5. centres: the top C by log rho + log delta with a distributed threshold search
   (:func:`~missrec.interests.dist_centres.select_top`), ordered like the single process; labels by
   distributed pointer jumping along the parents, or by the nearest centre (centre vectors gathered in
   chunks); centroids by sending float64 partial sums to the clusters' owners.

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
from missrec.interests.config import (
    ClusterResult,
    InterestConfig,
    _nonfinite_rows,
    resolve_k,
    resolve_num_clusters,
)
from missrec.interests.dist_centres import (
    denser,
    density_max,
    labels_by_parent,
    mean_centroids_sharded,
    order_centres,
    select_top,
)
from missrec.interests.dist_comm import Comm, is_distributed
from missrec.interests.dist_dense import assign_nearest_centre_distributed, nearest_denser_distributed
from missrec.interests.dist_index import ShardSearcher
from missrec.interests.dist_kmeans import kmeans_distributed
from missrec.interests.dist_knn import NO_ID, ring_knn
from missrec.interests.dpc_knn import dpc_result
from missrec.interests.scratch import Scratch

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
    n_r may be 0) into C interests; collective.

    Returns this rank's labels [n_r] (and rho / delta [n_r], DPC-KNN), the centres [C] (global token ids)
    and centroids [C, D] float32 (the same on every rank), per-phase timings of this rank and info
    (``world_size``, ``rank``, ``offset`` = the global id of this rank's first token, ``shard_sizes``,
    bytes this rank sent / received, peak counts, ``scratch_bytes``). ``chunk_rows``: query rows per
    travelling kNN block (None: about 64 MiB of vectors). Raises the same ValueError on every rank for bad
    tokens (non-finite values, mismatched widths, fewer than 2 tokens, C > N). Falls back to
    :func:`discover_interests` when not distributed (or one rank).
    """
    cfg = cfg or InterestConfig()
    if not is_distributed(group):
        res = discover_interests(local_tokens, cfg)
        res.info.setdefault("offset", 0)
        return res
    t_all = time.perf_counter()
    comm = Comm(group)
    x, sizes = _validated_shard(comm, local_tokens)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [W + 1]
    n = int(offsets[-1])
    c = resolve_num_clusters(n, cfg)
    with Scratch(cfg.scratch_dir) as scratch:
        if cfg.method == "kmeans":
            res = kmeans_distributed(comm, x, offsets, c, cfg)
        else:
            res = _dpc_knn_distributed(comm, x, offsets, c, resolve_k(n, cfg.knn), cfg, chunk_rows, scratch)
        scratch_bytes = scratch.file_bytes
    res.timings["total"] = time.perf_counter() - t_all
    res.info.update(
        distributed=True,
        world_size=comm.world,
        rank=comm.rank,
        offset=int(offsets[comm.rank]),
        shard_sizes=[int(v) for v in sizes],
        bytes_sent=int(comm.bytes["sent"]),
        bytes_received=int(comm.bytes["received"]),
        scratch_bytes=int(scratch_bytes),
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
    """This rank's tokens as a C-contiguous float32 [n_r, D] array (a memory map stays one) and all shard
    sizes [W]. Every rank checks every rank's shard (shape, width, finiteness, a block at a time) and raises
    the same error, so none is left waiting."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().to("cpu", torch.float32).numpy()
    x = tokens if isinstance(tokens, np.memmap) and tokens.dtype == np.float32 and tokens.flags.c_contiguous \
        else np.ascontiguousarray(tokens, dtype=np.float32)
    if x.ndim == 1 and x.size == 0:
        x = np.empty((0, 0), dtype=np.float32)
        width = -1  # an empty 1-D shard: the width comes from the other ranks
    else:
        width = x.shape[1] if x.ndim == 2 else -2
    bad = _nonfinite_rows(x) if x.ndim == 2 and x.size else np.empty(0, np.int64)
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
def _first_denser_sharded(comm: Comm, offsets: np.ndarray, log_rho: np.ndarray, d2: np.ndarray, nbr: np.ndarray,
                          chunk: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parent (first denser neighbour, global id; -1 if none) [n_r] and its squared distance [n_r] of this
    rank's tokens, from their kNN lists (``d2``, ``nbr`` [n_r, k], nearest first): the neighbours' densities
    are fetched from their owners a chunk at a time. Also returns ``found`` [n_r]."""
    n_r = log_rho.shape[0]
    lo = int(offsets[comm.rank])
    parent = np.full(n_r, -1, dtype=np.int64)
    delta2 = np.zeros(n_r, dtype=np.float64)
    found = np.zeros(n_r, dtype=bool)
    rounds = int(comm.all_gather_scalars(-(-n_r // chunk)).max())
    for r in range(rounds):
        sl = slice(r * chunk, min(n_r, (r + 1) * chunk))
        ids = np.asarray(nbr[sl])  # [m, k]
        valid = ids != NO_ID
        lr = np.full(ids.shape, -np.inf)
        lr[valid] = comm.fetch_values(log_rho, offsets, ids[valid])
        gq = lo + np.arange(sl.start, sl.stop, dtype=np.int64)
        den = valid & denser(lr, ids, log_rho[sl][:, None], gq[:, None])  # [m, k]
        col, hit = den.argmax(axis=1), den.any(axis=1)
        rows = np.flatnonzero(hit)
        parent[sl.start + rows] = ids[rows, col[rows]]
        delta2[sl.start + rows] = np.asarray(d2[sl])[rows, col[rows]]
        found[sl] = hit
    return parent, delta2, found


def _dpc_knn_distributed(
    comm: Comm,
    x: np.ndarray,
    offsets: np.ndarray,
    c: int,
    k: int,
    cfg: InterestConfig,
    chunk_rows: int | None,
    scratch: Scratch,
) -> ClusterResult:
    n_r, d = x.shape
    n = int(offsets[-1])
    lo = int(offsets[comm.rank])
    scale = float(d) if cfg.scale_by_dim else 1.0
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    approximate = n >= cfg.approx_threshold
    searcher = ShardSearcher(comm, x, offsets, approximate=approximate, cfg=cfg, scratch=scratch)
    ring = {"chunk_rows": chunk_rows, "show_progress": cfg.show_progress}
    local = np.arange(n_r, dtype=np.int64)
    d2, nbr = ring_knn(comm, x, offsets, local, k, searcher, scratch=scratch, **ring)  # [n_r, k] each
    short = np.flatnonzero((nbr == NO_ID).any(axis=1))  # approximate shards can leave lists short
    short_total = int(comm.all_gather_scalars(short.size).sum())
    if short_total:
        d2[short], nbr[short] = ring_knn(comm, x, offsets, short, k, searcher, exact=True, **ring)
    timings["knn"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log_rho = np.empty(n_r, dtype=np.float64)
    for s in range(0, n_r, 65536):
        log_rho[s : s + 65536] = -np.asarray(d2[s : s + 65536]).mean(axis=1) / scale
    top, top_lr = density_max(comm, log_rho, lo)
    timings["density"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    parent, delta2, found = _first_denser_sharded(comm, offsets, log_rho, d2, nbr)
    del d2, nbr
    unresolved = np.flatnonzero(~found)
    unresolved = unresolved[unresolved != top - lo]
    counts = comm.all_gather_scalars(unresolved.size)
    info: dict[str, Any] = dict(
        searcher.info, k=k, peaks_after_knn=int(counts.sum()), short_lists=short_total
    )
    if approximate:
        unresolved, counts = _widen_peak_search(comm, x, offsets, k, cfg, searcher, log_rho, parent, delta2,
                                                unresolved, counts, ring, info)
    del searcher
    if counts.sum():
        _bruteforce_peaks(comm, x, offsets, cfg, log_rho, parent, delta2, unresolved, counts)
    info["peaks_bruteforce"] = int(counts.sum())
    delta = np.sqrt(delta2 / scale)  # [n_r]
    others = delta.copy()
    if lo <= top < lo + n_r:
        others[top - lo] = -np.inf
        parent[top - lo] = top
    top_delta = float(comm.all_gather_concat(np.array([others.max(initial=-np.inf)])).max())
    if lo <= top < lo + n_r:
        delta[top - lo] = top_delta  # the density maximum: the largest other delta (settle_top)
    timings["delta"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with np.errstate(divide="ignore"):
        score = log_rho + np.log(delta)  # log(rho * delta); -inf where delta == 0
        top_score = top_lr + float(np.log(top_delta))
    chosen = select_top(comm, score, c)
    centres = order_centres(comm, chosen, score, lo, top, top_score)  # [C], cluster order
    del score, chosen
    if cfg.assign == "nearest_centre":
        labels = assign_nearest_centre_distributed(comm, x, offsets, centres)
    else:
        labels = labels_by_parent(comm, parent, offsets, centres)
    centroids = mean_centroids_sharded(comm, x, labels, c)
    timings["assign"] = time.perf_counter() - t0
    return dpc_result(labels, centres, centroids, log_rho, delta, timings, info)


def _widen_peak_search(comm: Comm, x: np.ndarray, offsets: np.ndarray, k: int, cfg: InterestConfig,
                       searcher: ShardSearcher, log_rho: np.ndarray, parent: np.ndarray, delta2: np.ndarray,
                       unresolved: np.ndarray, counts: np.ndarray, ring: dict[str, Any],
                       info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Approximate path: look for a denser token of each unresolved peak among its ``cfg.peak_expand``
    nearest neighbours (``parent`` and ``delta2`` updated in place); returns the peaks still unresolved and
    their counts per rank. Collective."""
    for ke in cfg.peak_expand:
        if counts.sum() == 0 or ke <= k:
            continue
        wide = {"nprobe_factor": cfg.peak_nprobe_factor, "density": log_rho, "desc": f"peaks k={ke}"}
        ed2, ei = ring_knn(comm, x, offsets, unresolved, ke, searcher, **wide, **ring)  # [m, 1] each
        f2 = ei[:, 0] != NO_ID
        hit = unresolved[f2]
        parent[hit] = ei[f2, 0]
        delta2[hit] = ed2[f2, 0]
        unresolved = unresolved[~f2]
        counts = comm.all_gather_scalars(unresolved.size)
        info[f"peaks_after_k{ke}"] = int(counts.sum())
    return unresolved, counts


def _bruteforce_peaks(comm: Comm, x: np.ndarray, offsets: np.ndarray, cfg: InterestConfig, log_rho: np.ndarray,
                      parent: np.ndarray, delta2: np.ndarray, unresolved: np.ndarray, counts: np.ndarray) -> None:
    """The exact nearest denser token of every peak still unresolved, over all ranks (``parent`` and ``delta2``
    updated in place). Collective."""
    lo = int(offsets[comm.rank])
    peaks = comm.all_gather_concat(lo + unresolved, counts)  # global ids, the same on every rank
    peak_lr = comm.all_gather_concat(log_rho[unresolved], counts)
    device = str(comm.device) if comm.device.type == "cuda" else "cpu"
    par, pd2 = nearest_denser_distributed(
        comm, x, offsets, peaks, peak_lr, log_rho, device=device, show_progress=cfg.show_progress
    )
    mine = slice(int(counts[: comm.rank].sum()), int(counts[: comm.rank + 1].sum()))
    parent[unresolved] = par[mine]
    delta2[unresolved] = pd2[mine]
