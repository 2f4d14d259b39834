"""The real transfer experiment: pre-train on four Amazon source domains, transfer to Scientific.

Stages (each writes files the next one reads, and each is skipped when its output is complete, so a rerun
continues where an interrupted one stopped):

1. prepare: the sources in their published formats (Games: a RecBole ``.inter`` + ``.item``; Beauty, Sports,
   Toys: ``user_sequence.txt`` + ``item_names.txt``) become atomic domain folders (``prepare_data.py unisrec /
   sequences``); Scientific is read as it is (the quick run cuts every domain to its first users);
2. extract: all-MiniLM-L6-v2 text features of every item of every domain with the Ray actor pool (with
   ``centre_features``, each domain centred on its mean row);
3. shards: WebDataset sequence shards per domain with their feature table;
4. pre-train: DeepSpeed (ZeRO-2, 2 ranks) on the four sources together (domains mixed by size), then export;
5. zero-shot: the pre-trained backbone on Scientific's test split, its adapters as pre-trained, no fine-tuning;
6. fine-tune: Scientific, inductive (text) and transductive (text + ID), from the backbone and from scratch,
   and SASRec, as Ray fan-outs, one per seed and model variant (the toolkit's defaults; the paper's model);
7. table: means over seeds, pre-trained against scratch tested (Welch), a popularity ranking beside them.

``python launcher/transfer.py [--quick]`` (``make transfer`` / ``make transfer-quick``) prints the table's JSON
as its last line.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from missrec.config import RunConfig, build
from missrec.data.atomic import INTER_HEADER, TEXT_HEADER, iter_table, load_domain, read_index_map
from missrec.data.prepare import prepare_sequences, prepare_unisrec
from missrec.data.shard_writer import write_domain_shards
from missrec.data.shards import ShardSource, shards_exist
from missrec.errors import ConfigError, StageFailedError
from missrec.eval.metrics import RankingMetrics
from missrec.eval.seeds import compare_groups, comparison_json
from missrec.features.encode import EncoderSpec
from missrec.features.job import ExtractConfig, extract_features
from missrec.features.pool import PoolConfig
from missrec.io import write_json
from missrec.train.dist import launch_command
from missrec.train.export import export_checkpoint
from missrec.transfer.fanout import FanoutConfig, run_fanout
from missrec.transfer.finetune import run_finetune

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
SUFFIX = "minilm"
TARGET = "Scientific"
# domain -> (reader, history file, item text file), paths under the sources folder
SOURCES: dict[str, tuple[str, str, str]] = {
    "Games": ("unisrec", "games/Games-6k.test.inter", "games/Games-6k.item"),
    "Beauty": ("sequences", "beauty/user_sequence.txt", "beauty/item_names.txt"),
    "Sports": ("sequences", "sports/user_sequence.txt", "sports/item_names.txt"),
    "Toys": ("sequences", "toys/user_sequence.txt", "toys/item_names.txt"),
}
ROWS = ("zero-shot", "inductive-pretrained", "inductive-scratch", "transductive-pretrained",
        "transductive-scratch", "sasrec", "popularity")
METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
# model variants: the toolkit's defaults (history offset and affinity chosen on validation) and the paper's model
VARIANTS: dict[str, list[str]] = {
    "defaults": ["sasrec.history_bias=true"],
    "paper": ["missrec.history_bias=false"],
}


@dataclass(frozen=True)
class TransferConfig:
    out: str = "runs/transfer"
    sources_root: str = "../shared/datasets/sources"
    target_root: str = "../shared/datasets/scientific"
    users_per_domain: int = 0  # > 0: only each domain's first users (the quick run)
    seeds: tuple[int, ...] = (2020, 1, 2)
    variants: tuple[str, ...] = ("defaults", "paper")
    settings: tuple[str, ...] = ("inductive", "transductive", "sasrec")  # fine-tuning settings per fan-out
    pretrain_epochs: int = 3
    pretrain_batch: int = 256  # per rank
    ranks: int = 2
    num_cpus: int = 2
    extract_actors: int = 2
    # each domain's text features centred on its mean row (missrec.features.job): zero-shot R@10 0.0656 -> 0.0900,
    # fine-tuned rows +0.003 R@10 from the backbone and from scratch alike (docs/experiments.md section 6)
    centre_features: bool = True
    model: tuple[str, ...] = ()  # model overrides shared by pre-training and fine-tuning (missrec.* keys)
    finetune: tuple[str, ...] = ()  # fine-tuning overrides
    pretrain: tuple[str, ...] = ()  # pre-training overrides

    @property
    def domains(self) -> tuple[str, ...]:
        return (*SOURCES, TARGET)


QUICK = TransferConfig(
    out="runs/transfer-quick", users_per_domain=400, seeds=(2020,), variants=("defaults",), pretrain_epochs=1,
    pretrain_batch=64, extract_actors=0,
    model=("missrec.hidden=32", "missrec.inner=64", "missrec.heads=2"),
    finetune=("train.epochs=2", "train.batch_size=128", "data.max_len=20"),
    pretrain=("max_len=20", "num_workers=1"),
)


@dataclass
class Stages:
    """Wall seconds of each stage of this run (a skipped stage counts its check only)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Any, *args: Any) -> Any:
        log.info("[transfer] %s", name)
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        log.info("[transfer] %s done in %.1fs", name, self.seconds[name])
        return out


