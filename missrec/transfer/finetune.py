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
from missrec.data.batching import Batch, iter_split_batches
from missrec.train.loop import fit
from missrec.train.rank_zero import RankZero

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class DomainData:
    """A domain's batches, from a shard folder (``manifest.json``) or from atomic files."""

    def __init__(self, cfg: RunConfig) -> None:
        d = cfg.data
        self.train_rows = "all"
        self.rows: np.ndarray | None = None
        self.group_by_length = d.group_by_length
        root = Path(d.data_root)
        self.max_len = d.max_len
        self.batch_size = cfg.train.batch_size
        self.eval_batch_size = cfg.train.eval_batch_size
        self.seed = cfg.train.seed
        self.item_drop = cfg.train.item_drop  # in [0, 1): TrainConfig checks it
        self.num_workers = d.num_workers
        shard_dir = _find_shard_dir(root, d.domain)
        if shard_dir is not None:
            from missrec.data.shards import ShardSource

            self.shards = ShardSource(shard_dir, skip_bad_shards=d.skip_bad_shards)
            self.domain = None
            self.num_items = self.shards.num_items
            self.features = {s: self.shards.features(s) for s in d.features}
            self.num_train = self.shards.num_rows("train")
            self.source = str(shard_dir)
        else:
            from missrec.data.atomic import load_domain

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

    def use_train_rows(self, kind: str) -> None:
        """``"all"`` prefix rows, or each user's ``"last_per_user"`` (for models trained causally)."""
        if kind not in ("all", "last_per_user"):
            raise ValueError(f"train_rows must be 'all' or 'last_per_user', got {kind!r}")
        self.train_rows = kind
        if self.shards is not None:
            self.num_train = self.shards.num_rows("train", last_per_user=kind == "last_per_user")
        else:
            self.rows = self.domain.train.last_rows_per_user() if kind == "last_per_user" else None
            self.num_train = len(self.domain.train) if self.rows is None else len(self.rows)

    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_train / self.batch_size)

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        batches = self._train_batches(epoch)
        if self.item_drop <= 0.0:
            return batches
        from missrec.models.losses import drop_items

        # a stream of its own, a function of (seed, epoch): dropout and the batch order are not disturbed
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return (drop_items(b, self.item_drop, gen) for b in batches)

    def _train_batches(self, epoch: int) -> Iterable[Batch]:
        if self.shards is not None:
            return self.shards.batches(
                "train", self.batch_size, epoch=epoch, seed=self.seed, shuffle=True, max_len=self.max_len,
                num_workers=self.num_workers, last_per_user=self.train_rows == "last_per_user",
                group_by_length=self.group_by_length,
            )
        return iter_split_batches(
            self.domain.train, self.batch_size, self.max_len, shuffle=True, seed=self.seed, epoch=epoch,
            rows=self.rows, group_by_length=self.group_by_length,
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
    from missrec.models.build import build_missrec, build_sasrec

    if cfg.model == "sasrec":
        return build_sasrec(cfg.sasrec, data.num_items, cfg.data.max_len)
    if cfg.model == "missrec":
        return build_missrec(cfg, data.num_items, data.features)
    raise ValueError(f"unknown model {cfg.model!r}: expected 'sasrec' or 'missrec'")


def run_finetune(cfg: RunConfig) -> dict[str, Any]:
    """Train and evaluate ``cfg.model`` on ``cfg.data.domain``; returns (and writes) the metrics."""
    t0 = time.perf_counter()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    out = RankZero(cfg.output_dir)
    data = DomainData(cfg)
    model = build_model(cfg, data)
    data.use_train_rows(getattr(model, "train_rows", "all"))
    if cfg.pretrained and cfg.model != "missrec":
        raise ValueError(f"model {cfg.model!r} cannot start from a pre-trained checkpoint")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("model %s: %d trainable of %d parameters; data from %s", cfg.model, trainable, total, data.source)
    out.record_start(to_dict(cfg), {"num_items": data.num_items, "data_source": data.source})
    result = fit(
        model, data.train_batches, data.eval_batches, cfg.train, out, steps_per_epoch=data.steps_per_epoch()
    )
    metrics = result.to_json()
    metrics["trainable_parameters"] = trainable
    metrics["total_parameters"] = total
    if cfg.pretrained and out.is_zero:
        from missrec.transfer.artefacts import save_adapter

        size = save_adapter(model, out.run_dir / "adapter.pt", cfg.pretrained, {"domain": cfg.data.domain})
        metrics["adapter_bytes"] = size
        metrics["backbone_bytes"] = Path(cfg.pretrained).stat().st_size
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    out.write_json("metrics.json", metrics)
    out.write_json("history.json", result.history)
    out.close()
    return metrics
