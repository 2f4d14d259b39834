"""The history affinity (``missrec.history_affinity``): each item's largest similarity to an item of the user's
history, weighted and added to its score, the weight chosen on validation with the history offset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from missrec.config import MISSRecConfig
from missrec.data.batching import collate
from missrec.interests import InterestConfig
from missrec.models.history import AFFINITY_GRID, fit_offset_on_validation, history_affinity
from missrec.models.missrec import MISSRec


def _tiny(missing_image=(), **kw):
    rng = np.random.default_rng(0)
    text = rng.normal(size=(12, 8)).astype(np.float32)
    image = rng.normal(size=(12, 6)).astype(np.float32)
    image[list(missing_image)] = 0.0
    torch.manual_seed(0)
    model = MISSRec(12, [text, image], hidden=16, max_len=10, heads=2, inner=32, use_ids=False,
                    interest_cfg=InterestConfig(cluster_ratio=0.5, knn=3), **kw)
    model.refresh_interests()
    return model.eval()


def test_affinity_is_the_largest_similarity_to_a_history_item():
    torch.manual_seed(0)
    unit = torch.randn(9, 5)  # row = item value, 0 = padding
    seq = torch.tensor([[3, 1, 3, 0], [0, 0, 0, 0], [0, 2, 8, 5]])  # repeated item; no history; padding first
    got = history_affinity(seq, unit)  # [3, 8]: column j = item value j + 1
    for b in range(3):
        hist = seq[b][seq[b] > 0]
        want = (unit[hist] @ unit[1:].T).max(0).values if hist.numel() else torch.zeros(8)
        assert torch.allclose(got[b], want)
    assert torch.equal(history_affinity(torch.zeros(2, 3, dtype=torch.long), unit), torch.zeros(2, 8))


def test_missrec_affinity_is_the_mean_cosine_over_modalities_and_a_missing_one_counts_zero():
    model = _tiny(missing_image=(4,), history_bias=True, history_affinity=True)
    batch = collate([(0, [1, 2], 3), (1, [4], 6)], max_len=10)  # 0-based items; item 4 has no image
    aff = model.history_affinity(batch)  # [2, 12]
    tok = F.normalize(model.item_tokens(), dim=-1)  # [M, N + 1, D]
    cos = torch.einsum("mhd,mnd->hnm", tok, tok[:, 1:])  # [N + 1, N, M]
    cos = cos * model.present[:, None, :] * model.present[1:][None]  # a modality missing on either: 0
    mean = cos.sum(-1) / 2
    assert torch.allclose(aff[0], torch.maximum(mean[2], mean[3]), atol=1e-6)  # history values 2, 3
    assert torch.allclose(aff[1], mean[5], atol=1e-6)
    assert aff[0, 1].item() == pytest.approx(1.0, abs=1e-6)  # an item is its own nearest neighbour
    assert aff[1, 4].item() == pytest.approx(0.5, abs=1e-6)  # text only: half the mean


def test_affinity_weight_adds_to_scores_is_a_fitted_buffer_and_loads_as_zero():
    plain = _tiny(history_bias=True)
    model = _tiny(history_bias=True, history_affinity=True)
    model.load_state_dict(plain.state_dict())  # strict: a run saved without the affinity loads with weight 0
    assert model.affinity_weight.item() == 0.0 and "affinity_weight" in dict(model.named_buffers())
    assert "affinity_weight" not in dict(model.named_parameters())
    batch = collate([(0, [1, 2], 3), (1, [5], 6)], max_len=10)
    base = model.full_scores(batch)
    assert torch.equal(base, plain.full_scores(batch))
    model.set_history_affinity(2.0)
    assert torch.allclose(model.full_scores(batch) - base, 2.0 * model.history_affinity(batch), atol=1e-5)
    assert torch.equal(model.loss(batch)["ce"], plain.loss(batch)["ce"])  # training is the plain model's
    assert model.fitted_buffers() == ["history_bias", "affinity_weight"]
    assert model.affinity_grid() == AFFINITY_GRID and plain.affinity_grid() is None
    with pytest.raises(ValueError, match="no history affinity"):
        plain.set_history_affinity(1.0)
    with pytest.raises(ValueError, match="history_affinity needs"):
        _tiny(history_bias=True, history_bias_fit="loss", history_affinity=True)


class _Fixed(torch.nn.Module):
    """Plain scores and affinities given per user id (as a model's full_scores / history_affinity)."""

    def __init__(self, scores, affinity):
        super().__init__()
        self.table = torch.tensor(scores)
        self.aff = torch.tensor(affinity)
        self.register_buffer("offset", torch.zeros(1))
        self.register_buffer("weight", torch.zeros(1))

    def history_offset(self):
        return self.offset

    def set_history_offset(self, logits):
        self.offset.fill_(logits)

    def affinity_grid(self):
        return (0.0, 1.0)

    def set_history_affinity(self, weight):
        self.weight.fill_(weight)

    def history_affinity(self, batch):
        return self.aff[batch.user]

    def full_scores(self, batch):
        from missrec.models.history import add_history_offset

        s = self.table[batch.user] + self.weight * self.aff[batch.user]
        return add_history_offset(s, batch.seq, self.offset)


def test_fit_chooses_offset_and_affinity_weight_together():
    from missrec.train.loop import evaluate

    # user 0: history item 0; target 3 is close to it (affinity 1) but scored below items 1 and 2
    model = _Fixed([[5.0, 2.0, 1.5, 1.0, 0.0]], [[1.0, 0.0, 0.0, 0.9, 0.0]])
    batch = collate([(0, [0], 3)], max_len=4)
    choice, metrics = fit_offset_on_validation(model, [batch], torch.device("cpu"), (0.0, -10.0), weights=(0.0, 1.0))
    # weight 0: the target (1.0) ranks 4th, 3rd with the history item pushed down (-10); weight 1: it scores 1.9,
    # 2nd behind item 1 (2.0) once the history item (6.0) is pushed down
    assert choice == {"history_offset": -10.0, "history_affinity": 1.0}
    assert evaluate(model, [batch], torch.device("cpu")) == metrics
    assert fit_offset_on_validation(model, [batch], torch.device("cpu"), (0.0,))[0] == {"history_offset": 0.0}
    with pytest.raises(ValueError, match="no history affinity"):
        fit_offset_on_validation(torch.nn.Module(), [batch], torch.device("cpu"), (0.0,), weights=(0.0, 1.0))


def test_sasrec_affinity_is_the_cosine_of_item_embeddings_and_needs_the_validated_offset():
    from missrec.models.sasrec import SASRec

    torch.manual_seed(0)
    plain = SASRec(20, max_len=8, hidden=16, heads=2, inner=32, history_bias=True).eval()
    model = SASRec(20, max_len=8, hidden=16, heads=2, inner=32, history_bias=True, history_affinity=True).eval()
    model.load_state_dict(plain.state_dict())  # strict: weight 0, the plain scores
    batch = collate([(0, [1, 2, 3], 4), (1, [5], 6)], max_len=8)
    emb = F.normalize(model.item_emb.weight, dim=-1)  # [N + 1, D]
    want = torch.stack([(emb[[2, 3, 4]] @ emb[1:].T).max(0).values, emb[6] @ emb[1:].T])
    assert torch.allclose(model.history_affinity(batch), want, atol=1e-6)
    assert torch.equal(model.full_scores(batch), plain.full_scores(batch))
    model.set_history_affinity(2.0)
    assert torch.allclose(model.full_scores(batch) - plain.full_scores(batch), 2.0 * want, atol=1e-5)
    assert torch.equal(model.loss(batch)["ce"], plain.loss(batch)["ce"])
    assert model.affinity_grid() == AFFINITY_GRID and plain.affinity_grid() is None


def test_affinity_is_on_by_default_only_with_the_offset_chosen_on_validation():
    from missrec.config import SASRecConfig
    from missrec.models.build import build_sasrec, history_affinity_in_effect, missrec_from_config

    feats = [np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)]
    small = {"hidden": 16, "heads": 2, "inner": 32}
    assert missrec_from_config(MISSRecConfig(**small), 12, feats, 10, 0).affinity_weight is not None  # the default
    for off in ({"history_bias": False}, {"history_bias_fit": "loss"}, {"history_affinity": False}):
        cfg = MISSRecConfig(**small, **off)  # the paper's model, session 18's offset, or switched off
        assert not history_affinity_in_effect(cfg)
        assert missrec_from_config(cfg, 12, feats, 10, 0).affinity_weight is None
    assert build_sasrec(SASRecConfig(), 20, 8).affinity_weight is None  # plain SASRec, the paper's baseline
    assert build_sasrec(SASRecConfig(history_bias=True), 20, 8).affinity_weight is not None