# ---------------------------------------------------------------------------------------------- data
def _head(src: Path, dst: Path, lines: int, header: bool) -> Path:
    """The first ``lines`` records of a text file (after its header line when ``header``)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for i, line in enumerate(fin):
            if i >= lines + int(header):
                break
            fout.write(line)
    return dst


def prepare(cfg: TransferConfig) -> dict[str, Any]:
    """Sources (and, in a sliced run, Scientific) as atomic domain folders under ``OUT/data``."""
    out, src = Path(cfg.out), Path(cfg.sources_root)
    done = {}
    for name, (reader, hist, text) in SOURCES.items():
        folder = out / "data" / name
        if (folder / f"{name}.prepare.json").exists():
            done[name] = json.loads((folder / f"{name}.prepare.json").read_text())
            continue
        hist_path = src / hist
        if cfg.users_per_domain:
            hist_path = _head(hist_path, out / "raw" / name / Path(hist).name, cfg.users_per_domain,
                              header=reader == "unisrec")
        fn = prepare_unisrec if reader == "unisrec" else prepare_sequences
        # Beauty names one item with an empty name: it is dropped from the histories (counted in prepare.json)
        done[name] = fn(hist_path, src / text, name, out / "data", drop_textless=True)
    if cfg.users_per_domain:
        done[TARGET] = slice_atomic(Path(cfg.target_root), TARGET, out / "data" / TARGET, cfg.users_per_domain)
    return {d: v.get("counts", v) if isinstance(v, dict) else v for d, v in done.items()}


def slice_atomic(src: Path, name: str, dst: Path, users: int) -> dict[str, int]:
    """The rows of users ``0 .. users - 1`` of an atomic domain, items re-indexed to those they use."""
    if (dst / f"{name}.text").exists():
        return {"users": users}
    dst.mkdir(parents=True, exist_ok=True)
    rows = {}
    for split in ("train", "valid", "test"):
        kept = []
        for _, (user, hist, target) in iter_table(src / f"{name}.{split}.inter", INTER_HEADER, 3,
                                                  "user_id, item_id_list, item_id"):
            if int(user) < users:
                kept.append((user, hist.split(), target))
        rows[split] = kept
    used = sorted({int(i) for split in rows.values() for _, h, t in split for i in (*h, t)})
    new = {old: i for i, old in enumerate(used)}
    for split, kept in rows.items():
        with open(dst / f"{name}.{split}.inter", "w", encoding="utf-8") as fh:
            fh.write(INTER_HEADER + "\n")
            for user, hist, target in kept:
                fh.write(f"{user}\t{' '.join(str(new[int(i)]) for i in hist)}\t{new[int(target)]}\n")
    raw = read_index_map(src / f"{name}.item2index")
    texts = {r: t for _, (r, t) in iter_table(src / f"{name}.text", TEXT_HEADER, 2, "item_id, text")}
    with open(dst / f"{name}.item2index", "w", encoding="utf-8") as fh:
        fh.writelines(f"{raw[old]}\t{new[old]}\n" for old in used)
    with open(dst / f"{name}.text", "w", encoding="utf-8") as fh:
        fh.write(TEXT_HEADER + "\n")
        fh.writelines(f"{raw[old]}\t{texts[raw[old]]}\n" for old in used)
    return {"users": users, "items": len(used), **{s: len(v) for s, v in rows.items()}}


def domain_dir(cfg: TransferConfig, name: str) -> Path:
    if name == TARGET and not cfg.users_per_domain:
        return Path(cfg.target_root)
    return Path(cfg.out) / "data" / name


def extract(cfg: TransferConfig) -> dict[str, Any]:
    """MiniLM text features of every domain with a pool of Ray actors (chunks already written are kept)."""
    spec = EncoderSpec(backend="sentence-transformers", model="all-MiniLM-L6-v2", device="cpu", torch_threads=1,
                       batch_size=128)
    pool = PoolConfig(num_actors=cfg.extract_actors, num_cpus_per_actor=1) if cfg.extract_actors else None
    out = {}
    for name in cfg.domains:
        folder = Path(cfg.out) / "features" / name
        meta = folder / f"{name}.{SUFFIX}.json"
        if meta.exists():
            done = json.loads(meta.read_text())
            if done.get("normalisation", "none").startswith("centred") != cfg.centre_features:
                raise ConfigError(f"{meta} holds features with normalisation {done.get('normalisation')!r}, "
                                  f"this run asks centre_features={cfg.centre_features}: every later stage "
                                  "depends on them, so use another --out")
            out[name] = done.get("items_per_second")
            continue
        m = extract_features(ExtractConfig(str(domain_dir(cfg, name)), name, spec, pool, out_dir=str(folder),
                                           chunk_size=1024, text_suffix=SUFFIX, centre=cfg.centre_features,
                                           progress=False))
        out[name] = m.get("items_per_second")
    return out


def shards(cfg: TransferConfig) -> dict[str, int]:
    out = {}
    for name in cfg.domains:
        folder = Path(cfg.out) / "shards" / name
        if not shards_exist(folder):
            dom = load_domain(domain_dir(cfg, name), name, [SUFFIX], feature_dir=Path(cfg.out) / "features" / name)
            write_domain_shards(dom, folder, samples_per_shard=10_000 if not cfg.users_per_domain else 500,
                                feature_suffixes=[SUFFIX], show_progress=False)
        out[name] = ShardSource(folder).num_rows("train")
    return out


# ---------------------------------------------------------------------------------------------- training
def pretrain(cfg: TransferConfig) -> dict[str, Any]:
    """DeepSpeed pre-training on the four sources (``--resume``: an interrupted run continues), then export."""
    run = Path(cfg.out) / "pretrain"
    backbone = run / "backbone.pt"
    if (run / "metrics.json").exists() and backbone.exists():
        return json.loads((run / "metrics.json").read_text())
    args = ["--deepspeed_config", str(REPO / "cluster_configs/zero2.json"), "--data",
            ",".join(str(Path(cfg.out) / "shards" / d) for d in SOURCES), "--output-dir", str(run), "--quiet",
            "--resume"]
    for s in (f"epochs={cfg.pretrain_epochs}", f"batch_size={cfg.pretrain_batch}", f"features=[{SUFFIX}]",
              "threads=1", *cfg.model, *cfg.pretrain):
        args += ["--set", s]
    cmd = launch_command(str(REPO / "launcher" / "pretrain.py"), args, cfg.ranks)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "launcher.log", "w", encoding="utf-8") as logf:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise StageFailedError(f"pre-training failed (exit {proc.returncode}); see {run / 'launcher.log'}")
    export_checkpoint(run, backbone)
    return json.loads((run / "metrics.json").read_text())


def _base(cfg: TransferConfig, seed: int, variant: str, extra: list[str] = ()) -> Any:
    return build(RunConfig, [], [
        f"data.data_root={Path(cfg.out) / 'shards'}", f"data.features=[{SUFFIX}]",
        f"pretrained={Path(cfg.out) / 'pretrain' / 'backbone.pt'}", f"train.seed={seed}", "train.progress=false",
        *cfg.model, *cfg.finetune, *VARIANTS[variant], *extra])


def zero_shot(cfg: TransferConfig) -> dict[str, float]:
    """The pre-trained backbone ranks Scientific's test items as it is: its adapters, no fine-tuning step."""
    from dataclasses import replace

    run = Path(cfg.out) / "zero-shot"
    if (run / "metrics.json").exists():
        return json.loads((run / "metrics.json").read_text())["test"]
    base = _base(cfg, cfg.seeds[0], "paper", ["model=missrec", "missrec.mode=inductive", f"data.domain={TARGET}"])
    cfg0 = replace(base, output_dir=str(run), train=replace(base.train, epochs=0))
    return run_finetune(cfg0)["test"]


