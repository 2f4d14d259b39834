"""How a model's scores become a ranking: one scoring policy for validation, test and serving alike.

A model scores every item for a user (``full_scores`` [B, N]); the policy then adds two history terms that are
not in the paper, both chosen at each validation on the selection metric (:func:`fit_policy`):

- ``history_offset``: logits added to the items already in the row's history (a user rarely takes the same
  item again, while a sequence model scores the items it was fed high; -100 puts them below every other item);
- ``affinity_weight``: w x each item's history affinity, its largest similarity to any one item of the row's
  history (:func:`history_affinity`, on vectors the model gives, ``affinity_units()``: MISSRec's adapted tokens,
  SASRec's item embeddings). The user vector ranks an item by its closeness to the history as a whole; the
  affinity also lifts items close to one older history item.

A run saves its policy in ``best.pt`` and in adapter files, so a served list is what evaluation measured (serving may
also drop history items altogether: ``ServeConfig.exclude_history``).

    policy, valid = fit_policy(model, valid_batches, device, OFFSET_GRID, AFFINITY_GRID)
    scores = policy.scores(model, batch)   # [B, N]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from missrec.data.batching import Batch
from missrec.errors import ConfigError
from missrec.eval.metrics import DEFAULT_KS, RankingMetrics, expected_at_k, scoring

# candidate offsets (logits) tried at each validation, the smaller first (ties go to the first); -100 puts history
# items below every other item (MISSRec's scores are cosines over τ, within ±1 / τ ≈ ±14.3)
OFFSET_GRID: tuple[float, ...] = (0.0, -1.0, -2.0, -2.5, -3.0, -3.5, -4.0, -4.5, -5.0, -6.0, -8.0, -100.0)
# candidate weights (logits per unit of similarity) of the history affinity, the smaller first
AFFINITY_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)


def history_mask(seq: torch.Tensor, columns: int, first: int = 1) -> torch.Tensor:
    """[B, C] bool: True where column j's item (item value ``first + j``; item value = index + 1, 0 = padding) is in
    the row's history ``seq`` [B, L]. A repeated history item is marked once."""
    cols = seq - first  # [B, L]
    valid = (seq > 0) & (cols >= 0) & (cols < columns)
    rows = torch.arange(seq.shape[0], device=seq.device)[:, None].expand_as(seq)
    mask = torch.zeros(seq.shape[0], columns, dtype=torch.bool, device=seq.device)
    mask[rows[valid], cols[valid]] = True
    return mask


def history_affinity(seq: torch.Tensor, unit: torch.Tensor, first: int = 1) -> torch.Tensor:
    """[B, C]: for each column j (item value ``first + j``), its largest similarity ``unit[h] · unit[first + j]`` to
    an item ``h`` of the row's history ``seq`` [B, L] (0 = padding; 0 for a row without history). ``unit``
    [N + 1, K] (row = item value): vectors whose dot product is the similarity. Computed over the batch's distinct
    history items, one [U, C] product, never [B, L, C]."""
    cand = unit[first:]  # [C, K]
    items = torch.unique(seq[seq > 0])  # [U]
    return max_over_history(seq, items, unit[items] @ cand.T)  # [U, C] rows gathered per slot


def max_over_history(seq: torch.Tensor, items: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """[B, C]: for each row of ``seq`` [B, L] (item values, 0 = padding) and column c, the largest ``sim[u, c]`` over
    the row's history items, where ``sim`` [U, C] holds one row per item of ``items`` [U] (sorted, distinct,
    covering every non-padding value of ``seq``); 0 for a row without history. Memory stays [B, C]."""
    out = torch.full((seq.shape[0], sim.shape[1]), float("-inf"), dtype=sim.dtype, device=sim.device)
    if items.numel() == 0:
        return torch.zeros_like(out)
    pos = torch.searchsorted(items, seq.clamp(min=1)).clamp(max=items.numel() - 1)  # [B, L]: row of sim per slot
    for slot in range(seq.shape[1]):
        real = (seq[:, slot] > 0)[:, None]  # [B, 1]
        out = torch.where(real, torch.maximum(out, sim[pos[:, slot]]), out)
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)


