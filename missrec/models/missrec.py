"""MISSRec: multi-modal interest-aware sequence representations (Wang et al., ACM MM 2023).

Per item, one frozen feature vector per modality (text, image, ...; an all-zero row means the modality is
missing and is masked everywhere). Each modality has its own adapter into the model width. Then:

- **Interest discovery (MID)** -- once per epoch (:meth:`MISSRec.refresh_interests`), the adapted item tokens of
  all modalities are clustered (DPC-KNN on FAISS, or k-means); the *interest index* is one interest id per (item,
  modality) and the cluster centroids.
- **Encoder** -- a transformer over a sequence's distinct interests (centroid vectors, looked up without gradient;
  no positions; padding masked).
- **Decoder** -- queries are the item sequence (sum of the item's present adapted modalities + position, + ID
  embedding in transductive mode; LayerNorm, dropout); bidirectional self-attention, cross-attention to the encoded
  interests. The user representation is the output at the last real position, L2-normalised.
- **Dynamic fusion** -- per modality the cosine between the user and the normalised item token, fused with softmax
  weights over the item's present modalities, ``softmax(cos_m * a)`` with a learnable scalar ``a``; transductive:
  ``(cos_id + 2 * fused) / 3``; divided by τ.
- **Losses** -- fine-tuning: full-softmax cross-entropy over every item plus the padding row (a zero feature row
  through the adapters, as the official code scores it) and the interest regulariser; pre-training: the in-batch
  contrastive losses of :func:`missrec.models.losses.pretrain_objective`.

Item features come two ways. Fine-tuning passes a domain's tables (an :class:`~missrec.models.item_table.ItemTable`);
pre-training passes only their widths, and each :class:`~missrec.data.pretrain_batch.PretrainBatch` brings the rows
of the items it touches with their interests, so the model holds nothing that grows with the catalogue. How scores
become a ranking (history terms, exclusion) is the scoring policy's (:mod:`missrec.eval.policy`), not the model's.

Differences from the official code (gimpong/MM23-MISSRec), on purpose: a missing modality is masked in the sequence
sum and in the fusion (the official code scores the adapter's bias vector of a zero row); distinct interests are
computed vectorised; the regulariser averages each row's real interest outputs (``interest_reg="official"`` sums
every slot, padded ones too: :mod:`missrec.models.official`). ``use_interests=False`` is the ablation without
interests (no MID, no interest encoder, a decoder of self-attention only).

    model = missrec_from_config(MISSRecConfig(), num_items, [text_feats, image_feats], max_len=50, seed=0)
    model.refresh_interests()                              # the trainer calls begin_epoch() for this
    terms = model.loss(model.prepare(batch).to(device))   # {"loss", "ce", "interest_reg"}
    scores = model.full_scores(batch)                      # [B, num_items]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from missrec.data.batching import Batch
from missrec.errors import ConfigError
from missrec.interests.index import InterestIndex, discover_item_interests
from missrec.interests.sampled import discover_interests_sampled
from missrec.models.adapters import make_adapter
from missrec.models.item_table import ItemTable
from missrec.models.losses import interest_regulariser, pretrain_objective
from missrec.models.official import padding_interest_slot
from missrec.models.sasrec import gather_last, init_weights

if TYPE_CHECKING:
    from missrec.data.pretrain_batch import PretrainBatch

log = logging.getLogger(__name__)


def _self_attention_stack(hidden: int, heads: int, inner: int, dropout: float, attn_dropout: float, layers: int,
                          final_norm: bool) -> nn.TransformerEncoder:
    """``layers`` transformer layers of bidirectional self-attention (GELU, post-norm); ``final_norm``: a LayerNorm
    after the stack, as torch's nn.Transformer (the official code) has."""
    enc = nn.TransformerEncoderLayer(hidden, heads, inner, dropout, activation="gelu", batch_first=True,
                                     layer_norm_eps=1e-12)
    enc.self_attn.dropout = attn_dropout
    return nn.TransformerEncoder(enc, layers, norm=nn.LayerNorm(hidden, eps=1e-12) if final_norm else None,
                                 enable_nested_tensor=False)