def finetune(cfg: TransferConfig) -> dict[str, dict[int, dict[str, float]]]:
    """Every (variant, seed) fan-out; returns {run name: {seed: test metrics}} (run names as in the fan-out,
    prefixed by the variant)."""
    import ray

    out: dict[str, dict[int, dict[str, float]]] = {}
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        for variant in cfg.variants:
            for seed in cfg.seeds:
                fan = run_fanout(FanoutConfig(
                    domains=(TARGET,), settings=tuple(cfg.settings),
                    output_dir=str(Path(cfg.out) / "finetune" / variant / f"seed{seed}"), compare_scratch=True,
                    cpus_per_job=1, progress=False), _base(cfg, seed, variant))
                for row in fan["jobs"]:
                    if row["status"] not in ("ok", "skipped") or not row.get("test"):
                        raise StageFailedError(f"fine-tuning job {row['run']} of {variant}/seed {seed} failed: "
                                           f"{row.get('error', '')}; log {row.get('log', '')}")
                    out.setdefault(f"{variant}/{row['run']}", {})[seed] = row["test"]
    finally:
        ray.shutdown()
    return out


def popularity(cfg: TransferConfig) -> dict[str, float]:
    """Every test user gets the items ranked by how often they are a training target (ties at random)."""
    import torch

    src = ShardSource(Path(cfg.out) / "shards" / TARGET)
    counts = torch.zeros(src.num_items, dtype=torch.float64)
    for b in src.batches("train", 4096, shuffle=False):
        counts += torch.bincount(b.target, minlength=src.num_items).double()
    scores = counts + torch.rand(src.num_items, generator=torch.Generator().manual_seed(0)) * 1e-3
    metrics = RankingMetrics((10, 50))
    for b in src.batches("test", 4096, shuffle=False):
        metrics.update(scores.expand(len(b), -1), b.target)
    return metrics.compute()


