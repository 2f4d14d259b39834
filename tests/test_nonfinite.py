"""A NaN or inf loss in the fine-tuning loop: skipped and counted (``train.nonfinite=skip``, checked every
step), or an error naming the step, the batch and the parameters that are no longer finite (the default,
read at the logging syncs: no host sync in the step).
The pre-training loop's counterpart (2 gloo ranks) is in test_pretrain.py."""

from __future__ import annotations

import pytest
import torch

from missrec.config import TrainConfig
from missrec.data.batching import Batch
from missrec.models.sasrec import SASRec
from missrec.train.loop import NonFiniteLossError, fit
from missrec.train.rank_zero import RankZero

ITEMS, LEN = 30, 6
BAD_STEPS = {1, 3}  # the steps whose loss is made NaN / inf


def _batches() -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(5):
        seq_len = torch.randint(1, LEN + 1, (8,), generator=g)
        seq = torch.randint(1, ITEMS + 1, (8, LEN), generator=g)
        seq[torch.arange(LEN)[None, :] >= seq_len[:, None]] = 0
        users = torch.arange(8) + 100 * k
        out.append(Batch(seq, seq_len, torch.randint(0, ITEMS, (8,), generator=g), users, torch.zeros(8, dtype=torch.long)))
    return out


class _Poisoned(SASRec):
    """SASRec whose loss is NaN (step 1) or inf (step 3) on the chosen training batches."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__(ITEMS, max_len=LEN, hidden=16, layers=1, heads=2, inner=32, dropout=0.0, attn_dropout=0.0)
        self.bad, self.calls = bad, 0

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        terms = super().loss(batch)
        k, self.calls = self.calls % 5, self.calls + 1
        if k in self.bad:
            terms["loss"] = terms["loss"] * (float("nan") if k == 1 else float("inf"))
        return terms


def _fit(model: SASRec, batches: list[Batch], tmp_path, nonfinite: str):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=2, patience=5, nonfinite=nonfinite, device="cpu", progress=False)
    model.load_state_dict(_start)
    return fit(model, lambda epoch: batches, lambda split: _batches()[:2], cfg, RankZero(tmp_path, 0, False))


torch.manual_seed(0)
_start = _Poisoned(set()).state_dict()


def test_skip_counts_and_skips_exactly_the_bad_steps(tmp_path):
    poisoned = _Poisoned(BAD_STEPS)
    res = _fit(poisoned, _batches(), tmp_path / "skip", "skip")
    assert res.skipped_nonfinite == 2 * len(BAD_STEPS)
    assert all(torch.isfinite(p).all() for p in poisoned.parameters())
    # the same as training on the good batches only: no optimizer step came from a bad one
    clean = _Poisoned(set())
    ref = _fit(clean, [b for k, b in enumerate(_batches()) if k not in BAD_STEPS], tmp_path / "ref", "skip")
    assert ref.skipped_nonfinite == 0
    for (name, a), b in zip(poisoned.named_parameters(), clean.parameters()):
        assert torch.equal(a, b), name
    assert res.history[0]["loss"] == pytest.approx(ref.history[0]["loss"])  # the mean leaves them out


def test_error_names_the_step_the_batch_and_the_parameters(tmp_path):
    with pytest.raises(NonFiniteLossError) as err:
        _fit(_Poisoned(BAD_STEPS), _batches(), tmp_path / "err", "error")
    msg = str(err.value)  # read at the next logging sync: the step was applied, its parameters are NaN now
    assert "epoch 0 step 1: loss is not finite for the batch of users [100, 101, 102" in msg
    assert "non-finite parameters now: item_emb.weight" in msg

    # a parameter that went NaN is named: the step-3 batch finds item_emb.weight corrupted
    class Corrupted(_Poisoned):
        def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
            if self.calls % 5 == 3:
                with torch.no_grad():
                    self.item_emb.weight[1, 0] = float("nan")
            return super().loss(batch)

    with pytest.raises(NonFiniteLossError) as err:
        _fit(Corrupted(set()), _batches(), tmp_path / "err2", "error")
    assert "epoch 0 step 3: loss is not finite for the batch of users [300, 301" in str(err.value)
    assert "item_emb.weight" in str(err.value)
