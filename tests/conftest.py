"""Shared fixtures: a small synthetic catalogue, and the path of the real shared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def datasets_root() -> Path:
    env = os.environ.get("MISSREC_DATASETS")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    root = datasets_root()
    if not (root / "scientific").is_dir():
        pytest.skip(f"real datasets not found at {root} (set MISSREC_DATASETS)")
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small multi-domain synthetic catalogue with proxy features (generated once per session)."""
    from missrec.data.synthetic import SyntheticConfig, generate_catalogue

    out = tmp_path_factory.mktemp("catalogue")
    cfg = SyntheticConfig(seed=7, items_per_domain=160, users_per_domain=400, domains=("Kitchen", "Office"),
                          target_domains=("Office",))
    generate_catalogue(out, cfg)
    return out
