"""The embedded end-to-end demo (what ``make demo`` runs): the whole pipeline on the synthetic catalogue.

Stages, each a library call writing files the next stage reads:

1. catalogue: the seeded synthetic catalogue (item text, rendered PNG images, user sequences);
2. prepare: each domain exported to raw files (interactions CSV + item table) and prepared again as a
   user would prepare a downloaded catalogue (``launcher/prepare_data.py generic``);
3. CLIP: a tiny open_clip architecture fitted on the source domains' (text, image) pairs (no
   pretrained CLIP can be downloaded offline), saved as an ordinary checkpoint;
4. extract: a pool of Ray actors encodes every domain's text and images with it (``--pretrained PATH``);
5. shards: WebDataset sequence shards per domain next to the feature tables;
6. pre-train: DeepSpeed (ZeRO-2, 2 ranks, gloo on CPU) on the source domains, then export;
7. fan-out: fine-tuning per target domain and setting as Ray tasks, with and without pre-training;
8. look: a picture of the discovered interests (PNG) and the item tokens in TensorBoard's projector.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from missrec.config import RunConfig, build
from missrec.data.atomic import load_domain, load_item_table
from missrec.data.prepare import PrepareConfig, prepare_generic
from missrec.data.prepare_merge import export_interactions
from missrec.data.shard_writer import write_domain_shards
from missrec.data.synthetic import SyntheticConfig, generate_catalogue
from missrec.errors import StageFailedError
from missrec.features.clip_train import fit_demo_clip
from missrec.features.encode import EncoderSpec
from missrec.features.job import ExtractConfig, extract_features
from missrec.features.pool import PoolConfig
from missrec.io import write_json
from missrec.train.dist import launch_command
from missrec.train.export import export_checkpoint
from missrec.transfer.fanout import FanoutConfig, run_fanout
from missrec.transfer.interest_plot import interest_picture

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
FEATURES = ("feat1CLS", "feat3CLS")


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    epochs: int = 10  # fine-tuning epochs per job
    pretrain_epochs: int = 8
    ranks: int = 2  # DeepSpeed ranks for pre-training
    clip_steps: int = 80
    num_cpus: int = 2  # Ray: CPUs for the extraction actors and the fine-tuning jobs
    settings: tuple[str, ...] = ("inductive", "transductive")
    catalogue: SyntheticConfig = field(default_factory=lambda: SyntheticConfig(proxy_features=False))


MODEL = [  # a small model for 2 CPU cores
    "data.max_len=20", "missrec.hidden=64", "missrec.inner=128", "missrec.heads=2", "missrec.dropout=0.2",
    "missrec.attn_dropout=0.2",
]
FINETUNE = ["train.batch_size=128", "train.patience=5", "missrec.pretrained_trainable=all"]


def _stage(n: int, text: str) -> None:
    log.info("[%d/8] %s", n, text)



def prepare_domains(catalogue: Path, out: Path, domains: tuple[str, ...]) -> dict[str, Any]:
    """Export each domain of ``catalogue`` to raw files under ``out/raw`` and prepare them into ``out/data``."""
    summaries = {}
    for d in domains:
        raw = export_interactions(catalogue / d, d, out / "raw" / d)
        summaries[d] = prepare_generic(raw["interactions_csv"], raw["items_table"], d, out / "data",
                                       PrepareConfig(user_k=0, item_k=0, progress=False))
    return summaries


def fit_clip(data: Path, sources: tuple[str, ...], out: Path, steps: int, progress: bool) -> tuple[Path, Path]:
    pairs = []
    for d in sources:
        for _, text, image in load_item_table(data / d / f"{d}.items.tsv"):
            pairs.append((text, data / d / image if image else None))
    return fit_demo_clip(pairs, out, steps=steps, progress=progress)


def extract_all(data: Path, domains: tuple[str, ...], clip: tuple[Path, Path], num_cpus: int,
                progress: bool) -> dict[str, Any]:
    """Ray actors (one per CPU) encode every domain's text and images with the demo CLIP."""
    cfg_path, ckpt = clip
    spec = EncoderSpec(backend="open_clip", model=cfg_path.stem, pretrained=str(ckpt), model_config=str(cfg_path),
                       device="cpu", torch_threads=1)
    pool = PoolConfig(num_actors=num_cpus, num_cpus_per_actor=1)
    return {d: extract_features(ExtractConfig(domain_dir=str(data / d), domain=d, encoder=spec, pool=pool,
                                              chunk_size=128, progress=progress)) for d in domains}


def write_shards(data: Path, out: Path, domains: tuple[str, ...]) -> None:
    for d in domains:
        dom = load_domain(data / d, d, list(FEATURES))
        write_domain_shards(dom, out / d, samples_per_shard=2000, feature_suffixes=list(FEATURES),
                            show_progress=False)


