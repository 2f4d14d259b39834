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

MISSRec can also add ``w`` × each item's *history affinity* (:func:`history_affinity`: its largest similarity
to an item of the history) to its scores, ``w`` chosen with the offset at each validation
(``missrec.history_affinity``; :data:`AFFINITY_GRID` × :data:`OFFSET_GRID`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from missrec.config import HISTORY_BIAS_FITS
from missrec.data.batching import Batch
from missrec.eval.metrics import DEFAULT_KS, RankingMetrics, scoring

# candidate offsets (logits) tried at each validation with history_bias_fit=validation, the smaller first (ties go
# to the first); -100 puts history items below every other item (MISSRec's scores are cosines over τ, within
# ±1 / τ ≈ ±14.3)
OFFSET_GRID: tuple[float, ...] = (0.0, -1.0, -2.0, -2.5, -3.0, -3.5, -4.0, -4.5, -5.0, -6.0, -8.0, -100.0)
# candidate weights (logits per unit of similarity) of the history affinity (:func:`history_affinity`) tried with
# each offset at each validation, the smaller first
AFFINITY_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)


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


def history_affinity(seq: torch.Tensor, unit: torch.Tensor, first: int = 1) -> torch.Tensor:
    """[B, C]: for each column j (item value ``first + j``), its largest similarity ``unit[h] · unit[first + j]``
    to an item ``h`` of the row's history ``seq`` [B, L] (0 = padding; 0 for a row without history).
    ``unit`` [N + 1, K] (row = item value): vectors whose dot product is the similarity. Computed over the
    batch's distinct history items, one [U, C] product, never [B, L, C]."""
    cand = unit[first:]  # [C, K]
    items = torch.unique(seq[seq > 0])  # [U]
    return max_over_history(seq, items, unit[items] @ cand.T)  # [U, C] rows gathered per slot


def max_over_history(seq: torch.Tensor, items: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """[B, C]: for each row of ``seq`` [B, L] (item values, 0 = padding) and column c, the largest ``sim[u, c]``
    over the row's history items, where ``sim`` [U, C] holds one row per item of ``items`` [U] (sorted, distinct,
    covering every non-padding value of ``seq``); 0 for a row without history. Memory stays [B, C]."""
    out = torch.full((seq.shape[0], sim.shape[1]), float("-inf"), dtype=sim.dtype, device=sim.device)
    if items.numel() == 0:
        return torch.zeros_like(out)
    pos = torch.searchsorted(items, seq.clamp(min=1)).clamp(max=items.numel() - 1)  # [B, L]: row of sim per slot
    for slot in range(seq.shape[1]):
        real = (seq[:, slot] > 0)[:, None]  # [B, 1]
        out = torch.where(real, torch.maximum(out, sim[pos[:, slot]]), out)
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)


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


@runtime_checkable
class ValidatedAffinity(Protocol):
    """A model that can add ``weight`` × its history affinity (:func:`history_affinity`) to its scores, the weight
    chosen on validation together with the history offset."""

    def affinity_grid(self) -> Sequence[float] | None:
        """The weights (logits per unit of similarity) to try; None: no affinity term."""

    def set_history_affinity(self, weight: float) -> None:
        """Make ``weight`` the affinity weight."""

    def history_affinity(self, batch: Batch) -> torch.Tensor:
        """[B, N]: each item's largest similarity to an item of the row's history."""


