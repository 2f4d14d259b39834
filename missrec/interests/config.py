"""What interest discovery takes and returns, shared by every method (DPC-KNN, k-means, distributed):
:class:`InterestConfig`, :class:`ClusterResult`, and the checks and sizes derived from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from missrec.errors import ConfigError

METHODS = ("dpc_knn", "kmeans")


@dataclass(frozen=True)
class InterestConfig:
    """How to discover interests. ``num_clusters`` overrides ``cluster_ratio`` (C = round(ratio * N)).

    ``knn``: neighbours for the density, a count (int) or a fraction of N (float < 1).
    ``approx_threshold``: pools of at least this many tokens use an approximate kNN index
    (``approx_method``, see :class:`missrec.interests.knn.KnnSearcher`) instead of the exact flat one.
    ``peak_expand``: on the approximate path, tokens with no denser token among their kNN are
    searched again with these larger k before the exact restricted search.
    """

    method: str = "dpc_knn"
    cluster_ratio: float = 0.5
    num_clusters: int | None = None
    knn: int | float = 5
    approx_threshold: int = 50_000
    approx_method: str = "auto"  # 'cells' (CPU default) | 'ivf' (FAISS IVF-Flat, GPU default) | 'auto'
    nprobe: int | None = None  # cells probed per query; None: 8 ('cells') / 16 ('ivf')
    nlist: int | None = None  # coarse k-means cells; None: 4 sqrt(N) (oversized cells are split further)
    peak_expand: tuple[int, ...] = (64, 512)
    peak_nprobe_factor: int = 4  # the peak searches probe this many times more cells
    scale_by_dim: bool = True
    kmeans_niter: int = 20
    seed: int = 0
    use_gpu: bool | str = "auto"
    show_progress: bool = False
    recall_sample: int = 0  # >0: measure the approximate kNN's recall@k on this many rows (diagnostic)
    assign: str = "parent"  # 'parent': follow the nearest denser token (density peaks) | 'nearest_centre' (official)
    scratch_dir: str = ""  # distributed: where a rank's large per-token arrays are memory-mapped ("": system temp)
    # > 0: cluster a seeded sample of this many tokens, the others join their nearest centroid (large catalogues;
    # missrec.interests.sampled); 0: every token
    sample_tokens: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak_expand", tuple(int(v) for v in self.peak_expand))
        if self.method not in METHODS:
            raise ConfigError(f"interest method must be one of {METHODS}, got {self.method!r}")
        if not (0.0 < float(self.cluster_ratio) <= 1.0):
            raise ConfigError(f"cluster_ratio must be in (0, 1], got {self.cluster_ratio}")
        if self.num_clusters is not None and int(self.num_clusters) < 1:
            raise ConfigError(f"num_clusters must be >= 1, got {self.num_clusters}")
        if isinstance(self.knn, bool) or not isinstance(self.knn, (int, float)) or self.knn <= 0:
            raise ConfigError(f"knn must be a positive count or ratio, got {self.knn!r}")
        if isinstance(self.knn, float) and not self.knn.is_integer() and self.knn >= 1:
            raise ConfigError(f"knn as a ratio must be < 1, got {self.knn}")
        if (
            min(
                self.approx_threshold,
                self.kmeans_niter,
                self.nprobe or 1,
                self.nlist or 1,
                self.peak_nprobe_factor,
            )
            < 1
        ):
            raise ConfigError(
                "approx_threshold, kmeans_niter, nprobe, nlist and peak_nprobe_factor must be >= 1"
            )
        if self.sample_tokens < 0:
            raise ConfigError(f"sample_tokens must be >= 0 (0: every token), got {self.sample_tokens}")
        if self.assign not in ("parent", "nearest_centre"):
            raise ConfigError(f"assign must be 'parent' or 'nearest_centre', got {self.assign!r}")
        if self.approx_method not in ("auto", "cells", "ivf"):
            raise ConfigError(f"approx_method must be 'auto', 'cells' or 'ivf', got {self.approx_method!r}")
        if self.use_gpu not in ("auto", True, False):
            raise ConfigError(f"use_gpu must be 'auto', True or False, got {self.use_gpu!r}")


@dataclass
class ClusterResult:
    """Clusters of N tokens into C interests.

    labels [N] int64 in 0..C-1; centres [C] int64 token index of each cluster's centre (-1 for an
    empty k-means cluster); centroids [C, D] float32 mean token of each cluster; rho / delta [N]
    float64 (DPC-KNN only); timings: seconds per phase.
    """

    labels: np.ndarray
    centres: np.ndarray
    centroids: np.ndarray
    rho: np.ndarray | None = None
    delta: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    method: str = "dpc_knn"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_clusters(self) -> int:
        return int(self.centres.shape[0])

    def cluster_sizes(self) -> np.ndarray:
        """Tokens per cluster, [C] int64."""
        return np.bincount(self.labels, minlength=self.num_clusters).astype(np.int64)


# ---------------------------------------------------------------------------- validation helpers
def as_token_matrix(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    """Tokens as a C-contiguous float32 [N, D] array (no copy when already so); checks finiteness."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(tokens, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"tokens must be a 2-D [N, D] array, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 tokens to cluster, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError("tokens have width 0")
    bad = _nonfinite_rows(x)
    if bad.size:
        raise ValueError(f"{bad.size} token(s) contain NaN or inf; first bad row is {int(bad[0])}")
    return x


def _nonfinite_rows(x: np.ndarray, chunk: int = 65536) -> np.ndarray:
    bad = []
    for s in range(0, x.shape[0], chunk):
        part = x[s : s + chunk]
        if not np.isfinite(part.sum()):  # cheap screen; exact check only when it fails
            bad.append(s + np.flatnonzero(~np.isfinite(part).all(axis=1)))
    return np.concatenate(bad) if bad else np.empty(0, dtype=np.int64)


def resolve_num_clusters(n: int, cfg: InterestConfig) -> int:
    """C from ``num_clusters`` or ``round(cluster_ratio * n)`` (at least 1); error when C > n."""
    c = int(cfg.num_clusters) if cfg.num_clusters is not None else max(1, round(cfg.cluster_ratio * n))
    if c > n:
        raise ValueError(f"asked for {c} clusters but there are only {n} tokens")
    return c


def resolve_k(n: int, knn: float) -> int:
    """Neighbour count from a count or a ratio of ``n``, clamped to 1..n-1."""
    k = round(knn * n) if isinstance(knn, float) and knn < 1 else int(knn)
    return max(1, min(k, n - 1))
