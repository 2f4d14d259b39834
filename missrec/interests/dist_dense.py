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


def nearest_denser_distributed(
    comm: Comm,
    x: np.ndarray,
    offsets: np.ndarray,
    peaks: np.ndarray,
    order: np.ndarray,
    rank: np.ndarray,
    *,
    device: str = "cpu",
    chunk_q: int = 1024,
    chunk_p: int = 32768,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest denser token of each global token id in ``peaks`` [P] (the same on every rank; none
    may be the density maximum), as :func:`missrec.interests.dpc_knn.nearest_denser_bruteforce`.

    Collective. Peaks are taken in density order in chunks of ``chunk_q``; their vectors are gathered
    from the owners (O(chunk_q * D)); each rank scans its own denser tokens (density-sorted, centred by
    the global mean of the densest ``min(max rank, 65536)`` tokens) and proposes its best (float32
    distance, density position, float64 distance); the smallest (distance, position) wins, so ties go to
    the denser token as in one process. Returns parents [P] int64 and their float64 squared distances [P].
    """
    peaks = np.asarray(peaks, dtype=np.int64)
    lo, hi_row = int(offsets[comm.rank]), int(offsets[comm.rank + 1])
    srt = np.argsort(rank[peaks], kind="stable")
    pk = peaks[srt]
    pr = rank[pk]
    if pr.size and pr[0] == 0:
        raise ValueError("the density maximum has no denser token")
    limit = int(pr[-1]) if pr.size else 0
    # centring vector: mean of the densest min(limit, 65536) tokens, as in the single-process search
    m = min(limit, 65536)
    my_rank = rank[lo:hi_row]
    sums = x[my_rank < m].sum(0, dtype=np.float64)[None, :]  # [1, D]
    total = comm.all_gather_concat(sums, np.ones(comm.world, dtype=np.int64)).sum(0)
    mu = torch.from_numpy(total / max(m, 1)).float().to(device)
    # my candidates: my tokens denser than the least dense peak, by density position
    cand = np.flatnonzero(my_rank < limit)
    cand = cand[np.argsort(my_rank[cand], kind="stable")]
    cpos = torch.from_numpy(my_rank[cand]).to(device)  # [M] increasing
    xs = torch.from_numpy(x[cand]).to(device) - mu  # [M, D]
    xs_norm = (xs * xs).sum(1)
    parents = np.empty(len(pk), dtype=np.int64)
    pd2 = np.empty(len(pk), dtype=np.float64)
    bar = _progress(len(pk), "delta (peaks)", show_progress)
    for qs in range(0, len(pk), chunk_q):
        qid = pk[qs : qs + chunk_q]
        qv = comm.fetch_rows(x, offsets, qid)  # [q, D] on every rank
        qr = torch.from_numpy(pr[qs : qs + chunk_q]).to(device)
        q = torch.from_numpy(qv).to(device) - mu
        qn = (q * q).sum(1)
        best = torch.full((len(qid),), float("inf"), device=device)
        arg = torch.full((len(qid),), -1, dtype=torch.int64, device=device)
        upto = int(torch.searchsorted(cpos, int(qr.max()))) if len(cand) else 0
        for ps in range(0, upto, chunk_p):
            pe = min(upto, ps + chunk_p)
            d2 = torch.addmm(qn[:, None] + xs_norm[None, ps:pe], q, xs[ps:pe].T, beta=1.0, alpha=-2.0)
            d2.masked_fill_(cpos[None, ps:pe] >= qr[:, None], float("inf"))
            v, j = d2.min(1)
            upd = v < best
            best = torch.where(upd, v, best)
            arg = torch.where(upd, j + ps, arg)
        best_np = best.cpu().numpy().astype(np.float32)
        arg_np = arg.cpu().numpy()
        found = arg_np >= 0
        pos = np.full(len(qid), np.iinfo(np.int64).max, dtype=np.int64)
        pos[found] = my_rank[cand[arg_np[found]]]
        exact = np.full(len(qid), np.inf, dtype=np.float64)
        if found.any():
            exact[found] = pair_d2_external(qv, x, np.flatnonzero(found), cand[arg_np[found]])
        props = np.stack([best_np.astype(np.float64), pos.astype(np.float64), exact])  # [3, q]
        allp = comm.all_gather_list(props[None], np.ones(comm.world, dtype=np.int64))
        bests, poss, exacts = (np.stack([a[0, i] for a in allp]) for i in range(3))  # [W, q] each
        # lexicographic min over ranks of (float32 distance, density position)
        win = np.lexsort((poss, bests), axis=0)[0]  # [q]
        cols = np.arange(len(qid))
        wpos = poss[win, cols]
        if not np.all(np.isfinite(bests[win, cols])):  # pragma: no cover - a peak always has a denser token
            raise RuntimeError("no denser token found for some peak")
        parents[qs : qs + len(qid)] = order[wpos.astype(np.int64)]
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


def mean_centroids_distributed(
    comm: Comm, x: np.ndarray, labels: np.ndarray, c: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean token of each cluster over all ranks ([C, D] float32, zeros when empty) and cluster sizes
    [C]: float64 sums and counts all-reduced (equal to the single-process means to float64 rounding).
    ``labels`` [n_r]: this rank's tokens' clusters. Collective."""
    sums, counts = cluster_sums(x, labels, c)
    sums = comm.all_reduce_sum(sums)
    counts = comm.all_reduce_sum(counts)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32), counts
