"""The last phases of distributed DPC-KNN with every per-token array sharded: centre selection, labels by
following parents, and cluster means; no rank holds an array of the pool's size N, only its shard's n_r
and the C centres.

Densities are compared by key, never by a global rank: token ``a`` is denser than ``b`` when its
log-density is larger, ties to the smaller global id (:func:`denser`), which is the order of the
single-process ``density_rank``. Centres are the top C tokens by ``log rho + log delta`` (ties to the
smaller id), found with a distributed threshold search over order-preserving integer keys of the float64
scores (:func:`select_top`), so the selection equals the single-process ``select_centres`` bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from missrec.interests.dist_comm import Comm

_FLIP = np.int64(0x7FFFFFFFFFFFFFFF)


def denser(lr_a: np.ndarray, g_a: np.ndarray, lr_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """Whether tokens ``a`` (log-densities ``lr_a``, global ids ``g_a``) are denser than tokens ``b``
    (element-wise, broadcasting): a larger log-density, ties to the smaller id."""
    return (lr_a > lr_b) | ((lr_a == lr_b) & (g_a < g_b))


def float_keys(x: np.ndarray) -> np.ndarray:
    """Order-preserving int64 keys of float64 values (no NaN; -0.0 and 0.0 get the same key)."""
    bits = (np.asarray(x, dtype=np.float64) + 0.0).view(np.int64)
    return np.where(bits >= 0, bits, bits ^ _FLIP)


def density_max(comm: Comm, log_rho: np.ndarray, lo: int) -> tuple[int, float]:
    """The global id and log-density of the densest token of the pool (ties to the smaller id)."""
    if log_rho.size:
        i = int(np.lexsort((np.arange(log_rho.size), -log_rho))[0])
        mine = np.array([[log_rho[i], float(lo + i), 1.0]])
    else:
        mine = np.array([[-np.inf, np.inf, 0.0]])
    every = np.concatenate(comm.all_gather_list(mine, np.ones(comm.world, dtype=np.int64)))  # [W, 3]
    every = every[every[:, 2] > 0]
    best = np.lexsort((every[:, 1], -every[:, 0]))[0]
    return int(every[best, 1]), float(every[best, 0])


def select_top(comm: Comm, score: np.ndarray, c: int) -> np.ndarray:
    """This rank's members [n_r] bool of the global top ``c`` tokens by ``score`` (descending, ties to the
    smaller global id; shards hold contiguous id ranges in rank order). Collective: a threshold search
    over the scores' integer keys (at most 64 all-reduces of one count), then the ties at the threshold
    are taken from the lowest ids."""
    key = float_keys(score)
    lo_t, hi_t = -(2**63), 2**63 - 1  # the largest t with count(key >= t) >= c
    while lo_t < hi_t:
        mid = (lo_t + hi_t + 1) // 2
        count = int(comm.all_reduce_sum(np.array([int((key >= np.int64(mid)).sum())], dtype=np.int64))[0])
        if count >= c:
            lo_t = mid
        else:
            hi_t = mid - 1
    t = np.int64(lo_t)
    chosen = key > t
    need = c - int(comm.all_reduce_sum(np.array([int(chosen.sum())], dtype=np.int64))[0])
    tied = np.flatnonzero(key == t)
    before = comm.all_gather_scalars(tied.size)  # ties per rank, taken from the lowest ranks (ids) first
    take = int(np.clip(need - before[: comm.rank].sum(), 0, tied.size))
    chosen[tied[:take]] = True
    return chosen


def order_centres(comm: Comm, chosen: np.ndarray, score: np.ndarray, lo: int, top: int,
                  top_score: float) -> np.ndarray:
    """The centres [C] (global ids) in cluster order, the same on every rank: the chosen tokens sorted by
    (score descending, id), with the density maximum ``top`` forced in in place of the last one, as the
    single-process ``select_centres`` does."""
    ids = lo + np.flatnonzero(chosen)
    mine = np.stack([ids.astype(np.float64), score[chosen]], axis=1)  # ids < 2**53: exact in float64
    both = comm.all_gather_concat(mine)  # [C, 2]
    centres, scores = both[:, 0].astype(np.int64), both[:, 1]
    ranked = np.lexsort((centres, -scores))
    centres, scores = centres[ranked], scores[ranked]
    if not np.any(centres == top):
        centres[-1], scores[-1] = top, top_score
        again = np.lexsort((centres, -scores))
        centres = centres[again]
    return centres.astype(np.int64)


def labels_by_parent(comm: Comm, parent: np.ndarray, offsets: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Cluster [n_r] of this rank's tokens: the centre that the chain of parents (global ids; the density
    maximum is its own parent) reaches first. Distributed pointer jumping: each round replaces every
    token's pointer by its pointer's pointer (fetched from the owners), O(log depth) rounds."""
    lo, hi = int(offsets[comm.rank]), int(offsets[comm.rank + 1])
    by_id = np.argsort(centres, kind="stable")
    sorted_centres = centres[by_id]
    mine = (sorted_centres >= lo) & (sorted_centres < hi)
    root = np.asarray(parent, dtype=np.int64).copy()
    root[sorted_centres[mine] - lo] = sorted_centres[mine]  # a centre ends its chain
    while True:
        nxt = comm.fetch_values(root, offsets, root)
        changed = int(comm.all_reduce_sum(np.array([int((nxt != root).sum())], dtype=np.int64))[0])
        root = nxt
        if not changed:
            break
    pos = np.searchsorted(sorted_centres, root)
    pos = np.minimum(pos, len(sorted_centres) - 1)
    if not np.array_equal(sorted_centres[pos], root):  # pragma: no cover - a chain that skips every centre
        raise RuntimeError("parent chain did not end at a centre")
    return by_id[pos].astype(np.int64)