def test_grid_ranks_equal_ranking_every_pair():
    """The one-pass-per-weight ranks equal ranking every (weight, offset) pair's scores in full, with tied scores
    (duplicated columns) and targets that are history items."""
    from missrec.eval.metrics import target_ranks
    from missrec.models.history import grid_ranks, history_mask

    g = torch.Generator().manual_seed(3)
    scores = torch.randn(16, 40, generator=g).round(decimals=1)  # coarse values: many exact ties
    aff = torch.rand(16, 40, generator=g).round(decimals=1)
    scores[:, 5], aff[:, 5] = scores[:, 7], aff[:, 7]  # a duplicate listing
    seq = torch.randint(0, 41, (16, 6), generator=g)
    target = torch.randint(0, 40, (16,), generator=g)
    seq[0, 0], seq[1, 2] = target[0] + 1, target[1] + 1  # two targets repeat a history item
    mask = history_mask(seq, 40)
    weights, offsets = (0.0, 0.5, 2.0), (0.0, -1.0, -2.5, -100.0)
    got = grid_ranks(scores, aff, mask, target, weights, offsets)
    for wi, w in enumerate(weights):
        for gi, off in enumerate(offsets):
            s = scores + w * aff if w else scores
            assert torch.equal(got[wi, gi], target_ranks(torch.where(mask, s + off, s), target)), (w, off)
