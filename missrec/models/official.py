"""The official MISSRec code's own behaviours that ``configs/official.yaml`` turns on, where the model needs more than
a flag (the parity tests, ``tests/test_official_parity.py``, check them against the official formulas).

The official code builds each row's interest list with ``unique()`` over the history padded to ``max_len``, so the
padding id is one of its interests whenever the row has padding: one more (zero) slot, which its regulariser
(``interest_reg="official"``, :func:`missrec.models.losses.interest_regulariser`) sums like the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def padding_interest_slot(ids: torch.Tensor, imask: torch.Tensor, seq_len: torch.Tensor, max_len: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` / ``imask`` [B, K] widened by the official padding-id slot where a row's list would be longer:
    K becomes the largest count of real ids plus one for rows shorter than ``max_len``."""
    has_pad = seq_len.to(ids.device) < max_len  # [B]
    extra = int((imask.sum(1) + has_pad).max()) - ids.shape[1]
    if extra > 0:
        ids = F.pad(ids, (0, extra), value=-1)
        imask = F.pad(imask, (0, extra), value=False)
    return ids, imask
