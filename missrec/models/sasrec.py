"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018), ID-based.

Causal self-attention over item-ID embeddings plus learned positions; the output at the last real
position scores every item by dot product with the item embeddings; full-softmax cross-entropy.
Post-LN blocks with GELU, as RecBole's implementation that the paper's baseline row used.

Two training objectives over the same (prefix -> next item) pairs:

- ``"last"`` (RecBole's, the default, what the paper's row used): cross-entropy at the last position of
  every prefix row.
- ``"causal"`` (SASRec's own): cross-entropy at every real position of a user's full training sequence.
  Causal attention makes position ``t`` see exactly the prefix ending at ``t``, so one row per user
  (its longest, ``train_rows == "last_per_user"``) covers every prefix row of ``.train.inter`` once,
  at about a third of the compute. Measured on Scientific it selects a worse model (validation NDCG@10
  0.0573 against 0.0607 for ``"last"``), so it is an option, not the default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from missrec.data.batching import Batch
from missrec.models.history import (
    HistoryScoring,
    history_affinity,
    history_cross_entropy,
)

HISTORY_SCALE = 1 / 0.07  # SASRec's history offset, in logits per unit of its parameter


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


class SASRec(HistoryScoring, nn.Module):
    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        hidden: int = 300,
        layers: int = 2,
        heads: int = 2,
        inner: int = 256,
        dropout: float = 0.5,
        attn_dropout: float = 0.5,
        objective: str = "last",
        history_bias: bool = False,
        history_bias_fit: str = "validation",
        history_affinity: bool = False,
    ) -> None:
        super().__init__()
        if objective not in ("causal", "last"):
            raise ValueError(f"objective must be 'causal' or 'last', got {objective!r}")
        if history_bias and objective != "last":
            raise ValueError("history_bias needs objective='last' (one history per row)")
        self.objective = objective
        # which training rows the data layer should feed (see the module docstring)
        self.train_rows = "last_per_user" if objective == "causal" else "all"
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)  # row 0 = padding
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, inner, dropout=dropout, activation="gelu", batch_first=True, norm_first=False,
            layer_norm_eps=1e-12,
        )
        # attention dropout is a separate knob in SASRec/RecBole
        layer.self_attn.dropout = attn_dropout
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        # an offset of the items already in the history (missrec.models.history), in units of HISTORY_SCALE
        # logits so that Adam moves it about as fast as MISSRec's (cosine units over τ = 0.07), and the weight of the
        # history affinity (cosine of item embeddings)
        self.init_history_scoring(history_bias, history_bias_fit, history_affinity)
        self.apply(init_weights)

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Causal encoder output at every position: [B, L', D] with ``L' = max(seq_len)``."""
        seq = batch.seq  # [B, L']
        length = seq.shape[1]
        pos = torch.arange(length, device=seq.device)
        x = self.item_emb(seq) + self.pos_emb(pos)[None]  # [B, L, D]
        x = self.drop(self.norm(x))
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seq.device), 1)  # [L, L]
        pad = seq == 0  # [B, L]
        return self.encoder(x, mask=causal, src_key_padding_mask=pad, is_causal=True)  # [B, L, D]; no mask check

    def encode(self, batch: Batch) -> torch.Tensor:
        """User representation: [B, D]."""
        return gather_last(self.hidden_states(batch), batch.seq_len)

    def plain_scores(self, batch: Batch) -> torch.Tensor:
        """Scores of every item without the history offset: [B, num_items]."""
        return self.encode(batch) @ self.item_emb.weight[1:].T

    def full_scores(self, batch: Batch) -> torch.Tensor:
        """[B, num_items], the history affinity and offset added."""
        return self.add_history_terms(self.plain_scores(batch), batch, lambda: self.history_affinity(batch))

    def history_affinity(self, batch: Batch) -> torch.Tensor:
        """[B, num_items]: each item's largest cosine (item embeddings) to an item of the row's history."""
        return history_affinity(batch.seq, self.affinity_units())

    def affinity_units(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[R, D]: the normalised item embeddings of item values ``rows`` [R] (default every row), whose dot
        product is the history affinity's similarity."""
        weight = self.item_emb.weight if rows is None else self.item_emb.weight[rows.to(self.item_emb.weight.device)]
        return F.normalize(weight, dim=-1)

    def history_offset(self) -> torch.Tensor | None:
        """The offset of history items in logits [1]; None without ``history_bias``."""
        return None if self.history_bias is None else self.history_bias * HISTORY_SCALE

    def set_history_offset(self, logits: float) -> None:
        """Set the history offset to ``logits``."""
        if self.history_bias is None:
            raise ValueError("this model has no history offset (history_bias=False)")
        with torch.no_grad():
            self.history_bias.fill_(logits / HISTORY_SCALE)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.objective == "last":
            # chosen on validation: the model trains as plain SASRec
            offset = None if self.history_bias_fit == "validation" else self.history_offset()
            ce = history_cross_entropy(self.plain_scores(batch), batch.target, batch.seq, offset,
                                       detach=self.history_bias_fit == "detached")
            return {"loss": ce, "ce": ce}
        h = self.hidden_states(batch)  # [B, L, D]
        seq = batch.seq
        # label at t = the item at t + 1 (0-based), and the row's target after the last real item
        labels = torch.zeros_like(seq)  # [B, L]
        labels[:, :-1] = seq[:, 1:] - 1
        labels.scatter_(1, (batch.seq_len - 1).view(-1, 1), batch.target.view(-1, 1))
        real = seq > 0  # [B, L]
        logits = h[real] @ self.item_emb.weight[1:].T  # [T, num_items]
        ce = F.cross_entropy(logits, labels[real])
        return {"loss": ce, "ce": ce}
