"""The items already in a row's history, as a mask over score columns.

Both models can learn one offset for these items (``history_bias``): in the Amazon data a user rarely
takes the same item again (0.85 % of the scientific_mm targets are in their history), while a sequence
model scores the items it was fed high (about 2 of a plain MISSRec's top 10 on scientific_mm are history
items). The offset is learned in training like any weight; ranking stays over all items.
"""

from __future__ import annotations

import torch


def history_mask(seq: torch.Tensor, columns: int, first: int = 1) -> torch.Tensor:
    """[B, C] bool: True where column j's item (item value ``first + j``; item value = index + 1, 0 =
    padding) is in the row's history ``seq`` [B, L]. A repeated history item is marked once."""
    cols = seq - first  # [B, L]
    valid = (seq > 0) & (cols >= 0) & (cols < columns)
    rows = torch.arange(seq.shape[0], device=seq.device)[:, None].expand_as(seq)
    mask = torch.zeros(seq.shape[0], columns, dtype=torch.bool, device=seq.device)
    mask[rows[valid], cols[valid]] = True
    return mask
