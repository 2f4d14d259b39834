"""Short end-to-end trainings on the synthetic catalogue through the library entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from missrec.config import RunConfig, build
from missrec.data.atomic import load_domain
from missrec.eval.metrics import RankingMetrics
from missrec.transfer.finetune import run_finetune

SMALL = [
    "train.epochs=12", "train.patience=12", "train.batch_size=128", "train.progress=false", "train.threads=1",
    "sasrec.hidden=32", "sasrec.inner=64", "sasrec.dropout=0.2", "sasrec.attn_dropout=0.2",
    "missrec.hidden=32", "missrec.inner=64", "missrec.heads=2", "missrec.dropout=0.2",
    "missrec.attn_dropout=0.2", "data.max_len=20",
]


def popularity_test_metrics(root, name):
    d = load_domain(root / name, name)
    counts = np.bincount(np.concatenate([d.train.items, d.train.targets]), minlength=d.num_items)
    m = RankingMetrics()
    scores = torch.from_numpy(counts.astype(np.float32)).expand(len(d.test), -1)
    m.update(scores, torch.from_numpy(d.test.targets))
    return m.compute()


def _run(root, tmp_path, name, *extra):
    cfg = build(RunConfig, [], [f"data.data_root={root}", "data.domain=Office", f"output_dir={tmp_path / name}",
                                *SMALL, *extra])
    return run_finetune(cfg)


@pytest.mark.slow
def test_sasrec_learns_and_beats_popularity(synthetic_root, tmp_path):
    metrics = _run(synthetic_root, tmp_path, "sasrec", "model=sasrec")
    pop = popularity_test_metrics(synthetic_root, "Office")
    assert metrics["test"]["ndcg@10"] > 1.5 * pop["ndcg@10"], (metrics["test"], pop)
    hist = json.loads((tmp_path / "sasrec" / "history.json").read_text())
    assert hist[-1]["loss"] < hist[0]["loss"]
    # the run folder is reproducible
    for f in ("config.json", "git.json", "env.json", "metrics.json", "best.pt"):
        assert (tmp_path / "sasrec" / f).exists(), f
    assert list((tmp_path / "sasrec" / "tb").iterdir())


@pytest.mark.slow
def test_missrec_beats_sasrec_on_synthetic(synthetic_root, tmp_path):
    sas = _run(synthetic_root, tmp_path, "sasrec", "model=sasrec")
    mis = _run(synthetic_root, tmp_path, "missrec", "model=missrec", "missrec.mode=transductive",
               "data.features=[feat1CLS,feat3CLS]")
    assert mis["test"]["ndcg@10"] > sas["test"]["ndcg@10"], (mis["test"], sas["test"])
    assert mis["trainable_parameters"] > 0
