"""Learning-rate decay on a validation plateau (``train.lr_decay``): the rate drops by the factor after
``lr_decay_patience`` evaluations without a better NDCG@10, never below ``lr_min``; off by default."""

from __future__ import annotations

import pytest
import torch

from missrec.config import TrainConfig
from missrec.data.batching import Batch
from missrec.errors import ConfigError
from missrec.models.sasrec import SASRec
from missrec.train import loop
from missrec.train.rank_zero import RankZero

ITEMS, LEN = 20, 5
# scripted validation NDCG@10 per epoch: better at 0, 1, 4; a plateau at 2-3 and 5-7
SCRIPT = [0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3]


def _batches() -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, ITEMS + 1, (8, LEN), generator=g)
    return [Batch(seq, torch.full((8,), LEN), torch.randint(0, ITEMS, (8,), generator=g),
                  torch.arange(8), torch.zeros(8, dtype=torch.long))]


def _fit(monkeypatch, tmp_path, **train):
    calls = iter(SCRIPT + [0.3])  # the last call is the test pass

    def scripted(model, batches, device):
        v = next(calls)
        return {"recall@10": v, "ndcg@10": v}

    monkeypatch.setattr(loop, "evaluate", scripted)
    cfg = TrainConfig(epochs=len(SCRIPT), patience=100, device="cpu", progress=False, **train)
    model = SASRec(ITEMS, LEN, 8, 1, 1, 16)
    return loop.fit(model, lambda e: _batches(), lambda s: [], cfg, RankZero(tmp_path, 0, False))


def test_rate_drops_after_patience_evaluations_without_improvement(monkeypatch, tmp_path):
    res = _fit(monkeypatch, tmp_path, lr=1e-3, lr_decay=0.5, lr_decay_patience=2)
    lrs = [h["lr"] for h in res.history]  # the rate each epoch trained with
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 2.5e-4])
    assert res.best_epoch == 4


def test_rate_never_goes_below_lr_min(monkeypatch, tmp_path):
    res = _fit(monkeypatch, tmp_path, lr=1e-3, lr_decay=0.1, lr_decay_patience=1, lr_min=5e-5)
    lrs = [h["lr"] for h in res.history]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4, 5e-5, 5e-5, 5e-5, 5e-5])


def test_off_by_default_keeps_the_rate_constant(monkeypatch, tmp_path):
    res = _fit(monkeypatch, tmp_path, lr=1e-3)
    assert {h["lr"] for h in res.history} == {1e-3}


@pytest.mark.parametrize("bad", [{"lr_decay": 0.0}, {"lr_decay": 1.5}, {"lr_decay": 0.5, "lr_decay_patience": 0}])
def test_bad_settings_are_config_errors(monkeypatch, tmp_path, bad):
    with pytest.raises(ConfigError, match="lr_decay"):
        _fit(monkeypatch, tmp_path, **bad)
