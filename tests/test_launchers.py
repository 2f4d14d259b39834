"""The launchers as a user types them: argv in, last stdout line is the metrics JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_finetune_launcher_prints_metrics_json_last(synthetic_root, tmp_path):
    out = tmp_path / "run"
    proc = _run("launcher/finetune.py", "--data-root", str(synthetic_root), "--domain", "Office", "--model", "missrec",
                "--mode", "inductive", "--features", "feat1CLS,feat3CLS", "--output-dir", str(out), "--epochs", "1",
                "--quiet", "--set", "missrec.hidden=32", "--set", "missrec.heads=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(last["test"]) == {"recall@10", "ndcg@10", "recall@50", "ndcg@50"}
    assert {"valid", "best_epoch", "seconds", "trainable_parameters"} <= set(last)
    assert json.loads((out / "metrics.json").read_text())["test"] == last["test"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["missrec"]["mode"] == "inductive" and cfg["missrec"]["hidden"] == 32
    # the run scored again from its folder: the same test metrics, and any other cutoffs
    proc = _run("launcher/evaluate.py", "--run", str(out), "--ks", "10,11,50")
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    for k in last["test"]:
        assert again[k] == pytest.approx(last["test"][k], abs=1e-9)
    assert again["recall@10"] <= again["recall@11"] <= again["recall@50"]
    # random features give no exact ties: the expected-rank rule agrees with the index rule
    proc = _run("launcher/evaluate.py", "--run", str(out), "--ties", "expected")
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = json.loads(proc.stdout.strip().splitlines()[-1])
    assert expected["ties"] == "expected"
    for k in last["test"]:
        assert expected[k] == pytest.approx(last["test"][k], abs=1e-9)
    # by target popularity: the buckets partition the users, and weighted back they give the overall figure
    proc = _run("launcher/evaluate.py", "--run", str(out), "--by-popularity", "2,4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    buckets = json.loads(proc.stdout.strip().splitlines()[-1])["buckets"]
    assert list(buckets) == ["0-1", "2-3", "4+", "all"]
    parts = [buckets[b] for b in ("0-1", "2-3", "4+")]
    assert sum(b["users"] for b in parts) == buckets["all"]["users"]
    for k in last["test"]:
        assert buckets["all"][k] == pytest.approx(last["test"][k], abs=1e-9)
        weighted = sum(b[k] * b["users"] for b in parts if b["users"]) / buckets["all"]["users"]
        assert weighted == pytest.approx(last["test"][k], abs=1e-9)
    proc = _run("launcher/evaluate.py", "--run", str(out), "--by-popularity", "5,2")
    assert proc.returncode == 2 and "strictly increasing" in proc.stderr


def test_evaluate_launcher_names_a_missing_run(tmp_path):
    proc = _run("launcher/evaluate.py", "--run", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'nowhere' / 'config.json'}: not found; is {tmp_path / 'nowhere'} " \
                          "a fine-tuning run folder?\n"  # one line, no traceback


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_a_toolkit_error(tmp_path, how):
    import os

    env = {**os.environ, "MISSREC_DEBUG": "1"} if how == "env" else None
    proc = subprocess.run([sys.executable, "launcher/evaluate.py", "--run", str(tmp_path / "nowhere"),
                           *(["--debug"] if how == "flag" else [])], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False, env=env)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "MissingInputError: " in proc.stderr and "nowhere/config.json: not found" in proc.stderr


def test_launch_prints_toolkit_errors_and_keeps_tracebacks_of_bugs(capsys, monkeypatch):
    from missrec.cli import launch
    from missrec.errors import ConfigError

    def bad_config(argv):
        raise ConfigError("unknown key 'train.epoch'; known: train.epochs")

    def bug(argv):
        raise KeyError("a bug")

    monkeypatch.delenv("MISSREC_DEBUG", raising=False)
    assert launch(bad_config, []) == 2
    assert capsys.readouterr().err == "error: unknown key 'train.epoch'; known: train.epochs\n"
    with pytest.raises(ConfigError):
        launch(bad_config, ["--debug"])
    with pytest.raises(KeyError):
        launch(bug, [])


def test_finetune_launcher_bad_input_names_file(tmp_path):
    (tmp_path / "D.train.inter").write_text("user\titems\ttarget\n0\t1\t2\n")
    for split in ("valid", "test"):
        (tmp_path / f"D.{split}.inter").write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n0\t1\t2\n")
    proc = _run("launcher/finetune.py", "--data-root", str(tmp_path), "--domain", "D", "--output-dir",
                str(tmp_path / "run"), "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {tmp_path / 'D.train.inter'}:1: wrong header" in proc.stderr


def test_build_shards_launcher(synthetic_root, tmp_path):
    proc = _run("launcher/build_shards.py", "--data-root", str(synthetic_root / "Office"), "--domain", "Office",
                "--out", str(tmp_path / "Office"), "--features", "feat1CLS,feat3CLS", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "Office" / "manifest.json").exists()


@pytest.mark.slow
def test_gpu_check_runs_its_checks_and_records_each(tmp_path, shared_datasets):
    """``bench.py gpu`` on a machine without a GPU (``--quick``): each check runs on the CPU and is recorded with its
    figures; a check that cannot run (no data) is recorded as failed while the others still run."""
    proc = _run("launcher/bench.py", "gpu", "--quick", "--only", "finetune,extract,mid_1m", "--workdir",
                str(tmp_path / "w"), "--data-root", str(shared_datasets / "scientific_mm"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cuda"] is False and set(out["checks"]) == {"finetune", "extract", "mid_1m"} and out["all_ok"]
    assert out["checks"]["finetune"]["test"]["recall@10"] > 0 and out["checks"]["extract"]["items"] == 300
    proc = _run("launcher/bench.py", "gpu", "--quick", "--only", "finetune", "--workdir", str(tmp_path / "x"),
                "--data-root", str(tmp_path / "nowhere"))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["all_ok"] and "scientific_mm not found" in out["checks"]["finetune"]["error"]
