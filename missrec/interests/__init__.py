"""Multi-modal interest discovery: cluster adapted item tokens into interests (DPC-KNN or k-means).

    from missrec.interests import InterestConfig, discover_interests
    result = discover_interests(tokens, InterestConfig(cluster_ratio=0.02))   # tokens [N, D]
    result.labels      # [N] cluster of each token
    result.centroids   # [C, D]

FAISS (extra ``cpu`` or ``gpu``) is imported only when clustering runs.
"""

from __future__ import annotations

import numpy as np
import torch

from missrec.interests.config import (
    ClusterResult,
    InterestConfig,
    as_token_matrix,
    resolve_k,
    resolve_num_clusters,
)
from missrec.interests.dpc_knn import dpc_knn
from missrec.interests.index import InterestIndex, TokenPool, build_token_pool
from missrec.interests.kmeans import kmeans_interests

__all__ = [
    "ClusterResult",
    "InterestConfig",
    "InterestIndex",
    "TokenPool",
    "build_token_pool",
    "discover_interests",
]


def discover_interests(tokens: np.ndarray | torch.Tensor, cfg: InterestConfig | None = None) -> ClusterResult:
    """Cluster tokens [N, D] into C interests as ``cfg`` says (C from ``num_clusters`` or the ratio).

    Raises ValueError for non-finite tokens, fewer than 2 tokens, or C > N.
    """
    cfg = cfg or InterestConfig()
    x = as_token_matrix(tokens)
    n = x.shape[0]
    c = resolve_num_clusters(n, cfg)
    if cfg.method == "kmeans":
        return kmeans_interests(x, c, cfg)
    return dpc_knn(x, c, resolve_k(n, cfg.knn), cfg)
