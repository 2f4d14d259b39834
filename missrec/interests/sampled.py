"""Interest discovery on a sample of the pool, for catalogues whose every token is too many to cluster each epoch.

With ``InterestConfig.sample_tokens = S`` (> 0) and more than S tokens in the pool, DPC-KNN (or k-means) runs on
a seeded sample of S tokens (each rank contributes in proportion to its shard, so the sample stays sharded) into
as many interests as the whole pool would have (C from N, at most S), and every token left out joins the
cluster of its nearest centroid (a FAISS search over the C
centroids, a block of tokens at a time). The per-epoch cost is then the sample's clustering, which does not grow
with the catalogue, plus one nearest-centroid search per token: O(N log C) instead of the kNN graph of all N
tokens. ``sample_tokens = 0`` (the default) clusters every token, as the paper does.

    res = discover_interests_sampled(my_tokens, InterestConfig(sample_tokens=500_000))
    res.labels   # [n_r] (or [N] in one process): every token's interest
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import numpy as np

from missrec.interests import discover_interests
from missrec.interests.config import ClusterResult, InterestConfig, resolve_num_clusters
from missrec.interests.dist_comm import Comm, is_distributed
from missrec.interests.distributed import discover_interests_distributed
from missrec.interests.knn import faiss_num_gpus, gpu_device, import_faiss
from missrec.interests.scratch import Scratch

log = logging.getLogger(__name__)


def _quota(total: int, sizes: np.ndarray) -> np.ndarray:
    """Split ``total`` over ranks in proportion to ``sizes`` (largest remainder)."""
    share = total * sizes / max(1, int(sizes.sum()))
    q = np.floor(share).astype(np.int64)
    q[np.argsort(-(share - q), kind="stable")[: total - int(q.sum())]] += 1
    return np.minimum(q, sizes)


class CentroidIndex:
    """Nearest of ``centroids`` [C, D]: an exact flat search for C <= 4096, else an IVF index over the centroids
    (cells of about sqrt(C) centroids, 8 probed); on the rank's GPU when ``use_gpu`` allows and FAISS has one."""

    def __init__(self, centroids: np.ndarray, use_gpu: bool | str = "auto") -> None:
        faiss = import_faiss()
        c, d = centroids.shape
        cen = np.ascontiguousarray(centroids, dtype=np.float32)
        if c <= 4096:
            index = faiss.IndexFlatL2(d)
        else:
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, round(math.sqrt(c)), faiss.METRIC_L2)
            index.train(cen)
            index.nprobe = 8
        index.add(cen)
        if (use_gpu is True or use_gpu == "auto") and faiss_num_gpus(faiss) > 0:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, gpu_device(faiss), index)
        self.index = index

    def nearest(self, x: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Index [n] of the nearest centroid of each row of ``x`` [n, D] (read a block at a time)."""
        out = np.empty(x.shape[0], dtype=np.int64)
        for s in range(0, x.shape[0], chunk):
            out[s : s + chunk] = self.index.search(np.ascontiguousarray(x[s : s + chunk], dtype=np.float32), 1)[1][:, 0]
        return out


def discover_interests_sampled(local_tokens: np.ndarray, cfg: InterestConfig, group: object = None
                               ) -> ClusterResult:
    """:func:`~missrec.interests.distributed.discover_interests_distributed` (one process:
    :func:`~missrec.interests.discover_interests`) on every token, or, with ``cfg.sample_tokens`` below the
    pool's size, on a seeded sample, the rest assigned to their nearest centroid. Returns this rank's labels
    (all labels in one process); ``info["sampled"]`` says how many tokens were clustered."""
    distributed = is_distributed(group)
    comm = Comm(group) if distributed else None
    n_r = int(local_tokens.shape[0])
    sizes = comm.all_gather_scalars(n_r) if comm else np.array([n_r])
    n = int(sizes.sum())
    s = int(cfg.sample_tokens)
    if s <= 0 or n <= s:
        return discover_interests_distributed(local_tokens, cfg, group) if distributed else \
            discover_interests(local_tokens, cfg)
    t0 = time.perf_counter()
    rank = comm.rank if comm else 0
    take = int(_quota(s, sizes)[rank])
    chosen = np.sort(np.random.default_rng([int(cfg.seed), 0x73616D70, rank]).choice(n_r, take, replace=False))
    scratch = Scratch(cfg.scratch_dir)
    sample = scratch.empty((take, local_tokens.shape[1]), np.float32, "sample")  # [take, D], on disk when large
    for b in range(0, take, 1 << 16):
        sample[b : b + (1 << 16)] = local_tokens[chosen[b : b + (1 << 16)]]
    scfg = replace(cfg, num_clusters=min(resolve_num_clusters(n, cfg), s))  # as many interests as the pool's
    res = discover_interests_distributed(sample, scfg, group) if distributed else discover_interests(sample, scfg)
    t_sample = time.perf_counter() - t0
    labels = np.empty(n_r, dtype=np.int64)
    labels[chosen] = np.asarray(res.labels)
    rest = np.ones(n_r, dtype=bool)
    rest[chosen] = False
    rest_ids = np.flatnonzero(rest)
    t1 = time.perf_counter()
    index = CentroidIndex(np.asarray(res.centroids), cfg.use_gpu)
    for b in range(0, len(rest_ids), 1 << 18):  # rows of a memory map, a block at a time
        ids = rest_ids[b : b + (1 << 18)]
        labels[ids] = index.nearest(np.asarray(local_tokens[ids]))
    res.timings["assign_rest"] = time.perf_counter() - t1
    res.timings["sample_discovery"] = t_sample
    res.labels = labels
    res.rho = res.delta = None  # per sampled token only: not the pool's
    res.info.update(sampled=s, pool=n, offset=int(sizes[:rank].sum()),
                    scratch_bytes=int(res.info.get("scratch_bytes", 0)) + scratch.file_bytes)
    scratch.close()
    log.info("MID on a sample of %d of %d tokens in %.1fs, the other %d assigned to the nearest of %d centroids "
             "in %.1fs", s, n, t_sample, n - s, len(res.centroids), res.timings["assign_rest"])
    return res
