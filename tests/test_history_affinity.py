"""The scoring policy (``missrec.eval.policy``): the history offset and the history affinity (each item's largest
similarity to an item of the user's history), added to a model's scores, chosen together on validation, and the same
for evaluation, checkpoints and serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from missrec.config import MISSRecConfig, SASRecConfig
from missrec.data.batching import collate
from missrec.eval.policy import AFFINITY_GRID, OFFSET_GRID, ScoringPolicy, fit_policy, history_affinity
from missrec.interests import InterestConfig


def _tiny(missing_image=()):
    from dataclasses import replace

    from missrec.models.build import missrec_from_config

    rng = np.random.default_rng(0)
    text = rng.normal(size=(12, 8)).astype(np.float32)
    image = rng.normal(size=(12, 6)).astype(np.float32)
    image[list(missing_image)] = 0.0
    torch.manual_seed(0)
    cfg = replace(MISSRecConfig(), hidden=16, heads=2, inner=32, mode="inductive",
                  interests=InterestConfig(cluster_ratio=0.5, knn=3))
    model = missrec_from_config(cfg, 12, [text, image], max_len=10, seed=0)
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
    model = _tiny(missing_image=(4,))
    batch = collate([(0, [1, 2], 3), (1, [4], 6)], max_len=10)  # 0-based items; item 4 has no image
    aff = history_affinity(batch.seq, model.affinity_units())  # [2, 12]
    tok = F.normalize(model.item_tokens(), dim=-1)  # [M, N + 1, D]
    present = model.items.present
    cos = torch.einsum("mhd,mnd->hnm", tok, tok[:, 1:])  # [N + 1, N, M]
    mean = (cos * present[:, None, :] * present[1:][None]).sum(-1) / 2  # a modality missing on either: 0
    assert torch.allclose(aff[0], torch.maximum(mean[2], mean[3]), atol=1e-6)  # history values 2, 3
    assert torch.allclose(aff[1], mean[5], atol=1e-6)
    assert aff[0, 1].item() == pytest.approx(1.0, abs=1e-6)  # an item is its own nearest neighbour
    assert aff[1, 4].item() == pytest.approx(0.5, abs=1e-6)  # text only: half the mean


def test_policy_adds_the_offset_to_history_items_once_and_the_weighted_affinity():
    model = _tiny()
    batch = collate([(0, [1, 2, 2], 4), (1, [5], 6)], max_len=10)  # item 2 twice
    base = model.full_scores(batch)
    assert torch.equal(ScoringPolicy().scores(model, batch), base)  # the model's own ranking
    diff = ScoringPolicy(history_offset=-3.0).scores(model, batch) - base  # [2, 12]
    hist = torch.zeros(2, 12, dtype=torch.bool)
    hist[0, [1, 2]] = True
    hist[1, 5] = True
    assert torch.allclose(diff[hist], torch.full((3,), -3.0)) and torch.equal(diff[~hist], torch.zeros(21))
    aff = history_affinity(batch.seq, model.affinity_units())
    assert torch.allclose(ScoringPolicy(affinity_weight=2.0).scores(model, batch) - base, 2.0 * aff, atol=1e-5)
    assert ScoringPolicy.from_dict(ScoringPolicy(-4.5, 3.0).to_dict()) == ScoringPolicy(-4.5, 3.0)


class _Fixed(torch.nn.Module):
    """Scores and affinity vectors given per user id (a model's full_scores / affinity_units)."""

    def __init__(self, scores, units):
        super().__init__()
        self.table = torch.tensor(scores)
        self.units = torch.tensor(units)

    def full_scores(self, batch):
        return self.table[batch.user]

    def affinity_units(self):
        return self.units


def test_fit_chooses_offset_and_affinity_weight_together():
    from missrec.train.loop import evaluate

    # user 0: history item 0; target 3 is close to it (similarity 0.9) but scored below items 1 and 2
    units = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.9, 0.44], [0.0, 1.0]]  # row = item value
    model = _Fixed([[5.0, 2.0, 1.5, 1.0, 0.0]], units)
    batch = collate([(0, [0], 3)], max_len=4)
    policy, metrics = fit_policy(model, [batch], torch.device("cpu"), (0.0, -10.0), (0.0, 1.0))
    # weight 0: the target (1.0) ranks 4th, 3rd with the history item pushed down (-10); weight 1: it scores 1.9,
    # 2nd behind item 1 (2.0) once the history item (6.0) is pushed down
    assert policy == ScoringPolicy(history_offset=-10.0, affinity_weight=1.0)
    assert evaluate(model, [batch], torch.device("cpu"), policy=policy) == metrics  # reported = what it ranks
    assert fit_policy(model, [batch], torch.device("cpu"), (0.0,))[0] == ScoringPolicy()
    # ties go to the first of the grid
    assert fit_policy(model, [batch], torch.device("cpu"), (-10.0, -11.0), (1.0,))[0].history_offset == -10.0
    assert fit_policy(model, [batch], torch.device("cpu"), (-11.0, -10.0), (1.0,))[0].history_offset == -11.0
    with pytest.raises(ValueError, match="no history affinity"):
        fit_policy(torch.nn.Module(), [batch], torch.device("cpu"), (0.0,), (0.0, 1.0))
    with pytest.raises(ValueError, match="at least one"):
        fit_policy(model, [batch], torch.device("cpu"), ())


def test_sasrec_affinity_is_the_cosine_of_item_embeddings():
    from missrec.models.build import build_sasrec

    torch.manual_seed(0)
    model = build_sasrec(SASRecConfig(hidden=16, heads=2, inner=32), 20, 8).eval()
    batch = collate([(0, [1, 2, 3], 4), (1, [5], 6)], max_len=8)
    emb = F.normalize(model.item_emb.weight, dim=-1)  # [N + 1, D]
    want = torch.stack([(emb[[2, 3, 4]] @ emb[1:].T).max(0).values, emb[6] @ emb[1:].T])
    assert torch.allclose(history_affinity(batch.seq, model.affinity_units()), want, atol=1e-6)
    got = ScoringPolicy(affinity_weight=2.0).scores(model, batch) - model.full_scores(batch)
    assert torch.allclose(got, 2.0 * want, atol=1e-5)


def test_grids_follow_the_config():
    """The defaults choose the offset and the affinity at each validation; history_bias=false is the paper's
    ranking, with no affinity either; plain SASRec is the paper's baseline."""
    from missrec.models.build import history_grid

    assert history_grid(MISSRecConfig()) == (OFFSET_GRID, AFFINITY_GRID)
    assert history_grid(MISSRecConfig(history_affinity=False)) == (OFFSET_GRID, (0.0,))
    assert history_grid(MISSRecConfig(history_bias=False)) is None
    assert history_grid(SASRecConfig()) is None
    assert history_grid(SASRecConfig(history_bias=True)) == (OFFSET_GRID, AFFINITY_GRID)


def test_grid_ranks_equal_ranking_every_pair():
    """The one-pass-per-weight ranks equal ranking every (weight, offset) pair's scores in full, with tied scores
    (duplicated columns) and targets that are history items."""
    from missrec.eval.metrics import target_ranks
    from missrec.eval.policy import grid_ranks, history_mask

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
