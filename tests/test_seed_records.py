"""The README's scientific_mm MISSRec rows are the means of the per-seed records in docs/benchmarks.

``docs/benchmarks/ours_{mode}.json`` holds our runs (defaults, one per seed) and
``official_{mode}.json`` the official code's, both scored with ties at their expected rank; the
README's row for each mode gives ours and, beside it, the official means. ``launcher/compare.py``
reads the same files, so a row that drifted from its records would mislead whoever reruns the test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from missrec.eval.seeds import load_metrics
from missrec.transfer.results import METRICS

ROOT = Path(__file__).resolve().parents[1]
ROW_LABEL = {"transductive": "(CLIP T+V+ID); mean of", "inductive": "(CLIP T+V); mean of"}


def _readme_row(mode: str) -> str:
    rows = [line for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("| MISSRec") and ROW_LABEL[mode] in line]
    assert len(rows) == 1, f"expected one README row for {mode}, found {len(rows)}"
    return rows[0]


def _means(path: Path) -> tuple[int, list[float]]:
    runs = load_metrics(path)
    return len(runs), [sum(r[m] for r in runs) / len(runs) for m in METRICS]


@pytest.mark.parametrize("mode", ["transductive", "inductive"])
def test_readme_rows_are_the_means_of_the_seed_records(mode: str) -> None:
    row = _readme_row(mode)
    cells = [c.strip() for c in row.strip("|").split("|")]
    n_ours, ours = _means(ROOT / "docs" / "benchmarks" / f"ours_{mode}.json")
    n_official, official = _means(ROOT / "docs" / "benchmarks" / f"official_{mode}.json")

    assert f"mean of {n_ours} seeds" in cells[0]
    assert [float(c) for c in cells[1:5]] == [round(v, 4) for v in ours]
    match = re.search(rf"official code, {n_official} seeds rerun here, scored like ours: "
                      r"([\d.]+) / ([\d.]+) / ([\d.]+) / ([\d.]+)", cells[5])
    assert match, cells[5]
    assert [float(g) for g in match.groups()] == [round(v, 4) for v in official]


@pytest.mark.parametrize("name", ["ours_inductive", "ours_transductive", "ours_shuffled_inductive",
                                  "ours_shuffled_transductive", "ours_sum_inductive", "ours_sum_transductive",
                                  "official_inductive", "official_transductive"])
def test_seed_records_have_one_run_per_seed(name: str) -> None:
    doc = json.loads((ROOT / "docs" / "benchmarks" / f"{name}.json").read_text())
    seeds = [r["seed"] for r in doc["runs"]]
    assert len(seeds) == len(set(seeds)) >= 5
    assert all(0.0 < r["test"][m] < 1.0 for r in doc["runs"] for m in METRICS)
