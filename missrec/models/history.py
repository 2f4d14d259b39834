"""The items already in a row's history, as a mask over score columns.

Both models can learn one offset for these items (``history_bias``): in the Amazon data a user rarely
takes the same item again (0.85 % of the scientific_mm targets are in their history), while a sequence
model scores the items it was fed high (about 2 of a plain MISSRec's top 10 on scientific_mm are history
items). The offset is learned in training like any weight; ranking stays over all items. Each model
says what its offset is in logits (``history_offset()``); :func:`add_history_offset` applies it and
:func:`history_cross_entropy` is the fine-tuning loss with it, either *joint* (the model trains through the
offset) or *detached* (the model trains on its plain scores, as without the offset, and the offset alone
learns from a second cross-entropy on those scores, detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    return scores + history_mask(seq, scores.shape[1], first).to(scores.dtype) * offset


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
