"""Modality adapters: frozen feature vector [..., D_in] -> model width [..., D].

- :class:`LinearAdapter` — MISSRec's adapter, one linear map per modality.
- :class:`MoEAdapter` — UniSRec's MoE-enhanced adapter: several parametric-whitening experts
  ``(x - b_e) W_e`` mixed by a softmax gate, with Gaussian gate noise during training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from missrec.errors import ConfigError


class LinearAdapter(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D_in] -> [..., D]."""
        return self.proj(self.drop(x))


class MoEAdapter(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, experts: int = 8, dropout: float = 0.2, noise: bool = True) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(experts, in_dim))  # whitening offsets b_e
        self.weight = nn.Parameter(torch.empty(experts, in_dim, out_dim))  # W_e
        nn.init.normal_(self.weight, std=0.02)
        self.gate = nn.Parameter(torch.zeros(in_dim, experts))
        self.gate_noise = nn.Parameter(torch.zeros(in_dim, experts))
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D_in] -> [..., D]."""
        logits = x @ self.gate  # [..., E]
        if self.training and self.noise:
            std = F.softplus(x @ self.gate_noise) + 1e-2
            logits = logits + torch.randn_like(logits) * std
        gates = torch.softmax(logits, dim=-1)  # [..., E]
        xd = self.drop(x)
        # expert e: (x - b_e) @ W_e = x @ W_e - b_e @ W_e
        experts = torch.einsum("...i,eio->...eo", xd, self.weight) - torch.einsum("ei,eio->eo", self.bias, self.weight)
        return (gates.unsqueeze(-1) * experts).sum(dim=-2)


def make_adapter(kind: str, in_dim: int, out_dim: int, dropout: float = 0.0, experts: int = 8) -> nn.Module:
    if kind == "linear":
        return LinearAdapter(in_dim, out_dim, dropout)
    if kind == "moe":
        return MoEAdapter(in_dim, out_dim, experts, dropout)
    raise ConfigError(f"unknown adapter {kind!r}: expected 'linear' or 'moe'")
