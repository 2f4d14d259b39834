"""bench.py report: the Markdown + PNG writer on a fake results dict, stage failure isolation, the fresh
process runner, and the SASRec FLOP formula against torch's FlopCounterMode (no real benchmark runs)."""

from __future__ import annotations

import copy
import math
import re
import time

import pytest
import torch

from missrec.bench.flops import count_step_flops, matmul_rate, sasrec_step_flops, step_rate
from missrec.bench.isolate import IsolatedError, run_isolated
from missrec.bench.report import STAGES, ReportConfig, machine_info, run_stages
from missrec.bench.report_render import render_report
from missrec.data.batching import Batch
from missrec.errors import ConfigError
from missrec.models.sasrec import SASRec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mid_run(method: str, n: int, seconds: float, rss: float, **extra) -> dict:
    return {"status": "ok", "method": method, "tokens": n, "seconds_total": seconds, "peak_rss_gib": rss,
            "ari_vs_planted": 0.99, "info": {"knn_recall": 0.998}, **extra}


def fake_results() -> dict:
    machine = {"date_utc": "2026-01-01 00:00:00", "cpu_model": "Fake CPU 9000", "logical_cores": 2,
               "physical_cores": 1, "usable_cores": 2, "ram_gib": 24.0, "gpus": [], "os": "Linux", "python": "3.11",
               "versions": {"torch": "2.x", "faiss": "1.x"}, "torch_default_threads": 2,
               "git_commit": "abc123", "git_modified_files": 3, "load_average": [0.5, 0.4, 0.3]}
    loader = {"data": "../shared/datasets/scientific", "threads": 2, "reader_sequences_per_second": 70783.0,
              "sasrec_training_sequences_per_second": 1753.0, "ratio": 40.4, "sasrec_measured_over": "one epoch",
              "reader": {"train_rows": 34101, "train_shards": 7, "num_workers": 2, "epochs": 2},
              "sasrec": {"threads": 2}}
    mid = {"dim": 300, "clusters_ratio": 0.02, "knn": 5, "seed": 0, "sizes": [10000, 100000, 1000000],
           "timeout_s": 600.0, "runs": [
               _mid_run("dpc_knn", 10000, 1.1, 0.7), _mid_run("kmeans", 10000, 0.9, 0.6),
               {"status": "ok", "method": "exact_reference", "tokens": 10000, "seconds_total": 6.0,
                "peak_rss_gib": 0.8, "ari_faiss_vs_exact": 1.0, "same_centres": True},
               _mid_run("dpc_knn", 100000, 17.0, 1.4), _mid_run("kmeans", 100000, 25.0, 1.2),
               _mid_run("dpc_knn", 1000000, 313.0, 3.6),
               {"status": "timeout", "method": "kmeans", "tokens": 1000000, "seconds_at_least": 600.0,
                "process_peak_rss_gib": 2.5, "error": "did not finish within 600 s",
                "seconds_extrapolated": 2500.0, "extrapolated_from": 100000}],
           "beyond_reference": [
               {"tokens": 100000, "official_dense_nxn_gib": 37.25, "blocked_reference_gib": 0.9,
                "reference_seconds_extrapolated": 600.0},
               {"tokens": 1000000, "official_dense_nxn_gib": 3725.3, "blocked_reference_gib": 25.0,
                "reference_seconds_extrapolated": 60000.0}]}
    extract = {"items": 3000, "chunk_size": 128, "batch_size": 64, "model": "tiny-clip", "torch_threads_per_actor": 1,
               "runs": {k: {"encode_items_per_second": v, "startup_seconds": 8.0, "end_to_end_items_per_second": v / 2}
                        for k, v in (("1", 2740.0), ("2", 4762.0), ("in_process", 2573.0))},
               "scaling_efficiency": 0.869}
    finetune = {"threads": 2, "quick": False, "runs": {
        "sasrec": {"data": "scientific", "train_rows": 34101, "steps_timed": 67, "steps_per_epoch": 67,
                   "epoch_seconds": 19.3, "epoch_extrapolated": False, "seconds_per_step": 0.288,
                   "sequences_per_second": 1767.0, "eval_seconds": 1.3},
        "missrec": {"data": "scientific_mm", "train_rows": 34101, "steps_timed": 10, "steps_per_epoch": 67,
                    "epoch_seconds": 42.0, "epoch_extrapolated": True, "seconds_per_step": 0.6,
                    "sequences_per_second": 800.0, "eval_seconds": 2.0}}}
    flops = {"threads": 2, "ceiling_gflops": 150.0,
             "matmul": {"n": 2048, "repeats": 10, "dtype": "float32", "threads": 2, "gflops_max": 150.0,
                        "gflops_median": 140.0},
             "sasrec": {"batches": 3, "lengths": [5, 12, 50], "flops_total": 3.0e11, "flops_by_op": {
                 "aten.mm": 2.0e11, "aten.addmm": 0.8e11, "aten.bmm": 0.2e11}, "seconds_per_step": 0.3,
                 "achieved_gflops": 33.3, "fraction_of_ceiling": 0.222, "analytic_over_counted": 1.0},
             "missrec": {"error": "RuntimeError: no features"}}
    ok = {"status": "ok", "seconds": 10.0}
    return {"machine": machine, "config": {"quick": False, "skip": []}, "seconds_total": 900.0, "stages": {
        "loader": {**ok, "result": loader}, "mid": {**ok, "result": mid}, "extract": {**ok, "result": extract},
        "pretrain": {"status": "failed", "seconds": 3.2, "error": "RuntimeError: pre-training with 2 ranks failed",
                     "traceback": "Traceback (most recent call last):\n  boom"},
        "finetune": {**ok, "result": finetune}, "flops": {**ok, "result": flops}}}


