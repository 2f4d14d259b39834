import json

import pytest

from missrec.config import RunConfig, build, parse_overrides, to_dict
from missrec.errors import ConfigError


def test_overrides_and_files(tmp_path):
    f = tmp_path / "diff.yaml"
    f.write_text("train:\n  lr: 0.002\nmissrec:\n  mode: inductive\n")
    base = RunConfig()
    cfg = build(RunConfig, [f], ["train.epochs=3", "data.features=[feat1CLS,feat3CLS]"])
    assert cfg.train.lr == 0.002 and cfg.train.epochs == 3 and cfg.missrec.mode == "inductive"
    assert cfg.data.features == ("feat1CLS", "feat3CLS")
    assert base.train.lr == 1e-3  # inputs are not mutated
    json.dumps(to_dict(cfg))


@pytest.mark.parametrize(
    "override, needle",
    [("train.lrr=1", "unknown key"), ("train.epochs=abc", "expected an integer"), ("novalue", "key.sub=value"),
     ("train.progress=3", "true/false")],
)
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError, match=needle):
        build(RunConfig, [], [override])


def test_numbers_in_e_notation(tmp_path):
    # YAML 1.1 (PyYAML) reads "1e-4" without a dot as a string; a float setting must still take it
    f = tmp_path / "diff.yaml"
    f.write_text("train:\n  lr: 5e-4\n")
    cfg = build(RunConfig, [f], ["train.weight_decay=1e-4", "missrec.temperature=7E-2", "train.grad_clip=+2.5e0"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.missrec.temperature, cfg.train.grad_clip) == (
        5e-4, 1e-4, 0.07, 2.5)
    for bad in ("train.lr=1e", "train.lr=e-4", "train.lr=1e-4x"):
        with pytest.raises(ConfigError, match="expected a number"):
            build(RunConfig, [], [bad])
    with pytest.raises(ConfigError, match="expected an integer"):
        build(RunConfig, [], ["train.epochs=1e2"])  # an integer setting stays an integer


def test_bad_file_named(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        build(RunConfig, [f])


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_presets_are_diffs_over_the_defaults():
    """configs/paper.yaml is the paper's ranking (no history terms); configs/official.yaml the official code's
    behaviours; both load over the defaults and change nothing else."""
    from dataclasses import replace
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    paper = build(RunConfig, [root / "paper.yaml"])
    assert not paper.missrec.history_bias and not paper.sasrec.history_bias
    assert replace(paper, missrec=RunConfig().missrec, sasrec=RunConfig().sasrec) == RunConfig()
    official = build(RunConfig, [root / "official.yaml"])
    m = official.missrec
    assert m.final_norm and m.interest_reg == "official" and m.interests.assign == "nearest_centre"
    assert not m.history_bias and m.interests.cluster_ratio == RunConfig().missrec.interests.cluster_ratio


def test_lost_switches_are_gone():
    """Settings whose experiments lost are not settings any more: naming one is an error that lists the known ones."""
    for override in ("train.ema=0.99", "train.lr_decay=0.3", "train.item_drop=0.2", "missrec.pad_negative=false",
                     "missrec.history_bias_fit=loss", "data.group_by_length=false", "sasrec.objective=causal"):
        with pytest.raises(ConfigError, match="unknown key"):
            build(RunConfig, [], [override])
    with pytest.raises(ConfigError, match="mean.*official"):
        build(RunConfig, [], ["missrec.interest_reg=sum"])


def test_every_setting_is_read_outside_its_definition():
    """A setting no code reads is silently ignored when a user sets it (``missrec.use_interests`` once was):
    each field of each config dataclass must be read (``.name``, ``name=`` or ``"name"``) somewhere in
    ``missrec/`` or ``launcher/`` besides ``missrec/config.py``."""
    import dataclasses
    import inspect
    import re
    from pathlib import Path

    import missrec.config as config_module

    root = Path(__file__).resolve().parents[1]
    sources = [p.read_text() for d in ("missrec", "launcher") for p in (root / d).rglob("*.py")
               if p != root / "missrec" / "config.py"]
    classes = [c for _, c in inspect.getmembers(config_module, inspect.isclass)
               if dataclasses.is_dataclass(c) and c.__module__ == config_module.__name__]
    assert len(classes) >= 5
    unread = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c)
              if not any(re.search(rf"\.{f.name}\b|[\"']{f.name}[\"']|\b{f.name}=", s) for s in sources)]
    assert not unread, f"settings nothing reads: {unread}"
