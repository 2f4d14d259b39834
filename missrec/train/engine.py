"""The DeepSpeed engine: the config actually used (engine settings from JSON + the toolkit's batch and
optimizer settings injected), and the engine around a model.

``cluster_configs/*.json`` hold engine settings only (ZeRO stage, precision, communication). Batch
sizes, learning rate and clipping come from :class:`~missrec.config.PretrainConfig`; a JSON that sets
one of them to a different value is a :class:`~missrec.errors.ConfigError` (the same value is accepted).
The optimizer is AdamW with ``torch_adam`` (PyTorch's implementation), so no DeepSpeed op has to be
compiled on any machine.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from missrec.config import PretrainConfig, load_file
from missrec.errors import ConfigError

log = logging.getLogger(__name__)

_ZERO_STAGES = (0, 1, 2, 3)


def read_ds_config(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed JSON at ``path`` (errors name the file and, for bad JSON, the line)."""
    return load_file(path, "the DeepSpeed config", json_only=True)


def _agree(path: str, cfg: dict[str, Any], key: str, value: Any) -> None:
    if key in cfg and cfg[key] != value and cfg[key] != "auto":
        raise ConfigError(
            f"{path}: {key}={cfg[key]!r} disagrees with the toolkit's value {value!r}; batch sizes and "
            "optimizer settings come from the toolkit config (--set ...), remove it from the JSON"
        )
    cfg[key] = value


def deepspeed_config(
    engine: Mapping[str, Any], cfg: PretrainConfig, world_size: int, source: str = "<deepspeed config>"
) -> dict[str, Any]:
    """The DeepSpeed config actually used: ``engine`` settings + the injected batch and optimizer
    settings of ``cfg`` for ``world_size`` data-parallel ranks. Does not modify ``engine``."""
    out = copy.deepcopy(dict(engine))
    _agree(source, out, "train_micro_batch_size_per_gpu", cfg.batch_size)
    _agree(source, out, "gradient_accumulation_steps", 1)
    _agree(source, out, "train_batch_size", cfg.batch_size * world_size)
    if cfg.grad_clip > 0:
        _agree(source, out, "gradient_clipping", cfg.grad_clip)
    zero = out.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in _ZERO_STAGES:
        raise ConfigError(f"{source}: zero_optimization.stage must be one of {_ZERO_STAGES}")
    opt = out.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"{source}: optimizer.type must be AdamW or Adam, got {opt.get('type')!r}")
    params = opt.setdefault("params", {})
    _agree(source, params, "lr", cfg.lr)
    _agree(source, params, "weight_decay", cfg.weight_decay)
    params.setdefault("torch_adam", True)
    if cfg.warmup_steps > 0:
        sched = out.setdefault("scheduler", {"type": "WarmupLR", "params": {}})
        sp = sched.setdefault("params", {})
        _agree(source, sp, "warmup_num_steps", cfg.warmup_steps)
        _agree(source, sp, "warmup_max_lr", cfg.lr)
        sp.setdefault("warmup_min_lr", 0.0)
    out.setdefault("steps_per_print", 10**9)  # our own logging reports progress
    out.setdefault("wall_clock_breakdown", False)
    return out


def zero_stage(ds_config: Mapping[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def bf16_enabled(ds_config: Mapping[str, Any]) -> bool:
    return bool(ds_config.get("bf16", {}).get("enabled", False))


def init_engine(model: nn.Module, ds_config: Mapping[str, Any]) -> Any:
    """``deepspeed.initialize`` over the trainable parameters of ``model``; returns the engine."""
    try:
        import deepspeed
    except ImportError as e:  # pragma: no cover - deepspeed is a core dependency
        raise ImportError("pre-training needs DeepSpeed: `pip install deepspeed==0.19.8`") from e
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=dict(ds_config))
    log.info("DeepSpeed engine: ZeRO-%d, bf16=%s, %d trainable tensors", zero_stage(ds_config),
             bf16_enabled(ds_config), len(params))
    return engine
