"""Full-ranking evaluation as the paper does it.

Every item is a candidate (only the padding column is excluded by construction: scores are over the
``num_items`` real items); items already in the history are *not* masked. With one target per row,
Recall@k equals HIT@k. Ties are broken by item index (as a stable descending sort would): an item
with the target's score ranks ahead of it when its index is lower. Ties only arise between items
whose scores are bit-identical, e.g. duplicate listings with the same features in a model without
item IDs (57 of the 2,928 test targets of scientific_mm in inductive mode).

``ties="expected"`` instead scores each target by its expectation over a uniformly random order of the
items tied with it (McSherry & Najork, ECIR 2008): with ``h`` items scored higher and ``t`` others tied,
the target is equally likely at every rank ``h .. h + t``. This rule needs no item order, so figures of
two codes (or an official checkpoint's dumped ranks) compare exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from missrec.errors import ConfigError

DEFAULT_KS = (10, 50)
TIE_RULES = ("index", "expected")


@contextlib.contextmanager
def scoring(model: nn.Module) -> Iterator[None]:
    """Eval mode for a scoring pass, with the model's ``begin_eval``/``end_eval`` hooks if it has them;
    the previous train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    hook = getattr(model, "begin_eval", None)
    if hook is not None:
        hook()
    try:
        yield
    finally:
        end = getattr(model, "end_eval", None)
        if end is not None:
            end()
        model.train(was_training)


def check_tie_rule(ties: str) -> None:
    """Refuse a tie rule other than :data:`TIE_RULES`."""
    if ties not in TIE_RULES:
        raise ConfigError(f"ties must be one of {TIE_RULES}, got {ties!r}")


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


def higher_and_ties(scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores`` [B, N], ``target`` [B] -> ([B] items scored strictly higher, [B] other items tied)."""
    tgt = scores.gather(1, target.view(-1, 1))  # [B, 1]
    return (scores > tgt).sum(dim=1), (scores == tgt).sum(dim=1) - 1


def expected_at_k(higher: torch.Tensor, ties: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected hit@k and NDCG@k [B] of targets at a uniformly random rank in ``higher .. higher + ties``.

    ``higher``, ``ties``: [B] int64 (:func:`higher_and_ties`)."""
    h = higher.double()
    n = ties.double() + 1.0  # ranks the target can take
    hit = ((h + n).clamp(max=k) - h.clamp(max=k)) / n  # share of those ranks below k
    # discount sum over ranks [a, b) below k: cumulative 1/log2(r + 2) table of the first k ranks
    disc = torch.cat([torch.zeros(1, dtype=torch.float64, device=h.device),
                      torch.cumsum(1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=h.device) + 2), 0)])
    lo = higher.clamp(max=k)
    hi = (higher + ties + 1).clamp(max=k)
    return hit, (disc[hi] - disc[lo]) / n


@dataclass
class RankingMetrics:
    """Accumulates Recall@k and NDCG@k over batches."""

    ks: tuple[int, ...] = DEFAULT_KS
    ties: str = "index"  # index | expected (see the module docstring)
    _sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def __post_init__(self) -> None:
        check_tie_rule(self.ties)

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``scores`` [B, N], ``target`` [B]."""
        if self.ties == "expected":
            higher, ties = higher_and_ties(scores.float(), target)  # [B], [B]
        else:  # the index rule: one rank each, ties already placed by item index
            higher = target_ranks(scores.float(), target)  # [B]
            ties = torch.zeros_like(higher)
        for k in self.ks:
            hit, ndcg = expected_at_k(higher, ties, k)
            self._sums[f"recall@{k}"] = self._sums.get(f"recall@{k}", 0.0) + float(hit.sum())
            self._sums[f"ndcg@{k}"] = self._sums.get(f"ndcg@{k}", 0.0) + float(ndcg.sum())
        self.count += int(target.shape[0])

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no rows were evaluated")
        order = [f"{m}@{k}" for k in self.ks for m in ("recall", "ndcg")]
        return {name: self._sums[name] / self.count for name in order}
