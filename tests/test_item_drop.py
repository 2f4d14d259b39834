"""``train.item_drop``: training histories lose random items anew each epoch; nothing else changes."""

from __future__ import annotations

import pytest
import torch

from missrec.config import ConfigError, RunConfig, build
from missrec.transfer.finetune import DomainData


def _data(root, *extra) -> DomainData:
    cfg = build(RunConfig, [], [f"data.data_root={root}", "data.domain=Office", "train.batch_size=64",
                                "data.features=[feat1CLS,feat3CLS]", *extra])
    return DomainData(cfg)


def _rows(batches):
    out = []
    for b in batches:
        for i in range(len(b)):
            n = int(b.seq_len[i])
            assert (b.seq[i, n:] == 0).all() and (b.seq[i, :n] > 0).all()  # left-aligned, padded
            out.append((int(b.user[i]), int(b.target[i]), b.seq[i, :n].tolist()))
    return out


def _is_subsequence(short, long) -> bool:
    it = iter(long)
    return all(x in it for x in short)


def test_off_by_default_and_batches_unchanged(synthetic_root):
    data = _data(synthetic_root)
    assert data.item_drop == 0.0
    assert _rows(data.train_batches(3)) == _rows(data._train_batches(3))


def test_drop_keeps_order_targets_and_at_least_one_item(synthetic_root):
    data = _data(synthetic_root, "train.item_drop=0.3")
    state = torch.get_rng_state()
    orig, aug = _rows(data._train_batches(1)), _rows(data.train_batches(1))
    assert torch.equal(torch.get_rng_state(), state)  # its own stream: dropout draws are not shifted
    assert [(u, t) for u, t, _ in orig] == [(u, t) for u, t, _ in aug]
    assert all(len(a) >= 1 and _is_subsequence(a, o) for (_, _, o), (_, _, a) in zip(orig, aug))
    kept = sum(len(a) for *_, a in aug) / sum(len(o) for *_, o in orig)
    assert 0.6 < kept < 0.8, kept  # about 1 - 0.3 (rows of one item always keep it)
    assert _rows(data.train_batches(1)) == aug  # a function of (seed, epoch)
    # another epoch: the same rows, other items dropped
    assert sorted(_rows(data._train_batches(2))) == sorted(orig)
    assert sorted(_rows(data.train_batches(2))) != sorted(aug)
    # evaluation is untouched
    assert _rows(data.eval_batches("test")) == _rows(_data(synthetic_root).eval_batches("test"))


@pytest.mark.parametrize("bad", ["-0.1", "1.0"])
def test_bad_probability_is_refused(synthetic_root, bad):
    with pytest.raises(ConfigError, match="train.item_drop"):
        _data(synthetic_root, f"train.item_drop={bad}")