def table(cfg: TransferConfig, zero: dict[str, float], runs: dict[str, dict[int, dict[str, float]]],
          pop: dict[str, float]) -> dict[str, Any]:
    """Means over seeds per row and variant, and pre-trained against scratch (Welch's t-test over seeds)."""
    def mean(group: dict[int, dict[str, float]]) -> dict[str, float]:
        return {m: round(sum(r[m] for r in group.values()) / len(group), 4) for m in METRICS}

    variants: dict[str, dict[str, Any]] = {}
    for variant in cfg.variants:
        rows: dict[str, Any] = {"zero-shot": {m: round(zero[m], 4) for m in METRICS}}
        for name in ("inductive", "inductive-scratch", "transductive", "transductive-scratch", "sasrec"):
            group = runs.get(f"{variant}/{name}")
            if group:
                key = name if name.endswith("scratch") or name == "sasrec" else f"{name}-pretrained"
                rows[key] = {**mean(group), "seeds": len(group)}
        rows["popularity"] = {m: round(pop[m], 4) for m in METRICS}
        tests = {}
        for mode in ("inductive", "transductive"):
            a, b = runs.get(f"{variant}/{mode}"), runs.get(f"{variant}/{mode}-scratch")
            if a and b and len(a) > 1 and len(b) > 1:
                tests[mode] = comparison_json(compare_groups(list(a.values()), list(b.values()), METRICS))
        variants[variant] = {"rows": {k: rows[k] for k in ROWS if k in rows}, "pretrained_vs_scratch": tests}
    return variants


def markdown(variants: dict[str, Any], stages: dict[str, float]) -> str:
    lines = []
    for variant, body in variants.items():
        lines += [f"### {variant}", "", "| row | R@10 | N@10 | R@50 | N@50 | seeds |", "| --- | --- | --- | --- | --- | --- |"]
        for name, r in body["rows"].items():
            lines.append(f"| {name} | " + " | ".join(f"{r[m]:.4f}" for m in METRICS) + f" | {r.get('seeds', '')} |")
        for mode, test in body["pretrained_vs_scratch"].items():
            lines.append("")
            lines.append(f"{mode}, pre-trained - scratch: " + ", ".join(
                f"{m} {t['diff']:+.4f} (p {t['p']:.3g})" if t["p"] is not None else f"{m} {t['diff']:+.4f}"
                for m, t in test.items()))
        lines.append("")
    lines.append("stage seconds: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    return "\n".join(lines) + "\n"


def run_transfer(cfg: TransferConfig) -> dict[str, Any]:
    """Every stage (skipping those already complete); writes ``OUT/table.json`` and ``OUT/table.md``."""
    import ray

    stages = Stages()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = stages.run("prepare", prepare, cfg)
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        rates = stages.run("extract", extract, cfg)
    finally:
        ray.shutdown()
    rows = stages.run("shards", shards, cfg)
    pre = stages.run("pretrain", pretrain, cfg)
    zero = stages.run("zero-shot", zero_shot, cfg)
    runs = stages.run("finetune", finetune, cfg)
    pop = stages.run("popularity", popularity, cfg)
    variants = table(cfg, zero, runs, pop)
    result = {
        "rows": variants[cfg.variants[0]]["rows"], "variants": variants, "stage_seconds": stages.seconds,
        "prepared": prepared, "extract_items_per_second": rates, "train_rows": rows,
        "pretrain": {k: pre.get(k) for k in ("world_size", "global_batch", "epochs", "global_step",
                                               "seq_per_second", "wall_seconds", "time_seconds")},
        "per_seed": {k: {str(s): v for s, v in g.items()} for k, g in runs.items()},
    }
    write_json(out / "table.json", result)
    (out / "table.md").write_text(markdown(variants, stages.seconds))
    return result
