"""Full-ranking evaluation as the paper does it.

Every item is a candidate (only the padding column is excluded by construction: scores are over the
``num_items`` real items); items already in the history are *not* masked. With one target per row,
Recall@k equals HIT@k. Ties are broken by item index (as a stable descending sort would): an item
with the target's score ranks ahead of it when its index is lower. Ties only arise between items
whose scores are bit-identical, e.g. duplicate listings with the same features in a model without
item IDs (57 of the 2,928 test targets of scientific_mm in inductive mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_KS = (10, 50)


def target_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items.

    ``scores`` [B, N] float, ``target`` [B] int64 -> [B] int64: the number of items scored strictly higher,
    plus the number of lower-index items with an equal score.
    """
    tgt = scores.gather(1, target.view(-1, 1))  # [B, 1]
    higher = (scores > tgt).sum(dim=1)  # [B]
    idx = torch.arange(scores.shape[1], device=scores.device).view(1, -1)  # [1, N]
    ties_before = ((scores == tgt) & (idx < target.view(-1, 1))).sum(dim=1)  # [B]
    return higher + ties_before


@dataclass
class RankingMetrics:
    """Accumulates Recall@k and NDCG@k over batches."""

    ks: tuple[int, ...] = DEFAULT_KS
    _sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``scores`` [B, N], ``target`` [B]."""
        ranks = target_ranks(scores.float(), target).double()  # [B]
        for k in self.ks:
            hit = (ranks < k).double()
            self._sums[f"recall@{k}"] = self._sums.get(f"recall@{k}", 0.0) + float(hit.sum())
            ndcg = hit / torch.log2(ranks + 2.0)
            self._sums[f"ndcg@{k}"] = self._sums.get(f"ndcg@{k}", 0.0) + float(ndcg.sum())
        self.count += int(target.shape[0])

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no rows were evaluated")
        order = [f"{m}@{k}" for k in self.ks for m in ("recall", "ndcg")]
        return {name: self._sums[name] / self.count for name in order}
