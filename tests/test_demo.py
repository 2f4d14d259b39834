"""The demo's stages on a very small catalogue (what `make demo` runs, shrunk): raw files -> prepared atomic
files -> Ray extraction with a tiny open_clip model -> shards -> DeepSpeed pre-training on 2 ranks ->
fan-out fine-tuning -> results table and interest picture."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

SMALL_DEMO = """
import json, sys
from missrec.data.synthetic import SyntheticConfig
from missrec.transfer.demo import DemoConfig, run_demo
cat = SyntheticConfig(seed=3, domains=("Kitchen", "Garden", "Toys"), target_domains=("Toys",),
                      items_per_domain=80, users_per_domain=160, proxy_features=False)
cfg = DemoConfig(out=sys.argv[1], epochs=2, pretrain_epochs=1, clip_steps=5, catalogue=cat, settings=("inductive",))
print(json.dumps(run_demo(cfg, progress=False)))
"""


@pytest.mark.slow
def test_demo_stages_small(tmp_path):
    # its own process, as `make demo` runs it (the demo starts and stops a Ray instance)
    proc = subprocess.run([sys.executable, "-c", SMALL_DEMO, str(tmp_path)], capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    cat_domains = ("Kitchen", "Garden", "Toys")
    assert res["failed"] == []
    # prepared data equals the catalogue it came from (through raw ids)
    for d in cat_domains:
        assert (tmp_path / "data" / d / f"{d}.prepare.json").exists()
        assert (tmp_path / "data" / d / f"{d}.item2index").read_text().count("\n") == 80
    # the actors' features equal one in-process model on the same items
    from missrec.data.atomic import read_features
    from missrec.features.encode import EncoderSpec
    from missrec.features.items import read_item_source
    from missrec.features.job import encode_in_process

    clip_cfg, ckpt = tmp_path / "clip" / "MissrecDemoCLIP.json", tmp_path / "clip" / "MissrecDemoCLIP.pt"
    spec = EncoderSpec(backend="open_clip", model="MissrecDemoCLIP", pretrained=str(ckpt),
                       model_config=str(clip_cfg), device="cpu")
    ref = encode_in_process(spec, read_item_source(tmp_path / "data" / "Toys", "Toys"))
    text = read_features(tmp_path / "data" / "Toys" / "Toys.feat1CLS", 80, 64)
    image = read_features(tmp_path / "data" / "Toys" / "Toys.feat3CLS", 80, 64)
    np.testing.assert_allclose(text, ref["text"], atol=1e-5)
    np.testing.assert_allclose(image, ref["image"], atol=1e-5)
    assert (np.abs(image).sum(1) == 0).sum() == res["features"]["Toys"]["counts"]["images_missing"]["count"]
    # shards, pre-training on 2 ranks, fan-out results, picture
    assert (tmp_path / "shards" / "Toys" / "manifest.json").exists()
    pre = json.loads((tmp_path / "pretrain" / "metrics.json").read_text())
    assert pre["world_size"] == 2 and pre["zero_stage"] == 2
    assert (tmp_path / "pretrain" / "backbone.pt").exists()
    table = (tmp_path / "finetune" / "results.md").read_text()
    assert "| Toys |" in table and "inductive-scratch" in table
    for run in ("inductive", "inductive-scratch"):
        m = json.loads((tmp_path / "finetune" / "Toys" / run / "metrics.json").read_text())
        assert 0.0 < m["test"]["recall@50"] <= 1.0
    assert (tmp_path / "interests.png").stat().st_size > 10_000
    assert list((tmp_path / "tb").rglob("projector_config.pbtxt"))
