"""Metrics per popularity bucket (:mod:`missrec.eval.popularity`): users split by how often their target
is a training target; each bucket scored as if alone."""

from __future__ import annotations

import pytest
import torch

from missrec.data.batching import Batch
from missrec.eval.metrics import RankingMetrics
from missrec.eval.popularity import bucket_labels, check_edges, evaluate_by_popularity, target_counts

N = 8


class FixedScores(torch.nn.Module):
    """Scores each row by a fixed table keyed on the row's user id: [B, N]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def full_scores(self, batch: Batch) -> torch.Tensor:
        return self.table[batch.user]


def _batch(targets: list[int], users: list[int]) -> Batch:
    b = len(targets)
    return Batch(torch.ones(b, 2, dtype=torch.long), torch.full((b,), 2), torch.tensor(targets), torch.tensor(users),
                 torch.zeros(b, dtype=torch.long))


def test_target_counts_count_each_training_row_once():
    counts = target_counts([_batch([0, 0, 3], [0, 1, 2]), _batch([3, 3, 7], [3, 4, 5])], N)
    assert counts.tolist() == [2, 0, 0, 3, 0, 0, 0, 1]


def test_buckets_score_their_own_users_only():
    counts = torch.tensor([0, 1, 5, 9, 30, 2, 0, 21])  # training-target count per item
    g = torch.Generator().manual_seed(0)
    table = torch.randn(6, N, generator=g)  # users 0..5
    targets, users = [0, 2, 4, 7, 1, 5], [0, 1, 2, 3, 4, 5]  # target counts 0, 5, 30, 21, 1, 2
    model = FixedScores(table)
    got = evaluate_by_popularity(model, [_batch(targets[:4], users[:4]), _batch(targets[4:], users[4:])], counts,
                                 (3, 21), torch.device("cpu"), ks=(1, 3))
    assert list(got) == ["0-2", "3-20", "21+", "all"]
    expect = {"0-2": [0, 5, 4], "3-20": [1], "21+": [2, 3]}  # the users of each bucket
    for name, us in expect.items():
        ref = RankingMetrics((1, 3))
        ref.update(table[us], torch.tensor([targets[u] for u in us]))
        assert got[name]["users"] == len(us)
        for k, v in ref.compute().items():
            assert got[name][k] == pytest.approx(v)
    assert got["all"]["users"] == 6


def test_an_empty_bucket_reports_zero_users():
    counts = torch.zeros(N, dtype=torch.long)
    got = evaluate_by_popularity(FixedScores(torch.randn(2, N)), [_batch([1, 2], [0, 1])], counts, (5,),
                                 torch.device("cpu"), ks=(3,))
    assert got["5+"] == {"users": 0.0} and got["0-4"]["users"] == 2


@pytest.mark.parametrize("bad", [(), (0, 5), (5, 5), (21, 6)])
def test_bad_edges_are_refused(bad):
    with pytest.raises(ValueError, match="strictly increasing positive"):
        check_edges(bad)


def test_labels_are_inclusive_ranges():
    assert bucket_labels((6, 21)) == ["0-5", "6-20", "21+"]
