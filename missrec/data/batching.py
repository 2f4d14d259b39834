"""Batches of user sequences, the one tensor layout every model and loader shares.

Conventions (in one place):

- ``seq`` [B, L] int64: the history as item index + 1, left-aligned, 0 = padding.
- ``seq_len`` [B] int64: number of real items (>= 1); the last real item is at ``seq_len - 1``.
- ``target`` [B] int64: the next item, 0-based item index (a column of the ``[B, num_items]`` scores).
- ``user`` [B] int64: user index (informational).
- ``domain`` [B] int64: domain index in a multi-domain mix (0 for a single domain).
- ``interests`` / ``imask`` [B, K] (optional): the rows' distinct interests, found on the host before the
  batch moves to its device (``MISSRec.prepare``), so the step needs no host sync.

Histories longer than ``max_len`` keep their most recent ``max_len`` items; :func:`collate` cuts ``seq`` to the
batch's longest history.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from missrec.data.atomic import Split
from missrec.errors import InputError

PAD = 0
DEFAULT_MAX_LEN = 50


@dataclass
class Batch:
    seq: torch.Tensor  # [B, L]
    seq_len: torch.Tensor  # [B]
    target: torch.Tensor  # [B]
    user: torch.Tensor  # [B]
    domain: torch.Tensor  # [B]
    interests: torch.Tensor | None = None  # [B, K]
    imask: torch.Tensor | None = None  # [B, K]

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    def _map(self, fn) -> Batch:
        return Batch(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                        for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())

    def with_interests(self, interests: torch.Tensor, imask: torch.Tensor) -> Batch:
        return replace(self, interests=interests, imask=imask)

    def select(self, rows: torch.Tensor) -> Batch:
        """The batch of rows ``rows`` [b] (indices into this batch), in that order."""
        return self._map(lambda t: t[rows])


def collate(
    rows: Sequence[tuple[int, Sequence[int] | np.ndarray, int]],
    max_len: int = DEFAULT_MAX_LEN,
    domain: int | Sequence[int] = 0,
) -> Batch:
    """Pad ``(user, history, target)`` rows (0-based item indices) into a :class:`Batch` as wide as its longest
    history (at most ``max_len``)."""
    b = len(rows)
    width = max((min(len(r[1]), max_len) for r in rows), default=1) or 1
    seq = np.zeros((b, width), dtype=np.int64)
    seq_len = np.empty(b, dtype=np.int64)
    target = np.empty(b, dtype=np.int64)
    user = np.empty(b, dtype=np.int64)
    for i, (u, hist, t) in enumerate(rows):
        h = np.asarray(hist, dtype=np.int64)[-max_len:]
        if h.size == 0:
            raise InputError(f"row {i} (user {u}) has an empty history")
        seq[i, : h.size] = h + 1
        seq_len[i] = h.size
        target[i] = t
        user[i] = u
    dom = np.full(b, domain, dtype=np.int64) if isinstance(domain, int) else np.asarray(domain, dtype=np.int64)
    return Batch(
        torch.from_numpy(seq), torch.from_numpy(seq_len), torch.from_numpy(target), torch.from_numpy(user),
        torch.from_numpy(dom),
    )


def batch_order(
    lengths: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    group_by_length: bool = False,
    group_batches: int = 32,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """Row indices of each batch; a function of ``(seed, epoch)`` only.

    ``group_by_length`` (training speed): shuffle, then sort rows by history length inside windows of
    ``group_batches`` batches, cut batches there and shuffle the batch order. Padding then costs little,
    while every row is still seen once per epoch and batches still mix users at random.
    """
    n = int(lengths.shape[0])
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    if group_by_length:
        window = batch_size * group_batches
        parts = []
        for s in range(0, n, window):
            chunk = order[s : s + window]
            parts.append(chunk[np.argsort(lengths[chunk], kind="stable")])
        order = np.concatenate(parts) if parts else order
    batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    if drop_last and batches and batches[-1].size < batch_size:
        batches.pop()
    if group_by_length and shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def iter_split_batches(
    split: Split,
    batch_size: int,
    max_len: int = DEFAULT_MAX_LEN,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    domain: int = 0,
    drop_last: bool = False,
    rows: np.ndarray | None = None,
    group_by_length: bool = False,
) -> Iterable[Batch]:
    """Batches straight from an in-memory split (optionally only the row indices ``rows``)."""
    rows = np.arange(len(split)) if rows is None else np.asarray(rows)
    lengths = np.minimum(split.lengths[rows], max_len)
    for idx in batch_order(lengths, batch_size, shuffle, seed, epoch, group_by_length, drop_last=drop_last):
        picked = rows[idx]
        yield collate(
            [(int(split.users[i]), split.history(int(i)), int(split.targets[i])) for i in picked], max_len, domain
        )
