"""Mixed-length batches run as a few passes over rows of similar length: the split is the cheapest one, and
the model computes exactly what one padded pass computes (user vectors, regulariser, gradients)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from missrec.config import RunConfig, build
from missrec.data.batching import collate, length_groups
from missrec.interests import InterestConfig
from missrec.models.build import missrec_from_config
from missrec.models.missrec import MISSRec


def _cost(lengths: list[int], groups: list[torch.Tensor], overhead: int) -> int:
    return sum(len(g) * max(lengths[i] for i in g.tolist()) + overhead for g in groups)


def test_groups_partition_rows_by_length_range() -> None:
    rng = np.random.default_rng(0)
    lengths = torch.from_numpy(rng.integers(1, 51, size=300))
    groups = length_groups(lengths, overhead=200, min_saving=0.0)
    rows = torch.cat(groups).sort().values
    assert torch.equal(rows, torch.arange(300))  # every row exactly once
    spans = [(int(lengths[g].min()), int(lengths[g].max())) for g in groups]
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))  # disjoint ranges, shortest first
    assert len(groups) > 1


@pytest.mark.parametrize("seed", range(6))
def test_split_is_the_cheapest_contiguous_split(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.choice([1, 2, 3, 5, 8, 13, 30, 50], size=int(rng.integers(5, 80))).tolist()
    overhead = int(rng.integers(0, 120))
    got = _cost(lengths, length_groups(torch.tensor(lengths), overhead, min_saving=0.0), overhead)
    values = sorted(set(lengths))
    best = None
    for cuts in itertools.product([False, True], repeat=len(values) - 1):  # every split of the sorted lengths
        groups, cur = [], [values[0]]
        for v, cut in zip(values[1:], cuts):
            if cut:
                groups.append(cur)
                cur = []
            cur.append(v)
        groups.append(cur)
        cost = sum(sum(lengths.count(v) for v in g) * max(g) + overhead for g in groups)
        best = cost if best is None else min(best, cost)
    assert got == best


def test_one_group_when_splitting_does_not_pay() -> None:
    assert len(length_groups(torch.tensor([3, 3, 4, 4]), overhead=100)) == 1
    # a batch already grouped by length: splitting saves 1/3 of the positions, less than the default half
    grouped = torch.tensor([1] * 200 + [3] * 200)
    assert len(length_groups(grouped, overhead=0)) == 1
    assert len(length_groups(grouped, overhead=0, min_saving=0.3)) == 2
    assert len(length_groups(torch.tensor([1] * 200 + [50]), overhead=-1)) == 1
    assert len(length_groups(torch.tensor([1] * 200 + [50]), overhead=100)) == 2
    assert length_groups(torch.tensor([], dtype=torch.long), overhead=10)[0].numel() == 0


@pytest.mark.parametrize("interest_reg", ["mean", "sum", "official"])
@pytest.mark.parametrize("use_ids", [True, False])
@pytest.mark.parametrize("subset", [False, True])
def test_grouped_passes_equal_one_padded_pass(interest_reg: str, use_ids: bool, subset: bool) -> None:
    items, max_len = 40, 12
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(items, 8)).astype(np.float32), rng.normal(size=(items, 6)).astype(np.float32)]
    feats[1][::5] = 0.0  # some items miss the second modality
    torch.manual_seed(0)
    model = MISSRec(items, feats, hidden=16, max_len=max_len, heads=2, inner=32, use_ids=use_ids,
                    interest_cfg=InterestConfig(cluster_ratio=0.3, knn=3), interest_reg=interest_reg,
                    final_norm=interest_reg == "official", adapter_init="torch", pad_negative=True)
    model.refresh_interests()
    model.eval()  # no dropout: both ways must agree to rounding
    lens = [1, 1, 2, 2, 2, 3, 12, 1, 11, 2, 1, 5]
    batch = collate([(u, rng.integers(0, items, size=n), int(rng.integers(items))) for u, n in enumerate(lens)],
                    max_len)
    out = {}
    for overhead in (-1, 0):
        model.length_group_overhead = overhead
        model.zero_grad()
        if subset:
            tokens, _, lut = model.subset_tokens(batch.seq)
            user, reg = model.encode(batch, tokens, lut)
        else:
            user, reg = model.encode(batch, model.item_tokens())
        (user.sum() * 3 + reg * 1e3).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[overhead] = (user.detach(), reg.detach(), grads)
    assert len(length_groups(batch.seq_len, 0)) > 1
    (u1, r1, g1), (u0, r0, g0) = out[-1], out[0]
    torch.testing.assert_close(u0, u1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r0, r1, atol=1e-6, rtol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for name in g1:  # rounding relative to the tensor's scale (the summed regularisers' gradients reach 1e5)
        scale = max(1.0, float(g1[name].abs().max()))
        torch.testing.assert_close(g0[name], g1[name], atol=1e-5 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("value", [-1, 64, None])
def test_overhead_is_a_config_setting(value: int | None) -> None:
    sets = [] if value is None else [f"missrec.length_group_overhead={value}"]
    cfg = build(RunConfig, overrides=sets).missrec
    feats = [np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)]
    model = missrec_from_config(cfg, 10, feats, max_len=8, seed=0)
    assert cfg.length_group_overhead == value and model.length_group_overhead == value


def test_sum_regulariser_is_the_mean_one_at_the_official_scale() -> None:
    """One row with n real interests: "sum" pools n x the mean output, so it is n^2 x "mean"; over rows it
    adds up where "mean" averages (batch-size times stronger at the same weight, as the official one)."""
    items, max_len = 30, 8
    rng = np.random.default_rng(2)
    feats = [rng.normal(size=(items, 8)).astype(np.float32)]
    regs = {}
    for kind in ("mean", "sum"):
        torch.manual_seed(0)
        model = MISSRec(items, feats, hidden=16, max_len=max_len, heads=2, inner=32, use_ids=False,
                        interest_cfg=InterestConfig(cluster_ratio=0.5, knn=3), interest_reg=kind)
        model.refresh_interests()
        model.eval()
        rows = [(0, np.array([1, 5, 9, 2]), 3), (1, np.array([7, 7]), 4)]
        single = [model.encode(collate([r], max_len), model.item_tokens())[1] for r in rows]
        both = model.encode(collate(rows, max_len), model.item_tokens())[1]
        n = [int(model._interests(collate([r], max_len))[1].sum()) for r in rows]
        regs[kind] = (single, both, n)
    (m_single, m_both, n), (s_single, s_both, _) = regs["mean"], regs["sum"]
    assert n[0] > n[1] >= 1
    for ms, ss, k in zip(m_single, s_single, n):
        torch.testing.assert_close(ss, ms * k * k, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s_both, s_single[0] + s_single[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m_both, (m_single[0] + m_single[1]) / 2, rtol=1e-5, atol=1e-7)
