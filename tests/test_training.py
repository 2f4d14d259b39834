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


@pytest.mark.slow
def test_finetune_from_backbone_saves_small_adapter(synthetic_root, tmp_path):
    from missrec.models.build import build_missrec
    from missrec.transfer.artefacts import BackboneMismatchError, load_adapter

    feats = ["model=missrec", "missrec.mode=transductive", "data.features=[feat1CLS,feat3CLS]"]
    scratch = _run(synthetic_root, tmp_path, "scratch", *feats, "train.epochs=2")
    backbone = tmp_path / "scratch" / "best.pt"
    tuned = _run(synthetic_root, tmp_path, "tuned", *feats, "train.epochs=2", f"pretrained={backbone}")
    assert tuned["trainable_parameters"] < scratch["trainable_parameters"]
    assert tuned["adapter_bytes"] < tuned["backbone_bytes"]
    # the adapter loads on top of the backbone and reproduces the fine-tuned model's test metrics
    cfg = build(RunConfig, [], [f"data.data_root={synthetic_root}", "data.domain=Office", *SMALL, *feats,
                                f"pretrained={backbone}"])
    dom = load_domain(synthetic_root / "Office", "Office", ["feat1CLS", "feat3CLS"])
    model = build_missrec(cfg, dom.num_items, dom.features)
    _, policy = load_adapter(model, tmp_path / "tuned" / "adapter.pt", backbone)
    best = torch.load(tmp_path / "tuned" / "best.pt", weights_only=True)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), best["model"][name]), name
    # with the scoring policy chosen on the domain (the history offset and affinity weight, the default)
    assert policy.to_dict() == best["policy"] == tuned["policy"] and policy.history_offset < 0
    # another backbone is refused
    other = tmp_path / "other.pt"
    other.write_bytes(backbone.read_bytes() + b"x")
    with pytest.raises(BackboneMismatchError, match="sha256"):
        load_adapter(model, tmp_path / "tuned" / "adapter.pt", other)


@pytest.mark.slow
def test_policy_is_chosen_each_validation_and_saved_with_the_best_state(synthetic_root, tmp_path):
    from missrec.eval.policy import AFFINITY_GRID, OFFSET_GRID
    from missrec.serve.loading import load_run
    from missrec.transfer.rescore import rescore_run

    # the defaults: the offset and the affinity weight chosen together at each validation
    m = _run(synthetic_root, tmp_path, "validated", "model=missrec", "missrec.mode=inductive",
             "data.features=[feat1CLS,feat3CLS]", "train.epochs=3")
    hist = json.loads((tmp_path / "validated" / "history.json").read_text())
    assert len(hist) == 3 and all(h["history_offset"] in OFFSET_GRID for h in hist)
    assert all(h["affinity_weight"] in AFFINITY_GRID for h in hist)
    best = next(h for h in hist if h["epoch"] == m["best_epoch"])
    assert m["valid"]["ndcg@10"] == best["ndcg@10"]
    saved = torch.load(tmp_path / "validated" / "best.pt", weights_only=False)
    assert saved["policy"] == m["policy"] == {"history_offset": best["history_offset"],
                                              "affinity_weight": best["affinity_weight"]}
    assert "history_bias" not in saved["model"]  # the model is the paper's; the terms are the policy's
    # evaluating the saved run ranks with its policy: the test figures the run reported
    run = load_run(tmp_path / "validated")
    assert run.policy.to_dict() == m["policy"]
    assert rescore_run(tmp_path / "validated", device="cpu") == pytest.approx(m["test"])
