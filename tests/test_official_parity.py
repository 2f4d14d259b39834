"""With the official code's behaviours (``configs/official.yaml``), MISSRec's fine-tuning loss equals the official
code's formulas.

The reference below follows gimpong/MM23-MISSRec's ``_compute_seq_embeddings`` / ``calculate_loss`` step by
step (histories padded to ``max_len``; interest lists from ``unique()`` over the padded history, so the
padding id 0 is one of them; zero vectors for it; the regulariser summed over every slot; the padding row
scored as one more negative). On the real data and an official checkpoint the same holds to 7 digits
(docs/experiments.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from missrec.data.batching import collate
from missrec.models.missrec import MISSRec

ITEMS, MAX_LEN, HIDDEN = 12, 6, 16
PRESET = Path(__file__).resolve().parents[1] / "configs" / "official.yaml"


def _model(use_ids: bool) -> MISSRec:
    from missrec.config import RunConfig, build
    from missrec.models.build import missrec_from_config

    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(ITEMS, 8)).astype(np.float32), rng.normal(size=(ITEMS, 6)).astype(np.float32)]
    torch.manual_seed(0)
    cfg = build(RunConfig, [PRESET], [f"missrec.hidden={HIDDEN}", "missrec.heads=2", "missrec.inner=32",
                                      f"missrec.mode={'transductive' if use_ids else 'inductive'}",
                                      "missrec.interests.cluster_ratio=0.5", "missrec.interests.knn=3"])
    m = missrec_from_config(cfg.missrec, ITEMS, feats, MAX_LEN, seed=0)
    m.refresh_interests()
    with torch.no_grad():  # a trained-looking fusion scalar, so the dynamic weights are not uniform
        m.fusion_factor.fill_(0.7)
    return m.eval()


def _official_loss(m: MISSRec, seq: torch.Tensor, seq_len: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official fine-tuning loss, written after its code. ``seq`` [B, MAX_LEN] item index + 1."""
    text, image = (ad(f) for f, ad in zip(m.items.rows(slice(None)), m.adapters))  # [N + 1, D] each
    lut = torch.cat([torch.zeros(1, 2, dtype=torch.long), m.item_interest[1:] + 1])  # official ids: 0 = padding
    emb = torch.cat([torch.zeros(1, HIDDEN), m.centroids])  # its interest_embeddings buffer
    lists = [torch.cat([lut[row, 0], lut[row, 1]]).unique() for row in seq]
    interest_seq = nn.utils.rnn.pad_sequence(lists, batch_first=True, padding_value=0)  # [B, K]
    key_pad = interest_seq == 0
    x = text[seq] + image[seq] + m.pos_emb.weight[None, :MAX_LEN]
    if m.item_id is not None:
        x = x + m.item_id(seq)
    x = m.drop(m.norm(x))
    memory = m.encoder(emb[interest_seq], src_key_padding_mask=key_pad)
    weight = (~key_pad).unsqueeze(-1).float().mean(1, keepdim=True)  # [B, 1, 1]
    pooled = (memory * weight).sum(1)
    reg = (pooled * pooled).sum() / pooled.shape[1]
    out = m.decoder(x, memory, tgt_key_padding_mask=seq == 0, memory_key_padding_mask=key_pad)
    user = F.normalize(out[torch.arange(len(seq)), seq_len - 1], dim=1)
    t, v = F.normalize(text, dim=1), F.normalize(image, dim=1)  # every row, the padding row included
    cos = torch.stack([user @ t.T, user @ v.T], dim=-1)  # [B, N + 1, 2]
    logits = (cos * F.softmax(cos * m.fusion_factor, dim=-1)).sum(-1)
    if m.item_id is not None:
        logits = (user @ F.normalize(m.item_id.weight, dim=1).T + 2 * logits) / 3
    return F.cross_entropy(logits / m.temperature, target + 1) + m.interest_weight * reg


BATCHES = {
    # the longest interest list belongs to a padded row: the official list has one more slot (the padding id)
    "padded-longest": [(0, [1, 2, 3], 4), (1, [5], 6), (2, [7, 8, 9, 10, 11], 1), (3, [2, 2, 3, 4], 5)],
    # a full row (no padding) has the longest list: no extra slot
    "full-longest": [(0, [1, 2, 3], 4), (1, [5], 6), (2, [7, 8, 9, 10, 11, 0], 1), (3, [2, 2, 3, 4], 5)],
}


@pytest.mark.parametrize("rows", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize("use_ids", [False, True])
def test_official_switches_give_the_official_loss(use_ids, rows):
    m = _model(use_ids)
    batch = collate(rows, max_len=MAX_LEN)
    with torch.no_grad():
        ours = m.loss(batch)["loss"]
        padded = F.pad(batch.seq, (0, MAX_LEN - batch.seq.shape[1]))  # the official code pads to max_len
        ref = _official_loss(m, padded, batch.seq_len, batch.target)
    assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)
    # and the switches matter: our default regulariser gives another loss on the same weights
    m.interest_reg = "mean"
    with torch.no_grad():
        assert not torch.allclose(m.loss(batch)["loss"], ref, atol=1e-5)
