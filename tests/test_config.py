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
