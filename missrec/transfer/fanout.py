"""Fan-out fine-tuning: one :func:`~missrec.transfer.finetune.run_finetune` job per (domain, setting), run in
parallel as Ray tasks, then one results table over all of them (``RUNS/results.md`` and ``results.json``).

Each job has its own run folder ``RUNS/<domain>/<setting>[-scratch]/`` with its own log (``finetune.log``),
and its own Ray resources (``cpus_per_job`` CPUs, torch threads set to match; ``gpus_per_job`` GPUs).
A failed job does not stop the others; it is reported with its exception and the tail of its log.

Reruns: a job whose run folder holds a complete ``metrics.json`` and a ``config.json`` equal to the job's
config (ignoring :data:`IGNORED_KEYS`, which do not change results) is skipped. A folder without a complete
``metrics.json`` (a failed or interrupted attempt) is emptied and the job runs again. A complete run whose
config differs is, with ``on_config_change="rerun"`` (the default), moved aside to
``<setting>.replaced-<time>/`` and rerun, or, with ``"refuse"``, stops the fan-out before any job starts
with a message naming the differing keys.

Ray: ``address`` (or the ``RAY_ADDRESS`` variable, as set by ``ray job submit``) connects to a cluster;
otherwise a private local Ray is started with ``num_cpus`` CPUs and shut down at the end. On a multi-node
cluster ``output_dir`` must be on a filesystem every node sees.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from missrec.config import RunConfig, from_dict, merge, to_dict
from missrec.errors import ConfigError, missing_extra
from missrec.transfer.finetune import run_finetune
from missrec.transfer.results import job_line, write_fanout_results
from missrec.transfer.runstate import (
    inspect_run,
    log_tail,
)

log = logging.getLogger(__name__)

# setting name -> what it changes in the run config
SETTINGS: dict[str, dict[str, Any]] = {
    "transductive": {"model": "missrec", "missrec": {"mode": "transductive"}},
    "inductive": {"model": "missrec", "missrec": {"mode": "inductive"}},
    "sasrec": {"model": "sasrec", "data": {"features": []}, "pretrained": ""},
}
LOG_NAME = "finetune.log"


@dataclass(frozen=True)
class FanoutConfig:
    """Which jobs to run and with which Ray resources."""

    domains: tuple[str, ...]
    settings: tuple[str, ...] = ("transductive", "inductive")
    output_dir: str = "runs/fanout"
    compare_scratch: bool = False  # with a pre-trained checkpoint: also run every MISSRec setting without it
    num_cpus: int = 0  # local Ray only: CPUs it may use; 0 = all of the machine
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0
    address: str = ""  # Ray cluster to connect to ("auto", "ray://host:10001"); "" = RAY_ADDRESS or local
    on_config_change: str = "rerun"  # rerun | refuse
    progress: bool = True
    log_tail: int = 30  # lines of a failed job's log in the report

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(self.domains))
        object.__setattr__(self, "settings", tuple(self.settings))
        bad = []
        if not self.domains or len(set(self.domains)) != len(self.domains):
            bad.append(f"domains must be non-empty and unique, got {list(self.domains)}")
        if any(not d or "/" in d or d.startswith(".") for d in self.domains):
            bad.append(f"domain names must be plain folder names, got {list(self.domains)}")
        unknown = [s for s in self.settings if s not in SETTINGS]
        if not self.settings or unknown or len(set(self.settings)) != len(self.settings):
            bad.append(f"settings must be unique names among {sorted(SETTINGS)}, got {list(self.settings)}")
        if self.cpus_per_job <= 0 or self.gpus_per_job < 0 or self.num_cpus < 0:
            bad.append("need cpus_per_job > 0, gpus_per_job >= 0, num_cpus >= 0")
        if self.on_config_change not in ("rerun", "refuse"):
            bad.append(f"on_config_change must be 'rerun' or 'refuse', got {self.on_config_change!r}")
        if bad:
            raise ConfigError("; ".join(bad))


@dataclass(frozen=True)
class Job:
    """One fine-tuning run of the fan-out."""

    domain: str
    setting: str
    scratch: bool = False

    @property
    def run(self) -> str:
        """The run folder's name and the results-table key, e.g. ``inductive-scratch``."""
        return f"{self.setting}-scratch" if self.scratch else self.setting

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.run}"