class HistoryScoring:
    """Mixin for a model with a ``history_bias`` (offset) and an ``affinity_weight`` (None: not used): a checkpoint
    saved without them loads with 0 (the plain model's scores), and the affinity weight's grid and setter of
    :class:`ValidatedAffinity`."""

    history_bias: torch.Tensor | None
    affinity_weight: torch.Tensor | None

    def init_history_scoring(self, history_bias: bool, history_bias_fit: str, history_affinity: bool) -> None:
        """Create the offset (``history_bias``: a parameter when learned in the loss, ``fit`` loss or detached; a
        buffer when chosen at each validation; None without) and the affinity weight (a buffer, None without;
        it is chosen with the offset, so it needs ``history_bias_fit="validation"``)."""
        if history_bias_fit not in HISTORY_BIAS_FITS:
            raise ValueError(f"history_bias_fit must be one of {HISTORY_BIAS_FITS}, got {history_bias_fit!r}")
        if history_affinity and not (history_bias and history_bias_fit == "validation"):
            raise ValueError("history_affinity needs history_bias with history_bias_fit='validation'")
        self.history_bias_fit = history_bias_fit
        if history_bias and history_bias_fit == "validation":
            self.register_buffer("history_bias", torch.zeros(1))
        else:
            self.history_bias = nn.Parameter(torch.zeros(1)) if history_bias else None
        self.register_buffer("affinity_weight", torch.zeros(1) if history_affinity else None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("history_bias", "affinity_weight"):
            if getattr(self, name) is not None and prefix + name not in state_dict:
                state_dict[prefix + name] = torch.zeros_like(getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def offset_grid(self) -> tuple[float, ...] | None:
        """The offsets (logits) tried at each validation with ``history_bias_fit="validation"``; else None."""
        return OFFSET_GRID if self.history_bias is not None and self.history_bias_fit == "validation" else None

    def add_history_terms(
        self, scores: torch.Tensor, batch: Batch, affinity: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """``scores`` [B, N] with the weighted history affinity (``affinity()`` [B, N], computed only when the weight
        is not 0) and the history offset (``self.history_offset()``) added."""
        if self.affinity_weight is not None and bool(self.affinity_weight != 0):
            scores = scores + self.affinity_weight * affinity()
        return add_history_offset(scores, batch.seq, self.history_offset())

    def affinity_grid(self) -> tuple[float, ...] | None:
        """The affinity weights tried at each validation (:data:`AFFINITY_GRID`); None without the affinity."""
        return AFFINITY_GRID if self.affinity_weight is not None else None

    def set_history_affinity(self, weight: float) -> None:
        """Set the affinity weight (logits per unit of similarity)."""
        if self.affinity_weight is None:
            raise ValueError("this model has no history affinity (history_affinity=False)")
        with torch.no_grad():
            self.affinity_weight.fill_(weight)


def grid_ranks(scores: torch.Tensor, aff: torch.Tensor | None, mask: torch.Tensor, target: torch.Tensor,
               weights: Sequence[float], offsets: Sequence[float]) -> torch.Tensor:
    """0-based rank of each row's target (ties to the lower item index) under every (affinity weight, offset)
    pair, as :func:`~missrec.eval.metrics.target_ranks` would give it on ``scores + w * aff`` with ``g`` added
    to the history items (``mask`` [B, N]) -> [W, G, B]. One pass over [B, N] per weight, not per pair: an
    offset moves only the row's history items (a few) unless the target is one of them (rare rows, redone per
    offset). The same float32 sums as the pair-by-pair ranking, so the same ranks bit for bit."""
    b, n = scores.shape
    rows = torch.arange(b, device=scores.device)
    g = torch.tensor(offsets, dtype=scores.dtype, device=scores.device)  # [G]
    idx = torch.arange(n, device=scores.device)[None, :]  # [1, N]
    before = idx < target[:, None]  # [B, N]: lower index than the target
    t_hist = mask[rows, target]  # [B]: the target is a history item
    hist_rows, hist_cols = mask.nonzero(as_tuple=True)  # the history entries, a few per row
    out = torch.empty(len(weights), len(offsets), b, dtype=torch.long, device=scores.device)
    for wi, w in enumerate(weights):
        sw = scores + w * aff if (w and aff is not None) else scores  # [B, N], as the pair-by-pair path adds it
        st = sw[rows, target]  # [B]
        plain = ~mask
        base = ((sw > st[:, None]) & plain).sum(1) + ((sw == st[:, None]) & plain & before).sum(1)  # [B]
        hv = sw[hist_rows, hist_cols]  # [H] history entries' scores
        hg = hv[:, None] + g[None, :]  # [H, G]
        ht = st[hist_rows][:, None]  # [H, 1]: the row's target score (without offset)
        hb = before[hist_rows, hist_cols][:, None]
        over = (hg > ht) | ((hg == ht) & hb)  # [H, G]: history entries ahead of a target not in the history
        extra = torch.zeros(b, len(offsets), dtype=torch.long, device=scores.device)
        extra.index_add_(0, hist_rows, over.long())
        out[wi] = (base[:, None] + extra).T
        for r in t_hist.nonzero().flatten().tolist():  # the target is a history item: every item moves relative
            for gi, off in enumerate(offsets):
                row = torch.where(mask[r], sw[r] + off, sw[r])
                out[wi, gi, r] = int(((row > row[target[r]]) | ((row == row[target[r]]) & before[r])).sum())
    return out


@torch.no_grad()
def fit_offset_on_validation(
    model: nn.Module, batches: Iterable[Batch], device: torch.device, grid: Sequence[float],
    metric: str = "ndcg@10", ks: tuple[int, ...] = DEFAULT_KS, ties: str = "index",
    weights: Sequence[float] = (0.0,),
) -> tuple[dict[str, float], dict[str, float]]:
    """Score ``batches`` once without an offset (and without affinity), rank their targets under each offset of
    ``grid`` (logits) added to the history items and, with a model that has one (:class:`ValidatedAffinity`), each
    affinity weight of ``weights`` (:func:`grid_ranks`: one pass per weight); set the model to the pair with the
    best ``metric`` (the first on a tie: list the smaller values first; weights are the outer loop). Returns the
    choice (``history_offset``, and ``history_affinity`` when ``weights`` holds more than 0) and its metrics.
    ``ties="expected"`` ranks each pair's scores in full (slower)."""
    from missrec.eval.metrics import expected_at_k

    if not grid or not weights:
        raise ValueError("fit_offset_on_validation needs at least one offset and one affinity weight")
    affine = tuple(weights) != (0.0,)
    if affine and not isinstance(model, ValidatedAffinity):
        raise ValueError(f"{type(model).__name__} has no history affinity to weigh")
    pairs = [(w, g) for w in weights for g in grid]
    metrics = [RankingMetrics(ks, ties) for _ in pairs]
    sums = torch.zeros(len(pairs), 2 * len(ks), dtype=torch.float64)
    count = 0
    model.set_history_offset(0.0)
    if affine:
        model.set_history_affinity(0.0)
    with scoring(model):
        for batch in batches:
            batch = batch.to(device)
            scores = model.full_scores(batch).float()  # [B, N], plain
            mask = history_mask(batch.seq, scores.shape[1])  # [B, N]
            aff = model.history_affinity(batch) if affine else None  # [B, N]
            if ties == "expected":
                for (w, g), m in zip(pairs, metrics):
                    s = scores + w * aff if w else scores
                    m.update(torch.where(mask, s + g, s), batch.target)
                continue
            ranks = grid_ranks(scores, aff, mask, batch.target, weights, grid).reshape(len(pairs), -1)  # [P, B]
            zero = torch.zeros_like(ranks[0])
            for i in range(len(pairs)):
                cols = []
                for k in ks:
                    hit, ndcg = expected_at_k(ranks[i], zero, k)
                    cols += [float(hit.sum()), float(ndcg.sum())]
                sums[i] += torch.tensor(cols, dtype=torch.float64)
            count += len(batch)
    if ties == "expected":
        results = [m.compute() for m in metrics]
    else:
        names = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]
        results = [dict(zip(names, (sums[i] / max(count, 1)).tolist())) for i in range(len(pairs))]
    best = max(range(len(pairs)), key=lambda i: (results[i][metric], -i))
    w, g = pairs[best]
    model.set_history_offset(float(g))
    choice = {"history_offset": float(g)}
    if affine:
        model.set_history_affinity(float(w))
        choice["history_affinity"] = float(w)
    return choice, results[best]
