"""MISSRec: multi-modal interest-aware sequence representations (Wang et al., ACM MM 2023).

One readable model file. Per item, one frozen feature vector per modality (text, image, ...; an
all-zero row means the modality is missing and is masked everywhere). Each modality has its own
adapter into the model width. Then:

- **Interest discovery (MID)** — once per epoch (:meth:`MISSRec.refresh_interests`), the adapted item
  tokens of all modalities are clustered (DPC-KNN on FAISS, or k-means); the result is the *interest
  index*: one interest id per (item, modality) and the cluster centroids.
- **Encoder** — a transformer over a sequence's distinct interests (centroid vectors, looked up without
  gradient; no positions; padding masked).
- **Decoder** — queries are the item sequence (sum of the item's present adapted modalities + position,
  + ID embedding in transductive mode; LayerNorm, dropout); bidirectional self-attention, cross-attention
  to the encoded interests. User representation: the output at the last real position, L2-normalised.
- **Scoring with dynamic fusion** — per modality the cosine between the user and the normalised item
  token; fused with softmax weights over the item's present modalities, ``softmax(cos_m * a)`` with a
  learnable scalar ``a`` (0 = plain mean); transductive: ``(cos_id + 2 * fused) / 3``; divided by τ.
- **History offset** (``history_bias``, the toolkit's default; not in the paper) — one scalar added, over τ,
  to the score of every item already in the row's history in ranking; ``history_bias_fit`` says how it is
  fit: on validation (default: the model trains as the paper's, the offset is chosen at each validation),
  in the loss, or in the loss beside the model (:mod:`missrec.models.history`); 0 gives the paper's model.
- **History affinity** (``history_affinity``; not in the paper) — w times each item's largest cosine to an
  item of the row's history (adapted tokens, mean over modalities) added to its score in ranking, w chosen
  with the offset at each validation; the single user vector scores an item by its closeness to the whole
  history, the affinity by its closeness to any one history item.

Differences from the official code (gimpong/MM23-MISSRec), on purpose:

- a missing modality is masked in the sequence sum and in the fusion (the official code adds the
  adapter's bias vector for a zero feature row and scores it like any other);
- distinct interests of a batch are computed vectorised, not with a Python loop over rows;
- the interest regulariser averages each row's real interest outputs (the official one sums every slot,
  padded ones too: ``interest_reg="official"``). Averaged over rows and over a row's interests instead of
  summed, it is (batch size x interests per row squared) times weaker at the same weight, thousands of
  times on scientific_mm; ``interest_reg="sum"`` keeps the official scale (real outputs summed per row,
  rows summed) without the padded slots.

``use_interests=False`` is the ablation without interests: no MID, no interest encoder, and the decoder
without cross-attention (bidirectional self-attention over the item sequence alone).

``pad_negative`` (the toolkit's default, as the official code) scores the padding row, whose tokens are
the linear adapters' biases, as one more negative in training.

Item features come two ways. Fine-tuning on a domain passes its tables (``features``): the model keeps them as
buffers on its device (``feature_cache``, the default) or memory-mapped on the host, adapting every item each
step either way (the full softmax needs them all). Pre-training passes only their widths (``feature_dims``):
each :class:`~missrec.data.pretrain_batch.PretrainBatch` brings the rows of the items it touches, its interest
ids and centroids, so the model holds nothing that grows with the catalogue.

With ``final_norm``, ``interest_reg="official"``, ``pad_negative`` and ``adapter_init="torch"``, the
forward pass and the fine-tuning loss are the official code's (tests/test_official_parity.py).

Usage::

    model = MISSRec(num_items, [text_feats, image_feats], use_ids=True)
    model.refresh_interests()            # the trainer calls begin_epoch() for this
    terms = model.loss(model.prepare(batch).to(device))   # {"loss", "ce", "interest_reg"}
    scores = model.full_scores(batch)    # [B, num_items]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from missrec.data.batching import Batch
from missrec.models.adapters import make_adapter
from missrec.models.history import (
    HistoryScoring,
    history_affinity,
    history_cross_entropy,
)
from missrec.models.losses import interest_regulariser
from missrec.models.sasrec import gather_last, init_weights

if TYPE_CHECKING:
    from missrec.data.pretrain_batch import PretrainBatch
    from missrec.interests.index import InterestIndex

log = logging.getLogger(__name__)


def _self_attention_stack(
    hidden: int, heads: int, inner: int, dropout: float, attn_dropout: float, layers: int, final_norm: bool
) -> nn.TransformerEncoder:
    """``layers`` transformer layers of bidirectional self-attention (GELU, post-norm), as the encoder."""
    enc = nn.TransformerEncoderLayer(
        hidden, heads, inner, dropout, activation="gelu", batch_first=True, layer_norm_eps=1e-12
    )
    enc.self_attn.dropout = attn_dropout
    return nn.TransformerEncoder(
        enc, layers, norm=nn.LayerNorm(hidden, eps=1e-12) if final_norm else None, enable_nested_tensor=False,
    )


class MISSRec(HistoryScoring, nn.Module):
    def __init__(
        self,
        num_items: int,
        features: Sequence[np.ndarray | torch.Tensor] | None,
        hidden: int = 300,
        max_len: int = 50,
        encoder_layers: int = 1,
        decoder_layers: int = 1,
        heads: int = 4,
        inner: int = 256,
        dropout: float = 0.5,
        attn_dropout: float = 0.5,
        adapter: str = "linear",
        adapter_dropout: float = 0.0,
        moe_experts: int = 8,
        use_ids: bool = True,
        temperature: float = 0.07,
        fusion: str = "dynamic",
        interest_weight: float = 1e-4,
        interest_cfg: object | None = None,
        final_norm: bool = False,
        interest_reg: str = "mean",
        adapter_init: str = "normal",
        pad_negative: bool = False,
        use_interests: bool = True,
        history_bias: bool = False,
        history_bias_fit: str = "validation",
        history_affinity: bool = False,
        feature_dims: Sequence[int] = (),
        feature_cache: bool = True,
    ) -> None:
        super().__init__()
        if not features and not feature_dims:
            raise ValueError("MISSRec needs at least one modality: feature tables, or their widths (pre-training)")
        if features is None and use_ids:
            raise ValueError("a model without feature tables (pre-training) is ID-agnostic: use_ids must be False")
        if fusion not in ("dynamic", "mean"):
            raise ValueError(f"fusion must be 'dynamic' or 'mean', got {fusion!r}")
        if interest_reg not in ("mean", "sum", "official"):
            raise ValueError(f"interest_reg must be 'mean', 'sum' or 'official', got {interest_reg!r}")
        if pad_negative and (adapter != "linear" or adapter_init != "torch"):
            raise ValueError("pad_negative scores the linear adapters' (non-zero) biases: it needs adapter='linear' "
                             f"and adapter_init='torch', got {adapter!r} and {adapter_init!r}; set pad_negative "
                             "off (missrec.pad_negative=false)")
        self.interest_reg = interest_reg
        self.use_interests = use_interests
        self.pad_negative = pad_negative
        self.num_items = num_items
        self.num_modalities = len(features) if features is not None else len(feature_dims)
        self.hidden = hidden
        self.use_ids = use_ids
        self.temperature = temperature
        self.fusion = fusion
        self.interest_weight = interest_weight
        self.interest_cfg = interest_cfg
        # fine-tuning: the tables, row 0 = padding (all zero), row i + 1 = item i; on the device (buffers) or on the
        # host (memory-mapped, ``feature_cache=False``); pre-training: none (each batch brings its rows)
        self._host_tables: list[np.ndarray] | None = None
        self.has_tables = features is not None
        dims = [int(d) for d in feature_dims]
        if features is not None:
            dims = [int(np.shape(f)[1]) for f in features]
            present = []
            host = []
            for m, f in enumerate(features):
                if np.shape(f)[0] != num_items:
                    raise ValueError(f"feature table {m} has {np.shape(f)[0]} rows, expected {num_items}")
                if feature_cache:
                    t = torch.from_numpy(np.array(f, dtype=np.float32))  # a private copy (inputs may be memmaps)
                    if not torch.isfinite(t).all():
                        raise ValueError(f"feature table {m} holds NaN or inf")
                    self.register_buffer(f"feat{m}", torch.cat([torch.zeros(1, t.shape[1]), t]), persistent=False)
                    present.append(torch.cat([torch.zeros(1, dtype=torch.bool), t.abs().sum(1) > 0]))
                else:
                    host.append(f)
                    rows = [np.abs(np.asarray(f[s : s + 65536], dtype=np.float32)).sum(1) > 0
                            for s in range(0, num_items, 65536)]
                    present.append(torch.from_numpy(np.concatenate([[False], *rows])))
            if host:
                self._host_tables = host
            self.register_buffer("present", torch.stack(present, dim=1), persistent=False)  # [N + 1, M]
        self.feature_dims = dims
        self.adapters = nn.ModuleList(
            make_adapter(adapter, dims[m], hidden, adapter_dropout, moe_experts) for m in range(self.num_modalities)
        )
        self.item_id = nn.Embedding(num_items + 1, hidden, padding_idx=0) if use_ids else None
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        # final_norm: a LayerNorm after each stack, as torch's nn.Transformer (the official code) has
        self.encoder: nn.TransformerEncoder | None = None
        self.decoder: nn.TransformerDecoder | nn.TransformerEncoder
        if use_interests:
            self.encoder = _self_attention_stack(hidden, heads, inner, dropout, attn_dropout, encoder_layers,
                                                 final_norm)
            dec = nn.TransformerDecoderLayer(
                hidden, heads, inner, dropout, activation="gelu", batch_first=True, layer_norm_eps=1e-12
            )
            dec.self_attn.dropout = attn_dropout
            dec.multihead_attn.dropout = attn_dropout
            self.decoder = nn.TransformerDecoder(
                dec, decoder_layers, norm=nn.LayerNorm(hidden, eps=1e-12) if final_norm else None
            )
        else:  # the ablation without interests: no MID, no interest encoder, the decoder without cross-attention
            self.decoder = _self_attention_stack(hidden, heads, inner, dropout, attn_dropout, decoder_layers,
                                                 final_norm)
        self.fusion_factor = nn.Parameter(torch.zeros(1))  # [1]: engines cannot broadcast 0-d tensors
        # an offset, in cosine units, of the items already in the history (0: plain MISSRec), and the weight (logits
        # per unit of cosine) of the history affinity (missrec.models.history)
        self.init_history_scoring(history_bias, history_bias_fit, history_affinity)
        # the interest index: per (item, modality) interest id (-1: missing), and centroids [C, D]; a host copy of
        # the ids (prepare() finds a batch's interests there); pre-training keeps its index in files instead
        if self.has_tables:
            self.register_buffer("item_interest",
                                 torch.full((num_items + 1, self.num_modalities), -1, dtype=torch.long))
            self.register_buffer("centroids", torch.zeros(1, hidden))
        self._host_index: InterestIndex | None = None
        self._eval_tokens: torch.Tensor | None = None
        self.apply(init_weights)
        if adapter_init == "torch":  # the official code's adapters keep torch's default init (non-zero bias)
            for mod in self.adapters.modules():
                if isinstance(mod, nn.Linear):
                    mod.reset_parameters()
        elif adapter_init != "normal":
            raise ValueError(f"adapter_init must be 'normal' or 'torch', got {adapter_init!r}")

    # ------------------------------------------------------------------------------ item tokens
    def item_tokens(self) -> torch.Tensor:
        """Adapted tokens of every item and modality: [M, N + 1, D] (row 0 = padding)."""
        if self._eval_tokens is not None:
            return self._eval_tokens
        return self.adapt(slice(None))

    def adapt(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """Adapted tokens [M, R, D] of feature rows ``rows`` (item index + 1), in the adapters' dtype."""
        if not self.has_tables:
            raise RuntimeError("this model has no feature tables (pre-training): adapt a batch's rows (adapt_rows)")
        if self._host_tables is None:
            return self.adapt_rows([getattr(self, f"feat{m}")[rows] for m in range(self.num_modalities)])
        return self.adapt_rows([self._host_rows(m, rows) for m in range(self.num_modalities)])

    def _host_rows(self, m: int, rows: slice | torch.Tensor) -> torch.Tensor:
        """Feature rows ``rows`` (item index + 1; 0 = padding) of host table ``m``, on the model's device."""
        table = self._host_tables[m]
        values = np.arange(self.num_items + 1)[rows] if isinstance(rows, slice) else rows.cpu().numpy()
        out = np.zeros((len(values), table.shape[1]), dtype=np.float32)
        real = np.flatnonzero(values > 0)
        out[real] = table[values[real] - 1]
        return torch.from_numpy(out).to(self.pos_emb.weight.device, non_blocking=True)

    def adapt_rows(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Adapted tokens [M, U, D] of feature rows ``feats`` (one [U, F_m] per modality), in the adapters' dtype
        (bf16 under a bf16 engine, float32 otherwise; float16 rows are widened)."""
        dtype = self.pos_emb.weight.dtype
        return torch.stack([ad(f.to(dtype)) for f, ad in zip(feats, self.adapters)])

    @staticmethod
    def rows_present(feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Which modalities each row has [U, M] (an all-zero feature row is a missing modality)."""
        return torch.stack([f.abs().sum(-1) > 0 for f in feats], dim=1)

    def begin_eval(self) -> None:
        """Cache the item tokens for a whole evaluation pass (they do not change without gradients)."""
        with torch.no_grad():
            self._eval_tokens = None
            self._eval_tokens = self.item_tokens()
        if self.use_interests and not self.has_interests:
            self.refresh_interests()

    def end_eval(self) -> None:
        self._eval_tokens = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the interest index changes size with the pool: take the saved one's shape before loading it
        key = prefix + "centroids"
        if self.has_tables and key in state_dict and state_dict[key].shape != self.centroids.shape:
            self.centroids = torch.zeros_like(state_dict[key], device=self.centroids.device)
        key = prefix + "fusion_factor"
        if key in state_dict and state_dict[key].dim() == 0:  # saved before it became [1]
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.has_tables and prefix + "item_interest" in state_dict:  # the host copy follows the loaded index
            from missrec.interests.index import InterestIndex

            host = self.item_interest[1:].cpu()
            self._host_index = InterestIndex(host, self.centroids.cpu()) if bool((host >= 0).any()) else None

    # ------------------------------------------------------------------------------ interests
    @property
    def has_interests(self) -> bool:
        return self._host_index is not None

    @torch.no_grad()
    def refresh_interests(self) -> dict[str, float]:
        """Multi-modal interest discovery over all present item tokens (single process; pre-training discovers
        across ranks into files, :mod:`missrec.train.pretrain_mid`); rebuilds the interest index. Without
        interests (``use_interests=False``) there is nothing to discover: ``{}`` is returned."""
        if not self.use_interests:
            return {}
        from missrec.interests import InterestConfig
        from missrec.interests.index import discover_item_interests
        from missrec.interests.sampled import discover_interests_sampled

        t0 = time.perf_counter()
        was_training = self.training
        self.eval()
        tokens = self.adapt(slice(1, None))  # [M, N, D]
        self.train(was_training)
        cfg = self.interest_cfg if self.interest_cfg is not None else InterestConfig()
        item_interest, centroids, result = discover_item_interests(tokens, self.present[1:], cfg,
                                                                   discover_interests_sampled)
        self.set_interest_index(item_interest, centroids)
        sizes = result.cluster_sizes()
        secs = time.perf_counter() - t0
        n_tokens = len(np.asarray(result.labels))
        log.debug("MID: %d tokens -> %d interests in %.2fs", n_tokens, len(sizes), secs)
        return {
            "clusters": float(len(sizes)), "tokens": float(n_tokens), "seconds": secs,
            "max_size": float(sizes.max()), "mean_size": float(sizes.mean()),
        }

    def set_interest_index(self, item_interest: torch.Tensor, centroids: torch.Tensor) -> None:
        """Install an interest index: ``item_interest`` [N, M] (-1: missing), ``centroids`` [C, D]; checked here,
        once, not at every forward."""
        from missrec.interests.index import InterestIndex

        if not self.has_tables:
            raise RuntimeError("a model without feature tables (pre-training) reads its interest index from files")
        if tuple(item_interest.shape) != (self.num_items, self.num_modalities):
            raise ValueError(f"item_interest must be [{self.num_items}, {self.num_modalities}], "
                             f"got {tuple(item_interest.shape)}")
        dev = self.item_interest.device
        pad = torch.full((1, self.num_modalities), -1, dtype=torch.long)
        host = torch.cat([pad, item_interest.cpu().long()])
        self._host_index = InterestIndex(host[1:], centroids.detach().cpu())  # validates the ids
        self.item_interest = host.to(dev)
        self.centroids = centroids.detach().to(dev, torch.float32).clone()

    def begin_epoch(self, epoch: int) -> dict[str, float]:
        """Called by the trainer before each epoch: MID on the current adapted tokens."""
        return self.refresh_interests()

    def weights_changed(self) -> None:
        """Called when weights were replaced in place (e.g. by an average of them, ``train.ema``): the
        interest index is rebuilt from the new adapters."""
        self.refresh_interests()

    def interest_index(self) -> InterestIndex:
        """The current interest index (item rows without the padding row), on the host."""
        if self._host_index is None:
            raise RuntimeError("no interest index yet: call refresh_interests()")
        return self._host_index

    # ------------------------------------------------------------------------------ forward
    def prepare(self, batch: Batch) -> Batch:
        """On the host, before the batch moves to the device: its distinct interests (ids [B, K] and mask), so the
        step needs no host sync. Batches that skip this get them on the device (evaluation)."""
        if not self.use_interests or self._host_index is None or batch.seq.device.type != "cpu":
            return batch
        ids, imask = self._interests(batch, self._host_index)
        return batch.with_interests(ids, imask)

    def encode(self, batch: Batch, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """User representation [B, D] (L2-normalised) and the interest regulariser (scalar), with the adapted
        ``tokens`` [M, N + 1, D] of every item. The batch's interests come from :meth:`prepare` when it ran."""
        if batch.interests is not None:
            ids, imask = batch.interests, batch.imask
        elif self.use_interests:
            ids, imask = self._interests(batch, self.interest_index().to(batch.seq.device))
        else:
            ids = torch.zeros(len(batch), 0, dtype=torch.long, device=batch.seq.device)  # [B, 0]
            imask = ids.bool()
        seq = batch.seq  # [B, L] item values: the rows of the full table
        interest = None
        if self.encoder is not None:
            interest = self.centroids[ids.clamp(min=0)].detach() * imask.unsqueeze(-1)  # [B, K, D]
        id_emb = self.item_id(seq) if self.item_id is not None else None
        return self.encode_rows(seq, batch.seq_len, tokens, self.present, interest, imask, id_emb)

    def _interests(self, batch: Batch, index: InterestIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's distinct interest ids [B, K] (-1 where padded) and their mask [B, K] from ``index``."""
        ids, imask = index.sequence_interests(batch.seq.to(index.item_interest.device))  # [B, K]
        if self.interest_reg == "official":  # its list holds the padding id too: one more slot where a row has padding
            has_pad = batch.seq_len.to(ids.device) < self.pos_emb.num_embeddings  # [B] (it pads every history to max_len)
            extra = int((imask.sum(1) + has_pad).max()) - ids.shape[1]
            if extra > 0:
                ids = F.pad(ids, (0, extra), value=-1)
                imask = F.pad(imask, (0, extra), value=False)
        return ids, imask

    def encode_rows(
        self, rows: torch.Tensor, seq_len: torch.Tensor, tokens: torch.Tensor, present: torch.Tensor,
        interest: torch.Tensor | None, imask: torch.Tensor, id_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The interest-aware encoder-decoder on a batch given as rows of an item table: ``rows`` [B, L] (0 = the
        padding row), ``seq_len`` [B], the table's adapted ``tokens`` [M, U, D] and ``present`` [U, M], the rows'
        ``interest`` vectors [B, K, D] with ``imask`` [B, K] (None without interests), ``id_emb`` [B, L, D]
        (transductive). Returns the user representation [B, D] (L2-normalised) and the interest regulariser."""
        length = rows.shape[1]
        pres = present[rows].to(tokens.dtype)  # [B, L, M]
        x = torch.zeros(*rows.shape, self.hidden, device=rows.device, dtype=tokens.dtype)
        for m in range(self.num_modalities):
            x = x + tokens[m][rows] * pres[..., m : m + 1]  # [B, L, D]
        if id_emb is not None:
            x = x + id_emb
        x = x + self.pos_emb(torch.arange(length, device=rows.device))[None]
        x = self.drop(self.norm(x))
        pad = rows == 0  # [B, L]
        if self.encoder is None or interest is None:  # without interests: self-attention over the sequence only
            h = self.decoder(x, src_key_padding_mask=pad)  # [B, L, D]
            return F.normalize(gather_last(h, seq_len), dim=-1), x.new_zeros(())
        # padded slots are zero vectors (masked everywhere; only the official regulariser sums their outputs)
        memory = self.encoder(interest.to(x.dtype), src_key_padding_mask=~imask)  # [B, K, D]
        reg = interest_regulariser(memory, imask, self.interest_reg)
        h = self.decoder(x, memory, tgt_key_padding_mask=pad, memory_key_padding_mask=~imask)  # [B, L, D]
        return F.normalize(gather_last(h, seq_len), dim=-1), reg

    def score(self, user: torch.Tensor, tokens: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Dynamic-fusion scores: ``user`` [B, D], ``tokens`` [M, N + 1, D], candidate ``items`` [C]
        (item index + 1; default every item) -> [B, C]."""
        if items is None:
            cand, present = tokens[:, 1:], self.present[1:]  # [M, N, D], [N, M]
            idw = self.item_id.weight[1:] if self.item_id is not None else None
        else:
            cand, present = tokens[:, items], self.present[items]
            idw = self.item_id.weight[items] if self.item_id is not None else None
        return self.fuse(user, cand, present, idw)

    def fuse(
        self, user: torch.Tensor, cand: torch.Tensor, present: torch.Tensor, idw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores [B, C] of ``user`` [B, D] against candidate tokens ``cand`` [M, C, D] whose modalities
        ``present`` [C, M] says exist; ``idw`` [C, D]: their ID embeddings (transductive)."""
        cand = F.normalize(cand, dim=-1)
        cos = torch.einsum("bd,mnd->bnm", user, cand)  # [B, C, M]
        if self.num_modalities == 1:
            fused = cos[..., 0] * present[:, 0]
        else:
            a = self.fusion_factor if self.fusion == "dynamic" else torch.zeros((), device=cos.device)
            logits = (cos * a).masked_fill(~present, float("-inf"))
            weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # an item with no modality: all zero
            fused = (cos * weights).sum(-1)  # [B, C]
        if idw is not None:
            fused = (user @ F.normalize(idw, dim=-1).T + 2 * fused) / 3
        return fused / self.temperature

    def history_offset(self) -> torch.Tensor | None:
        """The offset of history items in logits, β / τ [1]; None without ``history_bias``."""
        return None if self.history_bias is None else self.history_bias / self.temperature

    def fitted_buffers(self) -> list[str]:
        """Buffers fit on the fine-tuning domain that its adapter file carries: the offset (and affinity weight)
        chosen on validation."""
        if self.offset_grid() is None:
            return []
        return ["history_bias"] + (["affinity_weight"] if self.affinity_weight is not None else [])

    def history_affinity(self, batch: Batch, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N]: each item's largest cosine to an item of the row's history, averaged over the modalities
        (adapted tokens ``tokens`` [M, N + 1, D], default the current ones; a modality missing on either item
        counts 0)."""
        tokens = self.item_tokens() if tokens is None else tokens
        return history_affinity(batch.seq, self.affinity_units(tokens))

    def affinity_units(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[R, M·D]: vectors whose dot product is the history affinity's similarity of two items (the mean over
        modalities of the cosines of their adapted tokens, a modality missing on either counting 0), for the
        item values ``rows`` [R] (default every row, padding included) of ``tokens`` [M, N + 1, D]."""
        rows = torch.arange(tokens.shape[1], device=tokens.device) if rows is None else rows.to(tokens.device)
        unit = F.normalize(tokens[:, rows], dim=-1) * self.present[rows].T[..., None]  # [M, R, D]
        return unit.permute(1, 0, 2).reshape(rows.shape[0], -1) / self.num_modalities ** 0.5  # [R, M·D]

    def set_history_offset(self, logits: float) -> None:
        """Set the history offset to ``logits`` (β = logits · τ)."""
        if self.history_bias is None:
            raise ValueError("this model has no history offset (history_bias=False)")
        with torch.no_grad():
            self.history_bias.fill_(logits * self.temperature)

    def _train_offset(self) -> torch.Tensor | None:
        """The offset in the training loss: none when it is chosen on validation (the model trains as plain)."""
        return None if self.history_bias_fit == "validation" else self.history_offset()

    def full_scores(self, batch: Batch) -> torch.Tensor:
        """[B, num_items]."""
        tokens = self.item_tokens()
        user, _ = self.encode(batch, tokens)
        return self.add_history_terms(self.score(user, tokens), batch, lambda: self.history_affinity(batch, tokens))

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Fine-tuning: full-softmax cross-entropy over all items + the interest regulariser."""
        tokens = self.item_tokens()
        user, reg = self.encode(batch, tokens)
        if self.pad_negative:  # the official code's extra negative: row 0, a zero feature row through the adapters
            present = self.present.clone()
            present[0] = True
            idw = self.item_id.weight if self.item_id is not None else None
            # [B, N + 1]: column j is item value j (padding first)
            logits, target, first = self.fuse(user, tokens, present, idw), batch.target + 1, 0
        else:
            logits, target, first = self.score(user, tokens), batch.target, 1  # [B, N]
        ce = history_cross_entropy(logits, target, batch.seq, self._train_offset(), first,
                                   self.history_bias_fit == "detached")
        return {"loss": ce + self.interest_weight * reg, "ce": ce, "interest_reg": reg}

    def pretrain_loss(
        self, batch: PretrainBatch, seq_seq_weight: float = 0.1,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Pre-training loss terms: :func:`missrec.models.losses.pretrain_objective` (its arguments)."""
        from missrec.models.losses import pretrain_objective

        return pretrain_objective(self, batch, seq_seq_weight, gather)

    def forward(self, batch: Batch | PretrainBatch, objective: str = "pretrain", **kwargs: object
                ) -> dict[str, torch.Tensor]:
        """The loss terms of ``objective`` (``pretrain`` or ``finetune``); engines (DeepSpeed ZeRO-3)
        gather partitioned parameters around this call."""
        if objective == "pretrain":
            return self.pretrain_loss(batch, **kwargs)  # type: ignore[arg-type]
        if objective == "finetune":
            return self.loss(batch)
        raise ValueError(f"objective must be 'pretrain' or 'finetune', got {objective!r}")

    # ------------------------------------------------------------------------------ transfer
    def backbone_parameters(self) -> list[str]:
        """Names of the parameters frozen in parameter-efficient fine-tuning (transformer + positions)."""
        return [n for n, _ in self.named_parameters() if n.startswith(("encoder.", "decoder.", "pos_emb."))]

    def set_trainable(self, mode: str) -> int:
        """``"all"`` (from scratch) or ``"adapters"`` (after pre-training: freeze transformer and positions;
        train adapters, input LayerNorm, fusion scalar and ID embedding). Returns the trainable count."""
        if mode not in ("all", "adapters"):
            raise ValueError(f"mode must be 'all' or 'adapters', got {mode!r}")
        frozen = set(self.backbone_parameters()) if mode == "adapters" else set()
        for name, p in self.named_parameters():
            p.requires_grad_(name not in frozen)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
