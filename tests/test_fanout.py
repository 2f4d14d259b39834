"""Fan-out fine-tuning as Ray tasks: results table, a failing job, reruns that skip finished jobs."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

from missrec.config import RunConfig, build, to_dict
from missrec.errors import ConfigError
from missrec.transfer.fanout import (
    LOG_NAME,
    FanoutConfig,
    Job,
    _prepare,
    comparisons,
    job_config,
    plan_jobs,
    run_fanout,
)
from missrec.transfer.results import domain_table, markdown_table, render_domain_table
from missrec.transfer.runstate import config_diff, inspect_run

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "train.epochs=1", "train.batch_size=128", "train.progress=false", "data.max_len=20",
    "missrec.hidden=16", "missrec.inner=32", "missrec.heads=2", "sasrec.hidden=16", "sasrec.inner=32",
]


def _launcher():
    sys.path.insert(0, str(REPO / "launcher"))
    try:
        import finetune as launcher  # launcher/finetune.py
    finally:
        sys.path.pop(0)
    return launcher


def _base(root, *extra) -> RunConfig:
    return build(RunConfig, [], [f"data.data_root={root}", "data.features=[feat1CLS,feat3CLS]", *TINY, *extra])


# ------------------------------------------------------------------------------------------ no Ray


def test_plan_jobs_and_job_configs(tmp_path):
    ckpt = tmp_path / "backbone.pt"
    base = _base(tmp_path, f"pretrained={ckpt}", "missrec.mode=inductive", "model=sasrec")
    cfg = FanoutConfig(domains=("A", "B"), settings=("transductive", "inductive", "sasrec"),
                       output_dir=str(tmp_path / "runs"), compare_scratch=True)
    jobs = plan_jobs(cfg, base)
    assert [j.name for j in jobs[:5]] == [
        "A/transductive", "A/transductive-scratch", "A/inductive", "A/inductive-scratch", "A/sasrec"]
    assert len(jobs) == 10
    tr = job_config(Job("A", "transductive"), cfg, base)
    assert (tr.model, tr.missrec.mode, tr.pretrained) == ("missrec", "transductive", str(ckpt))
    assert tr.output_dir == str(tmp_path / "runs" / "A" / "transductive") and tr.data.domain == "A"
    scratch = job_config(Job("B", "inductive", scratch=True), cfg, base)
    assert (scratch.model, scratch.missrec.mode, scratch.pretrained) == ("missrec", "inductive", "")
    sas = job_config(Job("B", "sasrec"), cfg, base)
    assert (sas.model, sas.data.features, sas.pretrained) == ("sasrec", (), "")
    assert base.model == "sasrec" and base.data.domain == ""  # the shared config is not changed
    assert comparisons(cfg, base) == [
        ("transductive", "transductive-scratch"), ("inductive", "inductive-scratch"),
        ("transductive", "sasrec"), ("inductive", "sasrec")]
    with pytest.raises(ConfigError, match="pre-trained"):
        plan_jobs(FanoutConfig(domains=("A",), compare_scratch=True), _base(tmp_path))
    with pytest.raises(ConfigError, match="feature"):
        plan_jobs(FanoutConfig(domains=("A",)), build(RunConfig, [], [f"data.data_root={tmp_path}"]))
    with pytest.raises(ConfigError, match="settings"):
        FanoutConfig(domains=("A",), settings=("bert4rec",))


def test_domain_table_marks_failures_and_improvements():
    t1 = {"recall@10": 0.2, "ndcg@10": 0.1, "recall@50": 0.4, "ndcg@50": 0.15}
    t2 = {"recall@10": 0.1, "ndcg@10": 0.05, "recall@50": 0.5, "ndcg@50": 0.15}
    jobs = [
        {"domain": "A", "run": "transductive", "status": "ok", "test": t1},
        {"domain": "A", "run": "sasrec", "status": "skipped", "test": t2},
        {"domain": "B", "run": "transductive", "status": "failed"},
        {"domain": "B", "run": "sasrec", "status": "ok", "test": t2},
    ]
    table = domain_table(jobs, ["A", "B"], ["transductive", "sasrec"], [("transductive", "sasrec")])
    assert len(table["columns"]) == 12 and [r["domain"] for r in table["rows"]] == ["A", "B"]
    a = table["rows"][0]["values"]
    assert a["transductive vs sasrec R@10"] == pytest.approx(100.0)
    assert a["transductive vs sasrec R@50"] == pytest.approx(-20.0)
    assert a["transductive vs sasrec N@50"] == pytest.approx(0.0)
    md = render_domain_table(table)
    lines = md.splitlines()
    assert "+100.0%" in lines[2] and "-20.0%" in lines[2]
    assert lines[3].count("failed") == 4 and lines[3].count("–") == 4 and "0.1000" in lines[3]
    # the demo's one-run-per-row table still works
    assert "| x | 0.2000 |" in markdown_table([{"name": "x", "test": t1}])


def test_changed_config_is_refused_or_moved_aside(tmp_path):
    base = _base(tmp_path)
    cfg = FanoutConfig(domains=("A",), settings=("sasrec",), output_dir=str(tmp_path / "runs"))
    job = plan_jobs(cfg, base)[0]
    conf = to_dict(job_config(job, cfg, base))
    run_dir = Path(conf["output_dir"])
    run_dir.mkdir(parents=True)
    old = json.loads(json.dumps(conf))
    old["train"]["lr"] = 0.5
    old["train"]["threads"] = 7  # ignored: does not change results
    (run_dir / "config.json").write_text(json.dumps(old))
    (run_dir / "metrics.json").write_text(json.dumps({"test": {"recall@10": 0.1}}))  # incomplete
    assert inspect_run(run_dir, conf)[0] == "todo"
    (run_dir / "metrics.json").write_text(json.dumps(
        {"test": {"recall@10": 0.1, "ndcg@10": 0.1, "recall@50": 0.1, "ndcg@50": 0.1}}))
    assert inspect_run(run_dir, conf)[:2] == ("changed", ["train.lr"])
    assert config_diff(old, old) == []
    with pytest.raises(ConfigError, match="A/sasrec: train.lr"):
        run_fanout(FanoutConfig(domains=("A",), settings=("sasrec",), output_dir=str(tmp_path / "runs"),
                                on_config_change="refuse"), base)
    assert (run_dir / "metrics.json").exists()  # nothing touched
    results, todo = _prepare([job], {job: conf}, cfg)
    assert todo == [job] and not results and not run_dir.exists()
    assert len(list(run_dir.parent.glob("sasrec.replaced-*/metrics.json"))) == 1


# ------------------------------------------------------------------------------------------ with Ray


@pytest.mark.slow
def test_fanout_failure_then_rerun(synthetic_root, tmp_path, caplog, capsys, monkeypatch):
    """2 domains x 2 settings; Office lacks a feature file so Office/transductive fails (sasrec needs none)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "data"
    (root / "Office").mkdir(parents=True)
    os.symlink(synthetic_root / "Kitchen", root / "Kitchen")
    for f in (synthetic_root / "Office").glob("Office.*"):
        if f.name != "Office.feat3CLS":
            os.symlink(f, root / "Office" / f.name)
    runs = tmp_path / "runs"
    argv = ["--data-root", str(root), "--domains", "Kitchen,Office", "--settings", "transductive,sasrec",
            "--features", "feat1CLS,feat3CLS", "--output-dir", str(runs), "--num-cpus", "2",
            "--cpus-per-job", "1", "--quiet", *[a for s in TINY for a in ("--set", s)]]
    launcher = _launcher()
    caplog.set_level(logging.INFO, logger="missrec.transfer.fanout")

    assert launcher.main(argv) == 1
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["failed"] == ["Office/transductive"] and last["counts"] == {"ok": 3, "skipped": 0, "failed": 1}
    res = json.loads((runs / "results.json").read_text())
    assert [r["domain"] for r in res["table"]["rows"]] == ["Kitchen", "Office"]
    assert res["table"]["columns"] == [f"{r} {h}" for r in ("transductive", "sasrec", "transductive vs sasrec")
                                       for h in ("R@10", "N@10", "R@50", "N@50")]
    kitchen, office = res["table"]["rows"]
    assert all(0 <= v <= 1 for k, v in kitchen["values"].items() if " vs " not in k)
    assert office["status"] == {"transductive": "failed", "sasrec": "ok"}
    assert office["values"]["sasrec N@10"] > 0 and office["values"]["transductive N@10"] is None
    failed = next(j for j in res["jobs"] if j["status"] == "failed")
    assert "Office.feat3CLS" in failed["error"] and "MissingInputError" in failed["log_tail"]
    assert "Traceback" in (runs / "Office" / "transductive" / LOG_NAME).read_text()
    md = (runs / "results.md").read_text()
    assert "| Office | failed | failed | failed | failed |" in md and "Office.feat3CLS" in md
    for d, s in (("Kitchen", "transductive"), ("Kitchen", "sasrec"), ("Office", "sasrec")):
        assert (runs / d / s / "metrics.json").exists() and "epoch 0" in (runs / d / s / LOG_NAME).read_text()
    assert any("FAILED" in r.getMessage() and "Office/transductive" in r.getMessage() for r in caplog.records)

    # fix the data and rerun: the three finished jobs are skipped, only the failed one runs
    finished = {p: p.stat().st_mtime_ns for p in runs.glob("*/*/metrics.json")}
    assert len(finished) == 3
    os.symlink(synthetic_root / "Office" / "Office.feat3CLS", root / "Office" / "Office.feat3CLS")
    caplog.clear()
    assert launcher.main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["counts"] == {"ok": 1, "skipped": 3, "failed": 0}
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    skipped = sorted(r.getMessage().split()[0] for r in caplog.records if "skipped: complete" in r.getMessage())
    assert skipped == ["Kitchen/sasrec", "Kitchen/transductive", "Office/sasrec"]
    assert "skipped" in (runs / "Kitchen" / "sasrec" / LOG_NAME).read_text()
    res = json.loads((runs / "results.json").read_text())
    office = res["table"]["rows"][1]
    assert office["status"] == {"transductive": "ok", "sasrec": "skipped"}
    assert office["values"]["transductive N@10"] > 0 and office["values"]["transductive vs sasrec N@10"] is not None
    md = (runs / "results.md").read_text()
    assert "## Failed jobs" not in md and "| failed" not in md


