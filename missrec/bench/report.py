"""``bench.py report``: run every benchmark, save the raw figures and write a Markdown report with plots.

    from missrec.bench.report import ReportConfig, run_report
    summary = run_report(ReportConfig(output="docs/benchmarks.md", quick=True, skip=("pretrain",)))

Stages (:data:`STAGES`, see :mod:`missrec.bench.report_stages`) run one after the other, each in a fresh
process by default; a stage that fails is recorded with its error and the others still run. The raw
results go to ``<output without .md>/results.json`` after every stage, the plots beside it, and the
Markdown to ``output`` (:mod:`missrec.bench.report_render`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from missrec.bench import report_stages as s
from missrec.bench.isolate import IsolatedError, run_isolated
from missrec.bench.report_render import render_report
from missrec.config import to_dict
from missrec.errors import ConfigError
from missrec.io import write_json

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
STAGES = ("loader", "mid", "extract", "pretrain", "finetune", "flops", "scale")
GIB = float(1 << 30)


@dataclass(frozen=True)
class ReportConfig:
    """What ``bench.py report`` runs and where it writes. Sizes not set here follow ``quick``."""

    output: str = str(REPO / "docs" / "benchmarks.md")
    data_root: str = str(REPO.parent / "shared" / "datasets")  # holds scientific/ and scientific_mm/
    quick: bool = False  # smaller sizes: MID 10k / 100k only, fewer steps and items
    skip: tuple[str, ...] = ()
    threads: int = 0  # torch threads of the training-rate stages; 0 = torch's default, as training uses
    mid_tokens: tuple[int, ...] = ()  # default: (10k, 100k) quick, (10k, 100k, 1M) otherwise
    mid_dim: int = 300
    mid_ratio: float = 0.02
    mid_exact_max: int = 10_000  # the exact O(N^2) reference runs up to this many tokens
    mid_timeout_s: float = 900.0  # per DPC-KNN / exact MID run; one that runs longer is stopped and reported
    mid_kmeans_timeout_s: float = 300.0  # per k-means run: O(N * C) = O(N^2) at a fixed ratio, so 1M is long
    # catalogue sizes of the scale stage (an hour for 4 M items); default (20k, 100k) quick, (100k, 1M, 4M) otherwise
    scale_items: tuple[int, ...] = ()
    # pre-training overrides of the scale stage: above the sample, MID clusters a sample (missrec.interests.sampled)
    scale_overrides: tuple[str, ...] = ("missrec.interests.sample_tokens=500000",)
    isolate: bool = True  # each stage in a fresh process (its own memory peak; a crash fails only it)
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.skip) - set(STAGES))
        if unknown:
            raise ConfigError(f"unknown stage(s) to skip {unknown}; stages: {', '.join(STAGES)}")
        if min(self.mid_timeout_s, self.mid_kmeans_timeout_s) <= 0:
            raise ConfigError("MID time limits must be positive")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")

    @property
    def figure_dir(self) -> Path:
        """Folder of the PNGs and results.json: the output path without its suffix."""
        return Path(self.output).with_suffix("")

    def mid_sizes(self) -> tuple[int, ...]:
        if self.mid_tokens:
            return self.mid_tokens
        return (10_000, 100_000) if self.quick else (10_000, 100_000, 1_000_000)


def _read_first(path: str, key: str) -> str | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _version(*dists: str) -> str | None:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, library versions, date (UTC), git commit and load of this machine."""
    import torch

    mem_kib = _read_first("/proc/meminfo", "MemTotal")
    physical = set()
    try:
        with open("/proc/cpuinfo") as fh:
            phys = core = None
            for line in fh:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip():
                    if core is not None:
                        physical.add((phys, core))
                    phys = core = None
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_model": _read_first("/proc/cpuinfo", "model name") or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "physical_cores": len(physical) or None,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(int(mem_kib.split()[0]) * 1024 / GIB, 1) if mem_kib else None,
        "gpus": gpus,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "faiss": _version("faiss-cpu", "faiss-gpu", "faiss"),
            "deepspeed": _version("deepspeed"),
            "ray": _version("ray"),
            "open_clip_torch": _version("open_clip_torch"),
            "numpy": _version("numpy"),
        },
        "torch_default_threads": torch.get_num_threads(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_modified_files": len(status.splitlines()) if status is not None else None,
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def _stage_functions() -> dict[str, Callable[[ReportConfig], dict]]:
    return {"loader": s.stage_loader, "mid": s.stage_mid, "extract": s.stage_extract,
            "pretrain": s.stage_pretrain, "finetune": s.stage_finetune, "flops": s.stage_flops,
            "scale": s.stage_scale}


def run_stages(
    cfg: ReportConfig,
    stages: Mapping[str, Callable[[ReportConfig], dict]] | None = None,
    on_stage: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run each stage not in ``cfg.skip`` (``stages``: name -> function, default the real ones) and
    return name -> ``{"status": "ok" | "failed" | "skipped", "seconds", "result" | "error", "traceback"}``.
    A failing stage is recorded and the next one runs; ``on_stage(partial)`` is called after each."""
    stages = dict(stages if stages is not None else _stage_functions())
    out: dict[str, dict[str, Any]] = {}
    bar = tqdm(list(stages), desc="benchmarks", unit="stage", disable=None if cfg.progress else True)
    for name in bar:
        bar.set_postfix(stage=name)
        if name in cfg.skip:
            out[name] = {"status": "skipped", "seconds": 0.0}
            log.info("stage %s: skipped", name)
            continue
        log.info("stage %s: started", name)
        t0 = time.perf_counter()
        try:
            if cfg.isolate:
                result, _ = run_isolated(stages[name], cfg, log_level=logging.getLogger().getEffectiveLevel())
            else:
                result = stages[name](cfg)
            rec: dict[str, Any] = {"status": "ok", "result": result}
        except Exception as e:  # noqa: BLE001 - a failed stage is reported, the others still run
            import traceback

            details = e.details if isinstance(e, IsolatedError) else traceback.format_exc()
            msg = str(e) if isinstance(e, IsolatedError) else f"{type(e).__name__}: {e}"
            rec = {"status": "failed", "error": msg, "traceback": details[-4000:]}
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        out[name] = rec
        log.info("stage %s: %s in %.1f s%s", name, rec["status"], rec["seconds"],
                 f" ({rec['error']})" if rec["status"] == "failed" else "")
        if on_stage is not None:
            on_stage(out)
    bar.close()
    return out


def run_report(
    cfg: ReportConfig, stages: Mapping[str, Callable[[ReportConfig], dict]] | None = None
) -> dict[str, Any]:
    """Run the stages, write ``results.json``, the PNGs and the Markdown; return a short summary."""
    t0 = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "config": to_dict(cfg), "stages": {}}
    json_path = cfg.figure_dir / "results.json"

    def save(partial: dict[str, Any]) -> None:
        results["stages"] = partial
        results["seconds_total"] = round(time.perf_counter() - t0, 1)
        write_json(json_path, results)

    save(run_stages(cfg, stages, on_stage=save))
    results["load_average_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    write_json(json_path, results)
    figures = render_report(results, cfg.output)
    log.info("report written to %s (%d figures) in %.0f s", cfg.output, len(figures), results["seconds_total"])
    return summarise(results, cfg.output, figures, json_path)


def render_saved(cfg: ReportConfig) -> dict[str, Any]:
    """Re-render the Markdown and plots from the ``results.json`` of an earlier run (no benchmarks)."""
    json_path = cfg.figure_dir / "results.json"
    try:
        results = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{json_path}: no saved results to render (run the report first)") from None
    figures = render_report(results, cfg.output)
    return summarise(results, cfg.output, figures, json_path)


def summarise(results: Mapping[str, Any], output: str | Path, figures: list[Path], json_path: Path) -> dict:
    """The launcher's one-line JSON: where things went and each stage's status and seconds."""
    return {
        "output": str(output), "results": str(json_path), "figures": [str(f) for f in figures],
        "seconds_total": results.get("seconds_total"),
        "stages": {k: {"status": v["status"], "seconds": v.get("seconds")}
                   for k, v in results.get("stages", {}).items()},
    }


__all__ = ["STAGES", "ReportConfig", "machine_info", "render_saved", "run_report", "run_stages", "summarise"]
