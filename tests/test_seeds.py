"""Comparing groups of runs over seeds: the t distribution, Welch's test, the sources it reads, the launcher."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from missrec.eval.seeds import (
    betainc,
    compare_groups,
    load_group,
    load_metrics,
    t_quantile_two_sided,
    t_two_sided_p,
    t_upper_p,
    welch,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.0])
def test_t_p_value_matches_closed_forms(t):
    # df = 1 is the Cauchy distribution, df = 2 has a closed form too
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-12)
    assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    assert t_two_sided_p(-t, 2) == pytest.approx(t_two_sided_p(t, 2), abs=1e-15)


def test_t_p_value_textbook_points_and_normal_limit():
    assert t_two_sided_p(2.228, 10) == pytest.approx(0.05, abs=2e-4)  # the 97.5 % point at 10 df
    assert t_two_sided_p(2.571, 5) == pytest.approx(0.05, abs=2e-4)
    assert t_two_sided_p(1.959964, 1e7) == pytest.approx(0.05, abs=1e-5)  # the normal limit
    assert t_two_sided_p(3.3, 4.6) < t_two_sided_p(3.3, 4.0)  # fractional df (Welch) is monotone


def test_betainc_symmetry_and_ends():
    for a, b, x in [(0.5, 0.5, 0.3), (3.0, 0.5, 0.9), (20.0, 2.0, 0.95)]:
        assert betainc(a, b, x) + betainc(b, a, 1 - x) == pytest.approx(1.0, abs=1e-12)
    assert betainc(2.0, 3.0, 0.0) == 0.0 and betainc(2.0, 3.0, 1.0) == 1.0
    assert betainc(1.0, 1.0, 0.37) == pytest.approx(0.37, abs=1e-14)  # uniform


def test_welch_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    c = welch(a, b)
    va, vb = (5 / 3) / 4, 4.0 / 3  # sample variances 5/3 and 4, over n
    assert c.diff == pytest.approx(2.5 - 4.0)
    assert c.se == pytest.approx(math.sqrt(va + vb))
    assert c.t == pytest.approx(-1.5 / math.sqrt(va + vb))
    assert c.df == pytest.approx((va + vb) ** 2 / (va**2 / 3 + vb**2 / 2))
    assert c.p == pytest.approx(t_two_sided_p(c.t, c.df))
    assert 0.1 < c.p < 0.5
    # the 95 % interval is diff ± t(0.975, df) se, and it contains 0 exactly when p > 0.05
    half = t_quantile_two_sided(0.05, c.df) * c.se
    assert (c.ci_low, c.ci_high) == pytest.approx((c.diff - half, c.diff + half))
    assert c.ci_low < 0 < c.ci_high


def test_t_quantile_inverts_the_p_value():
    assert t_quantile_two_sided(0.05, 10) == pytest.approx(2.228139, abs=1e-5)
    assert t_quantile_two_sided(0.05, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)
    for p, df in [(0.01, 3.7), (0.5, 2), (0.2, 40)]:
        assert t_two_sided_p(t_quantile_two_sided(p, df), df) == pytest.approx(p, rel=1e-9)
    with pytest.raises(ValueError, match="p must be in"):
        t_quantile_two_sided(1.5, 3)


def test_noninferiority_is_the_one_sided_test_dual_to_the_90_percent_interval():
    a, b = [0.330, 0.326, 0.334, 0.329, 0.322, 0.333], [0.333, 0.331, 0.328, 0.329]
    c0 = welch(a, b, margin=0.0)  # margin 0: the one-sided p of "a beats b"
    assert c0.diff < 0 and c0.p_noninferior == pytest.approx(1 - c0.p / 2, abs=1e-12)
    assert welch(b, a, margin=0.0).p_noninferior == pytest.approx(c0.p / 2, abs=1e-12)
    # a trails by at most the 90 % interval's lower end, at exactly the 5 % level
    lower = c0.diff - t_quantile_two_sided(0.10, c0.df) * c0.se
    assert welch(a, b, margin=-lower).p_noninferior == pytest.approx(0.05, abs=1e-9)
    wide, narrow = welch(a, b, margin=0.01), welch(a, b, margin=0.001)
    assert wide.p_noninferior < 0.05 < narrow.p_noninferior and wide.p == c0.p  # the two-sided test is unchanged
    assert t_upper_p(0.0, 7) == pytest.approx(0.5) and t_upper_p(-3.0, 7) == pytest.approx(1 - t_upper_p(3.0, 7))
    assert welch(a, b).margin is None and welch(a, b).p_noninferior is None
    for bad in (-0.001, math.nan, math.inf):
        with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
            welch(a, b, margin=bad)


def test_welch_without_spread_gives_no_test():
    c = welch([0.3], [0.1, 0.2])
    assert c.sd_a is None and c.t is None and c.p is None and c.diff == pytest.approx(0.15)
    c = welch([0.2, 0.2], [0.2, 0.2])
    assert c.se is None and c.p is None


def test_sources_run_folder_metrics_file_runs_list_and_launcher_output(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"test": {"recall@10": 0.1, "ndcg@10": 0.05},
                                                  "valid": {"recall@10": 0.2, "ndcg@10": 0.07}}))
    many = tmp_path / "official.json"
    many.write_text(json.dumps({"source": "x", "runs": [{"seed": 1, "test": {"recall@10": 0.3, "ndcg@10": 0.1}},
                                                        {"recall@10": 0.4, "ndcg@10": 0.2}]}))
    out = tmp_path / "evaluate.out"
    out.write_text('INFO something\n{"run": "r", "split": "test", "recall@10": 0.5, "ndcg@10": 0.25}\n')
    got = load_group([run, many, out])
    assert [g["recall@10"] for g in got] == [0.1, 0.3, 0.4, 0.5]
    assert load_metrics(run, "valid") == [{"recall@10": 0.2, "ndcg@10": 0.07}]


BAD_SOURCES = [  # file content -> the error naming the file (and line or run)
    ('{"runs": [{"recall@10": 0.1}]}\n\n{not json\n\n', r"src.json: line 3: not JSON"),
    ("\n \n", r"src.json: empty file"),
    ('{"runs": [{"test": {"recall@10": true}}, {"test": 3}]}', r"src.json: run 0: recall@10 is not a finite number: True"),
    ('{"runs": [{"test": 3}]}', r"src.json: run 0: 'test' is not a JSON object"),
    ('{"runs": [{"recall@10": NaN}]}', r"src.json: run 0: recall@10 is not a finite number"),
    ('{"runs": [{"hit": 0.1}]}', r"src.json: run 0 has none of"),
]


@pytest.mark.parametrize(("content", "error"), BAD_SOURCES)
def test_bad_sources_are_named(tmp_path, content, error):
    src = tmp_path / "src.json"
    src.write_text(content)
    with pytest.raises(ValueError, match=error):
        load_metrics(src)


def test_missing_source_and_missing_metric_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_metrics(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="recall@50 is missing from run"):
        compare_groups([{"recall@10": 0.1}], [{"recall@10": 0.2}], ["recall@50"])


def test_compare_launcher(tmp_path):
    def group(name, vals):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({"runs": [{"test": {"recall@50": v, "ndcg@10": v / 4}} for v in vals]}))
        return str(p)

    a, b = group("a", [0.33, 0.34, 0.335, 0.345]), group("b", [0.32, 0.325, 0.318])
    proc = subprocess.run([sys.executable, "launcher/compare.py", "--runs", a, "--baseline", b,
                           "--metrics", "recall@50,ndcg@10", "--labels", "new,old"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "| recall@50 | 0.3375" in proc.stdout and "| metric | new | old |" in proc.stdout
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    r = last["metrics"]["recall@50"]
    assert r["n_a"] == 4 and r["n_b"] == 3 and r["diff"] == pytest.approx(0.3375 - 0.321)
    assert r["p"] < 0.01 and 0 < r["ci_low"] < r["diff"] < r["ci_high"]
    assert last["margin"] is None and r["p_noninferior"] is None
    proc = subprocess.run([sys.executable, "launcher/compare.py", "--runs", b, "--baseline", a, "--margin", "0.04",
                           "--metrics", "recall@50"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "p (ours trails by >= 0.04) |" in proc.stdout
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["margin"] == 0.04 and last["metrics"]["recall@50"]["p_noninferior"] < 0.05
    proc = subprocess.run([sys.executable, "launcher/compare.py", "--runs", a, "--baseline", b, "--margin", "-1",
                           "--metrics", "recall@50"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "margin must be a finite number >= 0" in proc.stderr
    proc = subprocess.run([sys.executable, "launcher/compare.py", "--runs", str(tmp_path / "x"), "--baseline", b],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "metrics.json" in proc.stderr
