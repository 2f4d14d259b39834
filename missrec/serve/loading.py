"""Load a fine-tuning run folder for serving: its config, its domain's item table, the model and weights.

A run folder (written by :func:`missrec.transfer.finetune.run_finetune`) holds ``config.json`` (the
merged :class:`~missrec.config.RunConfig`) and ``best.pt`` (``{"model": state_dict, "epoch", "valid", "policy"}``,
the best-validation state, with MISSRec's interest index as the ``item_interest`` / ``centroids`` buffers, and
the scoring policy chosen with it). The model is rebuilt from the config without touching ``pretrained``: ``best.pt`` holds every
tensor, frozen backbone included.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from missrec.config import RunConfig, from_dict
from missrec.data.atomic import read_index_map, read_text
from missrec.errors import ConfigError, InputError, MissingInputError
from missrec.eval.policy import ScoringPolicy
from missrec.models.build import build_sasrec, missrec_from_config
from missrec.transfer.finetune import DomainData

log = logging.getLogger(__name__)

INTEREST_KEYS = ("item_interest", "centroids")


@dataclass
class LoadedRun:
    """A run ready to serve. ``raw_ids`` / ``texts`` [num_items] index the domain's items; ``data`` is the
    run's :class:`~missrec.transfer.finetune.DomainData` (its splits give example histories)."""

    run_dir: Path
    cfg: RunConfig
    model: nn.Module
    data: Any
    raw_ids: list[str]
    texts: list[str]
    epoch: int | None
    policy: ScoringPolicy


def read_run_config(run_dir: str | Path, data_root: str | None = None) -> RunConfig:
    """``RUN/config.json`` as a :class:`RunConfig` (``data_root`` replaces the recorded data folder)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise MissingInputError(f"{path}: not found; is {run_dir} a fine-tuning run folder?")
    try:
        cfg = from_dict(RunConfig, json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ConfigError) as e:
        raise ConfigError(f"{path}: {e}") from e
    if data_root:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_root=str(data_root)))
    return cfg


def item_table(data: Any) -> tuple[list[str], list[str]]:
    """Raw item ids and texts [num_items] of a loaded domain (index strings / empty texts when absent)."""
    n = int(data.num_items)
    raw_ids: list[str] | None = None
    texts: list[str] | None = None
    if data.domain is not None:
        raw_ids, texts = data.domain.item_ids, data.domain.texts
    elif data.shards is not None:
        ids_path, text_path = data.shards.table_path("item2index"), data.shards.table_path("text")
        raw_ids = read_index_map(ids_path) if ids_path is not None and ids_path.exists() else None
        if text_path is not None and text_path.exists():
            texts = read_text(text_path, raw_ids, n)
    if raw_ids is None:
        log.warning("%s: no item2index table; raw ids are the item indices", data.source)
        raw_ids = [str(i) for i in range(n)]
    if texts is None:
        texts = [""] * n
    if len(raw_ids) != n or len(texts) != n:
        raise InputError(f"{data.source}: item table has {len(raw_ids)} ids / {len(texts)} texts for {n} items")
    return list(raw_ids), list(texts)


def build_serving_model(cfg: RunConfig, data: Any) -> nn.Module:
    """An untrained model of the run's architecture over the domain's items (no backbone loading)."""
    if cfg.model == "sasrec":
        return build_sasrec(cfg.sasrec, data.num_items, cfg.data.max_len)
    if cfg.model == "missrec":
        missing = [s for s in cfg.data.features if s not in data.features]
        if not cfg.data.features or missing:
            raise ConfigError(f"MISSRec run needs feature tables {list(cfg.data.features)}; missing {missing}")
        feats = [data.features[s] for s in cfg.data.features]
        return missrec_from_config(cfg.missrec, data.num_items, feats, cfg.data.max_len, cfg.train.seed)
    raise ConfigError(f"unknown model {cfg.model!r}: expected 'sasrec' or 'missrec'")


def load_weights(model: nn.Module, path: Path) -> tuple[int | None, ScoringPolicy]:
    """Load ``best.pt`` into ``model`` (every parameter must be there); returns the epoch it was saved at and the
    scoring policy chosen with it (a checkpoint that kept the history terms as model buffers, ``history_bias`` in
    cosine units and ``affinity_weight``, gives them as a policy)."""
    if not path.exists():
        raise MissingInputError(f"{path}: no best-validation checkpoint; did the run finish a validation?")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = dict(ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else None
    if state is None:
        raise InputError(f"{path}: not a checkpoint dict")
    policy = legacy_policy(state, model)
    if isinstance(ckpt, dict) and "policy" in ckpt:
        policy = ScoringPolicy.from_dict(ckpt["policy"])
    interest = {k: state.pop(k) for k in INTEREST_KEYS if k in state}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in INTEREST_KEYS]
    if missing or unexpected:
        raise InputError(f"{path}: checkpoint does not fit the run's model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if len(interest) == 2:
        model.set_interest_index(interest["item_interest"][1:], interest["centroids"])
    elif hasattr(model, "set_interest_index"):
        log.warning("%s: no interest index saved; it will be rediscovered", path)
    return (ckpt.get("epoch") if isinstance(ckpt, dict) else None), policy


def legacy_policy(state: dict[str, torch.Tensor], model: nn.Module) -> ScoringPolicy:
    """Remove the history terms older checkpoints kept as buffers from ``state``; the policy they made."""
    bias, weight = state.pop("history_bias", None), state.pop("affinity_weight", None)
    scale = 1.0 / float(getattr(model, "temperature", 0.07))  # MISSRec's offset was in cosine units; SASRec's x 1/0.07
    return ScoringPolicy(float(bias) * scale if bias is not None else 0.0, float(weight) if weight is not None else 0.0)


def load_run(run_dir: str | Path, data_root: str | None = None, device: str = "cpu") -> LoadedRun:
    """Config, data, model and best weights of a run folder; the model is in eval mode on ``device``."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir, data_root)
    data = DomainData(cfg)
    model = build_serving_model(cfg, data)
    epoch, policy = load_weights(model, run_dir / "best.pt")
    model.to(torch.device(device)).eval()
    raw_ids, texts = item_table(data)
    log.info("loaded %s run %s (best epoch %s, policy %s): %d items", cfg.model, run_dir, epoch, policy.to_dict(),
             data.num_items)
    return LoadedRun(run_dir, cfg, model, data, raw_ids, texts, epoch, policy)


__all__ = ["LoadedRun", "build_serving_model", "item_table", "load_run", "load_weights", "read_run_config"]
