"""A FAISS inner-product index over item vectors: exact (``IndexFlatIP``) or approximate (IVF-Flat, HNSW).

The index knows vectors only; which vectors represent items and users for a given model lives in
:mod:`missrec.serve.scorers`. Row ``i`` of the index is item ``i`` (0-based): items are only ever
appended, in order, so no id map is needed.

GPU FAISS is used for ``flat`` and ``ivf`` when the installed FAISS build sees a GPU (``use_gpu``
``"auto"``); HNSW has no GPU version and stays on the CPU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from missrec.errors import ConfigError
from missrec.interests.knn import faiss_num_gpus, gpu_device, import_faiss

log = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw")
GPU_MAX_K = 2048  # GPU FAISS answers at most this many neighbours per query


@dataclass(frozen=True)
class IndexConfig:
    """Which FAISS index to build.

    ``kind``: ``flat`` (exact, the default), ``ivf`` (IVF-Flat: ``nlist`` k-means cells, ``nprobe``
    probed per query; ``nlist`` 0 = about ``4 sqrt(N)``, at most ``N / 39``) or ``hnsw`` (graph with
    ``hnsw_m`` links per node; ``ef_search`` candidates kept while searching, raised to the number of
    results asked for). ``use_gpu``: ``auto`` | ``yes`` | ``no``.
    """

    kind: str = "flat"
    nlist: int = 0
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    use_gpu: str = "auto"
    train_size: int = 100_000  # IVF: vectors sampled for k-means training
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        if self.use_gpu not in ("auto", "yes", "no"):
            raise ConfigError(f"use_gpu must be 'auto', 'yes' or 'no', got {self.use_gpu!r}")
        if self.nlist < 0 or self.nprobe < 1 or self.hnsw_m < 2 or self.ef_search < 1 or self.ef_construction < 1:
            raise ConfigError("need nlist >= 0, nprobe >= 1, hnsw_m >= 2, ef_search >= 1, ef_construction >= 1")

    @property
    def approximate(self) -> bool:
        return self.kind != "flat"


def auto_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: about ``4 sqrt(n)``, with at least 39 training vectors per cell."""
    return max(1, min(round(4 * math.sqrt(max(n, 1))), n // 39))


class ItemIndex:
    """Inner-product search over item vectors [N, d].

    Build with :meth:`train` (IVF only; a no-op otherwise) then :meth:`add` (in item order); query with
    :meth:`search`. ``info`` describes the index (kind, device, sizes, build seconds).
    """

    def __init__(self, dim: int, cfg: IndexConfig = IndexConfig()) -> None:
        if dim < 1:
            raise ValueError(f"index dimension must be >= 1, got {dim}")
        self.faiss = import_faiss()
        self.faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
        self.cfg = cfg
        self.dim = int(dim)
        ngpu = faiss_num_gpus(self.faiss)
        if cfg.use_gpu == "yes" and ngpu == 0:
            raise ConfigError("use_gpu='yes' but FAISS sees no GPU (is the faiss-gpu build installed?)")
        want_gpu = ngpu > 0 and cfg.use_gpu != "no"
        if want_gpu and cfg.kind == "hnsw":
            log.info("HNSW has no GPU version in FAISS: the index stays on the CPU")
        self.on_gpu = want_gpu and cfg.kind != "hnsw"
        self._gpu_res = None
        self._index: Any = None
        self.nlist = 0
        self.build_seconds = 0.0
        if cfg.kind == "flat":
            self._index = self._to_device(self.faiss.IndexFlatIP(self.dim))
        elif cfg.kind == "hnsw":
            index = self.faiss.IndexHNSWFlat(self.dim, cfg.hnsw_m, self.faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = cfg.ef_construction
            index.hnsw.efSearch = cfg.ef_search
            self._index = index
        # ivf: made by train(), once the cell count can follow the data

    # ------------------------------------------------------------------------------ building
    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    def train(self, sample: np.ndarray, total: int | None = None) -> None:
        """IVF: learn the cells from ``sample`` [S, d] (``total``: the catalogue size the cell count is
        sized for; default S). A no-op for ``flat`` and ``hnsw``."""
        if self.cfg.kind != "ivf":
            return
        if self._index is not None:
            raise RuntimeError("the IVF index is already trained")
        x = self._as_matrix(sample, "training sample")
        if x.shape[0] < 1:
            raise ValueError("IVF training needs at least one vector")
        t0 = time.perf_counter()
        n = int(total or x.shape[0])
        self.nlist = min(self.cfg.nlist or auto_nlist(n), x.shape[0])
        quantizer = self.faiss.IndexFlatIP(self.dim)
        index = self.faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, self.faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.cfg.seed
        index.train(x)
        index.nprobe = min(self.cfg.nprobe, self.nlist)
        self._quantizer = quantizer  # the IVF index does not own it: keep it alive
        self._index = self._to_device(index)
        self.build_seconds += time.perf_counter() - t0

    def add(self, vectors: np.ndarray) -> None:
        """Append item vectors [n, d]; they get the next ``n`` row ids."""
        if not self.is_trained:
            raise RuntimeError("train the IVF index before adding vectors")
        x = self._as_matrix(vectors, "item vectors")
        t0 = time.perf_counter()
        self._index.add(x)
        self.build_seconds += time.perf_counter() - t0

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    # ------------------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` largest inner products of each query [B, d]: (scores [B, n] float32, ids [B, n]
        int64). ``n`` is capped at the index size (and at 2048 on GPU); an approximate index may return
        fewer hits, padded with id -1 and score -inf."""
        q = self._as_matrix(queries, "queries")
        n = min(int(n), self.ntotal)
        if n < 1 or q.shape[0] == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        if self.on_gpu and n > GPU_MAX_K:
            log.warning("GPU FAISS returns at most %d neighbours; asked for %d", GPU_MAX_K, n)
            n = GPU_MAX_K
        if self.cfg.kind == "hnsw":
            self._index.hnsw.efSearch = max(self.cfg.ef_search, n)
        scores, ids = self._index.search(q, n)
        ids = ids.astype(np.int64, copy=False)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32, copy=False)
        return scores, ids

    @property
    def info(self) -> dict[str, Any]:
        """Kind, device, size and build time, for logs and the launcher's JSON."""
        out: dict[str, Any] = {
            "kind": self.cfg.kind, "approximate": self.cfg.approximate, "gpu": self.on_gpu, "dim": self.dim,
            "ntotal": self.ntotal, "build_seconds": round(self.build_seconds, 4),
        }
        if self.cfg.kind == "ivf":
            out.update(nlist=self.nlist, nprobe=min(self.cfg.nprobe, max(self.nlist, 1)))
        if self.cfg.kind == "hnsw":
            out.update(hnsw_m=self.cfg.hnsw_m, ef_search=self.cfg.ef_search)
        return out

    # ------------------------------------------------------------------------------ helpers
    def _to_device(self, index: Any) -> Any:
        if not self.on_gpu:
            return index

        if self._gpu_res is None:
            self._gpu_res = self.faiss.StandardGpuResources()
        return self.faiss.index_cpu_to_gpu(self._gpu_res, gpu_device(self.faiss), index)

    def _as_matrix(self, x: np.ndarray, what: str) -> np.ndarray:
        a = np.ascontiguousarray(x, dtype=np.float32)
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise ValueError(f"{what} must be [n, {self.dim}], got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{what} hold NaN or inf")
        return a


def index_items(
    vectors: Callable[[torch.Tensor], np.ndarray | torch.Tensor], num_items: int, dim: int, cfg: IndexConfig,
    chunk_items: int = 65_536, progress: bool = True, desc: str = "item index",
) -> ItemIndex:
    """An index over ``vectors(items)`` ([n] 0-based -> [n, dim]) of items ``0 .. num_items - 1``, added chunk by
    chunk in item order (IVF: trained first on a sample of ``cfg.train_size`` items)."""
    index = ItemIndex(dim, cfg)
    if cfg.kind == "ivf":
        rng = np.random.default_rng(cfg.seed)
        sample = np.sort(rng.choice(num_items, size=min(num_items, cfg.train_size), replace=False))
        index.train(as_float32(vectors(torch.from_numpy(sample))), total=num_items)
    for lo in tqdm(range(0, num_items, chunk_items), desc=desc, unit="chunk", leave=False,
                   disable=not progress or num_items <= chunk_items):
        index.add(as_float32(vectors(torch.arange(lo, min(lo + chunk_items, num_items)))))
    return index


def as_float32(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 numpy of a tensor (any device) or an array."""
    return x.float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


__all__ = ["KINDS", "IndexConfig", "ItemIndex", "as_float32", "auto_nlist", "index_items"]
