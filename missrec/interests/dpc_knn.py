"""Interest discovery with DPC-KNN (density peaks clustering, k-nearest-neighbour density) on FAISS.

Definitions (shared with the exact O(N^2) reference in :mod:`missrec.interests.reference`):

* distances are Euclidean distances divided by ``sqrt(D)`` (as the official MISSRec code does,
  ``torch.cdist(x, x) / D ** 0.5``); ``scale_by_dim=False`` drops the division;
* ``rho_i = exp(-mean_j d_ij^2)`` over the ``k`` nearest neighbours of ``i`` (``i`` itself excluded).
  Densities are ordered by ``log rho`` (no underflow); ties go to the smaller token index, a
  deterministic stand-in for the official ``+ rand * 1e-6`` tie-breaker;
* ``delta_i`` = distance to the nearest denser token (its "parent"); for the global density maximum
  ``delta`` = the largest ``delta`` of the other tokens (the official code uses the largest pairwise
  distance; both make the maximum the top-scoring token);
* centres = top-``C`` tokens by ``rho * delta`` (ranked as ``log rho + log delta``, ties to the smaller
  index); the global density maximum is always a centre (it replaces the last one if needed);
* every other token joins the cluster of its parent, so each parent chain ends at a centre.
  (The official MISSRec/TCFormer code assigns each token to its nearest centre instead.)
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from missrec.interests.config import ClusterResult, InterestConfig
from missrec.interests.exact_knn import knn_recall
from missrec.interests.knn import KnnSearcher, _progress

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- shared primitives
def pair_d2(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, budget: int = 1 << 23) -> np.ndarray:
    """Exact float64 squared distances ``|x[rows[i]] - x[cols[i, j]]|^2``: rows [n], cols [n, m] -> [n, m]."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64).reshape(len(rows), -1)
    n, m = cols.shape
    out = np.empty((n, m), dtype=np.float64)
    step = max(1, budget // max(1, m * x.shape[1]))
    for s in range(0, n, step):
        a = x[rows[s : s + step]].astype(np.float64)[:, None, :]  # [c, 1, D]
        b = x[cols[s : s + step]].astype(np.float64)  # [c, m, D]
        diff = b - a
        out[s : s + step] = np.einsum("cmd,cmd->cm", diff, diff)
    return out


def sort_neighbours(d2: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row of (d2 [n, k], idx [n, k]) by distance, ties by index."""
    order = np.lexsort((idx, d2), axis=-1) if d2.size else np.zeros_like(idx)
    return np.take_along_axis(d2, order, 1), np.take_along_axis(idx, order, 1)


def density_rank(log_rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``order`` [N] token ids by decreasing density (ties: smaller id first) and ``rank`` [N] = inverse."""
    n = log_rho.shape[0]
    order = np.lexsort((np.arange(n), -log_rho))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return order, rank


def first_denser(rank: np.ndarray, rows: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row (neighbours idx [n, k] sorted by distance): column of the first denser neighbour
    and whether there is one. Returns (col [n] int64, found [n] bool)."""
    denser = rank[idx] < rank[rows][:, None]  # [n, k]
    return denser.argmax(axis=1), denser.any(axis=1)


def select_centres(log_rho: np.ndarray, delta: np.ndarray, order: np.ndarray, c: int) -> np.ndarray:
    """Top-``c`` tokens by ``rho * delta`` (ties: smaller id), the density maximum forced in; [c] int64."""
    n = log_rho.shape[0]
    with np.errstate(divide="ignore"):
        score = log_rho + np.log(delta)  # log(rho * delta); -inf where delta == 0
    ranked = np.lexsort((np.arange(n), -score))
    centres = ranked[:c].copy()
    top = order[0]
    if not np.any(centres == top):
        centres[-1] = top
        centres = centres[np.lexsort((centres, -score[centres]))]
    return centres.astype(np.int64)


def assign_by_parent(parent: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Labels [N] in 0..C-1: follow ``parent`` (a denser token; the density maximum points to itself)
    until a centre. Pointer jumping, O(N log depth)."""
    root = parent.astype(np.int64, copy=True)
    root[centres] = centres
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    label_of = np.full(parent.shape[0], -1, dtype=np.int64)
    label_of[centres] = np.arange(centres.shape[0])
    labels = label_of[root]
    if (labels < 0).any():  # pragma: no cover - would mean a chain that skips every centre
        raise RuntimeError("parent chain did not end at a centre")
    return labels


def assign_nearest_centre(x: np.ndarray, centres: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Labels [N]: the nearest centre token of each token (the official MISSRec/TCFormer assignment),
    searched in chunks against the C centres (never N x N). ``x`` [N, D], ``centres`` [C]."""
    cx = torch.from_numpy(np.ascontiguousarray(x[centres], dtype=np.float32))  # [C, D]
    cn = (cx * cx).sum(1)  # [C]
    labels = np.empty(x.shape[0], dtype=np.int64)
    for s in range(0, x.shape[0], chunk):
        q = torch.from_numpy(np.ascontiguousarray(x[s : s + chunk], dtype=np.float32))  # [Q, D]
        d2 = cn[None, :] - 2.0 * (q @ cx.T)  # [Q, C], up to the constant |q|^2
        labels[s : s + q.shape[0]] = d2.argmin(1).numpy()
    labels[centres] = np.arange(centres.shape[0])  # a centre is always its own cluster
    return labels


def mean_centroids(x: np.ndarray, labels: np.ndarray, c: int, chunk: int = 65536) -> np.ndarray:
    """Mean token of each cluster, [C, D] float32 (zeros for an empty cluster)."""
    acc = torch.zeros(c, x.shape[1], dtype=torch.float64)
    lab = torch.from_numpy(labels)
    for s in range(0, x.shape[0], chunk):
        acc.index_add_(0, lab[s : s + chunk], torch.from_numpy(x[s : s + chunk]).double())
    counts = torch.bincount(lab, minlength=c).clamp_min(1).double()
    return (acc / counts[:, None]).float().numpy()


def settle_top(delta: np.ndarray, parent: np.ndarray, top: int) -> None:
    """The density maximum ``top`` has no denser token: its δ becomes the largest other δ and it is
    its own parent (in place; ``delta``, ``parent`` [N])."""
    others = np.ones(delta.shape[0], dtype=bool)
    others[top] = False
    delta[top] = delta[others].max()
    parent[top] = top


def dpc_result(labels: np.ndarray, centres: np.ndarray, centroids: np.ndarray, log_rho: np.ndarray,
               delta: np.ndarray, timings: dict[str, float], info: dict[str, Any]) -> ClusterResult:
    """The :class:`ClusterResult` of a DPC-KNN run (ρ = exp(log ρ))."""
    with np.errstate(under="ignore"):
        rho = np.exp(log_rho)
    return ClusterResult(labels=labels, centres=centres, centroids=centroids, rho=rho, delta=delta,
                         timings=timings, method="dpc_knn", info=info)


# ---------------------------------------------------------------------------- restricted search
def nearest_denser_bruteforce(
    x: np.ndarray,
    peaks: np.ndarray,
    order: np.ndarray,
    rank: np.ndarray,
    *,
    device: str = "cpu",
    chunk_q: int = 1024,
    chunk_p: int = 32768,
    show_progress: bool = False,
) -> np.ndarray:
    """Exact nearest denser token of each token in ``peaks`` [P] (none may be the density maximum).

    Only the density-sorted prefix ``order[:rank[p]]`` is scanned for peak ``p``: peaks are processed
    in rank order in chunks of ``chunk_q``, each against prefix blocks of ``chunk_p`` tokens; work is
    sum(rank of peaks) * D, memory O(chunk_q * chunk_p + max rank * D). Returns parents [P] int64.
    """
    peaks = np.asarray(peaks, dtype=np.int64)
    pk = peaks[np.argsort(rank[peaks], kind="stable")]
    pr = rank[pk]
    if pr.size and pr[0] == 0:
        raise ValueError("the density maximum has no denser token")
    limit = int(pr[-1]) if pr.size else 0
    mu = torch.from_numpy(x[order[: min(limit, 65536)]].mean(0, dtype=np.float64)).float()
    # density-sorted, centred copy of the prefix any peak needs: [limit, D] (centring helps float32)
    xs = torch.from_numpy(x[order[:limit]]).to(device) - mu.to(device)
    xs_norm = (xs * xs).sum(1)  # [limit]
    best_pos = np.empty(pk.shape[0], dtype=np.int64)
    bar = _progress(pk.shape[0], "delta (peaks)", show_progress)
    for qs in range(0, pk.shape[0], chunk_q):
        qid = pk[qs : qs + chunk_q]
        qr = torch.from_numpy(pr[qs : qs + chunk_q]).to(device)  # [q]
        q = torch.from_numpy(x[qid]).to(device) - mu.to(device)  # [q, D]
        qn = (q * q).sum(1)
        best = torch.full((len(qid),), float("inf"), device=device)
        arg = torch.zeros(len(qid), dtype=torch.int64, device=device)
        hi = int(qr.max())
        lo = int(qr.min())
        for ps in range(0, hi, chunk_p):
            pe = min(hi, ps + chunk_p)
            d2 = torch.addmm(
                qn[:, None] + xs_norm[None, ps:pe], q, xs[ps:pe].T, beta=1.0, alpha=-2.0
            )  # [q, b]
            if pe > lo:  # some candidates are not denser than some queries
                pos = torch.arange(ps, pe, device=device)
                d2.masked_fill_(pos[None, :] >= qr[:, None], float("inf"))
            v, j = d2.min(1)
            upd = v < best
            best = torch.where(upd, v, best)
            arg = torch.where(upd, j + ps, arg)
        best_pos[qs : qs + len(qid)] = arg.cpu().numpy()
        bar.update(len(qid))
    bar.close()
    parents = np.empty(peaks.shape[0], dtype=np.int64)
    parents[np.argsort(rank[peaks], kind="stable")] = order[best_pos]
    return parents


# ---------------------------------------------------------------------------- DPC-KNN
def dpc_knn(x: np.ndarray, num_clusters: int, k: int, cfg: InterestConfig | None = None) -> ClusterResult:
    """DPC-KNN over tokens ``x`` [N, D] float32 (validated, see :func:`as_token_matrix`) into C clusters."""
    cfg = cfg or InterestConfig()
    n, d = x.shape
    scale = float(d) if cfg.scale_by_dim else 1.0
    timings: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    approximate = n >= cfg.approx_threshold
    searcher = KnnSearcher(
        x,
        approximate=approximate,
        method=cfg.approx_method,
        nprobe=cfg.nprobe,
        nlist=cfg.nlist,
        use_gpu=cfg.use_gpu,
        seed=cfg.seed,
        show_progress=cfg.show_progress,
    )
    _, nbr = searcher.search_rows(None, k)  # [N, k]
    rows_all = np.arange(n, dtype=np.int64)
    d2, nbr = sort_neighbours(pair_d2(x, rows_all, nbr), nbr)  # exact float64 distances, [N, k]
    timings["knn"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log_rho = -d2.mean(axis=1) / scale  # [N]
    order, rank = density_rank(log_rho)
    timings["density"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    parent = np.full(n, -1, dtype=np.int64)
    delta2 = np.zeros(n, dtype=np.float64)
    col, found = first_denser(rank, rows_all, nbr)
    parent[found] = nbr[found, col[found]]
    delta2[found] = d2[found, col[found]]
    del d2, nbr, col
    top = int(order[0])
    unresolved = np.flatnonzero(~found)
    unresolved = unresolved[unresolved != top]
    info: dict[str, Any] = dict(searcher.info, k=k, peaks_after_knn=int(unresolved.size))
    if approximate:
        unresolved = _widen_peak_search(x, k, cfg, searcher, rank, parent, delta2, unresolved, info)
    if cfg.recall_sample > 0 and approximate:
        t_r = time.perf_counter()
        info["knn_recall"] = knn_recall(searcher, k, cfg.recall_sample, cfg.seed)
        info["recall_seconds"] = time.perf_counter() - t_r  # not counted in the timings
        t0 += info["recall_seconds"]
        t_all += info["recall_seconds"]
    searcher.close()
    del searcher
    if unresolved.size:
        device = "cuda" if (info.get("gpu") and torch.cuda.is_available()) else "cpu"
        par = nearest_denser_bruteforce(
            x, unresolved, order, rank, device=device, show_progress=cfg.show_progress
        )
        parent[unresolved] = par
        delta2[unresolved] = pair_d2(x, unresolved, par[:, None])[:, 0]
    info["peaks_bruteforce"] = int(unresolved.size)
    delta = np.sqrt(delta2 / scale)  # [N]
    settle_top(delta, parent, top)
    timings["delta"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    centres = select_centres(log_rho, delta, order, num_clusters)
    if cfg.assign == "nearest_centre":
        labels = assign_nearest_centre(x, centres)
    else:
        labels = assign_by_parent(parent, centres)
    centroids = mean_centroids(x, labels, num_clusters)
    timings["assign"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    logger.info(
        "dpc_knn: %d tokens -> %d clusters in %.1fs (%s)",
        n,
        num_clusters,
        timings["total"],
        ", ".join(f"{key}={val:.1f}s" for key, val in timings.items() if key != "total"),
    )
    return dpc_result(labels, centres, centroids, log_rho, delta, timings, info)


def _widen_peak_search(x: np.ndarray, k: int, cfg: InterestConfig, searcher: KnnSearcher, rank: np.ndarray,
                       parent: np.ndarray, delta2: np.ndarray, unresolved: np.ndarray,
                       info: dict[str, Any]) -> np.ndarray:
    """Approximate path: look for a denser token of each unresolved peak among its ``cfg.peak_expand``
    nearest neighbours (``parent`` and ``delta2`` updated in place); returns the peaks still unresolved."""
    for ke in cfg.peak_expand:
        if unresolved.size == 0 or ke <= k:
            continue
        wide = searcher.nprobe * cfg.peak_nprobe_factor
        _, ei = searcher.search_rows(unresolved, ke, desc=f"peaks k={ke}", nprobe=wide)
        ed2, ei = sort_neighbours(pair_d2(x, unresolved, ei), ei)
        c2, f2 = first_denser(rank, unresolved, ei)
        hit = unresolved[f2]
        parent[hit] = ei[f2, c2[f2]]
        delta2[hit] = ed2[f2, c2[f2]]
        unresolved = unresolved[~f2]
        info[f"peaks_after_k{ke}"] = int(unresolved.size)
    return unresolved
