"""``train.trace_test``: the test split scored after every validation, as a diagnostic. It must trace the
state that was validated (the best epoch's trace equals the final test of the kept checkpoint) and must
not change training (same validation history, best epoch and test with the trace on or off)."""

from __future__ import annotations

import pytest
import torch

from missrec.config import TrainConfig
from missrec.data.batching import Batch
from missrec.models.sasrec import SASRec
from missrec.train import loop
from missrec.train.rank_zero import RankZero

ITEMS, LEN = 30, 6


def _batches(seed: int, rows: int = 16) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, ITEMS + 1, (rows, LEN), generator=g)
    target = (seq[:, -1] % ITEMS)  # learnable: the target follows from the last item
    return [Batch(seq, torch.full((rows,), LEN), target, torch.arange(rows), torch.zeros(rows, dtype=torch.long))]


def _fit(tmp_path, **train) -> loop.FitResult:
    torch.manual_seed(0)
    model = SASRec(ITEMS, LEN, 16, 1, 1, 32, dropout=0.2, attn_dropout=0.2)
    cfg = TrainConfig(epochs=6, patience=100, lr=1e-2, device="cpu", progress=False, **train)
    splits = {"valid": 1, "test": 2}
    return loop.fit(model, lambda e: _batches(100 + e), lambda s: _batches(splits[s]), cfg,
                    RankZero(tmp_path, 0, False))


def test_trace_records_the_test_split_of_every_validated_state(tmp_path):
    res = _fit(tmp_path / "on", trace_test=True)
    assert len(res.history) == 6
    for h in res.history:
        assert {"test_recall@10", "test_ndcg@10", "test_recall@50", "test_ndcg@50"} <= set(h)
    best = res.history[res.best_epoch]
    for k, v in res.test.items():
        assert best[f"test_{k}"] == pytest.approx(v)
    assert len({round(h["test_ndcg@10"], 9) for h in res.history}) > 1  # it follows training


def test_trace_does_not_change_training(tmp_path):
    on, off = _fit(tmp_path / "on", trace_test=True), _fit(tmp_path / "off")
    strip = [{k: v for k, v in h.items() if not k.startswith("test_") and k != "train_s"} for h in on.history]
    assert strip == [{k: v for k, v in h.items() if k != "train_s"} for h in off.history]
    assert (on.best_epoch, on.test) == (off.best_epoch, off.test)
    assert not any(k.startswith("test_") for h in off.history for k in h)  # off by default
