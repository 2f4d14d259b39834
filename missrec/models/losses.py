"""Pre-training losses and the sequence augmentation they use.

- :func:`in_batch_contrastive` — sequence-item (or sequence-sequence) InfoNCE over in-batch
  candidates, where other rows that share the row's positive (the same target item) are removed from
  the denominator: they are not negatives (the official code leaves them in).
- :func:`drop_items` — the item-drop view for the sequence-sequence loss. Items are dropped by
  position in the item sequence, so every modality of a dropped item disappears together (the official
  code drew the text and image drops independently).
- :func:`offset_contrastive` — the InfoNCE of this rank's rows against candidates gathered from every
  rank (:func:`local_offset` says where this rank's rows sit among them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from missrec.data.batching import Batch


def in_batch_contrastive(logits: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with the diagonal as positives.

    ``logits`` [B, B] (row i: query i against candidate j, already divided by τ); ``keys`` [B]: rows
    with equal keys are the same positive (e.g. the same target item), so off-diagonal entries with
    ``keys[i] == keys[j]`` are masked out of row i's denominator. Returns the mean loss (scalar).
    """
    b = logits.shape[0]
    if logits.shape != (b, b):
        raise ValueError(f"logits must be square [B, B], got {tuple(logits.shape)}")
    labels = torch.arange(b, device=logits.device)
    if keys is not None:
        same = keys.view(-1, 1) == keys.view(1, -1)  # [B, B]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, labels)


def drop_items(batch: Batch, prob: float, generator: torch.Generator | None = None) -> Batch:
    """A view of ``batch`` with each history item dropped with probability ``prob`` (at least one item
    is kept per row; survivors keep their order and are left-aligned again). Shapes as ``batch``."""
    seq = batch.seq  # [B, L]
    real = seq > 0
    u = torch.rand(seq.shape, generator=generator, device="cpu").to(seq.device)
    keep = real & (u >= prob)
    # keep the last real item when a row would become empty
    empty = ~keep.any(dim=1)
    if empty.any():
        last = (batch.seq_len - 1).clamp(min=0)
        keep[empty, last[empty]] = True
    # left-align the survivors: stable sort by "dropped" flag
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # [B, L]
    new_seq = torch.where(torch.gather(keep, 1, order), torch.gather(seq, 1, order), torch.zeros_like(seq))
    return Batch(new_seq, keep.sum(dim=1), batch.target, batch.user, batch.domain)


def local_offset(total: int, local: int) -> int:
    """Where this rank's rows start in a gathered batch of ``total`` rows (``local`` per rank)."""
    if total == local:
        return 0
    return torch.distributed.get_rank() * local


def offset_contrastive(
    logits: torch.Tensor, offset: int, keys: torch.Tensor, all_keys: torch.Tensor, loss_fn: Callable
) -> torch.Tensor:
    """InfoNCE of local queries ``logits`` [B, W * B] whose positives sit at ``offset + i``; candidates
    sharing the query's key (other than the positive) are masked out of its denominator."""
    b, total = logits.shape
    if total == b:
        return loss_fn(logits, keys)
    pos = torch.arange(b, device=logits.device) + offset
    same = keys.view(-1, 1) == all_keys.view(1, -1)  # [B, W * B]
    same[torch.arange(b, device=logits.device), pos] = False
    return F.cross_entropy(logits.masked_fill(same, float("-inf")), pos)
