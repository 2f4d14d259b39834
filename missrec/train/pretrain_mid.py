"""Interest discovery of a pre-training epoch, sharded over the ranks, into the epoch's index files.

Each rank adapts only its contiguous slice of the items (:func:`missrec.interests.index.item_slice`), a chunk
at a time (feature rows read from the memory-mapped tables, adapted on the step's device), and writes the
present tokens, modality-major, into a scratch memory map. The ranks then cluster the pool together
(:func:`missrec.interests.distributed.discover_interests_distributed`: kNN, densities, parents and labels stay
sharded; above ``sample_tokens`` tokens on a sample, :mod:`missrec.interests.sampled`), and each writes its items' interest ids and the centroids it owns
(:mod:`missrec.interests.tables`). What a rank holds is its slice's token pool (on disk), its kNN lists, its
per-token values and the C centroids, never the catalogue.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from missrec.data.feature_store import FeatureStore
from missrec.interests.config import InterestConfig
from missrec.interests.dist_centres import owner_ranges
from missrec.interests.dist_comm import Comm
from missrec.interests.index import item_slice
from missrec.interests.sampled import discover_interests_sampled
from missrec.interests.scratch import Scratch
from missrec.interests.tables import write_index, write_slices
from missrec.models.missrec import MISSRec
from missrec.train.dist import barrier

log = logging.getLogger(__name__)


@torch.no_grad()
def adapt_slice(model: MISSRec, store: FeatureStore, lo: int, hi: int, scratch: Scratch, device: torch.device,
                chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """The present adapted tokens of items ``lo .. hi - 1``, modality-major ([T, D] float32, a scratch memory
    map when large), and which modalities each item has ([hi - lo, M] bool)."""
    n, m_count = hi - lo, store.num_modalities
    pool = scratch.empty((n * m_count, model.hidden), np.float32, "tokens")
    present = np.zeros((n, m_count), dtype=bool)
    filled = 0
    was_training = model.training
    model.eval()
    for m in range(m_count):
        adapter = model.adapters[m]
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            rows = store.gather(np.arange(lo + s + 1, lo + e + 1, dtype=np.int64), modalities=(m,))[0]
            here = np.abs(rows.astype(np.float32)).sum(1) > 0
            present[s:e, m] = here
            feats = torch.from_numpy(rows[here]).to(device, non_blocking=True)
            tokens = adapter(feats.to(model.pos_emb.weight.dtype)).float().cpu().numpy()  # [n_present, D]
            pool[filled : filled + len(tokens)] = tokens
            filled += len(tokens)
    model.train(was_training)
    return pool[:filled], present


def discover_epoch_interests(model: MISSRec, store: FeatureStore, cfg: InterestConfig, folder: str | Path,
                             rank: int, world: int, device: torch.device) -> tuple[dict[str, float], np.ndarray]:
    """Discover this epoch's interests over every rank's item slice and write them to ``folder``; collective.
    Returns statistics for logging (clusters, tokens, seconds, cluster sizes, scratch bytes) and the cluster
    sizes [C]."""
    t0 = time.perf_counter()
    folder = Path(folder)
    lo, hi = item_slice(store.num_items, rank, world)
    with Scratch(cfg.scratch_dir) as scratch:
        pool, present = adapt_slice(model, store, lo, hi, scratch, device)
        t_adapt = time.perf_counter() - t0
        res = discover_interests_sampled(pool, cfg)
        labels = np.asarray(res.labels)  # [T_r]: this rank's tokens (one process: every token)
        scratch_bytes = scratch.file_bytes + int(res.info.get("scratch_bytes", 0))
    item_interest = np.full((present.shape[1], present.shape[0]), -1, dtype=np.int32)  # [M, n_r]
    item_interest[present.T] = labels  # modality-major, as the pool
    c = int(res.centroids.shape[0])
    bounds = owner_ranges(c, world)
    write_slices(folder, rank, item_interest.T, np.asarray(res.centroids)[bounds[rank] : bounds[rank + 1]])
    sizes = np.bincount(labels, minlength=c)
    if world > 1:
        sizes = Comm().all_reduce_sum(sizes.astype(np.int64))
    stats = {"clusters": float(c), "tokens": float(sizes.sum()), "seconds": time.perf_counter() - t0,
             "adapt_seconds": t_adapt, "max_size": float(sizes.max()), "mean_size": float(sizes.mean()),
             "scratch_gib": scratch_bytes / 2**30}
    barrier()  # every slice is written
    if rank == 0:
        items = [item_slice(store.num_items, r, world) for r in range(world)]
        write_index(folder, [b[0] for b in items] + [items[-1][1]], bounds, store.num_modalities,
                    model.hidden, stats)
    barrier()  # the index is complete before anyone reads it
    return stats, sizes
