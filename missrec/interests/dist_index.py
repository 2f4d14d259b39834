"""Per-rank search index of the distributed kNN: one rank's shard, searched with arbitrary query vectors.

Exact path: a FAISS flat index of the shard, searched with the FAISS kernel the single-process search
used for each query (see :mod:`missrec.interests.dist_knn`).

Approximate path: one set of coarse cells for the whole pool, trained by all ranks together
(:mod:`missrec.interests.dist_coarse`); each rank files its own tokens under their nearest cell. A query probes the same ``nprobe`` cells on every rank (computed once by its owner and sent with it
for 'cells'; by each rank's FAISS IVF-Flat index over the shared quantizer for 'ivf'), so each rank scans
only its share of the probed cells and the merged lists are what one IVF index over the whole pool with
these cells would return: the search work is split W ways instead of repeated per shard.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from missrec.errors import ConfigError
from missrec.interests.config import InterestConfig
from missrec.interests.dist_coarse import train_global_centroids
from missrec.interests.dist_comm import Comm
from missrec.interests.knn import DEFAULT_CHUNK, KnnSearcher, faiss_num_gpus, gpu_device, import_faiss
from missrec.interests.scratch import Scratch


class ShardSearcher:
    """kNN of arbitrary query vectors against this rank's shard ``x`` [n, D] (n may be 0).

    ``offsets`` [W + 1]: the shards' global row ranges (the pool size picks, per query, the FAISS kernel
    of the single-process search). Construction is collective on the approximate path (the cells are
    trained together).
    """

    def __init__(
        self, comm: Comm, x: np.ndarray, offsets: np.ndarray, *, approximate: bool, cfg: InterestConfig,
        scratch: Scratch | None = None,
    ) -> None:
        self.faiss = import_faiss()
        self.x = x
        self.scratch = scratch or Scratch(in_memory_bytes=1 << 62)
        self.n, self.d = x.shape
        self.n_global = int(offsets[-1])
        self.backend = "empty"
        self.nprobe = self.nlist = 0
        self.on_gpu = False
        self.info: dict[str, Any] = {"approximate": approximate}
        if approximate:
            self._build_cells(comm, offsets, cfg)
        elif self.n:
            self.searcher = KnnSearcher(x, approximate=False, use_gpu=cfg.use_gpu, seed=cfg.seed)
            self.backend = "flat"
            self.on_gpu = self.searcher.on_gpu
            self.info = dict(self.searcher.info)

    @property
    def needs_probes(self) -> bool:
        """Whether queries must come with their probed cells (see :meth:`probe`)."""
        return self.backend == "cells"

    # ------------------------------------------------------------------ approximate: shared cells
    def _build_cells(self, comm: Comm, offsets: np.ndarray, cfg: InterestConfig) -> None:
        faiss = self.faiss
        t0 = time.perf_counter()
        gpus = faiss_num_gpus(faiss)
        if cfg.use_gpu is True and gpus == 0:
            raise ConfigError("use_gpu=True but FAISS sees no GPU (is the faiss-gpu build installed?)")
        gpu = gpus > 0 if cfg.use_gpu == "auto" else bool(cfg.use_gpu)
        self.backend = ("ivf" if gpu else "cells") if cfg.approx_method == "auto" else cfg.approx_method
        self.on_gpu = gpu and self.backend == "ivf"
        self.centroids = train_global_centroids(comm, self.x, offsets, cfg)  # [nlist, D]
        self.nlist = self.centroids.shape[0]
        self.nprobe = max(1, min(int(cfg.nprobe or (8 if self.backend == "cells" else 16)), self.nlist))
        self.quantizer = faiss.IndexFlatL2(self.d)
        self.quantizer.add(self.centroids)
        train_s = time.perf_counter() - t0
        if self.backend == "cells":
            n, step = self.n, DEFAULT_CHUNK
            self.own_probes = self.scratch.empty((n, self.nprobe), np.int64, "probes")  # my rows' cells, nearest first
            for s in range(0, n, step):
                self.own_probes[s : s + step] = self.probe(np.ascontiguousarray(self.x[s : s + step]), self.nprobe)
            primary = np.ascontiguousarray(self.own_probes[:, 0])
            self.perm = np.argsort(primary, kind="stable")  # my rows grouped by cell
            counts = np.bincount(primary, minlength=self.nlist)
            self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [nlist + 1]
            # my rows in cell order, centred on their cell's centroid (float32 accuracy), and their norms
            xc = self.scratch.empty((n, self.d), np.float32, "cells")
            self.xc_norm = torch.empty(n, dtype=torch.float32)  # [n]
            for s in range(0, n, step):
                rows = self.perm[s : s + step]
                block = torch.from_numpy(np.ascontiguousarray(self.x[rows]))
                block -= torch.from_numpy(self.centroids[primary[rows]])
                xc[s : s + step] = block.numpy()
                self.xc_norm[s : s + step] = (block * block).sum(1)
            self.xc = torch.from_numpy(xc)
            self.info["largest_cell_here"] = int(counts.max()) if counts.size else 0
        else:
            index = faiss.IndexIVFFlat(self.quantizer, self.d, self.nlist, faiss.METRIC_L2)
            index.is_trained = True  # the quantizer holds the shared centroids
            if self.on_gpu:
                self._gpu_res = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._gpu_res, gpu_device(faiss), index)
            for s in range(0, self.n, DEFAULT_CHUNK):
                index.add(self.x[s : s + DEFAULT_CHUNK])
            self.index = index
        self.info.update(
            gpu=self.on_gpu,
            knn_backend=self.backend,
            nlist=self.nlist,
            nprobe=self.nprobe,
            train_seconds=train_s,
            build_seconds=time.perf_counter() - t0,
        )

    def probe_rows(self, rows: np.ndarray, nprobe: int) -> np.ndarray:
        """The ``nprobe`` nearest cells of this rank's rows ``rows`` [m]: [m, p] int64."""
        if min(int(nprobe), self.nlist) == self.own_probes.shape[1]:
            return self.own_probes[rows]
        return self.probe(self.x[rows], nprobe)

    def probe(self, q: np.ndarray, nprobe: int) -> np.ndarray:
        """The ``nprobe`` nearest cells of each query ``q`` [m, D]: [m, p] int64 (same on every rank)."""
        p = max(1, min(int(nprobe), self.nlist))
        out = np.empty((len(q), p), dtype=np.int64)
        for s in range(0, len(q), DEFAULT_CHUNK):
            out[s : s + DEFAULT_CHUNK] = self.quantizer.search(q[s : s + DEFAULT_CHUNK], p)[1]
        return out

    def _cells(
        self, q: np.ndarray, k: int, probes: np.ndarray, budget: int = 1 << 24
    ) -> tuple[np.ndarray, ...]:
        """Each query against this rank's members of its probed cells ``probes`` [m, p]; cell by cell,
        all queries probing a cell in one product."""
        out_d = np.empty((len(q), k), dtype=np.float32)
        out_i = np.empty((len(q), k), dtype=np.int64)
        p = probes.shape[1]
        step = max(1, budget // (p * k))
        for b0 in range(0, len(q), step):
            qb, pb = q[b0 : b0 + step], probes[b0 : b0 + step]
            m = len(qb)
            buf_d = np.full((m, p, k), np.inf, dtype=np.float32)
            buf_i = np.full((m, p, k), -1, dtype=np.int64)
            flat = pb.ravel()  # entry e = (query e // p, probe e % p)
            order = np.argsort(flat, kind="stable")
            cells, first = np.unique(flat[order], return_index=True)
            bounds = np.append(first, len(order))
            qt = torch.from_numpy(qb)
            for c, a, e in zip(cells.tolist(), bounds[:-1].tolist(), bounds[1:].tolist()):
                c0, c1 = (int(self.starts[c]), int(self.starts[c + 1])) if c >= 0 else (0, 0)
                if c1 == c0:
                    continue
                qi, slot = order[a:e] // p, order[a:e] % p
                qq = qt[torch.from_numpy(qi)] - torch.from_numpy(self.centroids[c])  # [e, D], centred
                d2 = torch.addmm(self.xc_norm[None, c0:c1], qq, self.xc[c0:c1].T, alpha=-2.0)  # [e, n_c]
                d2 += (qq * qq).sum(1, keepdim=True)
                kk = min(k, c1 - c0)
                v, j = torch.topk(d2, kk, dim=1, largest=False, sorted=True)
                buf_d[qi, slot, :kk] = v.clamp_min_(0).numpy()
                buf_i[qi, slot, :kk] = self.perm[c0 + j.numpy()]
            v, j = torch.topk(torch.from_numpy(buf_d.reshape(m, p * k)), k, dim=1, largest=False)
            out_d[b0 : b0 + m] = v.numpy()
            out_i[b0 : b0 + m] = np.take_along_axis(buf_i.reshape(m, p * k), j.numpy(), axis=1)
        return out_d, out_i

    # ------------------------------------------------------------------ exact path: kernel choice
    def _pairwise_kernel(self, gids: np.ndarray) -> np.ndarray:
        """Whether the single-process search computed query ``gids`` pair by pair: it searched the pool
        in blocks of DEFAULT_CHUNK rows, and FAISS uses BLAS when ``rows * D`` reaches the threshold."""
        thr = int(self.faiss.cvar.distance_compute_blas_threshold)
        start = (gids // DEFAULT_CHUNK) * DEFAULT_CHUNK
        rows = np.minimum(DEFAULT_CHUNK, self.n_global - start)
        return rows * self.d < thr

    def _flat(self, q: np.ndarray, k: int, gids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        index = self.searcher.index
        out_d = np.empty((len(q), k), dtype=np.float32)
        out_i = np.empty((len(q), k), dtype=np.int64)
        if self.on_gpu or gids is None:
            for s in range(0, len(q), DEFAULT_CHUNK):
                out_d[s : s + DEFAULT_CHUNK], out_i[s : s + DEFAULT_CHUNK] = index.search(
                    q[s : s + DEFAULT_CHUNK], k
                )
            return out_d, out_i
        pairwise = self._pairwise_kernel(gids)
        thr = int(self.faiss.cvar.distance_compute_blas_threshold)
        nthreads = max(1, int(self.faiss.omp_get_max_threads()))
        piece = max(1, (thr - 1) // self.d)  # rows per call that keep FAISS pair by pair
        for sel, step in ((np.flatnonzero(pairwise), piece), (np.flatnonzero(~pairwise), DEFAULT_CHUNK)):
            for s in range(0, len(sel), step):
                part = sel[s : s + step]
                qp = q[part]
                if len(part) < nthreads:  # pad: fewer rows than threads selects a BLAS kernel
                    qp = np.concatenate([qp, np.repeat(qp[:1], nthreads - len(part), axis=0)])
                dd, ii = index.search(np.ascontiguousarray(qp), k)
                out_d[part], out_i[part] = dd[: len(part)], ii[: len(part)]
        return out_d, out_i

    # ------------------------------------------------------------------ search
    def search(
        self,
        q: np.ndarray,
        k: int,
        gids: np.ndarray | None = None,
        probes: np.ndarray | None = None,
        nprobe: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` nearest shard rows of each query ``q`` [m, D]: (dist2 [m, k'] float32, local ids
        [m, k'] int64, -1 where a list is short), k' = min(k, n). ``gids``: the queries' global ids (exact
        path); ``probes`` [m, p]: their cells ('cells'); ``nprobe``: cells probed ('ivf')."""
        k = min(int(k), self.n)
        if len(q) == 0 or k == 0:
            return np.empty((len(q), k), dtype=np.float32), np.empty((len(q), k), dtype=np.int64)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if self.backend == "flat":
            return self._flat(q, k, gids)
        if self.backend == "cells":
            return self._cells(q, k, probes)
        self.index.nprobe = max(
            1, min(int(nprobe or self.nprobe), self.nlist, 2048 if self.on_gpu else self.nlist)
        )
        if self.on_gpu:
            k = min(k, 2048)  # GPU IVF limit
        return self.index.search(q, k)

    def exact(self, q: np.ndarray, k: int, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-``k`` (float32) against the shard, for the few queries an approximate index
        leaves short of neighbours: (dist2 [m, k'], local ids [m, k'])."""
        k = min(int(k), self.n)
        xs = torch.from_numpy(self.x)
        xn = (xs * xs).sum(1)
        best_d = torch.full((len(q), k), float("inf"))
        best_i = torch.full((len(q), k), -1, dtype=torch.int64)
        qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
        qn = (qt * qt).sum(1, keepdim=True)
        for s in range(0, self.n, chunk):
            d2 = torch.addmm(qn + xn[None, s : s + chunk], qt, xs[s : s + chunk].T, alpha=-2.0)
            v, j = torch.topk(d2, min(k, d2.shape[1]), dim=1, largest=False)
            best_d, pos = torch.topk(torch.cat([best_d, v.clamp_min(0)], 1), k, dim=1, largest=False)
            best_i = torch.gather(torch.cat([best_i, j + s], 1), 1, pos)
        return best_d.numpy(), best_i.numpy()
