"""Distributed kNN of a sharded token pool: query blocks travel a ring of ranks, each rank searches them
against its own shard, and the running top-(k+1) lists are merged exactly as they go.

Why the result equals the single-process :class:`missrec.interests.knn.KnnSearcher` (exact path):
FAISS' flat search returns, per query, the first ``k + 1`` tokens in the order (float32 distance, id)
(its heap only admits strictly smaller distances while ids are visited in increasing order). A global
lexicographic top-(k+1) is the top-(k+1) of the union of per-shard lexicographic top-(k+1) lists, so the
merge by (float32 distance, global id) reproduces it, provided each float32 distance is the one the
single process computed. FAISS computes a query block pair by pair (position-independent SIMD) when
``block rows * D < faiss.cvar.distance_compute_blas_threshold`` and with a BLAS product (whose rounding
depends on the block layout) otherwise; :class:`ShardSearcher` searches each query with the same kind of
kernel the single process used for it (pieces small enough for the pair-by-pair kernel, and never fewer
rows than FAISS threads, which would switch FAISS to its database-parallel BLAS kernel). With pair-by-pair
kernels the lists are bit-identical; with BLAS kernels they agree except for neighbours whose float32
distances tie to rounding. Float64 distances are computed with :func:`pair_d2` on the rank that holds the
neighbour, so they are bit-identical too.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from missrec.interests.dist_comm import Comm, pack, unpack
from missrec.interests.dist_dense import pair_d2_external
from missrec.interests.dist_index import ShardSearcher
from missrec.interests.dpc_knn import sort_neighbours
from missrec.interests.knn import _progress
from missrec.interests.scratch import Scratch

logger = logging.getLogger(__name__)

NO_ID = np.iinfo(np.int64).max  # sentinel id of an empty list slot (sorts last)


# ---------------------------------------------------------------------------- list helpers
def empty_lists(m: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty candidate lists: (dist32 [m, k] inf, gid [m, k] NO_ID, dist64 [m, k] inf)."""
    return (
        np.full((m, k), np.inf, dtype=np.float32),
        np.full((m, k), NO_ID, dtype=np.int64),
        np.full((m, k), np.inf, dtype=np.float64),
    )


def merge_lists(
    a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...], k: int, by64: bool = False
) -> tuple[np.ndarray, ...]:
    """The first ``k`` of two candidate lists (dist32, gid, dist64) per row, ordered by (float32 distance,
    global id), or by (float64 distance, global id) when ``by64``."""
    d32, gid, d64 = (np.concatenate([u, v], axis=1) for u, v in zip(a, b))
    order = np.lexsort((gid, d64 if by64 else d32), axis=-1)[:, :k]
    return tuple(np.take_along_axis(v, order, axis=1) for v in (d32, gid, d64))


def _merge_shard(
    lists: tuple[np.ndarray, ...],
    qv: np.ndarray,
    qg: np.ndarray,
    found: tuple[np.ndarray, np.ndarray],
    x: np.ndarray,
    lo: int,
    kk: int,
    density: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, ...]:
    """Merge one shard's search result ``found`` = (dist32 [b, m], local ids [b, m]) for the queries
    ``qv`` / ``qg`` into the running ``lists``; float64 distances are computed only for the entries that
    make it into the lists. ``density`` = (this shard's log-densities [n], the queries' [b]) given: keep only
    the nearest denser candidate (lists of one; denser: a larger log-density, ties to the smaller id)."""
    d32, lid = found
    valid = lid >= 0
    gid = np.where(valid, lid + lo, NO_ID)
    d32 = np.where(valid, d32, np.inf).astype(np.float32)
    if density is not None:
        shard_lr, q_lr = density
        lr = shard_lr[np.where(valid, lid, 0)]  # [b, m]
        denser = valid & ((lr > q_lr[:, None]) | ((lr == q_lr[:, None]) & (gid < qg[:, None])))
        d32 = np.where(denser, d32, np.inf).astype(np.float32)
        col = np.lexsort((gid, d32), axis=-1)[:, :1]  # this shard's nearest denser (float32)
        d32, gid, lid = (np.take_along_axis(v, col, axis=1) for v in (d32, gid, lid))
        hit = np.isfinite(d32[:, 0])
        gid[~hit] = NO_ID
        d64 = np.full(d32.shape, np.inf)
        d64[hit, 0] = pair_d2_external(qv, x, np.flatnonzero(hit), lid[hit, 0])
        return merge_lists(lists, (d32, gid, d64), 1, by64=True)
    old = lists[0].shape[1]
    all32 = np.concatenate([lists[0], d32], axis=1)
    allid = np.concatenate([lists[1], gid], axis=1)
    order = np.lexsort((allid, all32), axis=-1)[:, :kk]
    d64 = np.take_along_axis(np.concatenate([lists[2], np.full(d32.shape, np.inf)], axis=1), order, axis=1)
    rows, cols = np.nonzero((order >= old) & np.isfinite(np.take_along_axis(all32, order, axis=1)))
    d64[rows, cols] = pair_d2_external(qv, x, rows, lid[rows, order[rows, cols] - old])
    return np.take_along_axis(all32, order, axis=1), np.take_along_axis(allid, order, axis=1), d64


