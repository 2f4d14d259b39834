"""Stages of the transfer experiment (missrec/transfer/experiment.py) that can be checked without running it;
``make transfer-quick`` (in CI) runs it end to end."""

from __future__ import annotations

import json

import pytest

from missrec.errors import ConfigError
from missrec.transfer.experiment import SUFFIX, TransferConfig, extract


@pytest.mark.parametrize(("written", "asked"), [("none", True), ("centred, l2", False)])
def test_extract_refuses_features_normalised_otherwise(tmp_path, written: str, asked: bool) -> None:
    """Features already in the run folder but centred otherwise than asked: every later stage was built on them,
    so the stage names the file and asks for another folder instead of mixing the two."""
    cfg = TransferConfig(out=str(tmp_path), centre_features=asked, extract_actors=0)
    name = cfg.domains[0]
    meta = tmp_path / "features" / name / f"{name}.{SUFFIX}.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"normalisation": written, "items_per_second": 1.0}))
    with pytest.raises(ConfigError, match=rf"{meta.name}.*centre_features={asked}.*another --out"):
        extract(cfg)
