"""SASRec and MISSRec: shapes, masking, frozen sets, and short trainings on the synthetic catalogue."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from missrec.config import MISSRecConfig, SASRecConfig
from missrec.data.batching import collate
from missrec.errors import ConfigError
from missrec.interests import InterestConfig
from missrec.models.missrec import MISSRec
from missrec.models.sasrec import SASRec


def _tiny_missrec(num_items=12, use_ids=True, missing_image=(), dims=(8, 6), **kw):
    rng = np.random.default_rng(0)
    text = rng.normal(size=(num_items, dims[0])).astype(np.float32)
    image = rng.normal(size=(num_items, dims[1])).astype(np.float32)
    image[list(missing_image)] = 0.0
    torch.manual_seed(0)
    model = MISSRec(num_items, [text, image], hidden=16, max_len=10, heads=2, inner=32, use_ids=use_ids,
                    interest_cfg=InterestConfig(cluster_ratio=0.5, knn=3), **kw)
    model.refresh_interests()
    return model


def test_sasrec_shapes_and_causal_objective_covers_prefixes():
    torch.manual_seed(0)
    m = SASRec(20, max_len=8, hidden=16, heads=2, inner=32, dropout=0.0, attn_dropout=0.0, objective="causal")
    batch = collate([(0, [1, 2, 3], 4), (1, [5], 6)], max_len=8)
    assert m.full_scores(batch).shape == (2, 20)
    # the causal loss on the full row equals the mean of the last-position losses of its prefixes
    m.eval()
    full = m.loss(batch)["ce"]
    m.objective = "last"
    prefixes = collate([(0, [1], 2), (0, [1, 2], 3), (0, [1, 2, 3], 4), (1, [5], 6)], max_len=8)
    assert torch.allclose(full, m.loss(prefixes)["ce"], atol=1e-5)


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
    assert not m.present[1 + 3, 1] and m.present[1 + 3, 0]
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


def test_item_drop_removes_same_items_in_every_modality():
    from missrec.models.losses import drop_items

    batch = collate([(0, [1, 2, 3, 4, 5, 6], 7), (1, [8], 9)], max_len=10)
    g = torch.Generator().manual_seed(0)
    view = drop_items(batch, 0.5, g)
    assert view.seq_len[1] == 1 and view.seq[1, 0] == batch.seq[1, 0]  # never empties a row
    kept = view.seq[0, : view.seq_len[0]].tolist()
    assert 1 <= len(kept) < 6 and kept == sorted(kept)  # order kept, left-aligned
    assert (view.seq[0, view.seq_len[0]:] == 0).all()
    # modalities are looked up by item: a dropped item is gone from text and image alike
    m = _tiny_missrec()
    present_items = set(view.seq[0][view.seq[0] > 0].tolist())
    text_tokens = m.feat0[view.seq[0]][: view.seq_len[0]]
    image_tokens = m.feat1[view.seq[0]][: view.seq_len[0]]
    assert torch.equal(text_tokens, m.feat0[sorted(present_items)])
    assert torch.equal(image_tokens, m.feat1[sorted(present_items)])


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


def test_adapter_dropout_drops_features_in_training_only():
    plain = _tiny_missrec()
    dropped = _tiny_missrec(adapter_dropout=0.5)
    # the same weights at the same seed: the option adds no parameter
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dropped.state_dict().values()))
    dropped.train()
    torch.manual_seed(1)
    a = dropped.item_tokens()  # [M, N + 1, D]
    b = dropped.item_tokens()
    assert not torch.allclose(a[:, 1:], b[:, 1:])  # a fresh mask per call
    assert torch.equal(a[:, 0], b[:, 0])  # the padding row is all zero: its token is the bias, dropped or not
    dropped.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(dropped.item_tokens(), plain.item_tokens())  # off at evaluation


def test_adapter_dropout_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="missrec.adapter_dropout"):
        MISSRecConfig(adapter_dropout=1.0)


def test_interest_regulariser_scales_and_padded_slots():
    from missrec.models.losses import interest_regulariser

    # row 0: two real interests (a, b) and one padded slot p; row 1: one real interest c and two padded slots
    a, b, p, c = (torch.full((4,), v) for v in (1.0, 3.0, 10.0, 2.0))
    memory = torch.stack([torch.stack([a, b, p]), torch.stack([c, p, p])])  # [B=2, K=3, D=4]
    imask = torch.tensor([[True, True, False], [True, False, False]])
    # mean: each row's real outputs averaged ((a+b)/2 = 2, c = 2), squared norm / D averaged over rows
    assert interest_regulariser(memory, imask, "mean").item() == pytest.approx(4.0)
    # sum: real outputs summed per row (4 and 2), squared norms / D summed over rows
    assert interest_regulariser(memory, imask, "sum").item() == pytest.approx(16.0 + 4.0)
    # official: every slot, padded ones too, times the row's real fraction (2/3 * 14 and 1/3 * 22)
    expected = (2 / 3 * 14) ** 2 + (1 / 3 * 22) ** 2
    assert interest_regulariser(memory, imask, "official").item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="interest_reg"):
        interest_regulariser(memory, imask, "max")


def _loss_path(pad_negative):
    """MISSRec arguments for one of the two loss paths (with the padding row as a negative, or without)."""
    return {"adapter_init": "torch", "pad_negative": True} if pad_negative else {}


def _history_batch():
    """Two rows: 0-based items 1, 2, 2 (item 2 twice) -> 4, and 5 -> 6; no target is in its history."""
    return collate([(0, [1, 2, 2], 4), (1, [5], 6)], max_len=10)


@pytest.mark.parametrize("pad_negative", [False, True])
def test_history_bias_offsets_only_history_items(pad_negative):
    kw = _loss_path(pad_negative)
    plain = _tiny_missrec(**kw)
    biased = _tiny_missrec(history_bias=True, history_bias_fit="loss", **kw)
    assert plain.history_bias is None and biased.history_bias is not None
    biased.load_state_dict(plain.state_dict(), strict=False)  # same weights; the offset starts at 0
    for m in (plain, biased):
        m.eval()
    batch = _history_batch()
    base = plain.full_scores(batch)
    assert torch.equal(biased.full_scores(batch), base)  # offset 0: the plain model
    with torch.no_grad():
        biased.history_bias.fill_(-0.5)
    diff = biased.full_scores(batch) - base  # [2, 12]
    hist = torch.zeros(2, 12, dtype=torch.bool)
    hist[0, [1, 2]] = True
    hist[1, 5] = True
    assert torch.allclose(diff[hist], torch.full((3,), -0.5 / biased.temperature))  # once per item, repeats too
    assert torch.equal(diff[~hist], torch.zeros(int((~hist).sum())))
    # the training loss sees the same offset (with pad_negative its columns start at the padding row)
    lo_plain, lo_biased = plain.loss(batch)["ce"], biased.loss(batch)["ce"]
    assert lo_biased < lo_plain  # the targets are not in the histories: pushing history items down helps
    lo_biased.backward()
    assert biased.history_bias.grad is not None and biased.history_bias.grad.item() > 0
    # parameter-efficient fine-tuning trains it
    biased.set_trainable("adapters")
    assert biased.history_bias.requires_grad


@pytest.mark.parametrize("pad_negative", [False, True])
def test_detached_history_offset_leaves_the_model_gradients_of_the_plain_loss(pad_negative):
    kw = _loss_path(pad_negative)
    plain = _tiny_missrec(**kw)
    joint = _tiny_missrec(history_bias=True, history_bias_fit="loss", **kw)
    detached = _tiny_missrec(history_bias=True, history_bias_fit="detached", **kw)
    batch = _history_batch()
    for m in (joint, detached):
        m.load_state_dict(plain.state_dict(), strict=False)
        with torch.no_grad():
            m.history_bias.fill_(-0.5)
    losses = {}
    for name, m in (("plain", plain), ("joint", joint), ("detached", detached)):
        m.eval()  # no dropout: the three see the same scores
        losses[name] = m.loss(batch)["ce"]
        losses[name].backward()
    # the value: the plain cross-entropy plus the one with the offset
    assert losses["detached"].item() == pytest.approx(losses["plain"].item() + losses["joint"].item(), rel=1e-6)
    grads = {n: {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
             for n, m in (("plain", plain), ("joint", joint), ("detached", detached))}
    model_keys = set(grads["plain"])
    assert model_keys and set(grads["detached"]) == model_keys | {"history_bias"}
    for k in model_keys:  # the model learns as without the offset ...
        assert torch.allclose(grads["detached"][k], grads["plain"][k], atol=1e-6), k
    differs = [k for k in model_keys if not torch.allclose(grads["joint"][k], grads["plain"][k], atol=1e-6)]
    assert differs  # ... where the joint offset changes what it learns
    # ... and the offset learns as the joint one does
    assert torch.allclose(grads["detached"]["history_bias"], grads["joint"]["history_bias"])
    # ranking adds it either way
    assert torch.equal(detached.full_scores(batch), joint.full_scores(batch))


def test_history_bias_fit_reaches_the_model_from_the_config():
    from missrec.models.build import missrec_from_config

    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(12, 8)).astype(np.float32)]
    for fit in ("loss", "detached", "validation"):
        cfg = MISSRecConfig(hidden=16, heads=2, inner=32, history_bias_fit=fit)
        assert missrec_from_config(cfg, 12, feats, 10, 0).history_bias_fit == fit
    with pytest.raises(ConfigError, match="history_bias_fit"):
        MISSRecConfig(history_bias_fit="learned")


@pytest.mark.parametrize("pad_negative", [False, True])
def test_offset_fit_on_validation_is_a_buffer_outside_the_loss(pad_negative):
    kw = _loss_path(pad_negative)
    plain = _tiny_missrec(**kw)
    validated = _tiny_missrec(history_bias=True, history_bias_fit="validation", **kw)
    validated.load_state_dict(plain.state_dict())  # strict: the offset is filled with 0
    assert "history_bias" in dict(validated.named_buffers())
    assert "history_bias" not in dict(validated.named_parameters())
    validated.set_history_offset(-3.0)
    assert validated.history_offset().item() == pytest.approx(-3.0)
    assert validated.offset_grid() is not None and plain.offset_grid() is None
    assert _tiny_missrec(history_bias=True, history_bias_fit="loss").offset_grid() is None  # learned: no grid
    for m in (plain, validated):
        m.eval()
    batch = _history_batch()
    # the model trains as the plain one; ranking adds the offset
    assert torch.equal(validated.loss(batch)["ce"], plain.loss(batch)["ce"])
    diff = validated.full_scores(batch) - plain.full_scores(batch)
    assert diff[0, 1].item() == pytest.approx(-3.0) and diff[0, 4].item() == 0.0
    assert validated.set_trainable("all") == plain.set_trainable("all")  # nothing to train in the offset
    with pytest.raises(ValueError, match="no history offset"):
        plain.set_history_offset(-1.0)


class _FixedScores(torch.nn.Module):
    """Plain scores given per user id, plus the offset on history items (as a model's full_scores)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)  # [users, N]
        self.register_buffer("offset", torch.zeros(1))

    def history_offset(self):
        return self.offset

    def set_history_offset(self, logits):
        self.offset.fill_(logits)

    def full_scores(self, batch):
        from missrec.models.history import add_history_offset

        return add_history_offset(self.table[batch.user], batch.seq, self.offset)


def test_fit_offset_on_validation_picks_the_best_offset_of_the_grid_and_sets_it():
    from missrec.models.history import fit_offset_on_validation
    from missrec.train.loop import evaluate

    # user 0: history items 0, 1 above the target 2; user 1: the target (3) repeats its history item
    model = _FixedScores([[5.0, 4.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.5, 5.0, 1.0]])
    model.set_history_offset(-7.0)  # the current offset is not used to choose
    batch = collate([(0, [0, 1], 2), (1, [3], 3)], max_len=4)
    grid = (0.0, -1.5, -3.0, -100.0)
    choice, metrics = fit_offset_on_validation(model, [batch], torch.device("cpu"), grid)
    offset = choice["history_offset"]
    # 0: ranks 3 and 1; -1.5: 2 and 1; -3: 1 and 1 (5 - 3 = 2 still above 1.0); -100: 1 and 5
    assert offset == -3.0 and model.history_offset().item() == -3.0
    assert metrics["ndcg@10"] == pytest.approx(1.0)
    assert evaluate(model, [batch], torch.device("cpu")) == metrics  # what it reports is what the model now scores
    # ties go to the first offset of the grid
    assert fit_offset_on_validation(model, [batch], torch.device("cpu"), (-3.0, -3.5))[0] == {"history_offset": -3.0}
    assert fit_offset_on_validation(model, [batch], torch.device("cpu"), (-3.5, -3.0))[0] == {"history_offset": -3.5}
    with pytest.raises(ValueError, match="at least one"):
        fit_offset_on_validation(model, [batch], torch.device("cpu"), ())


def test_sasrec_history_bias_offsets_history_items_and_needs_the_last_objective():
    from missrec.models.sasrec import HISTORY_SCALE

    torch.manual_seed(0)
    m = SASRec(20, max_len=8, hidden=16, heads=2, inner=32, history_bias=True).eval()
    batch = collate([(0, [1, 2, 3], 4), (1, [5], 6)], max_len=8)
    base = m.full_scores(batch)
    with torch.no_grad():
        m.history_bias.fill_(-0.2)
    diff = m.full_scores(batch) - base
    hist = torch.zeros(2, 20, dtype=torch.bool)
    hist[0, [1, 2, 3]] = True
    hist[1, 5] = True
    assert torch.allclose(diff[hist], torch.full((4,), -0.2 * HISTORY_SCALE))
    assert torch.equal(diff[~hist], torch.zeros(int((~hist).sum())))
    with pytest.raises(ValueError, match="objective='last'"):
        SASRec(20, history_bias=True, objective="causal")
    with pytest.raises(ConfigError, match="sasrec.objective=last"):
        SASRecConfig(history_bias=True, objective="causal")


def test_sasrec_offset_fit_on_validation_trains_plain_sasrec_and_ranks_with_the_offset():
    from missrec.models.build import build_sasrec
    from missrec.models.sasrec import HISTORY_SCALE

    torch.manual_seed(0)
    plain = SASRec(20, max_len=8, hidden=16, heads=2, inner=32).eval()
    validated = SASRec(20, max_len=8, hidden=16, heads=2, inner=32, history_bias=True).eval()  # validation: default
    learned = SASRec(20, max_len=8, hidden=16, heads=2, inner=32, history_bias=True, history_bias_fit="loss").eval()
    validated.load_state_dict(plain.state_dict(), strict=False)
    learned.load_state_dict(validated.state_dict())  # same key: a buffer here, a parameter there
    assert "history_bias" in dict(validated.named_buffers())
    assert "history_bias" in dict(learned.named_parameters())
    assert validated.offset_grid() is not None and learned.offset_grid() is None and plain.offset_grid() is None
    batch = collate([(0, [1, 2, 3], 1), (1, [5], 6)], max_len=8)  # row 0's target repeats a history item
    validated.set_history_offset(-3.0)
    learned.set_history_offset(-3.0)
    assert validated.history_offset().item() == pytest.approx(-3.0)
    assert validated.history_bias.item() == pytest.approx(-3.0 / HISTORY_SCALE)
    # chosen on validation: the loss is plain SASRec's; learned in the loss: the offset changes it
    assert torch.equal(validated.loss(batch)["ce"], plain.loss(batch)["ce"])
    assert learned.loss(batch)["ce"].item() > plain.loss(batch)["ce"].item()
    diff = validated.full_scores(batch) - plain.full_scores(batch)
    assert diff[0, 1].item() == pytest.approx(-3.0) and diff[0, 4].item() == 0.0
    with pytest.raises(ValueError, match="no history offset"):
        plain.set_history_offset(-1.0)
    for fit in ("loss", "detached", "validation"):
        cfg = SASRecConfig(history_bias=True, history_bias_fit=fit)
        assert build_sasrec(cfg, 20, 8).history_bias_fit == fit
    with pytest.raises(ConfigError, match="sasrec.history_bias_fit"):
        SASRecConfig(history_bias_fit="learned")


@pytest.mark.parametrize("fit", ["loss", "validation"])
def test_checkpoint_without_history_offset_loads_as_offset_zero(fit):
    plain = _tiny_missrec()
    biased = _tiny_missrec(history_bias=True, history_bias_fit=fit)
    biased.load_state_dict(plain.state_dict())  # strict: a run saved before the offset existed
    assert biased.history_bias.item() == 0.0
    with pytest.raises(RuntimeError, match="history_bias"):
        plain.load_state_dict(biased.state_dict())  # the other way round is a mismatched config
