"""What a trained model looks like to the item index: item vectors, query vectors, exact scores.

- **SASRec** scores an item by the inner product of the user vector with the item embedding, so the
  index vector is the embedding and the index's ranking is the model's ranking.
- **MISSRec** scores with dynamic fusion (see :meth:`missrec.models.missrec.MISSRec.fuse`): per modality
  the cosine ``c_m`` between the user and the item's normalised token, mixed with weights
  ``softmax(a * c_m)`` over the item's present modalities (learnable ``a``); transductive:
  ``(c_id + 2 * fused) / 3``; divided by τ. The softmax makes that no inner product. The index vector
  is therefore a *proxy*: the concatenation over modalities of ``present_m / n_present * t_m / |t_m|``
  (times 2/3, after ``id / |id| / 3`` in transductive mode), queried with the user vector repeated once
  per block. Its inner product is the fused score at ``a = 0`` (the plain mean of the present
  cosines), exact when ``a == 0``, with ``fusion="mean"`` or with one modality. The recommender
  retrieves a candidate pool with the proxy and re-ranks it with the model's exact score; how often
  that equals the exact full ranking is measured by :mod:`missrec.serve.agreement`.

Inductive MISSRec can take new items from their features alone (:meth:`MISSRecScorer.add_items`):
they are adapted with the trained adapters, appended to the model's feature / ``present`` buffers and
to the interest index (each new token joins its nearest interest centroid), with no retraining.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from missrec.data.batching import Batch
from missrec.errors import MISSRecError
from missrec.eval.policy import history_affinity
from missrec.models.missrec import MISSRec
from missrec.models.sasrec import SASRec

log = logging.getLogger(__name__)


class ItemScorer(Protocol):
    """The view of a model that the recommender needs."""

    num_items: int
    dim: int  # index vector width
    proxy_is_exact: bool  # the index inner product ranks exactly as the model's score

    def encode(self, batch: Batch) -> torch.Tensor:
        """User vectors [B, D]."""

    def item_vectors(self, items: torch.Tensor) -> np.ndarray:
        """Index vectors of ``items`` (0-based) [n] -> [n, dim] float32."""

    def query_vectors(self, user: torch.Tensor) -> np.ndarray:
        """Query vectors of users [B, D] -> [B, dim] float32."""

    def scores(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The model's exact scores of ``items`` (0-based) [C] for users [B, D] -> [B, C]."""

    def full_scores(self, user: torch.Tensor) -> torch.Tensor:
        """The model's exact scores of every item: [B, num_items]."""

    def history_affinity(self, batch: Batch) -> torch.Tensor:
        """[B, num_items]: each item's largest similarity to an item of the row's history (0 without one)."""

    def affinity_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """[n] (0-based) -> [n, K] float32: vectors whose dot product is the history affinity's similarity."""


