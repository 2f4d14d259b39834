"""Build models from the run config (the one place where config fields become module arguments)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch

from missrec.config import MISSRecConfig, RunConfig, SASRecConfig
from missrec.errors import ConfigError, InputError
from missrec.eval.policy import AFFINITY_GRID, OFFSET_GRID
from missrec.models.missrec import MISSRec
from missrec.models.sasrec import SASRec
from missrec.transfer.artefacts import load_checkpoint_file

log = logging.getLogger(__name__)


def history_grid(m: MISSRecConfig | SASRecConfig) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (offsets, affinity weights) chosen from at each validation (:func:`missrec.eval.policy.fit_policy`), or
    None: ``history_bias=false`` keeps the model's own ranking (the paper's); the affinity comes with the offset."""
    if not m.history_bias:
        return None
    return OFFSET_GRID, (AFFINITY_GRID if m.history_affinity else (0.0,))


def build_sasrec(s: SASRecConfig, num_items: int, max_len: int) -> SASRec:
    """SASRec with the settings of ``s`` over ``num_items`` items."""
    return SASRec(num_items, max_len=max_len, hidden=s.hidden, layers=s.layers, heads=s.heads, inner=s.inner,
                  dropout=s.dropout, attn_dropout=s.attn_dropout)


def missrec_from_config(
    m: MISSRecConfig, num_items: int, features: Sequence[np.ndarray] | None, max_len: int, seed: int,
    feature_dims: Sequence[int] = (), feature_cache: bool = True,
) -> MISSRec:
    """MISSRec with the settings of ``m`` over ``num_items`` items and one table per modality (``features``,
    cached on the model's device unless ``feature_cache`` is false), or, for pre-training, only the tables'
    widths ``feature_dims`` (each batch brings its rows)."""
    if m.mode not in ("transductive", "inductive"):
        raise ConfigError(f"missrec.mode must be 'transductive' or 'inductive', got {m.mode!r}")
    return MISSRec(
        num_items, list(features) if features is not None else None, feature_dims=feature_dims,
        feature_cache=feature_cache, hidden=m.hidden, max_len=max_len, encoder_layers=m.encoder_layers,
        decoder_layers=m.decoder_layers, heads=m.heads, inner=m.inner, dropout=m.dropout,
        attn_dropout=m.attn_dropout, adapter=m.adapter, moe_experts=m.moe_experts, use_ids=m.mode == "transductive",
        temperature=m.temperature, fusion=m.fusion, interest_weight=m.interest_weight,
        interest_cfg=replace(m.interests, seed=seed), final_norm=m.final_norm, interest_reg=m.interest_reg,
        use_interests=m.use_interests,
    )


def build_missrec(cfg: RunConfig, num_items: int, features: Mapping[str, np.ndarray]) -> MISSRec:
    """MISSRec over the feature tables named by ``cfg.data.features`` (in that order)."""
    if not cfg.data.features:
        raise ConfigError("MISSRec needs feature tables: set --features (e.g. feat1CLS,feat3CLS)")
    m = cfg.missrec
    tables = [features[s] for s in cfg.data.features]
    nbytes = sum(int(np.prod(np.shape(t))) * 4 for t in tables)  # as float32 on the device
    cache = nbytes <= cfg.train.feature_cache_mib * 2**20
    log.info("item features: %d tables, %.1f MiB as float32: %s (train.feature_cache_mib=%d)", len(tables),
             nbytes / 2**20, "cached on the training device" if cache else
             "kept memory-mapped on the host and streamed to the device each step", cfg.train.feature_cache_mib)
    model = missrec_from_config(m, num_items, tables, cfg.data.max_len, cfg.train.seed, feature_cache=cache)
    if cfg.pretrained:
        load_backbone(model, cfg.pretrained)
        n = model.set_trainable(m.pretrained_trainable)
    else:
        n = model.set_trainable("all")
    log.info("MISSRec (%s, %d modalities): %d trainable parameters", m.mode, model.num_modalities, n)
    return model


def load_backbone(model: MISSRec, path: str) -> None:
    """Load a pre-trained checkpoint's transformer, positions and (shape-compatible) adapters."""
    state = load_checkpoint_file(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict of tensors (expected launcher/export.py output)")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and k not in (
        "item_interest", "centroids")}
    missing = [k for k in model.backbone_parameters() if k not in usable]
    if missing:
        raise InputError(f"{path}: pre-trained checkpoint lacks backbone parameters {missing[:5]}")
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s", len(usable), path)
