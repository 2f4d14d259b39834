"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018), ID-based.

Causal self-attention over item-ID embeddings plus learned positions; the output at the last real position scores
every item by dot product with the item embeddings; full-softmax cross-entropy at the last position of every
prefix row, as RecBole trains it (the paper's baseline row). Post-LN blocks with GELU, as RecBole's implementation.
How its scores become a ranking (the history terms) is the scoring policy's (:mod:`missrec.eval.policy`); its
history affinity compares item embeddings (:meth:`SASRec.affinity_units`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from missrec.data.batching import Batch


def gather_last(hidden: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
    """Output at each row's last real position: ``hidden`` [B, L, D], ``seq_len`` [B] -> [B, D]."""
    idx = (seq_len - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])  # [B, 1, D]
    return hidden.gather(1, idx).squeeze(1)


def init_weights(m: nn.Module) -> None:
    """BERT-style init shared by the models: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class SASRec(nn.Module):
    def __init__(self, num_items: int, *, max_len: int, hidden: int, layers: int, heads: int, inner: int,
                 dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)  # row 0 = padding
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(hidden, heads, inner, dropout=dropout, activation="gelu", batch_first=True,
                                           norm_first=False, layer_norm_eps=1e-12)
        layer.self_attn.dropout = attn_dropout  # attention dropout is a separate knob in SASRec/RecBole
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.apply(init_weights)

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Causal encoder output at every position: [B, L, D]."""
        seq = batch.seq  # [B, L]
        length = seq.shape[1]
        x = self.item_emb(seq) + self.pos_emb(torch.arange(length, device=seq.device))[None]  # [B, L, D]
        x = self.drop(self.norm(x))
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seq.device), 1)  # [L, L]
        # is_causal: torch need not inspect the mask (a host sync)
        return self.encoder(x, mask=causal, src_key_padding_mask=seq == 0, is_causal=True)  # [B, L, D]

    def encode(self, batch: Batch) -> torch.Tensor:
        """User representation: [B, D]."""
        return gather_last(self.hidden_states(batch), batch.seq_len)

    def full_scores(self, batch: Batch) -> torch.Tensor:
        """The model's score of every item for each row: [B, num_items]."""
        return self.encode(batch) @ self.item_emb.weight[1:].T

    def affinity_units(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[R, D]: the normalised item embeddings of item values ``rows`` [R] (default every row), whose dot product
        is the history affinity's similarity."""
        weight = self.item_emb.weight if rows is None else self.item_emb.weight[rows.to(self.item_emb.weight.device)]
        return F.normalize(weight, dim=-1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(self.full_scores(batch), batch.target)
        return {"loss": ce, "ce": ce}
