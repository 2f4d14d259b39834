"""The stages of ``bench.py report``: each takes the :class:`~missrec.bench.report.ReportConfig` and
returns a JSON-able dict (module-level functions, so they can run in a spawned process)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from missrec.bench.extract import run_extract_benchmark
from missrec.bench.flops import matmul_rate, sasrec_step_flops, step_rate
from missrec.bench.isolate import IsolatedError, run_isolated
from missrec.bench.loader import run_loader_benchmark
from missrec.bench.mid import _RssSampler, adjusted_rand_index, clustered_tokens, run_mid_benchmark
from missrec.bench.pretrain import run_pretrain_benchmark
from missrec.bench.scale import run_scale_benchmark
from missrec.bench.train_rate import sasrec_training_rate
from missrec.config import DataConfig, MISSRecConfig, RunConfig, SASRecConfig, TrainConfig
from missrec.data.atomic import load_domain
from missrec.data.batching import iter_split_batches
from missrec.data.shards import write_domain_shards
from missrec.errors import DataFormatError
from missrec.interests import InterestConfig, discover_interests
from missrec.interests.config import resolve_k, resolve_num_clusters
from missrec.interests.reference import dpc_knn_exact
from missrec.models.build import build_missrec, build_sasrec
from missrec.transfer.finetune import DomainData, build_model, run_finetune

if TYPE_CHECKING:
    from missrec.bench.report import ReportConfig

log = logging.getLogger(__name__)

GIB = float(1 << 30)
DOMAIN = "Scientific"
MM_FEATURES = ("feat1CLS", "feat3CLS")


def _threads(cfg: ReportConfig) -> int:
    import torch

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return torch.get_num_threads()


def _dataset(cfg: ReportConfig, name: str) -> Path:
    path = Path(cfg.data_root) / name
    if not (path / f"{DOMAIN}.train.inter").exists():
        raise DataFormatError(path / f"{DOMAIN}.train.inter", "missing: the shared dataset is not there "
                              "(set --data-root to the folder holding scientific/ and scientific_mm/)")
    return path


# ----------------------------------------------------------------------------------------- 1. loader
def stage_loader(cfg: ReportConfig) -> dict[str, Any]:
    """Shard reader rate (2 workers, 2 epochs) vs SASRec training consumption on Scientific."""
    threads = _threads(cfg)
    root = _dataset(cfg, "scientific")
    with tempfile.TemporaryDirectory(prefix="bench-report-loader-") as tmp:
        folder = Path(tmp) / DOMAIN
        t0 = time.perf_counter()
        write_domain_shards(load_domain(root, DOMAIN), folder, samples_per_shard=5000, show_progress=False)
        shard_seconds = time.perf_counter() - t0
        reader = run_loader_benchmark(folder, batch_size=512, num_workers=2, epochs=2)
        steps = 10 if cfg.quick else 0
        sasrec = sasrec_training_rate(folder, batch_size=512, steps=steps)
    return {
        "data": str(root), "shard_write_seconds": round(shard_seconds, 2), "threads": threads,
        "reader_sequences_per_second": reader["sequences_per_second"],
        "sasrec_training_sequences_per_second": sasrec["sequences_per_second"],
        "ratio": round(reader["sequences_per_second"] / sasrec["sequences_per_second"], 1),
        "sasrec_measured_over": "one epoch" if not steps else f"{steps} steps after 2 warm-up steps",
        "reader": reader, "sasrec": sasrec,
    }


# -------------------------------------------------------------------------------------------- 2. MID
def mid_reference_run(tokens: int, dim: int, ratio: float, knn: float, seed: int) -> dict[str, Any]:
    """Exact O(N^2) DPC-KNN on the benchmark's clustered tokens: seconds and peak RSS of the reference
    alone, then the ARI of the FAISS DPC-KNN labels against it (run it in a fresh process)."""
    x, _ = clustered_tokens(tokens, dim, seed)
    icfg = InterestConfig(cluster_ratio=ratio, knn=knn, seed=seed)
    c = resolve_num_clusters(tokens, icfg)
    with _RssSampler() as rss:
        t0 = time.perf_counter()
        ref = dpc_knn_exact(x, c, resolve_k(tokens, knn), scale_by_dim=icfg.scale_by_dim)
        seconds = time.perf_counter() - t0
    fast = discover_interests(x, icfg)
    return {
        "tokens": tokens, "dim": dim, "method": "exact_reference", "clusters": c,
        "seconds_total": seconds, "seconds": {k: float(v) for k, v in ref.timings.items() if k != "total"},
        "peak_rss_gib": rss.peak / GIB, "input_gib": x.nbytes / GIB,
        "ari_faiss_vs_exact": adjusted_rand_index(fast.labels, ref.labels),
        "same_centres": bool(sorted(fast.centres.tolist()) == sorted(ref.centres.tolist())),
    }


def mid_faiss_run(tokens: int, dim: int, ratio: float, knn: float, method: str, seed: int, progress: bool) -> dict:
    """One :func:`~missrec.bench.mid.run_mid_benchmark` call (no exact check; run it in a fresh process)."""
    return run_mid_benchmark(tokens, dim=dim, clusters_ratio=ratio, knn=knn, method=method, seed=seed,
                             exact_check_max=0, show_progress=progress)


def stage_mid(cfg: ReportConfig) -> dict[str, Any]:
    """MID seconds and peak RSS over token counts: DPC-KNN on FAISS, FAISS k-means, and the exact
    reference up to ``cfg.mid_exact_max`` tokens; each run in a fresh process, stopped after
    ``cfg.mid_timeout_s``."""
    knn, seed = 5, 0
    runs: list[dict[str, Any]] = []
    plan = []
    for n in cfg.mid_sizes():
        plan += [("dpc_knn", n), ("kmeans", n)]
        if n <= cfg.mid_exact_max:
            plan.append(("exact_reference", n))
    for method, n in plan:
        if method == "exact_reference":
            fn, args = mid_reference_run, (n, cfg.mid_dim, cfg.mid_ratio, knn, seed)
        else:
            fn, args = mid_faiss_run, (n, cfg.mid_dim, cfg.mid_ratio, knn, method, seed, cfg.progress)
        try:
            limit = cfg.mid_kmeans_timeout_s if method == "kmeans" else cfg.mid_timeout_s
            res, meta = run_isolated(fn, *args, timeout=limit,
                                     log_level=logging.getLogger().getEffectiveLevel())
            rec = {"status": "ok", **res, "process_peak_rss_gib": meta["peak_rss_gib"]}
        except IsolatedError as e:
            rec = {"status": "timeout" if e.timed_out else "failed", "tokens": n, "method": method,
                   "error": str(e), "seconds_at_least": round(e.seconds, 1) if e.timed_out else None,
                   "process_peak_rss_gib": e.peak_rss_gib}
        secs = rec.get("seconds_total")
        peak = rec.get("peak_rss_gib") or rec.get("process_peak_rss_gib")
        log.info("MID %s on %d tokens: %s, %s, peak %s", method, n, rec["status"],
                 f"{secs:.1f} s" if secs is not None else f"stopped after {rec.get('seconds_at_least')} s",
                 f"{peak:.2f} GiB" if peak is not None else "unknown")
        runs.append(rec)
    _extrapolate_stopped(runs)
    ref = [r for r in runs if r["method"] == "exact_reference" and r["status"] == "ok"]
    return {
        "dim": cfg.mid_dim, "clusters_ratio": cfg.mid_ratio, "knn": knn, "seed": seed,
        "sizes": list(cfg.mid_sizes()), "timeout_s": cfg.mid_timeout_s,
        "kmeans_timeout_s": cfg.mid_kmeans_timeout_s, "runs": runs,
        "beyond_reference": _reference_outlook(ref[-1] if ref else None, cfg),
    }


def _extrapolate_stopped(runs: list[dict[str, Any]]) -> None:
    """Give each stopped k-means / exact run an O(N^2) time estimate from the largest finished run of the
    same method (k-means at a fixed cluster ratio costs N * C * D * iterations; the reference N^2 * D).
    DPC-KNN on FAISS is not extrapolated (its cost is not a simple power of N)."""
    for r in runs:
        if r["status"] != "timeout" or r["method"] not in ("kmeans", "exact_reference"):
            continue
        done = [x for x in runs if x["method"] == r["method"] and x["status"] == "ok" and x["tokens"] < r["tokens"]]
        if done:
            base = max(done, key=lambda x: x["tokens"])
            r["seconds_extrapolated"] = base["seconds_total"] * (r["tokens"] / base["tokens"]) ** 2
            r["extrapolated_from"] = base["tokens"]


def _reference_outlook(ref: dict[str, Any] | None, cfg: ReportConfig) -> list[dict[str, Any]]:
    """For sizes above the exact limit: the dense N x N float32 matrix of the official code, the blocked
    reference's working memory (float64 tokens + [1024, N] float64 tiles), and the O(N^2) time
    extrapolated from the largest measured reference."""
    out = []
    for n in cfg.mid_sizes():
        if n <= cfg.mid_exact_max:
            continue
        row = {
            "tokens": n,
            "official_dense_nxn_gib": n * n * 4 / GIB,
            "blocked_reference_gib": (n * cfg.mid_dim * 8 + 3 * 1024 * n * 8) / GIB,
        }
        if ref is not None:
            row["reference_seconds_extrapolated"] = ref["seconds_total"] * (n / ref["tokens"]) ** 2
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------- 3. extract
def stage_extract(cfg: ReportConfig) -> dict[str, Any]:
    """Tiny open_clip extraction with 1 and 2 Ray actors (and in-process): items/s and efficiency."""
    return run_extract_benchmark(items=1000 if cfg.quick else 3000, actors=(1, 2), progress=cfg.progress)


# --------------------------------------------------------------------------------------- 4. pretrain
def stage_pretrain(cfg: ReportConfig) -> dict[str, Any]:
    """DeepSpeed (CPU, gloo) pre-training with 1 and 2 ranks: seq/s, efficiency, time shares."""
    with tempfile.TemporaryDirectory(prefix="bench-report-pretrain-") as tmp:
        return run_pretrain_benchmark(ranks=(1, 2), batch_size=128, steps=10 if cfg.quick else 40, workdir=tmp)


# --------------------------------------------------------------------------------------- 5. finetune
def _finetune_one(cfg: ReportConfig, name: str, overrides: dict[str, Any], workdir: Path) -> dict[str, Any]:
    steps = 10 if cfg.quick else 0
    data = DataConfig(data_root=overrides["data_root"], domain=DOMAIN, features=overrides.get("features", ()))
    run = RunConfig(
        model=overrides["model"], output_dir=str(workdir / name), data=data,
        train=TrainConfig(epochs=1, max_steps_per_epoch=steps, progress=cfg.progress, threads=cfg.threads),
        missrec=MISSRecConfig(mode="transductive"),
    )
    dd = DomainData(run)
    dd.use_train_rows(getattr(build_model(run, dd), "train_rows", "all"))
    per_epoch = dd.steps_per_epoch()
    done = min(steps, per_epoch) if steps else per_epoch
    t0 = time.perf_counter()
    metrics = run_finetune(run)
    wall = time.perf_counter() - t0
    train_s = metrics["seconds_per_epoch"]
    rows = dd.num_train if not steps else min(dd.num_train, done * run.train.batch_size)
    return {
        "model": overrides["model"], "mode": "transductive" if overrides["model"] == "missrec" else None,
        "data": overrides["data_root"], "features": list(data.features), "train_rows": dd.num_train,
        "steps_per_epoch": per_epoch, "steps_timed": done, "train_seconds": train_s,
        "seconds_per_step": round(train_s / done, 4),
        "epoch_seconds": round(train_s if not steps else train_s / done * per_epoch, 2),
        "epoch_extrapolated": bool(steps and done < per_epoch),
        "sequences_per_second": round(rows / train_s, 1),
        "eval_seconds": metrics["eval_seconds_per_epoch"], "run_seconds": round(wall, 2),
        "batch_size": run.train.batch_size,
    }


def stage_finetune(cfg: ReportConfig) -> dict[str, Any]:
    """One fine-tuning epoch (or 10 steps with ``quick``) of SASRec on Scientific and MISSRec
    (transductive, CLIP feat1CLS + feat3CLS) on scientific_mm, through the real training loop
    (MISSRec's epoch includes its interest discovery)."""
    threads = _threads(cfg)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-report-finetune-") as tmp:
        runs["sasrec"] = _finetune_one(cfg, "sasrec", {"model": "sasrec",
                                                       "data_root": str(_dataset(cfg, "scientific"))}, Path(tmp))
        log.info("fine-tuning SASRec: %s", runs["sasrec"])
        runs["missrec"] = _finetune_one(cfg, "missrec", {
            "model": "missrec", "data_root": str(_dataset(cfg, "scientific_mm")), "features": MM_FEATURES,
        }, Path(tmp))
        log.info("fine-tuning MISSRec: %s", runs["missrec"])
    return {"threads": threads, "quick": cfg.quick, "runs": runs}


# ------------------------------------------------------------------------------------------ 6. flops
def _train_batches(domain: Any, count: int, seed: int = 2020) -> list:
    """The training batches of epoch 0 as the trainer makes them (batch 512, grouped by length); with
    ``count`` > 0, that many spread evenly over the batches sorted by length, so short and long
    histories are both represented."""
    import numpy as np

    out = list(iter_split_batches(domain.train, 512, 50, shuffle=True, seed=seed, epoch=0, group_by_length=True))
    if 0 < count < len(out):
        out.sort(key=lambda b: int(b.seq_len.max()))
        out = [out[i] for i in np.linspace(0, len(out) - 1, count).round().astype(int)]
    return out


def stage_flops(cfg: ReportConfig) -> dict[str, Any]:
    """Dense float32 matmul ceiling and the FLOP/s SASRec's (and MISSRec's) training step reaches."""
    import torch

    threads = _threads(cfg)
    count = 4 if cfg.quick else 0  # 0: every batch of one epoch
    ceiling = matmul_rate(2048, repeats=5 if cfg.quick else 10)
    log.info("matmul ceiling: %s", ceiling)
    out: dict[str, Any] = {"threads": threads, "quick": cfg.quick, "matmul": ceiling,
                           "ceiling_gflops": ceiling["gflops_max"]}

    torch.manual_seed(0)
    dom = load_domain(_dataset(cfg, "scientific"), DOMAIN)
    s = SASRecConfig()
    model = build_sasrec(s, dom.num_items, 50)

    def analytic(b: Any) -> dict[str, int]:
        return sasrec_step_flops(len(b), int(b.seq_len.max()), s.hidden, s.layers, s.inner, dom.num_items)

    out["sasrec"] = {"num_items": dom.num_items, "hidden": s.hidden, "layers": s.layers, "inner": s.inner,
                     **step_rate(model, _train_batches(dom, count), ceiling["gflops_max"], analytic)}
    log.info("SASRec step: %.1f GFLOP/s", out["sasrec"]["achieved_gflops"])
    try:
        root = _dataset(cfg, "scientific_mm")
        mm = load_domain(root, DOMAIN, MM_FEATURES)
        run = RunConfig(model="missrec", data=DataConfig(data_root=str(root), domain=DOMAIN, features=MM_FEATURES))
        mmodel = build_missrec(run, mm.num_items, dict(mm.features))
        mmodel.begin_epoch(0)  # interest discovery, as the trainer does before the epoch's steps
        out["missrec"] = {"num_items": mm.num_items, "mode": "transductive",
                          **step_rate(mmodel, _train_batches(mm, count), ceiling["gflops_max"])}
        log.info("MISSRec step: %.1f GFLOP/s", out["missrec"]["achieved_gflops"])
    except Exception as e:  # noqa: BLE001 - SASRec's figures stand on their own
        out["missrec"] = {"error": f"{type(e).__name__}: {e}"}
        log.warning("MISSRec FLOP measurement failed: %s", e)
    return out


__all__ = [
    "mid_faiss_run",
    "mid_reference_run",
    "stage_extract",
    "stage_finetune",
    "stage_flops",
    "stage_loader",
    "stage_mid",
    "stage_pretrain",
]


# --------------------------------------------------------------------------------------- 7. scale
def stage_scale(cfg: ReportConfig) -> dict[str, Any]:
    """2-rank pre-training on catalogues of growing size (:mod:`missrec.bench.scale`); catalogues are cached
    under runs/bench-scale."""
    items = cfg.scale_items or ((20_000, 100_000) if cfg.quick else (100_000, 1_000_000, 4_000_000))
    out = run_scale_benchmark(items=items, steps=10 if cfg.quick else 30, extra=cfg.scale_overrides)
    out["overrides"] = list(cfg.scale_overrides)
    return out
