"""One fine-tuning run on one domain: load data, build the model, train, evaluate, record the run.

Called by ``launcher/finetune.py``; takes a :class:`~missrec.config.RunConfig`, returns the metrics dict
that is also written to ``RUN/metrics.json``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from missrec.config import RunConfig, to_dict
from missrec.data.atomic import load_domain
from missrec.data.batching import Batch, iter_split_batches
from missrec.data.shards import ShardSource
from missrec.errors import ConfigError
from missrec.models.build import build_missrec, build_sasrec, history_grid
from missrec.train.loop import fit
from missrec.train.rank_zero import RankZero
from missrec.transfer.artefacts import save_adapter

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class DomainData:
    """A domain's batches, from a shard folder (``manifest.json``) or from atomic files."""

    def __init__(self, cfg: RunConfig) -> None:
        d = cfg.data
        root = Path(d.data_root)
        self.max_len = d.max_len
        self.batch_size = cfg.train.batch_size
        self.eval_batch_size = cfg.train.eval_batch_size
        self.seed = cfg.train.seed
        self.num_workers = d.num_workers
        shard_dir = _find_shard_dir(root, d.domain)
        if shard_dir is not None:
            self.shards = ShardSource(shard_dir, skip_bad_shards=d.skip_bad_shards)
            self.domain = None
            self.num_items = self.shards.num_items
            self.features = {s: self.shards.features(s) for s in d.features}
            self.num_train = self.shards.num_rows("train")
            self.source = str(shard_dir)
        else:
            self.shards = None
            if not (root / f"{d.domain}.train.inter").exists() and (root / d.domain / f"{d.domain}.train.inter").exists():
                root = root / d.domain  # a catalogue folder with one sub-folder per domain
            self.domain = load_domain(
                root, d.domain, d.features, max_len=d.max_len, feature_dir=d.feature_dir or None
            )
            self.num_items = self.domain.num_items
            self.features = dict(self.domain.features)
            self.num_train = len(self.domain.train)
            self.source = str(root)

    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_train / self.batch_size)

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        """The epoch's training batches: shuffled by (seed, epoch), rows of similar history length together."""
        if self.shards is not None:
            return self.shards.batches(
                "train", self.batch_size, epoch=epoch, seed=self.seed, shuffle=True, max_len=self.max_len,
                num_workers=self.num_workers, group_by_length=True,
            )
        return iter_split_batches(
            self.domain.train, self.batch_size, self.max_len, shuffle=True, seed=self.seed, epoch=epoch,
            group_by_length=True,
        )

    def eval_batches(self, split: str) -> Iterable[Batch]:
        if self.shards is not None:
            return self.shards.batches(
                split, self.eval_batch_size, shuffle=False, max_len=self.max_len, num_workers=self.num_workers,
                group_by_length=True,
            )
        # metrics do not depend on the order: batch similar lengths together (less padding)
        return iter_split_batches(
            self.domain.splits[split], self.eval_batch_size, self.max_len, group_by_length=True
        )


def _find_shard_dir(root: Path, domain: str) -> Path | None:
    for cand in (root / domain, root):
        if (cand / "manifest.json").exists():
            return cand
    return None


def build_model(cfg: RunConfig, data: DomainData) -> nn.Module:
    """The model named by ``cfg.model``, sized from the data."""
    if cfg.model == "sasrec":
        return build_sasrec(cfg.sasrec, data.num_items, cfg.data.max_len)
    if cfg.model == "missrec":
        return build_missrec(cfg, data.num_items, data.features)
    raise ConfigError(f"unknown model {cfg.model!r}: expected 'sasrec' or 'missrec'")


def run_finetune(cfg: RunConfig) -> dict[str, Any]:
    """Train and evaluate ``cfg.model`` on ``cfg.data.domain``; returns (and writes) the metrics."""
    t0 = time.perf_counter()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    out = RankZero(cfg.output_dir)
    data = DomainData(cfg)
    model = build_model(cfg, data)
    if cfg.pretrained and cfg.model != "missrec":
        raise ConfigError(f"model {cfg.model!r} cannot start from a pre-trained checkpoint")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("model %s: %d trainable of %d parameters; data from %s", cfg.model, trainable, total, data.source)
    out.record_start(to_dict(cfg), {"num_items": data.num_items, "data_source": data.source})

    grid = history_grid(cfg.missrec if cfg.model == "missrec" else cfg.sasrec)
    result = fit(model, data.train_batches, data.eval_batches, cfg.train, out, steps_per_epoch=data.steps_per_epoch(),
                 grid=grid)
    metrics = result.to_json()
    metrics["trainable_parameters"] = trainable
    metrics["total_parameters"] = total
    if cfg.pretrained and out.is_zero:
        size = save_adapter(model, out.run_dir / "adapter.pt", cfg.pretrained, {"domain": cfg.data.domain},
                            result.policy)
        metrics["adapter_bytes"] = size
        metrics["backbone_bytes"] = Path(cfg.pretrained).stat().st_size
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    out.write_json("metrics.json", metrics)
    out.write_json("history.json", result.history)
    out.close()
    return metrics