def test_render_report_writes_markdown_and_pngs(tmp_path):
    results = fake_results()
    before = copy.deepcopy(results)
    md = tmp_path / "docs" / "benchmarks.md"
    figures = render_report(results, md)
    assert results == before  # inputs are not mutated
    text = md.read_text()
    assert {p.name for p in figures} == {"loader.png", "mid_scaling.png", "extract_scaling.png",
                                         "finetune_epoch.png", "flops.png"}
    for p in figures:
        assert p.parent == tmp_path / "docs" / "benchmarks"
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(f"benchmarks/{p.name}" for p in figures)
    assert "Fake CPU 9000" in text and "`abc123` (+3 modified tracked files)" in text
    assert "70,783.0" in text and "40.4 ×" in text  # loader table
    assert "> 600 (stopped; ≈ 42 min by O(N²) from 100,000)" in text and "≥ 2.50" in text  # the k-means run that hit the time limit
    assert "3,725.3 (> RAM)" in text and "0.90 |" in text and "16.7 h" in text  # memory vs RAM, extrapolation
    assert "**0.87**" in text  # extraction efficiency
    assert "**Failed** after 3.2 s: `RuntimeError: pre-training with 2 ranks failed`" in text
    assert "boom" in text
    assert "19.3" in text and "42.0 *" in text  # fine-tuning, the extrapolated epoch marked
    assert "MISSRec transductive step | failed" in text and "0.222" in text
    assert "Closed form / counter over these batches: **1.0000**" in text


def test_render_skipped_and_broken_sections(tmp_path):
    results = fake_results()
    results["stages"]["extract"] = {"status": "skipped", "seconds": 0.0}
    del results["stages"]["loader"]["result"]["reader"]  # a result without a field the section needs
    md = tmp_path / "bench.md"
    figures = render_report(results, md)
    text = md.read_text()
    assert "Skipped (`--skip`)." in text
    assert "Could not render this section: `KeyError: 'reader'`" in text
    assert "extract_scaling.png" not in text and "loader.png" not in {p.name for p in figures}
    assert (tmp_path / "bench" / "mid_scaling.png").exists()


