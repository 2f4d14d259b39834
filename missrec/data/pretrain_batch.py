"""A pre-training step's inputs, assembled on the host (in DataLoader workers) from a few hundred sequence
records: every data-dependent shape (history length, distinct items, distinct interests) is decided here,
so the device step runs without a host sync, and only the rows the step uses travel to the device.

Items are addressed by *rows* of the batch's own item table: ``feats[m][j]`` is modality ``m`` of the j-th
distinct item the batch touches (history, targets), row 0 being padding (all zero). Interests are rows of
the batch's own centroid table ``centroids``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from missrec.data.feature_store import FeatureStore
from missrec.interests.tables import InterestTables

Record = tuple[int, int, list[int], int, bool]  # (row, user, history, target, last) of a shard sample
HOST_FIELDS = ("rows", "passes")


@dataclass
class PretrainBatch:
    seq: torch.Tensor  # [B, L] int64: rows of ``feats`` (0 = padding), left-aligned, cut to the longest history
    seq_len: torch.Tensor  # [B]
    view_seq: torch.Tensor  # [B, L'] the item-drop view of ``seq`` (same rows, some dropped)
    view_len: torch.Tensor  # [B]
    target: torch.Tensor  # [B] row of each target in ``feats``
    item_key: torch.Tensor  # [B] global item id of the target (rows with equal keys are not negatives)
    user_key: torch.Tensor  # [B] global user id
    feats: list[torch.Tensor]  # per modality [U, F_m] (float16 or float32 as stored); row 0 = zeros
    interests: torch.Tensor  # [B, K] rows of ``centroids`` (0 where masked)
    imask: torch.Tensor  # [B, K] bool
    view_interests: torch.Tensor  # [B, K']
    view_imask: torch.Tensor  # [B, K']
    centroids: torch.Tensor  # [C_u, D] float32: the interests this batch touches
    rows: torch.Tensor  # [B] each record's row in its domain's training split (trace)
    passes: torch.Tensor  # [B] how many times its stream had wrapped around the domain before it (trace)
    step: int = 0
    domain: int = 0

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every input of the step (not the host-side bookkeeping ``rows`` and ``passes``)."""
        for f in fields(self):
            if f.name in HOST_FIELDS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                yield f.name, value
            elif isinstance(value, list):
                yield from ((f"{f.name}[{i}]", t) for i, t in enumerate(value))

    def _map(self, fn) -> PretrainBatch:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in HOST_FIELDS:  # bookkeeping for the trace: stays on the host
                out[f.name] = value
            elif isinstance(value, torch.Tensor):
                out[f.name] = fn(value)
            elif isinstance(value, list):
                out[f.name] = [fn(t) for t in value]
            else:
                out[f.name] = value
        return PretrainBatch(**out)

    def pin_memory(self) -> PretrainBatch:
        """Page-locked copies (DataLoader(pin_memory=True) calls this), for asynchronous copies to a GPU."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PretrainBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


def distinct_per_row(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's distinct non-negative values: ``ids`` [B, X] (-1 = none) -> (ascending values [B, K] padded
    with -1, mask [B, K]); K = the largest count (at least 1)."""
    b, width = ids.shape
    big = np.iinfo(np.int64).max
    flat = np.sort(np.where(ids >= 0, ids, big), axis=1)
    keep = flat != big
    keep[:, 1:] &= flat[:, 1:] != flat[:, :-1]
    count = keep.sum(axis=1)
    k = max(int(count.max()) if b else 0, 1)
    col = np.where(keep, np.cumsum(keep, axis=1) - 1, width)
    out = np.full((b, width + 1), -1, dtype=np.int64)
    np.put_along_axis(out, col, np.where(keep, flat, -1), axis=1)
    out = out[:, :k]
    return out, np.arange(k)[None, :] < count[:, None]


def drop_view(hist: Sequence[int], prob: float, rng: np.random.Generator) -> list[int]:
    """The item-drop view of one history: each item dropped with probability ``prob`` (every modality of it
    together), the last kept when all would go."""
    keep = rng.random(len(hist)) >= prob
    if not keep.any():
        keep[-1] = True
    return [h for h, k in zip(hist, keep) if k]


def _pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.array([len(r) for r in rows], dtype=np.int64)
    out = np.zeros((len(rows), int(lens.max())), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, lens


def assemble(
    parts: Sequence[Sequence[tuple[int, Record]]],
    *,
    domain: int,
    item_offset: int,
    user_offset: int,
    max_len: int,
    store: FeatureStore,
    tables: InterestTables,
    drop_prob: float,
    view_seeds: Sequence[Sequence[int]],
    step: int = 0,
) -> PretrainBatch:
    """The batch of records ``parts`` (one list per stream, of ``(pass, record)``) of domain ``domain``
    (local item ids + ``item_offset`` = global ids). ``view_seeds[i]``: the seed of stream ``i``'s item-drop
    view (a function of the stream and the step, so the view does not depend on how streams map to ranks)."""
    hists, views, targets, users, rows, passes = [], [], [], [], [], []
    for recs, seed in zip(parts, view_seeds):
        rng = np.random.default_rng(list(seed))
        for pas, (row, user, hist, target, _last) in recs:
            h = [int(i) + item_offset + 1 for i in hist[-max_len:]]  # item values
            hists.append(h)
            views.append(drop_view(h, drop_prob, rng) if drop_prob > 0 else h)
            targets.append(int(target) + item_offset + 1)
            users.append(int(user) + user_offset)
            rows.append(int(row))
            passes.append(int(pas))
    seq_v, seq_len = _pad(hists)
    view_v, view_len = _pad(views)
    target_v = np.asarray(targets, dtype=np.int64)
    values = np.unique(np.concatenate([[0], seq_v[seq_v > 0], target_v]))  # [U], values[0] = 0 (padding)
    seq = np.searchsorted(values, seq_v)
    view = np.searchsorted(values, view_v)
    item_int = tables.item_interests(values)  # [U, M]
    ids, imask = distinct_per_row(item_int[seq].reshape(len(seq), -1))
    vids, vmask = distinct_per_row(item_int[view].reshape(len(view), -1))
    used = np.unique(ids[imask])  # the view's interests are among the rows' own
    centroids = tables.centroid_rows(used) if used.size else np.zeros((1, tables.dim), dtype=np.float32)
    ids = np.where(imask, np.searchsorted(used, ids), 0)
    vids = np.where(vmask, np.searchsorted(used, vids), 0)
    feats = [torch.from_numpy(np.ascontiguousarray(f)) for f in store.gather(values)]
    t = torch.from_numpy
    return PretrainBatch(
        seq=t(seq), seq_len=t(seq_len), view_seq=t(view), view_len=t(view_len),
        target=t(np.searchsorted(values, target_v)), item_key=t(target_v - 1),
        user_key=t(np.asarray(users, dtype=np.int64)), feats=feats, interests=t(ids), imask=t(imask),
        view_interests=t(vids), view_imask=t(vmask), centroids=t(centroids),
        rows=t(np.asarray(rows, dtype=np.int64)), passes=t(np.asarray(passes, dtype=np.int64)),
        step=step, domain=domain,
    )
