"""The items already in a row's history, as a mask over score columns, and the offset a model adds to them.

Both models can add one offset to these items (``history_bias``): in the Amazon data a user rarely
takes the same item again (0.85 % of the scientific_mm targets are in their history), while a sequence
model scores the items it was fed high (about 2 of a plain MISSRec's top 10 on scientific_mm are history
items). Ranking stays over all items. Each model says what its offset is in logits (``history_offset()``);
:func:`add_history_offset` applies it. How the offset is fit (MISSRec's ``history_bias_fit``):

- ``loss``: learned in the fine-tuning loss like any weight; the model trains through it
  (:func:`history_cross_entropy`).
- ``detached``: learned beside the model: the model trains on its plain cross-entropy, as the paper's, and the
  offset alone learns from a second cross-entropy of the detached scores.
- ``validation``: the model trains as the paper's; at each validation the offset is the value of
  :data:`OFFSET_GRID` with the best validation NDCG@10 (:func:`fit_offset_on_validation`), so it is fit to
  the ranking metric, not to the likelihood (which also weighs the few targets that repeat a history item).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from missrec.data.batching import Batch
from missrec.eval.metrics import DEFAULT_KS, RankingMetrics, scoring

# candidate offsets (logits) tried at each validation with history_bias_fit=validation, the smaller first (ties go
# to the first); -100 puts history items below every other item (MISSRec's scores are cosines over τ, within
# ±1 / τ ≈ ±14.3)
OFFSET_GRID: tuple[float, ...] = (0.0, -1.0, -2.0, -2.5, -3.0, -3.5, -4.0, -4.5, -5.0, -6.0, -8.0, -100.0)


def history_mask(seq: torch.Tensor, columns: int, first: int = 1) -> torch.Tensor:
    """[B, C] bool: True where column j's item (item value ``first + j``; item value = index + 1, 0 =
    padding) is in the row's history ``seq`` [B, L]. A repeated history item is marked once."""
    cols = seq - first  # [B, L]
    valid = (seq > 0) & (cols >= 0) & (cols < columns)
    rows = torch.arange(seq.shape[0], device=seq.device)[:, None].expand_as(seq)
    mask = torch.zeros(seq.shape[0], columns, dtype=torch.bool, device=seq.device)
    mask[rows[valid], cols[valid]] = True
    return mask


def add_history_offset(
    scores: torch.Tensor, seq: torch.Tensor, offset: torch.Tensor | None, first: int = 1
) -> torch.Tensor:
    """``scores`` [B, C] (column j = item value ``first + j``) with ``offset`` (logits, [1]) added where the
    item is in the row's history ``seq`` [B, L]; unchanged when ``offset`` is None (no learned offset)."""
    if offset is None:
        return scores
    mask = history_mask(seq, scores.shape[1], first)
    return torch.where(mask, scores + offset, scores)


def history_cross_entropy(
    scores: torch.Tensor,
    target: torch.Tensor,
    seq: torch.Tensor,
    offset: torch.Tensor | None,
    first: int = 1,
    detach: bool = False,
) -> torch.Tensor:
    """Cross-entropy of ``scores`` [B, C] (column j = item value ``first + j``) against ``target`` [B] (column
    indices) with the history offset added (:func:`add_history_offset`). ``detach``: the plain cross-entropy
    (gradients to the model, as without an offset) plus the cross-entropy of the detached scores with the
    offset (gradient to the offset alone), so the offset learns beside a model that trains as the paper's.
    Scalar."""
    if offset is None:
        return F.cross_entropy(scores, target)
    if not detach:
        return F.cross_entropy(add_history_offset(scores, seq, offset, first), target)
    plain = F.cross_entropy(scores, target)
    return plain + F.cross_entropy(add_history_offset(scores.detach(), seq, offset, first), target)


@runtime_checkable
class ValidatedOffset(Protocol):
    """A model whose history offset is chosen on validation (:func:`fit_offset_on_validation`)."""

    def offset_grid(self) -> Sequence[float] | None:
        """The offsets (logits) to try at each validation; None: the offset is not chosen on validation."""

    def set_history_offset(self, logits: float) -> None:
        """Make ``logits`` the offset added to history items."""


@torch.no_grad()
def fit_offset_on_validation(
    model: nn.Module, batches: Iterable[Batch], device: torch.device, grid: Sequence[float],
    metric: str = "ndcg@10", ks: tuple[int, ...] = DEFAULT_KS, ties: str = "index",
) -> tuple[float, dict[str, float]]:
    """Score ``batches`` once without an offset, rank them with each offset of ``grid`` (logits) added to the
    history items, and set the model's offset (``set_history_offset``) to the one with the best ``metric`` (the
    first on a tie: list the smaller offsets first). Returns that offset and its metrics."""
    if not grid:
        raise ValueError("fit_offset_on_validation needs at least one offset")
    metrics = [RankingMetrics(ks, ties) for _ in grid]
    model.set_history_offset(0.0)
    with scoring(model):
        for batch in batches:
            batch = batch.to(device)
            scores = model.full_scores(batch)  # [B, N], plain
            mask = history_mask(batch.seq, scores.shape[1])  # [B, N]
            for g, m in zip(grid, metrics):
                m.update(torch.where(mask, scores + g, scores), batch.target)
    results = [m.compute() for m in metrics]
    best = max(range(len(grid)), key=lambda i: (results[i][metric], -i))
    model.set_history_offset(float(grid[best]))
    return float(grid[best]), results[best]
