"""k-means alternative to DPC-KNN (``faiss.Kmeans``), returning the same :class:`ClusterResult`.

Cost is O(N * C * D * niter): fine for small C, slow for C ~ N / 2 on large pools.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from missrec.interests.config import ClusterResult, InterestConfig
from missrec.interests.dpc_knn import mean_centroids
from missrec.interests.knn import DEFAULT_CHUNK, faiss_num_gpus, import_faiss

logger = logging.getLogger(__name__)


def kmeans_interests(x: np.ndarray, num_clusters: int, cfg: InterestConfig | None = None) -> ClusterResult:
    """Cluster tokens ``x`` [N, D] float32 into ``num_clusters`` with seeded k-means.

    ``centres`` holds, per cluster, the member token nearest its k-means centroid (-1 if the
    cluster ends up empty); ``centroids`` are member means (the k-means centroid when empty).
    """
    cfg = cfg or InterestConfig(method="kmeans")
    faiss = import_faiss()
    n, d = x.shape
    c = int(num_clusters)
    timings: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    gpu = faiss_num_gpus(faiss) > 0 if cfg.use_gpu == "auto" else bool(cfg.use_gpu)
    km = faiss.Kmeans(
        d,
        c,
        niter=int(cfg.kmeans_niter),
        seed=int(cfg.seed),
        gpu=gpu,
        verbose=bool(cfg.show_progress),
        min_points_per_centroid=1,
        max_points_per_centroid=256,
    )
    km.train(x)
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    labels = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float32)
    for s in range(0, n, DEFAULT_CHUNK):
        dd, ii = km.index.search(x[s : s + DEFAULT_CHUNK], 1)  # [b, 1]
        labels[s : s + len(ii)], dist[s : s + len(ii)] = ii[:, 0], dd[:, 0]
    # nearest member of each cluster: first entry per label after sorting by (label, distance)
    srt = np.lexsort((dist, labels))
    first = np.ones(n, dtype=bool)
    first[1:] = labels[srt][1:] != labels[srt][:-1]
    centres = np.full(c, -1, dtype=np.int64)
    centres[labels[srt][first]] = srt[first]
    centroids = mean_centroids(x, labels, c)
    empty = centres < 0
    if empty.any():
        centroids[empty] = np.asarray(km.centroids, dtype=np.float32)[empty]
        logger.warning("k-means left %d of %d clusters empty", int(empty.sum()), c)
    timings["assign"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    return ClusterResult(
        labels=labels,
        centres=centres,
        centroids=centroids,
        timings=timings,
        method="kmeans",
        info={
            "niter": int(cfg.kmeans_niter),
            "gpu": gpu,
            "objective": float(km.obj[-1]) if len(km.obj) else None,
        },
    )
