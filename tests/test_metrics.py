import math

import numpy as np
import pytest
import torch

from missrec.eval.metrics import RankingMetrics, target_ranks


def naive_metrics(scores: np.ndarray, target: np.ndarray, ks=(10, 50)) -> dict[str, float]:
    out = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    for s, t in zip(scores, target):
        # stable descending sort: equal scores keep index order
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        rank = order.index(int(t))
        for k in ks:
            if rank < k:
                out[f"recall@{k}"] += 1
                out[f"ndcg@{k}"] += 1 / math.log2(rank + 2)
    return {k: v / len(target) for k, v in out.items()}


def test_ties_are_broken_by_item_index():
    scores = torch.zeros(1, 100)  # all tied: the target ranks at its own index
    ranks = target_ranks(scores, torch.tensor([99]))
    assert int(ranks[0]) == 99
    ranks = target_ranks(scores, torch.tensor([0]))
    assert int(ranks[0]) == 0


def test_history_items_not_masked():
    # the best-scored item is in the history; it still counts above the target
    scores = torch.tensor([[5.0, 1.0, 3.0]])
    assert int(target_ranks(scores, torch.tensor([2]))[0]) == 1


def expected_by_permutations(scores: np.ndarray, target: np.ndarray, ks=(10, 50)) -> dict[str, float]:
    """Average of the index rule over every order of each target's tied items (brute force)."""
    out = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    for s, t in zip(scores, target):
        higher = int((s > s[t]).sum())
        tied = int((s == s[t]).sum())  # the target included
        for slot in range(tied):  # the target's position among its tied block, each equally likely
            rank = higher + slot
            for k in ks:
                if rank < k:
                    out[f"recall@{k}"] += 1 / tied
                    out[f"ndcg@{k}"] += 1 / math.log2(rank + 2) / tied
    return {k: v / len(target) for k, v in out.items()}


@pytest.mark.parametrize(("ties", "reference"), [("index", naive_metrics), ("expected", expected_by_permutations)])
def test_batched_metrics_match_brute_force_with_ties(ties, reference):
    rng = np.random.default_rng(0)
    ks = (1, 10, 50)
    for trial in range(5):
        b, n = 37, 120
        # few distinct values -> many ties, including with the target
        scores = rng.integers(0, 6 if trial % 2 else 200, size=(b, n)).astype(np.float32)
        target = rng.integers(0, n, size=b)
        ref = reference(scores, target, ks)
        m = RankingMetrics(ks, ties)
        for s in range(0, b, 10):  # several batches
            m.update(torch.from_numpy(scores[s : s + 10]), torch.from_numpy(target[s : s + 10]))
        got = m.compute()
        for key in ref:
            assert abs(got[key] - ref[key]) < 1e-9, (ties, trial, key, got[key], ref[key])


def test_expected_tie_rule_equals_index_rule_without_ties():
    rng = np.random.default_rng(2)
    scores = torch.from_numpy(rng.standard_normal((64, 200)).astype(np.float32))  # no exact ties
    target = torch.from_numpy(rng.integers(0, 200, size=64))
    a, b = RankingMetrics(), RankingMetrics(ties="expected")
    a.update(scores, target)
    b.update(scores, target)
    assert a.compute() == pytest.approx(b.compute(), abs=1e-12)


def test_expected_tie_rule_splits_a_tie_across_the_cutoff():
    # 9 items above, the target tied with 1 other: rank 9 or 10, equally likely -> half a hit at k = 10
    scores = torch.tensor([[2.0] * 9 + [1.0, 1.0] + [0.0] * 5])
    m = RankingMetrics(ks=(10,), ties="expected")
    m.update(scores, torch.tensor([10]))
    got = m.compute()
    assert got["recall@10"] == pytest.approx(0.5)
    assert got["ndcg@10"] == pytest.approx(0.5 / math.log2(11))


def test_unknown_tie_rule_is_refused():
    with pytest.raises(ValueError, match="ties must be one of"):
        RankingMetrics(ties="random")