class SASRecScorer:
    """Index vectors = item embeddings; the index ranking is exact."""

    proxy_is_exact = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.weight = model.item_emb.weight.detach()  # [N + 1, D], row 0 = padding
        self.num_items = int(model.num_items)
        self.dim = int(self.weight.shape[1])

    @torch.no_grad()
    def encode(self, batch: Batch) -> torch.Tensor:
        """User vectors [B, D]."""
        return self.model.encode(batch.to(self.weight.device))

    @torch.no_grad()
    def history_affinity(self, batch: Batch) -> torch.Tensor:
        """[B, N]: each item's largest cosine (item embeddings) to an item of the row's history."""
        return history_affinity(batch.seq.to(self.weight.device), self.model.affinity_units())

    @torch.no_grad()
    def affinity_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """[n] -> [n, D]: the normalised item embeddings."""
        return self.model.affinity_units(items.to(self.weight.device) + 1).float()

    def item_vectors(self, items: torch.Tensor) -> np.ndarray:
        """[n] -> [n, D]: the item embeddings."""
        return self.weight[items.to(self.weight.device) + 1].float().cpu().numpy()

    def query_vectors(self, user: torch.Tensor) -> np.ndarray:
        """[B, D] -> [B, D]."""
        return user.float().cpu().numpy()

    @torch.no_grad()
    def scores(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[B, D] x [C] -> [B, C] dot products."""
        return user @ self.weight[items.to(self.weight.device) + 1].T

    @torch.no_grad()
    def full_scores(self, user: torch.Tensor) -> torch.Tensor:
        """[B, N], as ``SASRec.full_scores``."""
        return user @ self.weight[1:].T


class MISSRecScorer:
    """Proxy index vectors for dynamic fusion (see the module docstring) and the model's exact score."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.transductive = model.item_id is not None
        self.num_modalities = int(model.num_modalities)
        self.hidden = int(model.hidden)
        with torch.no_grad():
            if not model.has_interests:
                log.info("the model has no interest index: running interest discovery once")
                model.refresh_interests()
            self.tokens = model.item_tokens().detach()  # [M, N + 1, D]
        self.dim = self.hidden * (self.num_modalities + int(self.transductive))

    @property
    def num_items(self) -> int:
        return int(self.model.num_items)

    @torch.no_grad()
    def history_affinity(self, batch: Batch) -> torch.Tensor:
        """[B, N]: the history affinity over the served tokens (new items included)."""
        return history_affinity(batch.seq.to(self.tokens.device), self.model.affinity_units(self.tokens))

    @torch.no_grad()
    def affinity_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """[n] -> [n, M * D]: the served tokens, normalised, a missing modality zeroed, over sqrt(M)."""
        return self.model.affinity_units(self.tokens, items.to(self.tokens.device) + 1).float()

    @property
    def proxy_is_exact(self) -> bool:
        m = self.model
        return self.num_modalities == 1 or m.fusion == "mean" or float(m.fusion_factor.detach().abs().max()) == 0.0

    @torch.no_grad()
    def encode(self, batch: Batch) -> torch.Tensor:
        """User vectors [B, D] (L2-normalised)."""
        user, _ = self.model.encode(batch.to(self.tokens.device), self.tokens)
        return user

    @torch.no_grad()
    def item_vectors(self, items: torch.Tensor) -> np.ndarray:
        """[n] -> [n, (M [+1]) * D]: the a = 0 proxy of the fused score."""
        rows = items.to(self.tokens.device) + 1
        t = F.normalize(self.tokens[:, rows].float(), dim=-1)  # [M, n, D]
        p = self.model.items.present[rows].float()  # [n, M]
        w = p / p.sum(1, keepdim=True).clamp(min=1)  # [n, M]: 1 / n_present on present modalities
        v = (t * w.T.unsqueeze(-1)).permute(1, 0, 2).reshape(rows.shape[0], -1)  # [n, M * D]
        if self.transductive:
            idv = F.normalize(self.model.item_id.weight[rows].detach().float(), dim=-1)  # [n, D]
            v = torch.cat([idv / 3, v * (2 / 3)], dim=1)
        return v.cpu().numpy()

    def query_vectors(self, user: torch.Tensor) -> np.ndarray:
        """[B, D] -> [B, (M [+1]) * D]: the user vector once per block."""
        blocks = self.num_modalities + int(self.transductive)
        return user.float().repeat(1, blocks).cpu().numpy()

    @torch.no_grad()
    def scores(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[B, D] x [C] -> [B, C]: the fused score divided by τ (``MISSRec.fuse``)."""
        rows = items.to(self.tokens.device) + 1
        m = self.model
        idw = m.item_id.weight[rows] if m.item_id is not None else None
        return m.fuse(user, self.tokens[:, rows], m.items.present[rows], idw)

    @torch.no_grad()
    def full_scores(self, user: torch.Tensor) -> torch.Tensor:
        """[B, N], as ``MISSRec.full_scores``."""
        return self.scores(user, torch.arange(self.num_items, device=self.tokens.device))

    @torch.no_grad()
    def add_items(self, features: Sequence[torch.Tensor]) -> None:
        """Append new items from one feature table per modality (``features[m]`` [n, dim_m]; an all-zero
        row = modality missing). Inductive models only; nothing is retrained."""
        m = self.model
        if self.transductive:
            raise TransductiveItemsError(
                "cannot add items to a transductive MISSRec: its score needs a trained ID embedding for "
                "every item, and new items have none; serve an inductive run (missrec.mode=inductive)"
            )
        if len(features) != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} feature tables, got {len(features)}")
        dev = self.tokens.device
        feats = [torch.as_tensor(f, dtype=torch.float32).to(dev) for f in features]
        n = int(feats[0].shape[0])
        present = torch.stack([f.abs().sum(1) > 0 for f in feats], dim=1)  # [n, M]
        new_tokens = torch.stack([ad(f) for ad, f in zip(m.adapters, feats, strict=True)])  # [M, n, D]
        interests = nearest_interests(new_tokens, present, m.centroids)  # [n, M]
        m.items.grow(feats)
        m.num_items = int(m.num_items) + n
        m.set_interest_index(torch.cat([m.item_interest[1:], interests.to(m.item_interest.device)]), m.centroids)
        self.tokens = torch.cat([self.tokens, new_tokens.to(self.tokens.dtype)], dim=1)
        log.info("added %d items inductively (catalogue now %d)", n, m.num_items)


class TransductiveItemsError(MISSRecError, ValueError):
    """Items cannot be added to a model that scores with trained per-item ID embeddings."""


def nearest_interests(tokens: torch.Tensor, present: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Interest id of each new token: its nearest centroid (Euclidean, as interest discovery clusters).

    ``tokens`` [M, n, D], ``present`` [n, M] bool, ``centroids`` [C, D] -> [n, M] int64 (-1 = missing)."""
    d = torch.cdist(tokens.float(), centroids.float().unsqueeze(0).expand(tokens.shape[0], -1, -1))  # [M, n, C]
    ids = d.argmin(-1).T  # [n, M]
    return torch.where(present, ids, torch.full_like(ids, -1))


def make_scorer(model: nn.Module) -> ItemScorer:
    """The scorer for a SASRec or MISSRec model (put in eval mode)."""
    if isinstance(model, MISSRec):
        return MISSRecScorer(model)
    if isinstance(model, SASRec):
        return SASRecScorer(model)
    raise TypeError(f"no item scorer for {type(model).__name__}: expected SASRec or MISSRec")


__all__ = [
    "ItemScorer", "MISSRecScorer", "SASRecScorer", "TransductiveItemsError", "make_scorer", "nearest_interests",
]