class MISSRec(nn.Module):
    def __init__(self, num_items: int, features: Sequence[np.ndarray | torch.Tensor] | None, *,
                 feature_dims: Sequence[int], feature_cache: bool, hidden: int, max_len: int, encoder_layers: int,
                 decoder_layers: int, heads: int, inner: int, dropout: float, attn_dropout: float, adapter: str,
                 moe_experts: int, use_ids: bool, temperature: float, fusion: str, interest_weight: float,
                 interest_cfg: Any, final_norm: bool, interest_reg: str, use_interests: bool) -> None:
        super().__init__()
        if features is None and use_ids:
            raise ConfigError("a model without feature tables (pre-training) is ID-agnostic: use_ids must be False")
        if fusion not in ("dynamic", "mean") or interest_reg not in ("mean", "official"):
            raise ConfigError(f"fusion must be dynamic|mean and interest_reg mean|official, got {fusion!r}, "
                             f"{interest_reg!r}")
        self.items = ItemTable(num_items, features, feature_cache) if features is not None else None
        dims = self.items.dims if self.items is not None else [int(d) for d in feature_dims]
        if not dims:
            raise ConfigError("MISSRec needs at least one modality: feature tables, or their widths (pre-training)")
        self.num_items, self.num_modalities, self.hidden = num_items, len(dims), hidden
        self.use_ids, self.temperature, self.fusion = use_ids, temperature, fusion
        self.interest_weight, self.interest_cfg, self.interest_reg = interest_weight, interest_cfg, interest_reg
        self.use_interests = use_interests
        # the padding row scored as one more negative needs a non-zero token for it: the linear adapters' biases (the
        # MoE adapter maps a zero row to zero, whose normalisation would give 1/eps gradients)
        self.pad_negative = adapter == "linear"
        self.adapters = nn.ModuleList(make_adapter(adapter, d, hidden, 0.0, moe_experts) for d in dims)
        self.item_id = nn.Embedding(num_items + 1, hidden, padding_idx=0) if use_ids else None
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.encoder: nn.TransformerEncoder | None = None
        self.decoder: nn.TransformerDecoder | nn.TransformerEncoder
        if use_interests:
            self.encoder = _self_attention_stack(hidden, heads, inner, dropout, attn_dropout, encoder_layers,
                                                 final_norm)
            dec = nn.TransformerDecoderLayer(hidden, heads, inner, dropout, activation="gelu", batch_first=True,
                                             layer_norm_eps=1e-12)
            dec.self_attn.dropout = attn_dropout
            dec.multihead_attn.dropout = attn_dropout
            self.decoder = nn.TransformerDecoder(dec, decoder_layers,
                                                 norm=nn.LayerNorm(hidden, eps=1e-12) if final_norm else None)
        else:  # the ablation without interests: the decoder without cross-attention
            self.decoder = _self_attention_stack(hidden, heads, inner, dropout, attn_dropout, decoder_layers,
                                                 final_norm)
        self.fusion_factor = nn.Parameter(torch.zeros(1))  # [1]: engines cannot broadcast 0-d tensors
        if self.items is not None:  # the interest index: per (item, modality) interest id (-1: missing), centroids
            self.register_buffer("item_interest", torch.full((num_items + 1, len(dims)), -1, dtype=torch.long))
            self.register_buffer("centroids", torch.zeros(1, hidden))
        self._host_index: InterestIndex | None = None  # the same ids on the host (prepare() reads them)
        self._eval_tokens: torch.Tensor | None = None
        self.apply(init_weights)
        for mod in self.adapters.modules():  # the official code's adapters keep torch's default init (non-zero bias)
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()

    # ------------------------------------------------------------------------------ item tokens
    def adapt_rows(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Adapted tokens [M, U, D] of feature rows ``feats`` (one [U, F_m] per modality), in the adapters' dtype
        (bf16 under a bf16 engine; float16 rows are widened)."""
        dtype = self.pos_emb.weight.dtype
        return torch.stack([ad(f.to(dtype)) for f, ad in zip(feats, self.adapters)])

    @staticmethod
    def rows_present(feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Which modalities each row has [U, M] (an all-zero feature row is a missing modality)."""
        return torch.stack([f.abs().sum(-1) > 0 for f in feats], dim=1)

    def item_tokens(self) -> torch.Tensor:
        """Adapted tokens of every item and modality: [M, N + 1, D] (row 0 = padding); cached while evaluating."""
        if self._eval_tokens is not None:
            return self._eval_tokens
        if self.items is None:
            raise RuntimeError("this model has no feature tables (pre-training): batches bring their rows")
        return self.adapt_rows(self.items.rows(slice(None)))

    def begin_eval(self) -> None:
        with torch.no_grad():
            self._eval_tokens = None
            self._eval_tokens = self.item_tokens()
        if self.use_interests and not self.has_interests:
            self.refresh_interests()

    def end_eval(self) -> None:
        self._eval_tokens = None

    # ------------------------------------------------------------------------------ interests
    @property
    def has_interests(self) -> bool:
        return self._host_index is not None

    @torch.no_grad()
    def refresh_interests(self) -> dict[str, float]:
        """MID over every present item token (one process; pre-training discovers across ranks into files,
        :mod:`missrec.train.pretrain_mid`); rebuilds the interest index. ``{}`` without interests."""
        if not self.use_interests:
            return {}

        t0 = time.perf_counter()
        was_training = self.training
        self.eval()
        tokens = self.adapt_rows(self.items.rows(slice(1, None)))  # [M, N, D]
        self.train(was_training)
        item_interest, centroids, result = discover_item_interests(tokens, self.items.present[1:], self.interest_cfg,
                                                                   discover_interests_sampled)
        self.set_interest_index(item_interest, centroids)
        sizes = result.cluster_sizes()
        return {"clusters": float(len(sizes)), "tokens": float(len(np.asarray(result.labels))),
                "seconds": time.perf_counter() - t0, "max_size": float(sizes.max()), "mean_size": float(sizes.mean())}

    def set_interest_index(self, item_interest: torch.Tensor, centroids: torch.Tensor) -> None:
        """Install an interest index (checked here, once): ``item_interest`` [N, M] (-1: missing), ``centroids``."""
        if tuple(item_interest.shape) != (self.num_items, self.num_modalities):
            raise ValueError(f"item_interest must be [{self.num_items}, {self.num_modalities}], "
                             f"got {tuple(item_interest.shape)}")
        host = torch.cat([torch.full((1, self.num_modalities), -1, dtype=torch.long), item_interest.cpu().long()])
        self._host_index = InterestIndex(host[1:], centroids.detach().cpu())  # validates the ids
        self.item_interest = host.to(self.item_interest.device)
        self.centroids = centroids.detach().to(self.item_interest.device, torch.float32).clone()

    def begin_epoch(self, epoch: int) -> dict[str, float]:
        """Called by the trainer before each epoch: MID on the current adapted tokens."""
        return self.refresh_interests()

    def interest_index(self) -> InterestIndex:
        if self._host_index is None:
            raise RuntimeError("no interest index yet: call refresh_interests()")
        return self._host_index

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "centroids"  # the index changes size with the pool: take the saved one's shape first
        if self.items is not None and key in state_dict and state_dict[key].shape != self.centroids.shape:
            self.centroids = torch.zeros_like(state_dict[key], device=self.centroids.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.items is not None and prefix + "item_interest" in state_dict:  # the host copy follows
            host = self.item_interest[1:].cpu()
            if bool((host >= 0).any()):
                self.set_interest_index(host, self.centroids)

    # ------------------------------------------------------------------------------ encoder-decoder
    def prepare(self, batch: Batch) -> Batch:
        """On the host, before the batch moves to its device: its distinct interests, so the step needs no sync."""
        if not self.use_interests or self._host_index is None or batch.seq.device.type != "cpu":
            return batch
        return batch.with_interests(*self._interests(batch, self._host_index))

    def _interests(self, batch: Batch, index: InterestIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's distinct interest ids [B, K] (-1 where padded) and their mask [B, K]."""
        ids, imask = index.sequence_interests(batch.seq.to(index.item_interest.device))
        if self.interest_reg == "official":
            ids, imask = padding_interest_slot(ids, imask, batch.seq_len, self.pos_emb.num_embeddings)
        return ids, imask

    def encode(self, batch: Batch, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """User representation [B, D] and interest regulariser, with the adapted ``tokens`` [M, N + 1, D]."""
        if batch.interests is not None:
            ids, imask = batch.interests, batch.imask
        elif self.use_interests:
            ids, imask = self._interests(batch, self.interest_index().to(batch.seq.device))
        else:
            ids = torch.zeros(len(batch), 0, dtype=torch.long, device=batch.seq.device)  # [B, 0]
            imask = ids.bool()
        interest = self.centroids[ids.clamp(min=0)].detach() * imask.unsqueeze(-1) if self.encoder is not None else None
        id_emb = self.item_id(batch.seq) if self.item_id is not None else None
        return self.encode_rows(batch.seq, batch.seq_len, tokens, self.items.present, interest, imask, id_emb)

    def encode_rows(self, rows: torch.Tensor, seq_len: torch.Tensor, tokens: torch.Tensor, present: torch.Tensor,
                    interest: torch.Tensor | None, imask: torch.Tensor, id_emb: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder-decoder on rows of an item table: ``rows`` [B, L] (0 = padding), ``seq_len`` [B], the
        table's ``tokens`` [M, U, D] and ``present`` [U, M], the rows' ``interest`` vectors [B, K, D] with ``imask``
        [B, K] (None without interests), ``id_emb`` [B, L, D]. Returns the user [B, D] and the regulariser."""
        pres = present[rows].to(tokens.dtype)  # [B, L, M]
        x = torch.zeros(*rows.shape, self.hidden, device=rows.device, dtype=tokens.dtype)
        for m in range(self.num_modalities):
            x = x + tokens[m][rows] * pres[..., m : m + 1]  # [B, L, D]
        if id_emb is not None:
            x = x + id_emb
        x = self.drop(self.norm(x + self.pos_emb(torch.arange(rows.shape[1], device=rows.device))[None]))
        pad = rows == 0  # [B, L]
        if self.encoder is None or interest is None:
            h = self.decoder(x, src_key_padding_mask=pad)  # [B, L, D]
            return F.normalize(gather_last(h, seq_len), dim=-1), x.new_zeros(())
        memory = self.encoder(interest.to(x.dtype), src_key_padding_mask=~imask)  # [B, K, D]
        reg = interest_regulariser(memory, imask, self.interest_reg)
        h = self.decoder(x, memory, tgt_key_padding_mask=pad, memory_key_padding_mask=~imask)  # [B, L, D]
        return F.normalize(gather_last(h, seq_len), dim=-1), reg

    # ------------------------------------------------------------------------------ scores and losses
    def fuse(self, user: torch.Tensor, cand: torch.Tensor, present: torch.Tensor, idw: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Scores [B, C] of ``user`` [B, D] against candidate tokens ``cand`` [M, C, D] whose modalities ``present``
        [C, M] says exist; ``idw`` [C, D]: their ID embeddings (transductive)."""
        cand = F.normalize(cand, dim=-1)
        cos = torch.einsum("bd,mnd->bnm", user, cand)  # [B, C, M]
        if self.num_modalities == 1:
            fused = cos[..., 0] * present[:, 0]
        else:
            a = self.fusion_factor if self.fusion == "dynamic" else torch.zeros((), device=cos.device)
            weights = torch.softmax((cos * a).masked_fill(~present, float("-inf")), dim=-1).nan_to_num(0.0)
            fused = (cos * weights).sum(-1)  # [B, C]; an item with no modality scores 0
        if idw is not None:
            fused = (user @ F.normalize(idw, dim=-1).T + 2 * fused) / 3
        return fused / self.temperature

    def full_scores(self, batch: Batch) -> torch.Tensor:
        """The model's score of every item for each row: [B, num_items]."""
        tokens = self.item_tokens()
        user, _ = self.encode(batch, tokens)
        idw = self.item_id.weight[1:] if self.item_id is not None else None
        return self.fuse(user, tokens[:, 1:], self.items.present[1:], idw)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Fine-tuning: full-softmax cross-entropy over every item and, with linear adapters, the padding row (as the
        official code scores it: a zero feature row through the adapters), plus the interest regulariser."""
        tokens = self.item_tokens()
        user, reg = self.encode(batch, tokens)
        if self.pad_negative:
            present = self.items.present.clone()
            present[0] = True
            idw = self.item_id.weight if self.item_id is not None else None
            ce = F.cross_entropy(self.fuse(user, tokens, present, idw), batch.target + 1)  # column j = item value j
        else:
            idw = self.item_id.weight[1:] if self.item_id is not None else None
            ce = F.cross_entropy(self.fuse(user, tokens[:, 1:], self.items.present[1:], idw), batch.target)
        return {"loss": ce + self.interest_weight * reg, "ce": ce, "interest_reg": reg}

    def pretrain_loss(self, batch: PretrainBatch, seq_seq_weight: float = 0.1,
                      gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return pretrain_objective(self, batch, seq_seq_weight, gather)

    def forward(self, batch: Batch | PretrainBatch, objective: str = "pretrain", **kwargs: object
                ) -> dict[str, torch.Tensor]:
        """The loss terms of ``objective`` (``pretrain`` or ``finetune``); engines (DeepSpeed ZeRO-3) gather
        partitioned parameters around this call."""
        if objective == "pretrain":
            return self.pretrain_loss(batch, **kwargs)  # type: ignore[arg-type]
        if objective == "finetune":
            return self.loss(batch)
        raise ValueError(f"objective must be 'pretrain' or 'finetune', got {objective!r}")

    def affinity_units(self, tokens: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[R, M·D]: vectors whose dot product is the history affinity's similarity of two items (the mean over
        modalities of their adapted tokens' cosines, a modality missing on either counting 0), for the item values
        ``rows`` (default every row, padding included) of ``tokens`` [M, N + 1, D] (default the current ones)."""
        tokens = self.item_tokens() if tokens is None else tokens
        rows = torch.arange(tokens.shape[1], device=tokens.device) if rows is None else rows.to(tokens.device)
        unit = F.normalize(tokens[:, rows], dim=-1) * self.items.present[rows].T[..., None]  # [M, R, D]
        return unit.permute(1, 0, 2).reshape(rows.shape[0], -1) / self.num_modalities ** 0.5

    # ------------------------------------------------------------------------------ transfer
    def backbone_parameters(self) -> list[str]:
        """Names of the parameters frozen in parameter-efficient fine-tuning (transformer + positions)."""
        return [n for n, _ in self.named_parameters() if n.startswith(("encoder.", "decoder.", "pos_emb."))]

    def set_trainable(self, mode: str) -> int:
        """``"all"`` (from scratch) or ``"adapters"`` (after pre-training: the transformer and positions frozen;
        adapters, input LayerNorm, fusion scalar and ID embedding train). Returns the trainable count."""
        if mode not in ("all", "adapters"):
            raise ConfigError(f"mode must be 'all' or 'adapters', got {mode!r}")
        frozen = set(self.backbone_parameters()) if mode == "adapters" else set()
        for name, p in self.named_parameters():
            p.requires_grad_(name not in frozen)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
