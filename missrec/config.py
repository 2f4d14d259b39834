"""Typed configuration for every stage: defaults in dataclasses, small diffs from YAML/JSON and dotted overrides.

A run's config is ``default -> file (optional) -> --set key.sub=value overrides``; the merged result is
written into the run folder. Configs are frozen: every change makes a new object.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from missrec.errors import ConfigError
from missrec.interests.config import InterestConfig

T = TypeVar("T")

@dataclass(frozen=True)
class DataConfig:
    """Where a domain's data lives. ``data_root`` holds atomic files or a shard folder per domain."""

    data_root: str = ""
    domain: str = ""
    features: tuple[str, ...] = ()  # feature-file suffixes, e.g. ("feat1CLS", "feat3CLS")
    feature_dir: str = ""  # where the feature files live when not beside the atomic files
    max_len: int = 50
    num_workers: int = 0  # shard-reader worker processes
    skip_bad_shards: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """The training loop. Batch sizes are per process; the global batch is ``batch_size * world_size``."""

    epochs: int = 200
    batch_size: int = 512
    eval_batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    seed: int = 2020
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    # MISSRec's item feature tables up to this size (MiB, as float32) are cached on the training device; larger
    # ones stay memory-mapped on the host and every step streams them through the adapters
    feature_cache_mib: int = 4096
    grad_clip: float = 0.0  # 0 = off
    # a NaN/inf loss: "error" stops at the next logging sync naming the step (which was applied), "skip" checks
    # every step (a host sync each) and skips such steps, counted
    nonfinite: str = "error"
    max_steps_per_epoch: int = 0  # 0 = whole epoch (a cap for smoke runs)
    eval_every: int = 1
    progress: bool = True


@dataclass(frozen=True)
class SASRecConfig:
    """SASRec (Kang & McAuley 2018) with the UniSRec-baseline settings of the paper's table (a loss at the last
    position of every prefix row, as RecBole trains it)."""

    hidden: int = 300
    layers: int = 2
    heads: int = 2
    inner: int = 256
    dropout: float = 0.5
    attn_dropout: float = 0.5
    # the history terms chosen at each validation (eval/policy.py), as missrec.history_bias / history_affinity
    # (cosines of item embeddings); false: plain SASRec, the paper's baseline
    history_bias: bool = False
    history_affinity: bool = True


@dataclass(frozen=True)
class MISSRecConfig:
    """The interest-aware encoder-decoder; defaults follow the official code's fine-tuning settings, plus the history
    terms chosen on validation (``configs/paper.yaml`` drops them: the paper's model)."""

    hidden: int = 300
    encoder_layers: int = 1
    decoder_layers: int = 1
    heads: int = 4
    inner: int = 256
    dropout: float = 0.5
    attn_dropout: float = 0.5
    adapter: str = "linear"  # linear | moe
    moe_experts: int = 8
    mode: str = "transductive"  # transductive (with item IDs) | inductive (no IDs)
    temperature: float = 0.07
    # interest discovery: method (dpc_knn | kmeans), cluster_ratio (clusters = ratio x item tokens), knn, assign
    # (parent | nearest_centre, the official code's), the approximate kNN (approx_threshold, nprobe, nlist, ...),
    # use_gpu, scratch_dir, sample_tokens: every field of missrec.interests.InterestConfig (its seed is the run's)
    interests: InterestConfig = field(default_factory=InterestConfig)
    interest_weight: float = 1e-4  # weight of the interest regulariser
    # false: the ablation without interests (no MID, no interest encoder, the decoder without cross-attention;
    # fine-tuning only)
    use_interests: bool = True
    fusion: str = "dynamic"  # dynamic | mean
    final_norm: bool = False  # LayerNorm after the encoder and decoder stacks (as nn.Transformer has: configs/official.yaml)
    # interest regulariser: mean (of the real interests' outputs, over the batch) | official (the official code's:
    # every slot's output summed, padded ones and its padding-id slot included, times the real fraction, summed over
    # the batch: configs/official.yaml)
    interest_reg: str = "mean"
    # the history terms of the ranking (eval/policy.py), chosen at each validation on the selection metric: an
    # offset for the items already in the user's history, and w x each item's largest cosine to one of them (the
    # history affinity); false / false: the paper's model's ranking
    history_bias: bool = True
    history_affinity: bool = True
    pretrained_trainable: str = "adapters"  # with --pretrained: adapters (frozen backbone) | all

    def __post_init__(self) -> None:
        if self.interest_reg not in ("mean", "official"):
            raise ConfigError(f"missrec.interest_reg must be 'mean' or 'official', got {self.interest_reg!r}")