def test_run_stages_records_failure_and_goes_on():
    calls = []

    def good(cfg):
        calls.append("good")
        return {"value": 1}

    def bad(cfg):
        calls.append("bad")
        raise ValueError("broken stage")

    def skipped(cfg):
        raise AssertionError("a skipped stage must not run")

    seen = []
    cfg = ReportConfig(isolate=False, progress=False, skip=("flops",))
    out = run_stages(cfg, {"mid": bad, "loader": good, "flops": skipped}, on_stage=lambda r: seen.append(dict(r)))
    assert calls == ["bad", "good"]
    assert out["mid"]["status"] == "failed" and out["mid"]["error"] == "ValueError: broken stage"
    assert "broken stage" in out["mid"]["traceback"]
    assert out["loader"] == {"status": "ok", "result": {"value": 1}, "seconds": out["loader"]["seconds"]}
    assert out["flops"]["status"] == "skipped"
    assert [list(s) for s in seen] == [["mid"], ["mid", "loader"]]


def test_report_config_rejects_unknown_stage():
    with pytest.raises(ConfigError, match="nope"):
        ReportConfig(skip=("nope",))
    assert set(ReportConfig().skip) <= set(STAGES)
    assert ReportConfig(quick=True).mid_sizes() == (10_000, 100_000)
    assert ReportConfig().mid_sizes()[-1] == 1_000_000


def test_run_isolated_result_error_and_timeout():
    value, meta = run_isolated(math.factorial, 10)
    assert value == 3628800 and meta["seconds"] > 0
    assert meta["peak_rss_gib"] is None or meta["peak_rss_gib"] > 0
    with pytest.raises(IsolatedError, match="ValueError: math domain error") as err:
        run_isolated(math.sqrt, -1.0)
    assert not err.value.timed_out and "Traceback" in err.value.details
    t0 = time.perf_counter()
    with pytest.raises(IsolatedError, match="did not finish within 1 s") as err:
        run_isolated(time.sleep, 60, timeout=1.0)
    assert err.value.timed_out and time.perf_counter() - t0 < 30


def _batch(b: int, length: int, num_items: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    seq_len = torch.randint(1, length + 1, (b,), generator=g)
    seq_len[0] = length
    seq = torch.randint(1, num_items + 1, (b, length), generator=g)
    seq[torch.arange(length)[None, :] >= seq_len[:, None]] = 0
    zeros = torch.zeros(b, dtype=torch.long)
    return Batch(seq, seq_len, torch.randint(0, num_items, (b,), generator=g), zeros, zeros)


def test_sasrec_closed_form_matches_flop_counter():
    torch.manual_seed(0)
    n, d, layers, inner = 300, 32, 2, 48
    model = SASRec(n, max_len=20, hidden=d, layers=layers, heads=2, inner=inner, dropout=0.5, attn_dropout=0.5)
    for b, length in ((16, 20), (7, 3)):
        batch = _batch(b, length, n)
        counted = count_step_flops(model, batch)
        assert counted == {**counted, **{k: sasrec_step_flops(b, length, d, layers, inner, n)[k]
                                         for k in ("forward", "total")}}
        assert all(p.grad is None for p in model.parameters())


def test_step_rate_reports_fraction_of_ceiling():
    torch.manual_seed(0)
    model = SASRec(200, max_len=10, hidden=16, layers=1, heads=2, inner=32, dropout=0.5, attn_dropout=0.5)
    batches = [_batch(8, 10, 200, seed=s) for s in range(2)]
    ceiling = matmul_rate(64, repeats=2, warmup=1)
    assert ceiling["gflops_max"] >= ceiling["gflops_median"] > 0
    res = step_rate(model, batches, ceiling["gflops_max"],
                    lambda b: sasrec_step_flops(len(b), int(b.seq_len.max()), 16, 1, 32, 200))
    assert res["analytic_over_counted"] == 1.0
    assert res["flops_total"] == res["flops_analytic"] > 0
    assert res["fraction_of_ceiling"] == pytest.approx(res["achieved_gflops"] / ceiling["gflops_max"], rel=1e-2)
    assert len(res["step_seconds"]) == 2


def test_machine_info_names_the_machine():
    m = machine_info()
    assert m["logical_cores"] >= 1 and m["versions"]["torch"] == torch.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", m["date_utc"])