def plan_jobs(cfg: FanoutConfig, base: RunConfig) -> list[Job]:
    """Every job, domain by domain, in the order of ``cfg.settings``.

    With ``base.pretrained`` and ``cfg.compare_scratch``, each MISSRec setting also gets a ``-scratch`` job
    without the checkpoint; ``sasrec`` has no pre-trained backbone and always runs from scratch.
    """
    if not base.data.data_root:
        raise ConfigError("data.data_root is not set (--data-root)")
    if cfg.compare_scratch and not base.pretrained:
        raise ConfigError("compare_scratch needs a pre-trained checkpoint (--pretrained)")
    missrec_settings = [s for s in cfg.settings if SETTINGS[s]["model"] == "missrec"]
    if missrec_settings and not base.data.features:
        raise ConfigError(
            f"settings {missrec_settings} train MISSRec, which needs feature files: set data.features "
            "(e.g. --features feat1CLS,feat3CLS)"
        )
    jobs = []
    for d in cfg.domains:
        for s in cfg.settings:
            jobs.append(Job(d, s))
            if cfg.compare_scratch and s in missrec_settings:
                jobs.append(Job(d, s, scratch=True))
    return jobs


def run_names(cfg: FanoutConfig, base: RunConfig) -> list[str]:
    """The table's run keys, in column order."""
    return list(dict.fromkeys(j.run for j in plan_jobs(cfg, base)))


def comparisons(cfg: FanoutConfig, base: RunConfig) -> list[tuple[str, str]]:
    """``(ours, base)`` run pairs of the relative-improvement columns: each MISSRec setting vs its scratch
    run (with ``compare_scratch``), then each MISSRec setting vs SASRec (when ``sasrec`` is a setting)."""
    runs = run_names(cfg, base)
    mis = [s for s in cfg.settings if SETTINGS[s]["model"] == "missrec"]
    pairs = [(s, f"{s}-scratch") for s in mis if f"{s}-scratch" in runs]
    if "sasrec" in runs:
        pairs += [(s, "sasrec") for s in mis]
    return pairs


def job_config(job: Job, cfg: FanoutConfig, base: RunConfig) -> RunConfig:
    """The job's run config: ``base`` plus the job's domain, setting and run folder (paths made absolute,
    so that Ray workers with another working directory read and write the same files)."""
    diff: dict[str, Any] = {
        "output_dir": os.path.abspath(Path(cfg.output_dir) / job.domain / job.run),
        "data": {"domain": job.domain, "data_root": os.path.abspath(base.data.data_root)},
        "train": {"progress": False},  # the fan-out shows one bar over jobs; each job logs to its file
    }
    if base.data.feature_dir:
        diff["data"]["feature_dir"] = os.path.abspath(base.data.feature_dir)
    if base.pretrained:
        diff["pretrained"] = "" if job.scratch else os.path.abspath(base.pretrained)
    out = merge(base, diff)
    return merge(out, SETTINGS[job.setting])


# ------------------------------------------------------------------------------------------ run folders


def _append_log(path: Path, message: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} missrec.transfer.fanout: {message}\n")


# ------------------------------------------------------------------------------------------ the Ray task


KILL_FAULT_ENV = "MISSREC_FAULT_KILL_JOB"  # test hook: "DOMAIN/SETTING" SIGKILLs that job's worker at its start


