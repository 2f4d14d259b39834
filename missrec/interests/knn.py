"""k-nearest-neighbour search over a token pool with FAISS (exact flat index or IVF-Flat).

FAISS is imported lazily: it is an optional dependency (extras ``cpu`` or ``gpu``).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from missrec.errors import ConfigError
from missrec.interests.exact_knn import exact_knn_sample

logger = logging.getLogger(__name__)

# Queries per FAISS call: bounds the temporary [chunk, k] / [chunk, nprobe] buffers and
# the flat index's [chunk, block] distance tiles.
DEFAULT_CHUNK = 16384

APPROX_METHODS = ("auto", "cells", "ivf")


def import_faiss() -> Any:
    """Import FAISS or raise an ImportError that names the extras to install."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "FAISS is required for interest discovery: install the `cpu` extra "
            "(`pip install 'missrec[cpu]'`, i.e. faiss-cpu) or the `gpu` extra "
            "(`pip install 'missrec[gpu]'`, i.e. faiss-gpu)."
        ) from exc
    return faiss


def faiss_num_gpus(faiss: Any) -> int:
    """GPUs FAISS can use; 0 for the CPU build (which lacks the GPU functions)."""
    fn = getattr(faiss, "get_num_gpus", None)
    if fn is None:
        return 0
    try:
        return int(fn())
    except RuntimeError:  # pragma: no cover - broken driver etc.
        return 0


def gpu_device(faiss: Any) -> int:
    """The GPU a FAISS index of this process goes on: the rank's current CUDA device (distributed launchers set
    it from LOCAL_RANK), else LOCAL_RANK, modulo the GPUs FAISS sees."""
    import os

    if torch.cuda.is_available():
        dev = torch.cuda.current_device()
    else:
        dev = int(os.environ.get("LOCAL_RANK", "0"))
    return dev % max(1, faiss_num_gpus(faiss))


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar; disabled (``update`` / ``close`` do nothing) unless ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", leave=False, disable=not enabled)


