"""Distributed brute-force pieces of DPC-KNN over a sharded pool: exact pair distances computed where the
vectors live, the nearest denser token of the few peaks the kNN lists leave unresolved, nearest-centre
assignment, and cluster means.

Each mirrors its single-process counterpart in :mod:`missrec.interests.dpc_knn` (same float32 formulas,
same centring, same tie-breaks), evaluated where the vectors live; the per-rank winners are then reduced
with the single-process tie-break. Float32 BLAS products round according to the block layout, so two
candidates whose float32 distances tie to rounding may be ordered differently than in one process.
"""

from __future__ import annotations

import numpy as np
import torch

from missrec.interests.dist_centres import denser
from missrec.interests.dist_comm import Comm
from missrec.interests.dpc_knn import pair_d2
from missrec.interests.knn import _progress


def pair_d2_external(
    q: np.ndarray, x: np.ndarray, qi: np.ndarray, lid: np.ndarray, budget: int = 1 << 22
) -> np.ndarray:
    """Exact float64 squared distances between queries ``q[qi]`` and shard rows ``x[lid]`` (pairs, [n])
    with :func:`pair_d2` (bit-identical to the single-process values)."""
    out = np.empty(len(qi), dtype=np.float64)
    step = max(1, budget // max(1, x.shape[1]))
    for s in range(0, len(qi), step):
        a, b = qi[s : s + step], lid[s : s + step]
        m = len(a)
        stacked = np.concatenate([q[a], x[b]])  # [2m, D]
        rows = np.arange(m, dtype=np.int64)
        out[s : s + m] = pair_d2(stacked, rows, (rows + m)[:, None])[:, 0]
    return out


def _denser_count(neg_lr: np.ndarray, gid: np.ndarray, q_lr: np.ndarray, q_gid: np.ndarray) -> np.ndarray:
    """How many of the tokens sorted densest first (``neg_lr`` = -log-density ascending, ties by ``gid``
    ascending) are denser than each query (``q_lr``, ``q_gid``): [q]."""
    left = np.searchsorted(neg_lr, -q_lr, side="left")
    right = np.searchsorted(neg_lr, -q_lr, side="right")
    out = left.copy()
    for i in np.flatnonzero(right > left):  # equal log-densities: the smaller ids are the denser
        out[i] += np.searchsorted(gid[left[i] : right[i]], q_gid[i])
    return out


def nearest_denser_distributed(
    comm: Comm,
    x: np.ndarray,
    offsets: np.ndarray,
    peaks: np.ndarray,
    peak_lr: np.ndarray,
    log_rho: np.ndarray,
    *,
    device: str = "cpu",
    chunk_q: int = 1024,
    chunk_p: int = 32768,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest denser token of each global token id in ``peaks`` [P] (the same on every rank, with
    their log-densities ``peak_lr`` [P]; none may be the density maximum), as
    :func:`missrec.interests.dpc_knn.nearest_denser_bruteforce`. ``log_rho`` [n_r]: this rank's densities.

    Collective. Peaks are taken densest first in chunks of ``chunk_q``; their vectors are gathered from
    the owners; each rank scans its own tokens denser than the chunk's least dense peak, in blocks of
    ``chunk_p`` read from ``x`` (a memory map is read, never copied whole), centred by the mean of the
    ``min(limit, 65536)`` densest tokens of the pool (``limit``: tokens denser than the least dense peak),
    and proposes its best (float32 distance, density, float64 distance); the smallest distance wins, ties
    to the denser token as in one process. Returns parents [P] int64 and their float64 squared distances.
    """
    peaks = np.asarray(peaks, dtype=np.int64)
    peak_lr = np.asarray(peak_lr, dtype=np.float64)
    lo = int(offsets[comm.rank])
    gid = lo + np.arange(log_rho.shape[0], dtype=np.int64)
    srt = np.lexsort((peaks, -peak_lr))  # densest first
    pk, plr = peaks[srt], peak_lr[srt]
    # my tokens denser than the least dense peak, densest first
    if len(pk):
        cand = np.flatnonzero(denser(log_rho, gid, plr[-1], pk[-1]))
    else:
        cand = np.empty(0, dtype=np.int64)
    cand = cand[np.lexsort((gid[cand], -log_rho[cand]))]
    c_neg, c_gid = -log_rho[cand], gid[cand]
    limit = int(comm.all_reduce_sum(np.array([cand.size], dtype=np.int64))[0])
    if len(pk) and int(comm.all_reduce_sum(np.array([int(denser(log_rho, gid, plr[0], pk[0]).sum())]))[0]) == 0:
        raise ValueError("the density maximum has no denser token")
    mu = _pool_centre(comm, x, log_rho, gid, cand, min(limit, 65536)).to(device)  # [D]
    parents = np.empty(len(pk), dtype=np.int64)
    pd2 = np.empty(len(pk), dtype=np.float64)
    bar = _progress(len(pk), "delta (peaks)", show_progress)
    for qs in range(0, len(pk), chunk_q):
        qid, q_lr = pk[qs : qs + chunk_q], plr[qs : qs + chunk_q]
        qv = comm.fetch_rows(x, offsets, qid)  # [q, D] on every rank
        cnt = torch.from_numpy(_denser_count(c_neg, c_gid, q_lr, qid)).to(device)  # my candidates denser than each
        best_np, arg_np = _scan_candidates(x, cand, torch.from_numpy(qv).to(device) - mu, mu, cnt, chunk_p)
        found = arg_np >= 0
        w_lr = np.full(len(qid), -np.inf)
        w_gid = np.full(len(qid), np.inf)
        w_lr[found] = log_rho[cand[arg_np[found]]]
        w_gid[found] = gid[cand[arg_np[found]]]
        exact = np.full(len(qid), np.inf, dtype=np.float64)
        if found.any():
            exact[found] = pair_d2_external(qv, x, np.flatnonzero(found), cand[arg_np[found]])
        props = np.stack([best_np, w_lr, w_gid, exact])  # [4, q]
        allp = comm.all_gather_list(props[None], np.ones(comm.world, dtype=np.int64))
        bests, lrs, gids, exacts = (np.stack([a[0, i] for a in allp]) for i in range(4))  # [W, q] each
        win = np.lexsort((gids, -lrs, bests), axis=0)[0]  # smallest distance, then the denser token
        cols = np.arange(len(qid))
        if not np.all(np.isfinite(bests[win, cols])):  # pragma: no cover - a peak always has a denser token
            raise RuntimeError("no denser token found for some peak")
        parents[qs : qs + len(qid)] = gids[win, cols].astype(np.int64)
        pd2[qs : qs + len(qid)] = exacts[win, cols]
        bar.update(len(qid))
    bar.close()
    out_par = np.empty(len(peaks), dtype=np.int64)
    out_d2 = np.empty(len(peaks), dtype=np.float64)
    out_par[srt] = parents
    out_d2[srt] = pd2
    return out_par, out_d2


def assign_nearest_centre_distributed(
    comm: Comm,
    x: np.ndarray,
    offsets: np.ndarray,
    centres: np.ndarray,
    *,
    chunk: int = 16384,
    chunk_c: int = 16384,
) -> np.ndarray:
    """Labels [n_r] of this rank's tokens: the nearest of the global centre tokens ``centres`` [C] (the
    same on every rank), as :func:`missrec.interests.dpc_knn.assign_nearest_centre`. Collective.

    Centre vectors are gathered ``chunk_c`` at a time (memory O(chunk_c * D)); ties go to the smaller
    centre index, as the single-process argmin does."""
    n = x.shape[0]
    lo = int(offsets[comm.rank])
    best = torch.full((n,), float("inf"))
    labels = torch.zeros(n, dtype=torch.int64)
    for cs in range(0, len(centres), chunk_c):
        cx = torch.from_numpy(comm.fetch_rows(x, offsets, centres[cs : cs + chunk_c]))  # [c, D]
        cn = (cx * cx).sum(1)
        for s in range(0, n, chunk):
            q = torch.from_numpy(np.ascontiguousarray(x[s : s + chunk], dtype=np.float32))
            d2 = cn[None, :] - 2.0 * (q @ cx.T)  # [Q, c], up to the constant |q|^2
            v, j = d2.min(1)
            upd = v < best[s : s + chunk]
            best[s : s + chunk] = torch.where(upd, v, best[s : s + chunk])
            labels[s : s + chunk] = torch.where(upd, j + cs, labels[s : s + chunk])
    out = labels.numpy()
    mine = (centres >= lo) & (centres < lo + n)
    out[centres[mine] - lo] = np.flatnonzero(mine)  # a centre is always its own cluster
    return out


def cluster_sums(
    x: np.ndarray, labels: np.ndarray, c: int, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 sums [C, D] and counts [C] of this rank's tokens ``x`` [n, D] with ``labels`` [n]."""
    acc = torch.zeros(c, x.shape[1], dtype=torch.float64)
    lab = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    for s in range(0, x.shape[0], chunk):
        acc.index_add_(0, lab[s : s + chunk], torch.from_numpy(x[s : s + chunk]).double())
    counts = np.bincount(labels, minlength=c).astype(np.int64)
    return acc.numpy(), counts


def _pool_centre(comm: Comm, x: np.ndarray, log_rho: np.ndarray, gid: np.ndarray, cand: np.ndarray,
                 m: int) -> torch.Tensor:
    """Mean [D] (float32) of the ``m`` densest tokens of the pool over all ranks, as in one process
    (``cand``: this rank's candidates, densest first). Collective."""
    top_local = cand[:m]  # my densest m (candidates are the densest of my tokens)
    keys = comm.all_gather_concat(np.stack([log_rho[top_local], gid[top_local].astype(np.float64)], axis=1))
    keep = np.zeros(len(top_local), dtype=bool)
    if m:
        best = np.lexsort((keys[:, 1], -keys[:, 0]))[:m]
        cut_lr, cut_g = keys[best[-1], 0], keys[best[-1], 1]
        keep = ~denser(np.float64(cut_lr), np.float64(cut_g), log_rho[top_local], gid[top_local].astype(np.float64))
    sums = np.asarray(x[np.sort(top_local[keep])]).sum(0, dtype=np.float64)[None, :]  # [1, D]
    total = comm.all_gather_concat(sums, np.ones(comm.world, dtype=np.int64)).sum(0)
    return torch.from_numpy(total / max(m, 1)).float()


def _scan_candidates(x: np.ndarray, cand: np.ndarray, q: torch.Tensor, mu: torch.Tensor, cnt: torch.Tensor,
                     chunk_p: int) -> tuple[np.ndarray, np.ndarray]:
    """For each centred query row of ``q`` [q, D], the nearest of its first ``cnt`` candidates (``x[cand]``
    read in blocks of ``chunk_p``): float64 squared distances [q] and positions in ``cand`` [q] (-1: none)."""
    device = q.device
    qn = (q * q).sum(1)
    best_d = torch.full((q.shape[0],), float("inf"), device=device)
    arg = torch.full((q.shape[0],), -1, dtype=torch.int64, device=device)
    upto = int(cnt.max()) if q.shape[0] else 0
    for ps in range(0, upto, chunk_p):
        pe = min(upto, ps + chunk_p)
        xs = torch.from_numpy(np.ascontiguousarray(x[cand[ps:pe]])).to(device) - mu  # [b, D]
        d2 = torch.addmm(qn[:, None] + (xs * xs).sum(1)[None, :], q, xs.T, beta=1.0, alpha=-2.0)  # [q, b]
        d2.masked_fill_(torch.arange(ps, pe, device=device)[None, :] >= cnt[:, None], float("inf"))
        v, j = d2.min(1)
        upd = v < best_d
        best_d = torch.where(upd, v, best_d)
        arg = torch.where(upd, j + ps, arg)
    return best_d.cpu().numpy().astype(np.float64), arg.cpu().numpy()
