"""Interest index: which interest (cluster) each item's modality tokens belong to, and the set of
interests a sequence of items touches.

Token pool layout is modality-major: token ``m * num_items + i`` is modality ``m`` of item ``i``.
A boolean mask [num_items, num_modalities] says which tokens exist; missing ones are left out of
clustering and get interest -1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from missrec.interests.config import ClusterResult


@dataclass
class TokenPool:
    """The present tokens of a [M, I, D] token tensor, in modality-major order.

    tokens [T, D] float32; flat [T] int64 position ``m * I + i`` of each pool token.
    """

    tokens: torch.Tensor
    flat: torch.Tensor
    num_items: int
    num_modalities: int

    def to_item_matrix(self, labels: np.ndarray | torch.Tensor, fill: int = -1) -> torch.Tensor:
        """Scatter per-pool-token labels [T] back to [I, M] int64, ``fill`` where a token is missing."""
        lab = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        if lab.shape != self.flat.shape:
            raise ValueError(f"expected {self.flat.shape[0]} labels, got {tuple(lab.shape)}")
        out = torch.full((self.num_modalities * self.num_items,), fill, dtype=torch.int64)
        out[self.flat] = lab.to(torch.int64).cpu()
        return out.view(self.num_modalities, self.num_items).T.contiguous()  # [I, M]


def build_token_pool(
    tokens: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None = None
) -> TokenPool:
    """Pool the present tokens of ``tokens`` [M, I, D] given ``mask`` [I, M] bool (None: all present)."""
    t = torch.as_tensor(tokens).detach().to("cpu", torch.float32)
    if t.dim() != 3:
        raise ValueError(f"tokens must be [M, I, D], got shape {tuple(t.shape)}")
    m, i, d = t.shape
    if mask is None:
        mk = torch.ones(i, m, dtype=torch.bool)
    else:
        mk = torch.as_tensor(mask).to("cpu", torch.bool)
        if tuple(mk.shape) != (i, m):
            raise ValueError(f"mask must be [num_items={i}, num_modalities={m}], got {tuple(mk.shape)}")
    present = mk.T.reshape(-1)  # [M * I], modality-major
    flat = torch.nonzero(present, as_tuple=False).squeeze(1)  # [T]
    pool = t.reshape(m * i, d)[flat].contiguous()  # [T, D]
    return TokenPool(tokens=pool, flat=flat, num_items=i, num_modalities=m)


def item_slice(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous item range [lo, hi) that ``rank`` of ``world_size`` adapts in distributed MID."""
    per = -(-num_items // world_size)
    return min(rank * per, num_items), min((rank + 1) * per, num_items)


def discover_item_interests(
    tokens: torch.Tensor, present: torch.Tensor, cfg: Any, discover: Callable[[np.ndarray, Any], ClusterResult],
) -> tuple[torch.Tensor, torch.Tensor, ClusterResult]:
    """MID in one process: ``tokens`` [M, N, D] adapted tokens of every item, ``present`` [N, M],
    ``discover(pool [T, D], cfg)`` clusters the present ones. Returns the interest id per (item, modality)
    [N, M] (-1: missing), the centroids [C, D] float32 and the clustering result."""
    pool = build_token_pool(tokens, present.cpu())  # [T, D], modality-major
    result = discover(pool.tokens.numpy(), cfg)
    item_interest = pool.to_item_matrix(result.labels)  # [N, M]
    centroids = torch.as_tensor(np.asarray(result.centroids)).to(torch.float32)  # [C, D]
    return item_interest, centroids, result


class InterestIndex:
    """``item_interest`` [I, M] int64 (-1 = missing modality) and ``centroids`` [C, D] float32."""

    def __init__(self, item_interest: torch.Tensor, centroids: torch.Tensor) -> None:
        item_interest = torch.as_tensor(item_interest).to(torch.int64)
        centroids = torch.as_tensor(centroids).to(torch.float32)
        if item_interest.dim() != 2 or centroids.dim() != 2:
            raise ValueError("item_interest must be [I, M] and centroids [C, D]")
        c = centroids.shape[0]
        if item_interest.numel() and (item_interest.max() >= c or item_interest.min() < -1):
            raise ValueError(f"interest ids must lie in -1..{c - 1}")
        self.item_interest = item_interest  # [I, M]
        self.centroids = centroids  # [C, D]

    @property
    def num_items(self) -> int:
        return int(self.item_interest.shape[0])

    @property
    def num_modalities(self) -> int:
        return int(self.item_interest.shape[1])

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def to(self, device: torch.device | str) -> InterestIndex:
        """Move both tensors to ``device`` (in place); returns self."""
        self.item_interest = self.item_interest.to(device)
        self.centroids = self.centroids.to(device)
        return self

    def sequence_interests(self, seq: torch.Tensor, pad_id: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """Distinct interests of each sequence of items.

        ``seq`` [B, L] int64 holds item index + 1, 0 = padding. Returns ``ids`` [B, K] int64 (ascending,
        padded with ``pad_id``) and ``mask`` [B, K] bool (True = real id), K = max distinct count in the
        batch (at least 1). Missing modality tokens and padding are ignored; duplicates are removed.
        """
        if seq.dim() != 2:
            raise ValueError(f"seq must be [B, L], got shape {tuple(seq.shape)}")
        seq = seq.to(self.item_interest.device, torch.int64)
        b = seq.shape[0]
        if seq.numel() and (seq.max() > self.num_items or seq.min() < 0):
            raise ValueError(f"item ids must lie in 0..{self.num_items} (0 = padding)")
        item = (seq - 1).clamp_min(0)  # [B, L]
        ids = self.item_interest[item]  # [B, L, M]
        valid = (seq > 0)[:, :, None] & (ids >= 0)  # [B, L, M]
        sentinel = self.num_clusters  # sorts after every real id
        flat = torch.where(valid, ids, torch.full_like(ids, sentinel)).reshape(b, -1)  # [B, L*M]
        flat, _ = flat.sort(dim=1)
        keep = flat != sentinel
        keep[:, 1:] &= flat[:, 1:] != flat[:, :-1]  # first of each run of equal ids
        count = keep.sum(dim=1)  # [B]
        k = max(int(count.max()) if b else 0, 1)
        width = flat.shape[1]
        col = torch.where(keep, keep.cumsum(dim=1) - 1, torch.full_like(flat, width))  # dump column = width
        out = torch.full((b, width + 1), pad_id, dtype=torch.int64, device=seq.device)
        out.scatter_(1, col, torch.where(keep, flat, torch.full_like(flat, pad_id)))
        ids_out = out[:, :k]  # [B, K]
        mask = torch.arange(k, device=seq.device)[None, :] < count[:, None]  # [B, K]
        return ids_out.contiguous(), mask