def drop_self(gid: np.ndarray, d64: np.ndarray, qgid: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From ``k + 1`` candidates per row drop the query itself (or, if absent, the last one), keeping
    order: (gid [m, k], dist64 [m, k]). Mirrors the single-process search."""
    is_self = gid == qgid[:, None]
    drop = is_self.copy()
    drop[~is_self.any(axis=1), -1] = True
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(gid, order, axis=1), np.take_along_axis(d64, order, axis=1)


# ---------------------------------------------------------------------------- the ring
def auto_chunk_rows(d: int) -> int:
    """Query rows per travelling block: about 64 MiB of float32 vectors, within 1024..131072 (large
    blocks keep the per-cell overhead of the approximate search low)."""
    return int(min(131072, max(1024, (1 << 26) // (4 * max(1, d)))))


def ring_knn(
    comm: Comm,
    x: np.ndarray,
    offsets: np.ndarray,
    rows: np.ndarray,
    k: int,
    searcher: ShardSearcher,
    *,
    chunk_rows: int | None = None,
    nprobe_factor: int = 1,
    exact: bool = False,
    density: np.ndarray | None = None,
    desc: str = "knn",
    show_progress: bool = False,
    scratch: Scratch | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """kNN of this rank's tokens ``rows`` [m] (local ids) over the whole sharded pool, self excluded.

    Collective. Blocks of ``chunk_rows`` queries (None: :func:`auto_chunk_rows`) visit every rank in W
    steps (the vectors move on while the shard is searched); memory O(chunk_rows * (D + k)) per rank.
    ``exact``: brute force instead of the shard index (fallback for short lists); ``nprobe_factor``: the
    approximate index probes this many times its default cells ('cells': the owner picks a query's cells,
    which travel with it). Returns exact float64 squared distances [m, k] and global ids [m, k] (NO_ID
    where the pool offers fewer candidates), sorted by (distance, id).

    ``density`` [n_r] (this rank's log-densities): instead, the nearest token denser than the query among
    each shard's ``k + 1`` nearest (the best over shards by float64 distance): [m, 1] each, NO_ID if none.
    The query's log-density travels with it. ``scratch``: where the [m, k] outputs live when large.
    """
    w, r = comm.world, comm.rank
    lo = int(offsets[r])
    d = x.shape[1]
    rows = np.asarray(rows, dtype=np.int64)
    qcounts = comm.all_gather_scalars(len(rows))  # [W]
    kk = int(k) + 1
    width = 1 if density is not None else kk  # columns of the travelling lists
    dens = 1 if density is not None else 0  # the query's log-density travels with it
    step = max(1, int(chunk_rows or auto_chunk_rows(d)))
    rounds = math.ceil(int(qcounts.max()) / step) if qcounts.size else 0
    nprobe = searcher.nprobe * int(nprobe_factor)
    p = min(nprobe, searcher.nlist) if searcher.needs_probes and not exact else 0

    def vec_specs(b: int) -> list[tuple[tuple[int, ...], type]]:  # a block of queries
        return [((b, d), np.float32), ((b,), np.int64), ((b, p), np.int64), ((b, dens), np.float64)]

    def list_specs(b: int) -> list[tuple[tuple[int, ...], type]]:  # their candidate lists
        return [((b, width), np.float32), ((b, width), np.int64), ((b, width), np.float64)]

    vec_bytes = d * 4 + 8 + p * 8 + dens * 8  # a query: vector, global id, probed cells, log-density
    list_bytes = width * (4 + 8 + 8)  # a candidate list: dist32, gid, dist64
    shape = (len(rows), width if density is not None else k)
    out_d2 = scratch.empty(shape, np.float64, "knn_d2") if scratch else np.empty(shape, dtype=np.float64)
    out_id = scratch.empty(shape, np.int64, "knn_id") if scratch else np.empty(shape, dtype=np.int64)
    bar = _progress(len(rows), desc, show_progress)
    for c in range(rounds):

        def size_of(origin: int, c: int = c) -> int:
            return int(np.clip(qcounts[origin] - c * step, 0, step))

        mine = rows[c * step : (c + 1) * step]
        qv, qg = np.ascontiguousarray(x[mine]), lo + mine
        qp = searcher.probe_rows(mine, nprobe) if p else np.empty((len(mine), 0), dtype=np.int64)
        qd = density[mine][:, None] if density is not None else np.empty((len(mine), 0), dtype=np.float64)
        lists = empty_lists(len(mine), width)
        for s in range(w):
            last = s == w - 1
            b_in = size_of((r - s - 1) % w)  # the block arriving next (my own after the last step)
            pend_v = None
            if not last:
                pend_v = comm.shift_start(pack(qv, qg, qp, qd) if len(qv) else None, b_in * vec_bytes)
            if len(qv) and searcher.n:
                if exact:
                    found = searcher.exact(qv, kk)
                else:
                    found = searcher.search(qv, kk, gids=qg, probes=qp, nprobe=nprobe)
                lists = _merge_shard(lists, qv, qg, found, x, lo, kk,
                                     None if density is None else (density, qd[:, 0]))
            pend_l = comm.shift_start(pack(*lists) if len(qv) else None, b_in * list_bytes)
            if pend_v is not None:
                got = comm.shift_wait(pend_v)
                qv, qg, qp, qd = unpack(got, vec_specs(b_in)) if b_in else _empty(vec_specs(0))
            got = comm.shift_wait(pend_l)
            lists = tuple(unpack(got, list_specs(b_in))) if b_in else empty_lists(0, width)
        if len(mine):
            sl = slice(c * step, c * step + len(mine))
            if density is not None:
                out_d2[sl], out_id[sl] = lists[2], lists[1]
            else:
                gid, d64 = drop_self(lists[1], lists[2], lo + mine, k)
                out_d2[sl], out_id[sl] = sort_neighbours(d64, gid)
        bar.update(len(mine))
    bar.close()
    return out_d2, out_id


def _empty(specs: list[tuple[tuple[int, ...], object]]) -> list[np.ndarray]:
    return [np.empty(shape, dtype=dtype) for shape, dtype in specs]