@pytest.mark.slow
def test_fanout_job_killed_then_rerun(synthetic_root, tmp_path, capsys, monkeypatch):
    """One job's Ray worker is SIGKILLed mid-run: the other jobs finish and the results are written;
    the rerun runs only the killed job."""
    from missrec.transfer.fanout import KILL_FAULT_ENV

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(KILL_FAULT_ENV, "Kitchen/sasrec")  # inherited by the local Ray's workers
    runs = tmp_path / "runs"
    argv = ["--data-root", str(synthetic_root), "--domains", "Kitchen", "--settings", "inductive,sasrec",
            "--features", "feat1CLS,feat3CLS", "--output-dir", str(runs), "--num-cpus", "2",
            "--cpus-per-job", "1", "--quiet", *[a for s in TINY for a in ("--set", s)],
            "--set", "train.max_steps_per_epoch=3"]
    launcher = _launcher()
    assert launcher.main(argv) == 1
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["failed"] == ["Kitchen/sasrec"] and last["counts"] == {"ok": 1, "skipped": 0, "failed": 1}
    killed = next(j for j in json.loads((runs / "results.json").read_text())["jobs"] if j["status"] == "failed")
    assert "died" in killed["error"].lower() or "crash" in killed["error"].lower(), killed["error"]
    assert "fault injection: SIGKILL" in (runs / "Kitchen" / "sasrec" / LOG_NAME).read_text()
    assert (runs / "Kitchen" / "inductive" / "metrics.json").exists()
    assert not (runs / "Kitchen" / "sasrec" / "metrics.json").exists()

    monkeypatch.delenv(KILL_FAULT_ENV)
    assert launcher.main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["counts"] == {"ok": 1, "skipped": 1, "failed": 0}
    assert (runs / "Kitchen" / "sasrec" / "metrics.json").exists()