@dataclass(frozen=True)
class RunConfig:
    """One fine-tuning / training run."""

    model: str = "sasrec"  # sasrec | missrec
    output_dir: str = "runs/default"
    pretrained: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    missrec: MISSRecConfig = field(default_factory=MISSRecConfig)


@dataclass(frozen=True)
class PretrainConfig:
    """Multi-domain, ID-agnostic pre-training (DeepSpeed). Batch sizes live here and are injected into
    the DeepSpeed config, which holds engine settings only (ZeRO stage, precision, communication)."""

    data: tuple[str, ...] = ()  # domain shard folders
    domain_weights: tuple[float, ...] = ()  # sampling weight per domain; empty: proportional to rows
    features: tuple[str, ...] = ("feat1CLS", "feat3CLS")
    output_dir: str = "runs/pretrain"  # on a file system every node sees (checkpoints, interest index files)
    deepspeed_config: str = "cluster_configs/zero2.json"
    max_len: int = 50
    epochs: int = 10
    batch_size: int = 256  # per rank; the global batch is batch_size * world_size
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 = off
    seed: int = 2020
    drop_prob: float = 0.2  # item-drop augmentation for the sequence-sequence loss
    seq_seq_weight: float = 0.1
    # logical data streams (0: the world size; else a multiple of it): stream s reads shards s, s + S, ... of each
    # domain, so the global batch is the same for every number of ranks that divides S (data/pretrain_stream.py)
    streams: int = 0
    num_workers: int = 2  # DataLoader workers per rank that read shards and assemble batches (0: the rank itself)
    prefetch: int = 2  # batches each worker assembles ahead
    shuffle_buffer: int = 10000  # records shuffled in each reader's buffer
    log_every: int = 20  # steps between the host syncs that log the losses and check them for NaN/inf
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    keep_checkpoints: int = 2
    max_steps_per_epoch: int = 0  # 0 = whole epoch (a cap for smoke runs)
    # a NaN/inf loss: "error" stops at the next log_every sync naming the first such step (which was applied);
    # "skip" checks every step before applying it (one host sync per step) and skips it on every rank
    nonfinite: str = "error"
    threads: int = 0  # torch intra-op threads per rank; 0 = leave torch's default
    progress: bool = True
    trace_samples: bool = False  # record each rank's trained rows per step in RUN/trace/ (train/trace.py)
    skip_bad_shards: bool = False  # a corrupt shard: skip the rest of it (logged, counted) instead of stopping
    missrec: MISSRecConfig = field(
        default_factory=lambda: MISSRecConfig(mode="inductive", interests=InterestConfig(cluster_ratio=0.02))
    )


# ------------------------------------------------------------------------------------------- loading


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-able dict of a (nested) config dataclass."""
    out = dataclasses.asdict(cfg)
    return json.loads(json.dumps(out))


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build ``cls`` from a (partial) mapping; unknown keys and wrong types are ``ConfigError``s."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def merge(cfg: T, diff: Mapping[str, Any], where: str = "") -> T:
    """A copy of ``cfg`` with the (nested) values of ``diff`` applied."""
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in diff.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"{path}: unknown key; known: {sorted(names)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = merge(current, value, path)
        else:
            changes[key] = _coerce(hints[key], value, path)
    return dataclasses.replace(cfg, **changes)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "data.features=[feat1CLS,feat3CLS]"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_file(path: str | Path, what: str = "config", json_only: bool = False) -> dict[str, Any]:
    """Read a YAML or JSON mapping (``json_only``: JSON whatever the suffix); errors name the file and,
    for a syntax error, the line. ``what`` names the kind of file in the messages."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e})") from e
    try:
        data = json.loads(text) if json_only or path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if data is None and not json_only:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (a JSON object)")
    return data


def build(cls: type[T], files: Sequence[str | Path] = (), overrides: Sequence[str] = (), base: T | None = None) -> T:
    """Default (or ``base``) -> each file's diff -> dotted overrides."""
    cfg = base if base is not None else cls()
    for f in files:
        diff = load_file(f)  # its errors already name the file
        try:
            cfg = merge(cfg, diff)
        except ConfigError as e:
            raise ConfigError(f"{f}: {e}") from None
    if overrides:
        cfg = merge(cfg, parse_overrides(overrides))
    return cfg


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (elem, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(elem, v, where) for v in value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value
