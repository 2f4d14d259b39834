"""Candidates for a run with a history affinity: each history item's nearest neighbours, and the affinity itself.

A model with ``history_affinity`` adds ``w`` × each item's largest similarity to an item of the user's history
(:func:`missrec.models.history.history_affinity`) to its score. That is a max over the history, which no single
inner product with the user vector searches. :class:`HistoryNeighbours` keeps a second index over the items'
affinity vectors (:meth:`~missrec.serve.scorers.ItemScorer.affinity_vectors`, whose dot product is the
similarity), built on first use, and joins each history item's nearest neighbours to the user's pool; the
recommender then re-ranks the pool with the exact score, the affinity (:meth:`HistoryNeighbours.affinity`)
included. An item left out is neither among the user vector's candidates nor near any history item.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from missrec.data.batching import Batch
from missrec.models.history import max_over_history
from missrec.serve.index import IndexConfig, ItemIndex, as_float32, index_items
from missrec.serve.scorers import ItemScorer

log = logging.getLogger(__name__)


class HistoryNeighbours:
    """The affinity index of ``scorer``'s items (``cfg``; built on first use) and the pool and scores it serves."""

    def __init__(self, scorer: ItemScorer, cfg: IndexConfig, chunk_items: int = 65_536, progress: bool = True) -> None:
        self.scorer = scorer
        self.cfg = cfg
        self.chunk_items = chunk_items
        self.progress = progress
        self._index: ItemIndex | None = None

    @property
    def built(self) -> bool:
        return self._index is not None

    @property
    def index(self) -> ItemIndex:
        """The index over every item's affinity vector (built now if it was not)."""
        if self._index is None:
            t0 = time.perf_counter()
            dim = int(self.scorer.affinity_vectors(torch.zeros(1, dtype=torch.long)).shape[1])
            self._index = index_items(self.scorer.affinity_vectors, self.scorer.num_items, dim, self.cfg,
                                      self.chunk_items, self.progress, "affinity index")
            log.info("affinity index %s over %d items in %.3fs (history affinity weight %g)",
                     self.cfg.kind, self.scorer.num_items, time.perf_counter() - t0, self.scorer.affinity_weight)
        return self._index

    def add(self, items: torch.Tensor) -> None:
        """Append the affinity vectors of new ``items`` [n] (0-based, the next ids) when the index exists."""
        if self._index is not None:
            self._index.add(as_float32(self.scorer.affinity_vectors(items)))

    def pool(self, batch: Batch, cand: np.ndarray, n: int) -> np.ndarray:
        """The pool ``cand`` [B, P] (0-based ids, -1 = none) joined, per row, with the ``n`` nearest neighbours of
        each item of the row's history (the model's window ``batch.seq``): [B, P'], each row's distinct ids
        ascending, then -1."""
        seq = batch.seq.cpu()  # [B, L] item values, 0 = padding
        items = torch.unique(seq[seq > 0])  # [U]
        if items.numel() == 0:
            return cand
        _, near = self.index.search(as_float32(self.scorer.affinity_vectors(items - 1)), n)  # [U, n]
        rows = []
        for r in range(seq.shape[0]):
            mine = np.searchsorted(items.numpy(), seq[r][seq[r] > 0].numpy())  # rows of `near` for this history
            ids = np.concatenate([cand[r], near[mine].ravel()])
            rows.append(np.unique(ids[ids >= 0]))
        out = np.full((len(rows), max(len(x) for x in rows)), -1, dtype=np.int64)
        for r, ids in enumerate(rows):
            out[r, : ids.size] = ids
        return out

    @torch.no_grad()
    def affinity(self, batch: Batch, items: np.ndarray) -> torch.Tensor:
        """[B, C]: the history affinity of ``items`` [C] (0-based) for each row of ``batch``, as the model scores
        it (the largest similarity to an item of the row's window ``batch.seq``; 0 without history)."""
        seq = batch.seq
        hist = torch.unique(seq[seq > 0])  # [U] item values
        sim = self.scorer.affinity_vectors(hist - 1) @ self.scorer.affinity_vectors(torch.from_numpy(items)).T  # [U, C]
        return max_over_history(seq.to(sim.device), hist.to(sim.device), sim)


__all__ = ["HistoryNeighbours"]