def run_job(config: dict[str, Any], threads: int, tail_lines: int = 30) -> dict[str, Any]:
    """Body of one Ray task: run ``config`` (a :func:`~missrec.config.to_dict` RunConfig) with ``threads``
    torch threads, logging to ``<output_dir>/finetune.log``. Never raises: returns ``{"status": "ok",
    "metrics"}`` or ``{"status": "failed", "error", "traceback", "log_tail"}``."""
    import torch

    t0 = time.perf_counter()
    run_dir = Path(config["output_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / LOG_NAME
    handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    torch.set_num_threads(max(1, threads))
    try:
        log.info("job %s/%s starts on %s with %d torch threads", config["data"]["domain"],
                 run_dir.name, os.uname().nodename, torch.get_num_threads())
        if os.environ.get(KILL_FAULT_ENV) == f"{config['data']['domain']}/{run_dir.name}":
            log.warning("fault injection: SIGKILL of this job's worker process")
            handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        metrics = run_finetune(from_dict(RunConfig, config))
        return {"status": "ok", "metrics": metrics, "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as e:  # a failed job is reported, it does not stop the others
        log.exception("job failed")
        handler.flush()
        return {
            "status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
            "log_tail": log_tail(log_path, tail_lines), "seconds": round(time.perf_counter() - t0, 2),
        }
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


# ------------------------------------------------------------------------------------------ the fan-out


def run_fanout(cfg: FanoutConfig, base: RunConfig) -> dict[str, Any]:
    """Run every job of :func:`plan_jobs` as a Ray task, write ``results.md`` / ``results.json`` under
    ``cfg.output_dir`` and return ``{"table", "markdown", "jobs", "failed", "seconds", ...}``.

    ``base`` is the shared run config (data root, features, model sizes, training); each job overrides
    its domain, setting and run folder. Failed jobs are listed in ``"failed"``; the caller decides the
    exit status.
    """
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    jobs = plan_jobs(cfg, base)
    configs = {j: to_dict(job_config(j, cfg, base)) for j in jobs}
    out.mkdir(parents=True, exist_ok=True)
    fan_log = logging.FileHandler(out / "fanout.log", mode="a", encoding="utf-8")
    fan_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
    report = logging.getLogger("missrec.transfer")  # this module's and the results writer's lines
    report.addHandler(fan_log)
    try:
        results, todo = _prepare(jobs, configs, cfg)
        log.info("fan-out: %d jobs (%d to run, %d skipped) into %s", len(jobs), len(todo),
                 len(jobs) - len(todo), out)
        if todo:
            results.update(_run_on_ray(todo, configs, cfg, done=len(jobs) - len(todo), total=len(jobs)))
        ordered = [results[j] for j in jobs]
        seconds = time.perf_counter() - t0
        summary = write_fanout_results(
            out, ordered, cfg.domains, run_names(cfg, base), comparisons(cfg, base),
            extra={"output_dir": str(out), "seconds": round(seconds, 1), "settings": list(cfg.settings),
                   "pretrained": base.pretrained},
            pretrained=bool(base.pretrained),
        )
    finally:
        report.removeHandler(fan_log)
        fan_log.close()
    return summary


def _prepare(
    jobs: list[Job], configs: dict[Job, dict[str, Any]], cfg: FanoutConfig
) -> tuple[dict[Job, dict[str, Any]], list[Job]]:
    """Skip finished jobs, refuse or move aside changed ones, empty incomplete folders."""
    results: dict[Job, dict[str, Any]] = {}
    states = {j: inspect_run(Path(configs[j]["output_dir"]), configs[j]) for j in jobs}
    changed = {j: s[1] for j, s in states.items() if s[0] == "changed"}
    if changed and cfg.on_config_change == "refuse":
        lines = [f"  {j.name}: {', '.join(keys[:8])}" for j, keys in changed.items()]
        raise ConfigError(
            "finished runs were made with another config (on_config_change=refuse):\n" + "\n".join(lines)
            + "\nuse another output folder, or on_config_change=rerun (--on-config-change rerun) to rerun them"
        )
    todo = []
    for j in jobs:
        state, keys, metrics = states[j]
        run_dir = Path(configs[j]["output_dir"])
        if state == "done":
            msg = "skipped: complete metrics.json with a matching config.json"
            log.info("%s %s", j.name, msg)
            _append_log(run_dir / LOG_NAME, f"fan-out rerun: {msg}")
            results[j] = _row(j, run_dir, "skipped", metrics=metrics, seconds=metrics.get("seconds"))
            continue
        if state == "changed":
            aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("%s: config changed (%s); old run moved to %s, rerunning", j.name, ", ".join(keys[:8]), aside)
            run_dir.rename(aside)
        elif run_dir.exists():
            log.info("%s: incomplete run folder (no complete metrics.json) emptied, rerunning", j.name)
            shutil.rmtree(run_dir)
        todo.append(j)
    return results, todo


def _run_on_ray(
    todo: list[Job], configs: dict[Job, dict[str, Any]], cfg: FanoutConfig, done: int, total: int
) -> dict[Job, dict[str, Any]]:
    try:
        import ray
    except ImportError as e:
        raise missing_extra("ray", "ray") from e
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm  # log lines above the bar, not through it

    started = local = False
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS", "")
        if address:
            ray.init(address=address)
            log.info("connected to the Ray cluster at %s", address)
        else:  # "local": a private instance, never another user's `ray start` cluster
            ray.init(address="local", num_cpus=cfg.num_cpus or None, include_dashboard=False)
            local = True
        started = True
    results: dict[Job, dict[str, Any]] = {}
    refs: dict[Any, Job] = {}
    try:
        _check_resources(ray.cluster_resources(), cfg, local=local)
        task = ray.remote(run_job).options(num_cpus=cfg.cpus_per_job, num_gpus=cfg.gpus_per_job, max_retries=0)
        threads = max(1, int(cfg.cpus_per_job))
        refs = {task.remote(configs[j], threads, cfg.log_tail): j for j in todo}
        submitted = time.perf_counter()
        pending = list(refs)
        with logging_redirect_tqdm(), tqdm(total=total, initial=done, desc="fan-out", unit="job",
                                           disable=None if cfg.progress else True) as bar:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                j = refs[ready[0]]
                run_dir = Path(configs[j]["output_dir"])
                try:
                    res = ray.get(ready[0])
                except ray.exceptions.RayError as e:  # the worker died (OOM, signal) or the task could not run
                    res = {"status": "failed", "error": f"{type(e).__name__}: {e}".strip()[:2000],
                           "log_tail": log_tail(run_dir / LOG_NAME, cfg.log_tail),
                           "seconds": round(time.perf_counter() - submitted, 2)}
                if res["status"] == "ok":
                    row = _row(j, run_dir, "ok", metrics=res["metrics"], seconds=res["seconds"])
                else:
                    row = _row(j, run_dir, "failed", seconds=res.get("seconds"), error=res["error"],
                               log_tail=res.get("log_tail", ""))
                results[j] = row
                done += 1
                bar.update(1)
                log.info("[%d/%d] %s", done, total, job_line(row))
    finally:
        for ref, j in refs.items():  # interrupted: stop what still runs
            if j not in results:
                ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
    return results


def _check_resources(avail: dict[str, float], cfg: FanoutConfig, local: bool) -> None:
    short = []
    if cfg.cpus_per_job > avail.get("CPU", 0):
        short.append(f"{cfg.cpus_per_job} CPUs per job but the Ray cluster has {avail.get('CPU', 0)}")
    if cfg.gpus_per_job > avail.get("GPU", 0):
        short.append(f"{cfg.gpus_per_job} GPUs per job but the Ray cluster has {avail.get('GPU', 0)}")
    if short and local:
        raise ConfigError("; ".join(short) + ": no job could ever be scheduled")
    for s in short:  # a cluster with an autoscaler may still grow
        log.warning("%s; jobs wait until the cluster grows", s)


def _row(job: Job, run_dir: Path, status: str, metrics: dict[str, Any] | None = None, seconds: Any = None,
         error: str = "", log_tail: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"domain": job.domain, "setting": job.setting, "run": job.run, "scratch": job.scratch,
                           "run_dir": str(run_dir), "status": status, "seconds": seconds}
    if metrics is not None:
        row.update(test=metrics.get("test"), valid=metrics.get("valid"), best_epoch=metrics.get("best_epoch"),
                   epochs_run=metrics.get("epochs_run"))
    if status == "failed":
        row.update(error=error, log=str(run_dir / LOG_NAME), log_tail=log_tail)
    return row
