"""Weight averaging (``train.ema``): the loop validates, keeps and tests an EMA of the weights; the live
weights and buffers come back exactly after each validation; MISSRec rebuilds its interest index from
the averaged adapters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from missrec.config import TrainConfig
from missrec.data.batching import Batch
from missrec.errors import ConfigError
from missrec.models.missrec import MISSRec
from missrec.models.sasrec import SASRec
from missrec.train import loop
from missrec.train.averaging import WeightAverage
from missrec.train.rank_zero import RankZero

ITEMS, LEN = 20, 5


def test_update_follows_the_warmed_up_decay():
    p = nn.Parameter(torch.zeros(3))
    avg = WeightAverage([p], decay=0.9)
    expected = torch.zeros(3)
    for t, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0]):
        p.data.fill_(value)
        avg.update()
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * value
    assert torch.allclose(avg.shadow[0], expected)
    assert avg.updates == 5


class _Derived(nn.Module):
    """A weight and a buffer derived from it, rebuilt by ``weights_changed`` (as MISSRec's interest index)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))
        self.register_buffer("derived", self.w.detach() * 10)
        self.rebuilt = 0

    def weights_changed(self) -> None:
        self.derived = self.w.detach() * 10
        self.rebuilt += 1


def test_swap_puts_the_average_in_and_restores_everything():
    m = _Derived()
    avg = WeightAverage([m.w], decay=0.5)
    avg.shadow[0].fill_(3.0)
    with avg.swapped_in(m):
        assert torch.equal(m.w.detach(), torch.full((4,), 3.0))
        assert torch.equal(m.derived, torch.full((4,), 30.0))
    assert m.rebuilt == 1
    assert torch.equal(m.w.detach(), torch.ones(4))
    assert torch.equal(m.derived, torch.full((4,), 10.0))


def test_swap_restores_the_live_weights_when_the_block_fails():
    m = _Derived()
    avg = WeightAverage([m.w], decay=0.5)
    avg.shadow[0].fill_(3.0)
    with pytest.raises(RuntimeError, match="boom"), avg.swapped_in(m):
        raise RuntimeError("boom")
    assert torch.equal(m.w.detach(), torch.ones(4))


def test_missrec_rebuilds_its_interest_index_from_the_averaged_adapters():
    torch.manual_seed(0)
    feats = [torch.randn(ITEMS, 6), torch.randn(ITEMS, 5)]
    model = MISSRec(ITEMS, feats, hidden=8, max_len=LEN, heads=2, inner=16, use_ids=False)
    model.refresh_interests()
    live_centroids = model.centroids.clone()
    params = [p for p in model.parameters() if p.requires_grad]
    avg = WeightAverage(params, decay=0.5)
    for s in avg.shadow:
        s.add_(torch.randn_like(s))
    with avg.swapped_in(model):
        assert not torch.equal(model.centroids, live_centroids)
        tokens = model.adapt(slice(1, None)).detach()  # [M, N, D] from the averaged adapters
        pool = torch.cat([tokens[0], tokens[1]])  # [2N, D]
        labels = torch.cat([model.item_interest[1:, 0], model.item_interest[1:, 1]])  # [2N]
        for c in labels.unique():  # each centroid is the mean of its members' averaged tokens
            assert torch.allclose(model.centroids[c], pool[labels == c].mean(0), atol=1e-5)
    assert torch.equal(model.centroids, live_centroids)


class _Recording(torch.optim.Adam):
    """Adam that keeps a copy of the first parameter after every step."""

    def __init__(self, params, **kw) -> None:
        params = list(params)
        super().__init__(params, **kw)
        self.watched, self.after_step = params[0], []

    def step(self, closure=None):
        out = super().step(closure)
        self.after_step.append(self.watched.detach().clone())
        return out


def _batches() -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        seq = torch.randint(1, ITEMS + 1, (8, LEN), generator=g)
        out.append(Batch(seq, torch.full((8,), LEN), torch.randint(0, ITEMS, (8,), generator=g),
                         torch.arange(8), torch.zeros(8, dtype=torch.long)))
    return out


def test_fit_validates_keeps_and_tests_the_average(monkeypatch, tmp_path):
    script = iter([0.1, 0.3, 0.2, 0.25])  # best at epoch 1
    seen = []

    def scripted(model, batches, device):
        seen.append(next(model.parameters()).detach().clone())
        v = next(script, 0.0)
        return {"recall@10": v, "ndcg@10": v}

    monkeypatch.setattr(loop, "evaluate", scripted)
    torch.manual_seed(0)
    model = SASRec(ITEMS, LEN, 8, 1, 1, 16)
    init = next(model.parameters()).detach().clone()
    opt = _Recording([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cfg = TrainConfig(epochs=4, patience=100, device="cpu", progress=False, ema=0.8)
    res = loop.fit(model, lambda e: _batches(), lambda s: [], cfg, RankZero(tmp_path, 0, False), optimizer=opt)

    expected, averages = init, []
    for t, live in enumerate(opt.after_step):
        d = min(0.8, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * live
        if (t + 1) % 3 == 0:  # 3 steps per epoch: the average each validation should see
            averages.append(expected)
    assert len(seen) == 5  # 4 validations + the test pass
    for got, want, live in zip(seen[:4], averages, opt.after_step[2::3], strict=True):
        assert torch.allclose(got, want, atol=1e-6)
        assert not torch.allclose(got, live)  # the live weights were not what was validated
    assert res.best_epoch == 1
    assert torch.allclose(seen[4], averages[1], atol=1e-6)  # test = the best epoch's average
    saved = torch.load(tmp_path / "best.pt", weights_only=False)["model"]
    assert torch.allclose(next(iter(saved.values())), averages[1], atol=1e-6)


def test_ema_off_by_default_validates_the_live_weights(monkeypatch, tmp_path):
    seen = []

    def scripted(model, batches, device):
        seen.append(next(model.parameters()).detach().clone())
        return {"recall@10": 0.1, "ndcg@10": 0.1}

    monkeypatch.setattr(loop, "evaluate", scripted)
    model = SASRec(ITEMS, LEN, 8, 1, 1, 16)
    opt = _Recording([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cfg = TrainConfig(epochs=1, device="cpu", progress=False)
    loop.fit(model, lambda e: _batches(), lambda s: [], cfg, RankZero(tmp_path, 0, False), optimizer=opt)
    assert torch.equal(seen[0], opt.after_step[-1])


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_bad_decay_is_a_config_error(tmp_path, bad):
    cfg = TrainConfig(epochs=1, device="cpu", progress=False, ema=bad)
    with pytest.raises(ConfigError, match="train.ema"):
        loop.fit(SASRec(ITEMS, LEN, 8, 1, 1, 16), lambda e: _batches(), lambda s: [], cfg,
                 RankZero(tmp_path, 0, False))

