"""SASRec and MISSRec: shapes, masking, frozen sets, and short trainings on the synthetic catalogue."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from missrec.config import MISSRecConfig
from missrec.data.batching import collate
from missrec.interests import InterestConfig
from missrec.models.sasrec import SASRec


def _tiny_missrec(num_items=12, use_ids=True, missing_image=(), dims=(8, 6), **kw):
    """A small MISSRec built from the config (``kw``: MISSRecConfig fields), with its interests discovered."""
    from dataclasses import replace

    from missrec.models.build import missrec_from_config

    rng = np.random.default_rng(0)
    text = rng.normal(size=(num_items, dims[0])).astype(np.float32)
    image = rng.normal(size=(num_items, dims[1])).astype(np.float32)
    image[list(missing_image)] = 0.0
    torch.manual_seed(0)
    cfg = replace(MISSRecConfig(), hidden=16, heads=2, inner=32, mode="transductive" if use_ids else "inductive",
                  interests=InterestConfig(cluster_ratio=0.5, knn=3), **kw)
    model = missrec_from_config(cfg, num_items, [text, image], max_len=10, seed=0)
    model.refresh_interests()
    return model


def _tiny_sasrec(**kw):
    torch.manual_seed(0)
    args = {"max_len": 8, "hidden": 16, "layers": 2, "heads": 2, "inner": 32, "dropout": 0.0, "attn_dropout": 0.0}
    return SASRec(20, **{**args, **kw})


def test_sasrec_shapes_and_last_position_loss():
    m = _tiny_sasrec().eval()
    batch = collate([(0, [1, 2, 3], 4), (1, [5], 6)], max_len=8)
    scores = m.full_scores(batch)
    assert scores.shape == (2, 20)
    # the loss is the cross-entropy of every row's scores at its last position
    assert torch.allclose(m.loss(batch)["ce"], torch.nn.functional.cross_entropy(scores, batch.target))
    # the causal mask: a row's scores do not depend on items after its last real position (padding)
    longer = collate([(0, [1, 2, 3, 7], 4)], max_len=8)
    assert not torch.allclose(m.full_scores(longer)[0], scores[0])


def test_missrec_shapes_padding_and_length_one():
    m = _tiny_missrec()
    m.eval()
    batch = collate([(0, [1, 2, 3], 4), (1, [5], 6)], max_len=10)
    s = m.full_scores(batch)
    assert s.shape == (2, 12) and torch.isfinite(s).all()
    # padding width does not change the result (the batch is trimmed, padding masked)
    wide = collate([(0, [1, 2, 3], 4), (1, [5], 6)], max_len=10)
    narrow = collate([(0, [1, 2, 3], 4), (1, [5], 6)], max_len=3)
    assert torch.allclose(m.full_scores(wide), m.full_scores(narrow), atol=1e-5)
    # a length-1 row scores the same alone and in a batch with a longer row
    alone = m.full_scores(collate([(1, [5], 6)], max_len=10))
    assert torch.allclose(alone[0], s[1], atol=1e-5)
    terms = m.loss(batch)
    assert set(terms) == {"loss", "ce", "interest_reg"} and torch.isfinite(terms["loss"])


def test_missing_modality_is_masked():
    m = _tiny_missrec(missing_image=(3, 4, 5))
    m.eval()
    assert not m.items.present[1 + 3, 1] and m.items.present[1 + 3, 0]
    # missing image tokens get no interest id
    assert (m.item_interest[1 + np.array([3, 4, 5]), 1] == -1).all()
    # a sequence whose items all miss the image still works, and changing the (missing) image
    # adapter's bias changes nothing for it
    batch = collate([(0, [3, 4, 5], 1)], max_len=10)
    before = m.full_scores(batch)
    assert torch.isfinite(before).all()
    with torch.no_grad():
        m.adapters[1].proj.bias.add_(5.0)
    after = m.full_scores(batch)
    # scores of items that have an image change (their image token moved) but the user vector did not:
    # compare on items whose image is missing too
    assert torch.allclose(before[0, [3, 4, 5]], after[0, [3, 4, 5]], atol=1e-5)


def test_interest_lookup_has_no_gradient_path():
    m = _tiny_missrec()
    m.train()
    batch = collate([(0, [1, 2, 3], 4), (1, [5, 6], 7)], max_len=10)
    m.loss(batch)["loss"].backward()
    assert m.centroids.grad is None and not m.centroids.requires_grad
    assert m.adapters[0].proj.weight.grad is not None and m.encoder.layers[0].linear1.weight.grad is not None


@pytest.mark.parametrize("use_ids", [True, False])
def test_frozen_sets(use_ids):
    m = _tiny_missrec(use_ids=use_ids)
    total = sum(p.numel() for p in m.parameters())
    assert m.set_trainable("all") == total
    n = m.set_trainable("adapters")
    trainable = {name for name, p in m.named_parameters() if p.requires_grad}
    assert not any(t.startswith(("encoder.", "decoder.", "pos_emb.")) for t in trainable)
    expected = {"adapters.0.proj.weight", "adapters.0.proj.bias", "adapters.1.proj.weight", "adapters.1.proj.bias",
                "norm.weight", "norm.bias", "fusion_factor"} | ({"item_id.weight"} if use_ids else set())
    assert trainable == expected
    assert n == sum(p.numel() for name, p in m.named_parameters() if name in expected) < total


def test_moe_adapter_runs():
    m = _tiny_missrec(adapter="moe", moe_experts=3)
    batch = collate([(0, [1, 2, 3], 4)], max_len=10)
    assert torch.isfinite(m.loss(batch)["loss"])
    assert not m.pad_negative  # a zero row through the MoE adapter is zero: no padding-row negative
    assert _tiny_missrec().pad_negative  # linear adapters: the official code's padding-row negative


def test_contrastive_masks_false_negatives():
    from missrec.models.losses import in_batch_contrastive

    logits = torch.tensor([[2.0, 5.0, 0.0], [5.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    keys = torch.tensor([7, 7, 3])  # rows 0 and 1 share their positive
    masked = in_batch_contrastive(logits, keys)
    # reference: row 0's denominator holds only itself and row 2
    ref = torch.stack([
        -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0],
        -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0],
        -torch.log_softmax(torch.tensor([0.0, 0.0, 1.0]), 0)[2],
    ]).mean()
    assert torch.allclose(masked, ref)
    assert in_batch_contrastive(logits) > masked  # unmasked, the shared positive counts as a negative


def test_item_drop_view_keeps_order_and_one_item_and_drops_every_modality():
    from pretrain_batches import batch_from_model

    from missrec.data.pretrain_batch import drop_view

    rng = np.random.default_rng(0)
    view = drop_view([1, 2, 3, 4, 5, 6], 0.5, rng)
    assert 1 <= len(view) < 6 and view == sorted(view)  # order kept
    assert drop_view([8], 0.99, rng) == [8]  # never empties a row
    # the view's rows point into the batch's own item table: a dropped item is gone from every modality at once
    m = _tiny_missrec(use_ids=False)
    batch = batch_from_model(m, [(0, [0, 1, 2, 3, 4, 5], 6)], drop_prob=0.5, seed=3)
    kept = batch.view_seq[0, : batch.view_len[0]]
    assert 1 <= len(kept) < 6 and set(kept.tolist()) <= set(batch.seq[0].tolist())


def test_pretrain_loss_runs_and_backprops():
    from pretrain_batches import batch_from_model

    m = _tiny_missrec(use_ids=False)
    batch = batch_from_model(m, [(0, [1, 2, 3], 4), (1, [5, 6], 4), (2, [7], 8)], drop_prob=0.3)
    terms = m.pretrain_loss(batch)
    assert set(terms) == {"loss", "seq_item", "seq_seq", "interest_reg"}
    terms["loss"].backward()
    assert m.adapters[0].proj.weight.grad is not None


def test_pretraining_rows_give_the_users_the_full_tables_give():
    """A pre-training batch brings only the rows it touches, renumbered; the encoder sees the same items,
    modalities and interests as from the model's full tables (items 9 and 10 miss their image)."""
    from pretrain_batches import batch_from_model

    m = _tiny_missrec(use_ids=False, missing_image=(9, 10), dropout=0.0, attn_dropout=0.0).eval()
    rows = [(0, [1, 2, 9], 4), (1, [10, 6], 4), (2, [7], 11)]
    batch = batch_from_model(m, rows)
    assert len(batch.feats[0]) == 9  # the padding row and the 8 distinct items, not the catalogue's 12
    with torch.no_grad():
        tokens = m.adapt_rows(batch.feats)
        got, _ = m.encode_rows(batch.seq, batch.seq_len, tokens, m.rows_present(batch.feats),
                               batch.centroids[batch.interests] * batch.imask.unsqueeze(-1), batch.imask)
        want, _ = m.encode(collate(rows, max_len=10), m.item_tokens())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_without_interests_the_ablation_has_no_mid_no_encoder_no_cross_attention():
    """``missrec.use_interests=false`` reaches the model (it was once a setting nothing read): no interest
    discovery, no interest encoder, a decoder of self-attention only; it scores and trains."""
    from missrec.config import RunConfig, build
    from missrec.models.build import missrec_from_config

    feats = [np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)]
    on = missrec_from_config(build(RunConfig, overrides=[]).missrec, 30, feats, max_len=10, seed=0)
    assert on.encoder is not None and any("multihead_attn" in n for n, _ in on.named_parameters())
    cfg = build(RunConfig, overrides=["missrec.use_interests=false", "missrec.hidden=16", "missrec.heads=2"])
    m = missrec_from_config(cfg.missrec, 30, feats, max_len=10, seed=0)
    names = [n for n, _ in m.named_parameters()]
    assert m.encoder is None and not any(n.startswith("encoder.") or "multihead_attn" in n for n in names)
    assert m.refresh_interests() == {} and m.begin_epoch(0) == {}
    assert not m.has_interests  # nothing was clustered
    batch = collate([(0, [1, 2, 3], 4), (1, [5], 6), (2, [7, 8], 9)], max_len=10)
    terms = m.loss(batch)
    assert torch.isfinite(terms["loss"]) and float(terms["interest_reg"]) == 0.0
    terms["loss"].backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if n.startswith("decoder."))
    m.eval()
    assert m.full_scores(batch).shape == (3, 30)


def test_interest_regulariser_scales_and_padded_slots():
    from missrec.models.losses import interest_regulariser

    # row 0: two real interests (a, b) and one padded slot p; row 1: one real interest c and two padded slots
    a, b, p, c = (torch.full((4,), v) for v in (1.0, 3.0, 10.0, 2.0))
    memory = torch.stack([torch.stack([a, b, p]), torch.stack([c, p, p])])  # [B=2, K=3, D=4]
    imask = torch.tensor([[True, True, False], [True, False, False]])
    # mean: each row's real outputs averaged ((a+b)/2 = 2, c = 2), squared norm / D averaged over rows
    assert interest_regulariser(memory, imask, "mean").item() == pytest.approx(4.0)
    # official: every slot, padded ones too, times the row's real fraction (2/3 * 14 and 1/3 * 22)
    expected = (2 / 3 * 14) ** 2 + (1 / 3 * 22) ** 2
    assert interest_regulariser(memory, imask, "official").item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="interest_reg"):
        interest_regulariser(memory, imask, "max")