class KnnSearcher:
    """Self-excluding kNN over the rows of ``x`` [N, D] (queries are rows of the pool itself).

    Backends: ``flat`` (exact IndexFlatL2; when ``approximate`` is False); ``ivf`` (FAISS IVF-Flat,
    ``nlist ~ 4 sqrt(N)`` lists, ``nprobe`` = 16 probed; the default on GPU); ``cells`` (the default
    on CPU): the same search semantics (each query scans its ``nprobe`` = 8 nearest of
    ``nlist ~ 4 sqrt(N)`` k-means cells), executed cell by cell: every query probing a cell is matched
    against its members with one BLAS product. On CPU that is several times faster than IVF-Flat's
    per-query list scans at the same recall. Oversized cells are split (see ``_split_oversized``).
    """

    def __init__(
        self,
        x: np.ndarray,
        *,
        approximate: bool,
        method: str = "auto",
        nprobe: int | None = None,
        nlist: int | None = None,
        train_per_list: int = 20,
        use_gpu: bool | str = "auto",
        seed: int = 0,
        chunk: int = DEFAULT_CHUNK,
        show_progress: bool = False,
    ) -> None:
        faiss = import_faiss()
        self.faiss = faiss
        self.x = np.ascontiguousarray(x, dtype=np.float32)  # [N, D]
        n, d = self.x.shape
        self.n, self.d = n, d
        self.chunk = max(1, int(chunk))
        self.show_progress = show_progress
        self.seed = int(seed)
        self.train_per_list = int(train_per_list)
        faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
        ngpu = faiss_num_gpus(faiss)
        if use_gpu is True and ngpu == 0:
            raise ConfigError("use_gpu=True but FAISS sees no GPU (is the faiss-gpu build installed?)")
        self.on_gpu = ngpu > 0 if use_gpu == "auto" else bool(use_gpu)
        if method not in APPROX_METHODS:
            raise ConfigError(f"approximate kNN method must be one of {APPROX_METHODS}, got {method!r}")
        auto = "ivf" if self.on_gpu else "cells"
        self.backend = "flat" if not approximate else auto if method == "auto" else method
        self.approximate = approximate
        self.info: dict[str, Any] = {
            "approximate": approximate,
            "gpu": self.on_gpu,
            "knn_backend": self.backend,
        }

        t0 = time.perf_counter()
        self.nlist = self.nprobe = 0
        if self.backend == "flat":
            self.index = self._maybe_gpu(faiss.IndexFlatL2(d))
            self.index.add(self.x)
        else:
            cells = self.backend == "cells"
            self.nlist = int(nlist or round(4 * math.sqrt(n)))
            self.nlist = max(1, min(self.nlist, n // 4))
            self.nprobe = max(1, min(int(nprobe or (8 if cells else 16)), self.nlist))
            centroids = self._train_coarse()
            self.info["train_seconds"] = time.perf_counter() - t0
            if self.backend == "ivf":
                self._build_ivf(centroids)
            else:
                self._build_cells(centroids)
            self.info.update(nlist=self.nlist, nprobe=self.nprobe)
        self.info["build_seconds"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ build helpers
    def _maybe_gpu(self, index: Any) -> Any:
        if not self.on_gpu:
            return index
        self._gpu_res = self.faiss.StandardGpuResources()
        return self.faiss.index_cpu_to_gpu(self._gpu_res, gpu_device(self.faiss), index)

    def _train_coarse(self) -> np.ndarray:
        """k-means centroids [nlist, D] from a seeded sample of ``train_per_list * nlist`` rows."""
        ntrain = min(self.n, max(self.train_per_list * self.nlist, 1000))
        rng = np.random.default_rng(self.seed)
        sample = self.x if ntrain >= self.n else self.x[np.sort(rng.choice(self.n, ntrain, replace=False))]
        km = self.faiss.Kmeans(
            self.d,
            self.nlist,
            niter=10,
            seed=self.seed,
            gpu=self.on_gpu,
            verbose=False,
            min_points_per_centroid=1,
            max_points_per_centroid=max(self.train_per_list, 1),
        )
        km.train(sample)
        self.info["train_points"] = int(ntrain)
        centroids = self._split_oversized(sample, np.ascontiguousarray(km.centroids, dtype=np.float32))
        self.info["nlist_trained"] = self.nlist
        self.nlist = centroids.shape[0]
        self.nprobe = min(self.nprobe, self.nlist)
        return centroids

    def _split_oversized(self, sample: np.ndarray, centroids: np.ndarray, rounds: int = 4) -> np.ndarray:
        """Rebalance cells: a cell holding over twice the target share of the sample (sample / nlist) is
        replaced by ``ceil(share / target)`` sub-centroids from a small k-means on its members; repeated
        while some cell is oversized. k-means cells on clustered high-dimensional data are very uneven
        ("hub" centroids averaging many clusters draw probes from everywhere), and search work grows
        with sum(size * probes)."""
        target = sample.shape[0] / centroids.shape[0]
        for r in range(rounds):
            q = self.faiss.IndexFlatL2(self.d)
            q.add(centroids)
            a = q.search(sample, 1)[1][:, 0]
            cnt = np.bincount(a, minlength=centroids.shape[0])
            big = np.flatnonzero(cnt > max(2.0 * target, 8))
            if big.size == 0:
                break
            order = np.argsort(a, kind="stable")
            starts = np.concatenate([[0], np.cumsum(cnt)])
            jobs = [
                (
                    sample[order[starts[c] : starts[c + 1]]],
                    math.ceil(cnt[c] / target),
                    self.seed + r * 7919 + c,
                )
                for c in big
            ]
            keep = np.ones(centroids.shape[0], dtype=bool)
            keep[big] = False
            with _single_threaded_torch() as pool:
                subs = list(pool.map(lambda job: seeded_kmeans(*job), jobs))
            logger.debug("coarse cells, round %d: split %d oversized of %d", r, big.size, centroids.shape[0])
            centroids = np.ascontiguousarray(np.concatenate([centroids[keep], *subs]))
        return centroids

    def _assign(self, centroids: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray, Any]:
        """``p`` nearest centroids of every row: (dist2 [N, p] float32, ids [N, p] int64, quantizer)."""
        quantizer = self.faiss.IndexFlatL2(self.d)
        quantizer.add(centroids)
        dq = np.empty((self.n, p), dtype=np.float32)
        iq = np.empty((self.n, p), dtype=np.int64)
        bar = _progress(self.n, "coarse assign", self.show_progress)
        for s in range(0, self.n, self.chunk):
            e = min(self.n, s + self.chunk)
            dq[s:e], iq[s:e] = quantizer.search(self.x[s:e], p)
            bar.update(e - s)
        bar.close()
        return dq, iq, quantizer

    def _build_ivf(self, centroids: np.ndarray) -> None:
        faiss = self.faiss
        quantizer = faiss.IndexFlatL2(self.d)
        quantizer.add(centroids)
        index = faiss.IndexIVFFlat(quantizer, self.d, self.nlist, faiss.METRIC_L2)
        index.nprobe = self.nprobe
        index.is_trained = True  # the quantizer holds trained centroids; IVF-Flat needs nothing else
        self._quantizer = quantizer  # keep the Python object alive alongside the index
        self.index = self._maybe_gpu(index)
        for s in range(0, self.n, self.chunk):
            self.index.add(self.x[s : s + self.chunk])

    def _build_cells(self, centroids: np.ndarray) -> None:
        _, iq, self._quantizer = self._assign(centroids, self.nprobe)
        self.centroids = centroids  # [nlist, D]
        self.probes = iq  # [N, nprobe] nearest cells of each row, the first is its own
        self.primary = primary = np.ascontiguousarray(iq[:, 0])  # [N]
        self.perm = np.argsort(primary, kind="stable")  # rows grouped by cell
        counts = np.bincount(primary, minlength=self.nlist)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [nlist + 1]
        self.pos_in_cell = np.empty(self.n, dtype=np.int64)  # position of each row among its cell's members
        self.pos_in_cell[self.perm] = np.arange(self.n) - self.starts[primary[self.perm]]
        self.info["largest_cell"] = int(counts.max())

    # ------------------------------------------------------------------ search
    def search_rows(
        self, rows: np.ndarray | None, k: int, desc: str = "knn", nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """kNN of the pool's own rows ``rows`` [n] (all rows if None), the row itself excluded;
        ``nprobe`` overrides the cells probed (approximate backends).

        Returns ``dist2`` [n, k] float32 and ``idx`` [n, k] int64, sorted by distance.
        """
        rows = np.arange(self.n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        k = int(min(k, self.n - 1))
        nprobe = min(int(nprobe or self.nprobe), self.nlist)
        if self.on_gpu and self.backend == "ivf":
            k, nprobe = min(k, 2047), min(nprobe, 2048)  # GPU IVF limits (k + 1 <= 2048)
        if self.backend == "cells":
            probes = (
                self.probes[rows]
                if nprobe == self.nprobe
                else self._quantizer.search(self.x[rows], nprobe)[1]
            )
            out_d, out_i = self._search_cells(rows, probes, k, desc)
        else:
            saved = getattr(self.index, "nprobe", None)
            if saved is not None:
                self.index.nprobe = nprobe
            try:
                out_d, out_i = self._search_faiss(rows, k, desc)
            finally:
                if saved is not None:
                    self.index.nprobe = saved
        bad = np.flatnonzero((out_i < 0).any(axis=1))
        if bad.size:  # too few candidates (tiny cells / lists): exact search for those rows
            logger.debug("kNN: %d rows short of %d neighbours; searching them exactly", bad.size, k)
            out_d[bad], out_i[bad] = exact_knn_sample(self.x, rows[bad], k)
        return out_d, out_i

    def _search_faiss(self, rows: np.ndarray, k: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
        out_d = np.empty((len(rows), k), dtype=np.float32)
        out_i = np.empty((len(rows), k), dtype=np.int64)
        bar = _progress(len(rows), desc, self.show_progress and len(rows) > self.chunk)
        for s in range(0, len(rows), self.chunk):
            r = rows[s : s + self.chunk]
            d, i = self.index.search(self.x[r], k + 1)  # the row itself is (almost always) among k + 1
            out_d[s : s + len(r)], out_i[s : s + len(r)] = _drop_self(d, i, r, k)
            bar.update(len(r))
        bar.close()
        return out_d, out_i

    def _search_cells(
        self, rows: np.ndarray, probes: np.ndarray, k: int, desc: str, budget: int = 1 << 25
    ) -> tuple[np.ndarray, np.ndarray]:
        """IVF semantics (each query scans the cells ``probes`` [n, p], nearest first), executed cell by
        cell: all the queries probing one cell are matched against its members with one BLAS product,
        then the per-probe top-k are merged. Batches of rows bound the [n, p, k] buffers."""
        out_d = np.empty((len(rows), k), dtype=np.float32)
        out_i = np.empty((len(rows), k), dtype=np.int64)
        step = max(1, budget // (probes.shape[1] * k))
        bar = _progress(len(rows), desc, self.show_progress and len(rows) > self.chunk)
        for s in range(0, len(rows), step):
            r = rows[s : s + step]
            out_d[s : s + len(r)], out_i[s : s + len(r)] = self._search_cells_batch(
                r, probes[s : s + step], k
            )
            bar.update(len(r))
        bar.close()
        return out_d, out_i

    def _search_cells_batch(
        self, rows: np.ndarray, probes: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        n, p = probes.shape
        buf_d = np.full((n, p, k), np.inf, dtype=np.float32)  # per-probe top-k
        buf_i = np.full((n, p, k), -1, dtype=np.int64)
        cells = probes.ravel()  # [n * p], entry e = (query e // p, probe e % p)
        order = np.argsort(cells, kind="stable")
        uniq, first = np.unique(cells[order], return_index=True)
        bounds = np.append(first, len(order))
        jobs = [(c, order[a:b]) for c, a, b in zip(uniq.tolist(), bounds[:-1].tolist(), bounds[1:].tolist())]
        jobs.sort(key=lambda j: -len(j[1]) * int(self.starts[j[0] + 1] - self.starts[j[0]]))  # big first
        with _single_threaded_torch() as pool:  # many small products: cells in parallel, ops single-threaded
            for fut in [pool.submit(self._cell_job, rows, c, ent, p, k, buf_d, buf_i) for c, ent in jobs]:
                fut.result()
        # merge the p lists of k: [n, p*k] -> k best
        flat_d = torch.from_numpy(buf_d.reshape(n, p * k))
        v, j = torch.topk(flat_d, k, dim=1, largest=False, sorted=True)
        ids = np.take_along_axis(buf_i.reshape(n, p * k), j.numpy(), axis=1)
        return v.numpy(), ids

    def _cell_job(
        self,
        rows: np.ndarray,
        c: int,
        ent: np.ndarray,
        p: int,
        k: int,
        buf_d: np.ndarray,
        buf_i: np.ndarray,
        budget: int = 1 << 23,
    ) -> None:
        """Queries ``rows[ent // p]`` that probe cell ``c`` against c's members; fills their probe slot."""
        members = self.perm[self.starts[c] : self.starts[c + 1]]  # [m]
        m = members.shape[0]
        if m == 0:
            return
        mu = torch.from_numpy(self.centroids[c])
        xm = torch.from_numpy(self.x[members]) - mu  # [m, D], centred for float32 accuracy
        mn = (xm * xm).sum(1)  # [m]
        kk = min(k, m)
        step = max(1, budget // m)
        for s in range(0, len(ent), step):
            e = ent[s : s + step]
            qi, slot = e // p, e % p
            qrow = rows[qi]
            q = torch.from_numpy(self.x[qrow]) - mu  # [q, D]
            d2 = torch.addmm(mn[None, :], q, xm.T, alpha=-2.0)  # [q, m] = |m|^2 - 2 q.m
            d2 += (q * q).sum(1, keepdim=True)
            own = np.flatnonzero(self.primary[qrow] == c)  # queries whose own cell this is
            if own.size:
                d2[torch.from_numpy(own), torch.from_numpy(self.pos_in_cell[qrow[own]])] = float("inf")
            v, j = torch.topk(d2, kk, dim=1, largest=False, sorted=True)
            v = v.clamp_min_(0).numpy()
            ids = members[j.numpy()]
            ids[np.isinf(v)] = -1  # the excluded self, when a cell has no more than k members
            buf_d[qi, slot, :kk], buf_i[qi, slot, :kk] = v, ids

    def close(self) -> None:
        """Free the index and cached probe lists."""
        self.index = None
        self.probes = None


def _drop_self(d: np.ndarray, i: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From ``k + 1`` hits per row drop the row itself (or, if absent, the last hit)."""
    is_self = i == rows[:, None]  # [n, k+1]
    drop = is_self.copy()
    drop[~is_self.any(axis=1), -1] = True
    # stable partition: kept entries first, in their original (sorted) order
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)


class _single_threaded_torch:
    """Thread pool (one worker per torch thread) while torch ops run single-threaded: on shared
    cores many tiny multi-threaded ops stall in their barriers; independent single-threaded ones do not."""

    def __enter__(self) -> ThreadPoolExecutor:
        self._saved = torch.get_num_threads()
        torch.set_num_threads(1)
        self._pool = ThreadPoolExecutor(max_workers=max(1, self._saved))
        return self._pool

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)
        torch.set_num_threads(self._saved)


def seeded_kmeans(points: np.ndarray, parts: int, seed: int, iters: int = 8) -> np.ndarray:
    """Small seeded k-means (k-means++ start) of ``points`` [n, D] into ``parts`` centroids (float32)."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    parts = min(parts, x.shape[0])
    picks = [int(rng.integers(x.shape[0]))]
    d2 = ((x - x[picks[0]]) ** 2).sum(1)  # [n] distance to the nearest pick
    for _ in range(1, parts):
        w = d2.double().clamp_min(0).numpy()
        picks.append(
            int(rng.choice(x.shape[0], p=w / w.sum())) if w.sum() > 0 else int(rng.integers(x.shape[0]))
        )
        d2 = torch.minimum(d2, ((x - x[picks[-1]]) ** 2).sum(1))
    cen = x[torch.tensor(picks)].clone()
    for _ in range(iters):
        dist = torch.addmm((cen * cen).sum(1)[None, :], x, cen.T, alpha=-2.0)  # [n, parts] up to |x|^2
        lab = dist.argmin(1)
        sums = torch.zeros_like(cen).index_add_(0, lab, x)
        cnt = torch.bincount(lab, minlength=parts)
        filled = cnt > 0
        cen[filled] = sums[filled] / cnt[filled, None].float()
    return cen.numpy()
