"""A fine-tuning domain's item feature tables, as a model uses them: every item's rows for the full softmax.

Row 0 is padding (all zero), row i + 1 is item i, one table per modality. The tables live on the model's device
as buffers (``cache=True``; the trainer decides by size, ``train.feature_cache_mib``) or stay memory-mapped on the
host, each step copying the rows it adapts to the device. ``present`` [N + 1, M] says which modalities each item has
(an all-zero feature row is a missing modality). Pre-training uses none: each batch brings its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from missrec.errors import InputError


class ItemTable(nn.Module):
    """The feature tables ``features`` (one [N, F_m] array per modality) of ``num_items`` items."""

    def __init__(self, num_items: int, features: Sequence[np.ndarray | torch.Tensor], cache: bool) -> None:
        super().__init__()
        self.num_items = num_items
        self.dims = [int(np.shape(f)[1]) for f in features]
        self._host: list[np.ndarray] | None = None if cache else list(features)
        present = []
        for m, f in enumerate(features):
            if np.shape(f)[0] != num_items:
                raise InputError(f"feature table {m} has {np.shape(f)[0]} rows, expected {num_items}")
            if cache:
                t = torch.from_numpy(np.array(f, dtype=np.float32))  # a private copy (inputs may be memmaps)
                if not torch.isfinite(t).all():
                    raise InputError(f"feature table {m} holds NaN or inf")
                self.register_buffer(f"feat{m}", torch.cat([torch.zeros(1, t.shape[1]), t]), persistent=False)
                present.append(torch.cat([torch.zeros(1, dtype=torch.bool), t.abs().sum(1) > 0]))
            else:
                rows = [np.abs(np.asarray(f[s : s + 65536], dtype=np.float32)).sum(1) > 0
                        for s in range(0, num_items, 65536)]
                present.append(torch.from_numpy(np.concatenate([[False], *rows])))
        self.register_buffer("present", torch.stack(present, dim=1), persistent=False)  # [N + 1, M]

    def rows(self, rows: slice | torch.Tensor) -> list[torch.Tensor]:
        """Feature rows ``rows`` (item values, 0 = padding) of every modality, on the tables' device: [R, F_m] each."""
        if self._host is None:
            return [getattr(self, f"feat{m}")[rows] for m in range(len(self.dims))]
        values = np.arange(self.num_items + 1)[rows] if isinstance(rows, slice) else rows.cpu().numpy()
        real = np.flatnonzero(values > 0)
        out = []
        for table in self._host:
            block = np.zeros((len(values), table.shape[1]), dtype=np.float32)
            block[real] = table[values[real] - 1]
            out.append(torch.from_numpy(block).to(self.present.device, non_blocking=True))
        return out

    def grow(self, features: Sequence[torch.Tensor]) -> None:
        """Append items (one [n, F_m] table per modality; cached tables only): the catalogue grows at serving."""
        if self._host is not None:
            raise InputError("items can be added to tables cached on the device only")
        for m, f in enumerate(features):
            table = getattr(self, f"feat{m}")
            setattr(self, f"feat{m}", torch.cat([table, f.to(table.device, table.dtype)]))
        present = torch.stack([f.abs().sum(1) > 0 for f in features], dim=1).to(self.present.device)
        self.present = torch.cat([self.present, present])
        self.num_items += int(features[0].shape[0])
