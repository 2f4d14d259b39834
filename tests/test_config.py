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


@pytest.mark.parametrize("override", ["missrec.adapter=moe", "missrec.adapter_init=normal"])
def test_pad_negative_needs_linear_adapters_with_a_bias(override):
    # the padding row's tokens are the adapters' biases: zero for the MoE adapter and the normal init,
    # where normalising them would give 1/eps gradients
    with pytest.raises(ConfigError, match="missrec.pad_negative=false"):
        build(RunConfig, [], [override])
    cfg = build(RunConfig, [], [override, "missrec.pad_negative=false"])
    assert not cfg.missrec.pad_negative


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
