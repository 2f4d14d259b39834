"""Pre-training losses and the sequence augmentation they use.

- :func:`in_batch_contrastive` — sequence-item (or sequence-sequence) InfoNCE over in-batch
  candidates, where other rows that share the row's positive (the same target item) are removed from
  the denominator: they are not negatives (the official code leaves them in).
- the item-drop view for the sequence-sequence loss is drawn when a pre-training batch is assembled
  (:func:`missrec.data.pretrain_batch.drop_view`): items are dropped by position in the item sequence, so every
  modality of a dropped item disappears together (the official code drew the text and image drops
  independently).
- :func:`offset_contrastive` — the InfoNCE of this rank's rows against candidates gathered from every
  rank (:func:`local_offset` says where this rank's rows sit among them).
- :func:`pretrain_objective` — MISSRec's pre-training loss, built from the above.
- :func:`interest_regulariser` — the penalty on the encoded interests, in its three scales.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from missrec.errors import ConfigError

if TYPE_CHECKING:
    from missrec.data.pretrain_batch import PretrainBatch
    from missrec.models.missrec import MISSRec


def interest_regulariser(memory: torch.Tensor, imask: torch.Tensor, kind: str = "mean") -> torch.Tensor:
    """The interest regulariser (a scalar) on the encoder outputs ``memory`` [B, K, D] of the interests that
    ``imask`` [B, K] marks real; D normalises it.

    - ``"mean"`` (the toolkit's default): each row's real outputs averaged, the squared norm averaged over rows;
    - ``"official"``: the official code's, padded slots included: all K outputs times the row's real fraction,
      rows summed (thousands of times the mean's scale on scientific_mm).
    """
    hidden = memory.shape[-1]
    w = imask.unsqueeze(-1).to(memory.dtype)  # [B, K, 1]
    if kind == "official":
        pooled = (memory * w.mean(1, keepdim=True)).sum(1)  # [B, D]
        return (pooled * pooled).sum() / hidden
    if kind == "mean":
        pooled = (memory * w).sum(1) / w.sum(1).clamp(min=1)  # [B, D]
        return (pooled * pooled).sum(-1).mean() / hidden
    raise ConfigError(f"interest_reg must be 'mean' or 'official', got {kind!r}")


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


def pretrain_objective(
    model: MISSRec, batch: PretrainBatch, seq_seq_weight: float = 0.1,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Pre-training: in-batch sequence-item contrastive loss (rows with the same target item are not
    negatives of each other) + ``seq_seq_weight`` x sequence-sequence contrastive loss between the
    batch and its item-drop view + the interest regulariser on both views.

    Only the rows the batch brings are adapted (``batch.feats``). ``gather`` (e.g. an all-gather across
    ranks that keeps gradients, [n, ...] -> [world * n, ...]) widens the negatives to the global batch; the
    local rows are then rows ``offset .. offset + B`` of the gathered batch. Every tensor it uses is the
    batch's or the model's: no host sync."""
    gather = gather or (lambda t: t)
    tokens = model.adapt_rows(batch.feats)  # [M, U, D]
    present = model.rows_present(batch.feats)  # [U, M]
    centroids = batch.centroids.detach()  # [C_u, D]
    user, reg = model.encode_rows(batch.seq, batch.seq_len, tokens, present,
                                  centroids[batch.interests] * batch.imask.unsqueeze(-1), batch.imask)  # [B, D]
    view, reg_view = model.encode_rows(batch.view_seq, batch.view_len, tokens, present,
                                       centroids[batch.view_interests] * batch.view_imask.unsqueeze(-1),
                                       batch.view_imask)  # [B, D]
    cand = gather(tokens[:, batch.target].transpose(0, 1).contiguous())  # [W * B, M, D]
    cand_present = gather(present[batch.target].to(torch.uint8)).bool()  # [W * B, M]
    all_items, all_users, all_views = gather(batch.item_key), gather(batch.user_key), gather(view)
    b = batch.seq.shape[0]
    offset = local_offset(all_items.shape[0], b)
    seq_item = offset_contrastive(model.fuse(user, cand.transpose(0, 1), cand_present), offset,
                                  batch.item_key, all_items, in_batch_contrastive)
    seq_seq = offset_contrastive(user @ all_views.T / model.temperature, offset, batch.user_key, all_users,
                                 in_batch_contrastive)
    reg_total = reg + reg_view
    loss = seq_item + seq_seq_weight * seq_seq + model.interest_weight * reg_total
    return {"loss": loss, "seq_item": seq_item, "seq_seq": seq_seq, "interest_reg": reg_total}