@dataclass
class ScoringPolicy:
    """The history terms added to a model's scores (both 0: the model's own ranking)."""

    history_offset: float = 0.0
    affinity_weight: float = 0.0

    def apply(self, scores: torch.Tensor, seq: torch.Tensor, affinity: Callable[[], torch.Tensor] | None = None
              ) -> torch.Tensor:
        """``scores`` [B, N] (column j = item j) of the rows whose histories are ``seq`` [B, L] (item values), with
        the weighted ``affinity()`` [B, N] (called only when the weight is not 0) and the offset added."""
        if self.affinity_weight:
            if affinity is None:
                raise ValueError("this scorer has no history affinity, but the policy weighs one")
            scores = scores + self.affinity_weight * affinity()
        if self.history_offset:
            scores = torch.where(history_mask(seq, scores.shape[1]), scores + self.history_offset, scores)
        return scores

    def scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """``model``'s scores of every item for ``batch`` [B, N], the terms added (the model's ``affinity_units()``)."""
        units = getattr(model, "affinity_units", None)
        return self.apply(model.full_scores(batch), batch.seq,
                          (lambda: history_affinity(batch.seq, units())) if units is not None else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ScoringPolicy:
        d = dict(d or {})
        return cls(float(d.get("history_offset", 0.0)), float(d.get("affinity_weight", 0.0)))


def grid_ranks(scores: torch.Tensor, aff: torch.Tensor | None, mask: torch.Tensor, target: torch.Tensor,
               weights: Sequence[float], offsets: Sequence[float]) -> torch.Tensor:
    """0-based rank of each row's target (ties to the lower item index) under every (affinity weight, offset) pair,
    as :func:`~missrec.eval.metrics.target_ranks` gives it on ``scores + w * aff`` with ``g`` added to the history
    items (``mask`` [B, N]) -> [W, G, B]. One pass over [B, N] per weight, not per pair: an offset moves only the
    row's history items (a few) unless the target is one of them (rare rows, ranked per offset). The same float32
    sums as ranking each pair, so the same ranks bit for bit."""
    b, n = scores.shape
    rows = torch.arange(b, device=scores.device)
    g = torch.tensor(offsets, dtype=scores.dtype, device=scores.device)  # [G]
    before = torch.arange(n, device=scores.device)[None, :] < target[:, None]  # [B, N]: lower index than the target
    t_hist = mask[rows, target]  # [B]: the target is a history item
    hist_rows, hist_cols = mask.nonzero(as_tuple=True)  # the history entries, a few per row
    out = torch.empty(len(weights), len(offsets), b, dtype=torch.long, device=scores.device)
    for wi, w in enumerate(weights):
        sw = scores + w * aff if (w and aff is not None) else scores  # [B, N]
        st = sw[rows, target]  # [B]
        plain = ~mask
        base = ((sw > st[:, None]) & plain).sum(1) + ((sw == st[:, None]) & plain & before).sum(1)  # [B]
        hg = sw[hist_rows, hist_cols][:, None] + g[None, :]  # [H, G] history entries with each offset
        ht = st[hist_rows][:, None]  # [H, 1]: the row's target score (without offset)
        over = (hg > ht) | ((hg == ht) & before[hist_rows, hist_cols][:, None])  # [H, G]
        extra = torch.zeros(b, len(offsets), dtype=torch.long, device=scores.device)
        extra.index_add_(0, hist_rows, over.long())
        out[wi] = (base[:, None] + extra).T
        for r in t_hist.nonzero().flatten().tolist():  # the target is a history item: every item moves relative
            for gi, off in enumerate(offsets):
                row = torch.where(mask[r], sw[r] + off, sw[r])
                out[wi, gi, r] = int(((row > row[target[r]]) | ((row == row[target[r]]) & before[r])).sum())
    return out


@torch.no_grad()
def fit_policy(
    model: nn.Module, batches: Iterable[Batch], device: torch.device, offsets: Sequence[float],
    weights: Sequence[float] = (0.0,), metric: str = "ndcg@10", ks: tuple[int, ...] = DEFAULT_KS,
    ties: str = "index",
) -> tuple[ScoringPolicy, dict[str, float]]:
    """Score ``batches`` once, rank their targets under every (affinity weight, offset) pair of ``weights`` x
    ``offsets`` (:func:`grid_ranks`: one pass per weight), and return the policy with the best ``metric`` (the first
    on a tie: list the smaller values first; weights are the outer loop) with its metrics. ``ties="expected"``
    ranks each pair's scores in full (slower)."""
    if not offsets or not weights:
        raise ConfigError("fit_policy needs at least one offset and one affinity weight")
    affine = tuple(weights) != (0.0,)
    units = getattr(model, "affinity_units", None)
    if affine and units is None:
        raise ConfigError(f"{type(model).__name__} has no history affinity to weigh")
    pairs = [(w, g) for w in weights for g in offsets]
    names = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]
    sums = torch.zeros(len(pairs), len(names), dtype=torch.float64, device=device)  # on the device: no sync per batch
    full = [RankingMetrics(ks, ties) for _ in pairs] if ties == "expected" else []
    count = 0
    with scoring(model):
        for batch in batches:
            batch = batch.to(device)
            scores = model.full_scores(batch).float()  # [B, N], the model's own
            mask = history_mask(batch.seq, scores.shape[1])  # [B, N]
            aff = history_affinity(batch.seq, units()).float() if affine else None  # [B, N]
            if full:
                for (w, g), m in zip(pairs, full):
                    s = scores + w * aff if w else scores
                    m.update(torch.where(mask, s + g, s), batch.target)
                continue
            ranks = grid_ranks(scores, aff, mask, batch.target, weights, offsets).reshape(len(pairs), -1)  # [P, B]
            zero = torch.zeros_like(ranks)
            for k_i, k in enumerate(ks):
                hit, ndcg = expected_at_k(ranks, zero, k)  # [P, B] each
                sums[:, 2 * k_i] += hit.sum(1)
                sums[:, 2 * k_i + 1] += ndcg.sum(1)
            count += len(batch)
    if full:
        results = [m.compute() for m in full]
    else:
        if count == 0:
            raise ValueError("no rows were evaluated")
        means = (sums / count).tolist()  # one transfer for the whole grid
        results = [dict(zip(names, means[i])) for i in range(len(pairs))]
    best = max(range(len(pairs)), key=lambda i: (results[i][metric], -i))
    w, g = pairs[best]
    return ScoringPolicy(history_offset=float(g), affinity_weight=float(w)), results[best]
