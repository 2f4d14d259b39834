"""Candidates for a run with a history affinity: each history item's nearest neighbours, and the affinity itself.

A scoring policy with a history affinity adds ``w`` × each item's largest similarity to an item of the user's
history (:func:`missrec.eval.policy.history_affinity`) to its score. That is a max over the history, which no single
inner product with the user vector searches. :class:`HistoryNeighbours` keeps a second index over the items'
affinity vectors (:meth:`~missrec.serve.scorers.ItemScorer.affinity_vectors`, whose dot product is the
similarity), built on first use, and joins each history item's nearest neighbours to the user's pool; the
recommender then re-ranks the pool with the exact score, the affinity included
(:meth:`HistoryNeighbours.rerank`). An item left out is neither among the user vector's candidates nor near any history item.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from missrec.data.batching import Batch
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
            log.info("affinity index %s over %d items in %.3fs", self.cfg.kind, self.scorer.num_items,
                     time.perf_counter() - t0)
        return self._index

    def add(self, items: torch.Tensor) -> None:
        """Append the affinity vectors of new ``items`` [n] (0-based, the next ids) when the index exists."""
        if self._index is not None:
            self._index.add(as_float32(self.scorer.affinity_vectors(items)))

    @torch.no_grad()
    def rerank(
        self, user: torch.Tensor, batch: Batch, cand: np.ndarray, weight: float, n: int
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Join to each row's pool ``cand`` [B, P] (0-based ids, -1 = none) the ``n`` nearest neighbours of each item
        of the row's history (the model's window ``batch.seq``; ``n`` 0: none), and score the pool exactly for users
        ``user`` [B, D] with ``weight`` × the history affinity added. Returns (pool [B, P'], each row's distinct
        ids ascending then -1 when neighbours were joined; scores [B, P'] float32, -inf on -1). The history items'
        affinity vectors are computed once for both steps."""
        seq = batch.seq.cpu()  # [B, L] item values, 0 = padding
        hist = torch.unique(seq[seq > 0])  # [U]
        hist_vec = self.scorer.affinity_vectors(hist - 1)  # [U, K]
        if n > 0 and hist.numel():
            cand = self._join_neighbours(seq, hist, hist_vec, cand, n)
        return cand, self._scores(user, seq, hist, hist_vec, cand, weight)

    def _join_neighbours(
        self, seq: torch.Tensor, hist: torch.Tensor, hist_vec: torch.Tensor, cand: np.ndarray, n: int
    ) -> np.ndarray:
        """``cand`` [B, P] joined, per row, with the ``n`` nearest neighbours of its history items: [B, P']."""
        _, near = self.index.search(as_float32(hist_vec), n)  # [U, n]
        rows = []
        for r in range(seq.shape[0]):
            mine = np.searchsorted(hist.numpy(), seq[r][seq[r] > 0].numpy())  # rows of `near` for this history
            ids = np.concatenate([cand[r], near[mine].ravel()])
            rows.append(np.unique(ids[ids >= 0]))
        out = np.full((len(rows), max(len(x) for x in rows)), -1, dtype=np.int64)
        for r, ids in enumerate(rows):
            out[r, : ids.size] = ids
        return out

    def _scores(
        self, user: torch.Tensor, seq: torch.Tensor, hist: torch.Tensor, hist_vec: torch.Tensor, cand: np.ndarray,
        weight: float,
    ) -> torch.Tensor:
        """[B, P]: exact scores of each row's pool plus ``weight`` × affinity, row by row, so the cost follows the
        pools, not the catalogue (a batch's pools together can span most of it)."""
        out = torch.full(cand.shape, float("-inf"), dtype=torch.float32, device=user.device)
        for r in range(cand.shape[0]):
            keep = np.flatnonzero(cand[r] >= 0)
            if keep.size == 0:
                continue
            items = torch.from_numpy(cand[r, keep])
            score = self.scorer.scores(user[r : r + 1], items)[0].float()  # [n]
            mine = torch.searchsorted(hist, seq[r][seq[r] > 0])  # rows of hist_vec in this history
            if mine.numel():
                sim = hist_vec[mine.to(hist_vec.device)] @ self.scorer.affinity_vectors(items).T  # [L_r, n]
                score = score + weight * sim.max(0).values.to(score.device)
            out[r, torch.from_numpy(keep).to(out.device)] = score.to(out.device)
        return out


__all__ = ["HistoryNeighbours"]