def pretrain(shards: Path, sources: tuple[str, ...], run: Path, ranks: int, epochs: int) -> dict[str, Any]:
    """``deepspeed --num_accelerators RANKS launcher/pretrain.py`` (ZeRO-2, CPU), then the export."""
    args = ["--deepspeed_config", str(REPO / "cluster_configs/zero2.json"),
            "--data", ",".join(str(shards / d) for d in sources), "--output-dir", str(run), "--quiet",
            "--set", f"epochs={epochs}", "--set", "batch_size=64", "--resume"]
    for s in MODEL:
        args += ["--set", s.removeprefix("data.")]
    cmd = launch_command(str(REPO / "launcher" / "pretrain.py"), args, ranks)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    log.info("    %s", " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    (run / "launcher.log").parent.mkdir(parents=True, exist_ok=True)
    (run / "launcher.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise StageFailedError(f"pre-training failed (exit {proc.returncode}); see {run / 'launcher.log'}:\n"
                           f"{proc.stderr[-3000:]}")
    return export_checkpoint(run, run / "backbone.pt")


def run_demo(cfg: DemoConfig = DemoConfig(), progress: bool = True) -> dict[str, Any]:
    """Run every stage; returns the results (also written to ``out/results.json`` and ``results.md``)."""
    import ray

    out = Path(cfg.out)
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    cat = cfg.catalogue
    sources, targets = cat.source_domains, cat.target_domains

    def lap(name: str, t: float) -> None:
        times[name] = round(time.perf_counter() - t, 1)
        log.info("    done in %.1fs", times[name])

    _stage(1, f"synthetic catalogue: {', '.join(cat.domains)} (sources {', '.join(sources)}) -> {out / 'catalogue'}")
    t = time.perf_counter()
    generate_catalogue(out / "catalogue", cat)
    lap("catalogue", t)
    _stage(2, f"raw files -> prepared atomic files -> {out / 'data'}")
    t = time.perf_counter()
    prepared = prepare_domains(out / "catalogue", out, cat.domains)
    lap("prepare", t)
    _stage(3, f"fitting a tiny open_clip model on the source domains' text-image pairs ({cfg.clip_steps} steps)")
    t = time.perf_counter()
    clip = fit_clip(out / "data", sources, out / "clip", cfg.clip_steps, progress)
    lap("clip", t)
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        _stage(4, f"Ray extraction with {cfg.num_cpus} actors: text and image features of every item")
        t = time.perf_counter()
        extracted = extract_all(out / "data", cat.domains, clip, cfg.num_cpus, progress)
        lap("extract", t)
        _stage(5, f"sequence shards -> {out / 'shards'}")
        t = time.perf_counter()
        write_shards(out / "data", out / "shards", cat.domains)
        lap("shards", t)
        _stage(6, f"DeepSpeed pre-training on {', '.join(sources)} with {cfg.ranks} ranks (ZeRO-2, gloo)")
        t = time.perf_counter()
        exported = pretrain(out / "shards", sources, out / "pretrain", cfg.ranks, cfg.pretrain_epochs)
        lap("pretrain", t)
        _stage(7, f"fan-out fine-tuning on {', '.join(targets)}: {', '.join(cfg.settings)}, with and without "
                  "pre-training, as Ray tasks")
        t = time.perf_counter()
        base = build(RunConfig, [], [
            f"data.data_root={out / 'shards'}", f"data.features=[{','.join(FEATURES)}]",
            f"pretrained={exported['out']}", f"train.epochs={cfg.epochs}", "train.progress=false", *MODEL, *FINETUNE,
        ])
        fan = run_fanout(FanoutConfig(domains=targets, settings=cfg.settings, output_dir=str(out / "finetune"),
                                      compare_scratch=True, cpus_per_job=1, progress=progress), base)
        lap("finetune", t)
    finally:
        ray.shutdown()
    _stage(8, f"interest picture and TensorBoard projector -> {out / 'interests.png'}")
    t = time.perf_counter()
    picture = interest_picture(out / "finetune" / targets[0] / "inductive", out / "interests.png", out / "tb")
    lap("picture", t)
    result = {
        "table": fan["markdown"], "failed": fan["failed"], "seconds": round(time.perf_counter() - t0, 1),
        "stage_seconds": times, "prepared": {d: s.get("counts", s) for d, s in prepared.items()},
        "features": {d: {k: v for k, v in m.items() if k in ("items", "dim", "counts", "seconds")}
                     for d, m in extracted.items()},
        "pretrain": exported, "picture": picture, "results": str(out / "finetune" / "results.md"),
    }
    write_json(out / "results.json", result)
    (out / "results.md").write_text(fan["markdown"] + "\n")
    return result
