"""The demo's stages on a very small catalogue (what `make demo` runs, shrunk)."""

from __future__ import annotations

import json

import pytest

from missrec.data.synthetic import SyntheticConfig
from missrec.transfer.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_stages_small(tmp_path):
    cat = SyntheticConfig(seed=3, domains=("Kitchen", "Toys"), target_domains=("Toys",), items_per_domain=80,
                          users_per_domain=120)
    res = run_demo(DemoConfig(out=str(tmp_path), epochs=2, threads=1, catalogue=cat), progress=False)
    assert (tmp_path / "shards" / "Toys" / "manifest.json").exists()
    assert len(res["rows"]) == 3
    for row in res["rows"]:
        assert 0.0 <= row["test"]["ndcg@10"] <= 1.0
    assert "| Toys: SASRec (ID) |" in (tmp_path / "results.md").read_text()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"][1]["name"].startswith("Toys: MISSRec transductive")
    for slug in ("sasrec", "transductive", "inductive"):
        assert (tmp_path / "runs" / "Toys" / slug / "metrics.json").exists()