def owner_ranges(c: int, world: int) -> np.ndarray:
    """Contiguous cluster ranges [W + 1] owned by each rank when the cluster means are reduced."""
    per = -(-c // world)
    return np.minimum(np.arange(world + 1, dtype=np.int64) * per, c)


def mean_centroids_sharded(comm: Comm, x: np.ndarray, labels: np.ndarray, c: int,
                           chunk: int = 65536) -> np.ndarray:
    """Mean token [C, D] float32 of every cluster (zeros when empty), on every rank. Each rank adds up its
    tokens ``x`` [n_r, D] by cluster ``labels`` [n_r] a chunk at a time and sends the float64 partial sums
    to the clusters' owners (:func:`owner_ranges`); each owner divides its slice, and the float32 slices
    are gathered. Memory O(chunk * D + C * D)."""
    d = x.shape[1]
    bounds = owner_ranges(c, comm.world)
    c_lo, c_hi = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
    acc = np.zeros((c_hi - c_lo, d), dtype=np.float64)
    cnt = np.zeros(c_hi - c_lo, dtype=np.int64)
    rounds = int(comm.all_gather_scalars(-(-x.shape[0] // chunk)).max())
    for r in range(rounds):
        part = x[r * chunk : (r + 1) * chunk]
        lab = np.asarray(labels[r * chunk : (r + 1) * chunk], dtype=np.int64)
        uniq, inv = np.unique(lab, return_inverse=True)
        sums = torch.zeros(len(uniq), d, dtype=torch.float64)
        sums.index_add_(0, torch.from_numpy(inv.reshape(-1)), torch.from_numpy(np.asarray(part)).double())
        counts = np.bincount(inv.reshape(-1), minlength=len(uniq)).astype(np.int64)
        owner = np.searchsorted(bounds, uniq, side="right") - 1
        rows = np.concatenate([uniq[:, None].astype(np.float64), counts[:, None].astype(np.float64),
                               sums.numpy()], axis=1)  # [u, 2 + D]
        got = comm.all_to_all([rows[owner == w] for w in range(comm.world)])
        for block in got:  # in rank order: the sums are added in the same order on every run
            ids = block[:, 0].astype(np.int64) - c_lo
            np.add.at(cnt, ids, block[:, 1].astype(np.int64))
            np.add.at(acc, ids, block[:, 2:])
    mine = (acc / np.maximum(cnt, 1)[:, None]).astype(np.float32)
    return comm.all_gather_concat(mine, np.diff(bounds))
