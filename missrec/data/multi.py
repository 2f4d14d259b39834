"""Several source domains read at once for pre-training, with one global item index.

Each domain is a shard folder (``manifest.json``, shards, its own feature tables). Items of domain d
get global indices ``item_offset[d] + i``; users get ``user_offset[d] + u``. The global feature table
of a modality is the domains' tables stacked in that order (a domain without the modality contributes
all-zero rows, which the model treats as missing).

The epoch plan is a pure function of (seed, epoch, global batch): every global batch comes from one
domain, chosen so that each domain gets a share of the epoch's batches proportional to its sampling
weight (its number of training rows by default). Rows of a domain are drawn from seeded permutations
(cycled when a domain is sampled more than it has rows). Rank r of W takes rows ``[r * b, (r + 1) * b)``
of each global batch of ``W * b``, so every rank runs the same number of steps and the ranks' rows
together are exactly the global batch a single process would train on. Resuming at step s of an
epoch is recomputing the plan and starting at s.

    data = MultiDomainData(["shards/Kitchen", "shards/Garden"], features=("feat1CLS", "feat3CLS"))
    for step, batch in data.batches(epoch=0, batch_size=256, rank=0, world_size=2, seed=2020):
        ...   # batch.seq holds global item index + 1
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from missrec.data.batching import Batch
from missrec.errors import ConfigError

log = logging.getLogger(__name__)


class MultiDomainData:
    """The training rows of several domain shard folders, in memory, with global item and user ids."""

    def __init__(
        self,
        folders: Sequence[str | Path],
        features: Sequence[str],
        weights: Sequence[float] = (),
        max_len: int = 50,
        verify: bool = False,
        skip_bad_shards: bool = False,
    ) -> None:
        from missrec.data.shards import ShardSource

        if not folders:
            raise ConfigError("pre-training needs at least one domain folder (--data)")
        if weights and len(weights) != len(folders):
            raise ConfigError(f"{len(weights)} domain weights for {len(folders)} domains")
        if any(w < 0 for w in weights) or (weights and sum(weights) <= 0):
            raise ConfigError(f"domain weights must be >= 0 and not all 0, got {list(weights)}")
        self.max_len = max_len
        self.sources = [ShardSource(f, verify=verify, skip_bad_shards=skip_bad_shards) for f in folders]
        self.names = [s.name for s in self.sources]
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"the same domain appears twice: {self.names}")
        counts = [s.num_items for s in self.sources]
        self.item_offset = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [D + 1]
        users = [s.num_users for s in self.sources]
        self.user_offset = np.concatenate([[0], np.cumsum(users)]).astype(np.int64)
        self.num_items = int(self.item_offset[-1])
        self.features = self._stack_features(features)
        self.rows = [self._load_rows(d, s) for d, s in enumerate(self.sources)]
        sizes = np.array([r[0].shape[0] for r in self.rows], dtype=np.float64)
        w = np.asarray(weights, dtype=np.float64) if weights else sizes
        self.weights = w / w.sum()
        log.info(
            "pre-training data: %s; %d items, %s training rows, sampling weights %s",
            ", ".join(self.names), self.num_items, [int(x) for x in sizes], np.round(self.weights, 4).tolist(),
        )

    # ------------------------------------------------------------------------------------ loading
    def _stack_features(self, suffixes: Sequence[str]) -> list[np.ndarray]:
        tables = []
        for suffix in suffixes:
            dims = {s.name: int(s.manifest["features"][suffix]["dim"]) for s in self.sources
                    if suffix in s.manifest["features"]}
            if not dims:
                raise ConfigError(f"no domain has the feature table {suffix!r}")
            if len(set(dims.values())) > 1:
                raise ConfigError(f"feature table {suffix!r} has different widths across domains: {dims}")
            dim = next(iter(dims.values()))
            out = np.zeros((self.num_items, dim), dtype=np.float32)  # [N, dim]
            for d, s in enumerate(self.sources):
                if s.name in dims:
                    out[self.item_offset[d] : self.item_offset[d + 1]] = s.features(suffix)
                else:
                    log.warning("domain %s has no %s table: its items miss that modality", s.name, suffix)
            tables.append(out)
        return tables

    def _load_rows(self, d: int, source: object) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(seq [R, L] int32 global item + 1, seq_len [R], target [R] global item, user [R] global)."""
        seqs, lens, tgts, users = [], [], [], []
        for b in source.batches("train", 4096, shuffle=False, max_len=self.max_len):  # type: ignore[attr-defined]
            seqs.append(b.seq.numpy().astype(np.int32))
            lens.append(b.seq_len.numpy())
            tgts.append(b.target.numpy())
            users.append(b.user.numpy())
        if not seqs:
            raise ConfigError(f"domain {self.names[d]}: no training rows")
        seq = np.concatenate(seqs)
        off = int(self.item_offset[d])
        seq = np.where(seq > 0, seq + off, 0).astype(np.int32)
        return (seq, np.concatenate(lens), np.concatenate(tgts) + off,
                np.concatenate(users) + int(self.user_offset[d]))

    # ------------------------------------------------------------------------------------ the plan
    @property
    def num_rows(self) -> int:
        return int(sum(r[0].shape[0] for r in self.rows))

    def steps_per_epoch(self, global_batch: int) -> int:
        """Global batches per epoch: all training rows once, on average, dropping the remainder."""
        steps = self.num_rows // global_batch
        if steps < 1:
            raise ConfigError(f"global batch {global_batch} exceeds the {self.num_rows} training rows")
        return steps

    def epoch_plan(self, epoch: int, seed: int, global_batch: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(domain of each step [S], per domain the row order it is drawn from)."""
        steps = self.steps_per_epoch(global_batch)
        rng = np.random.default_rng([seed, epoch, 0x6D697373])
        share = self.weights * steps
        count = np.floor(share).astype(np.int64)
        rest = steps - int(count.sum())
        if rest:
            count[np.argsort(-(share - count), kind="stable")[:rest]] += 1
        domains = rng.permutation(np.repeat(np.arange(len(self.rows)), count))
        orders = []
        for d, (seq, *_rest) in enumerate(self.rows):
            need = int(count[d]) * global_batch
            reps = max(1, -(-need // seq.shape[0]))
            orders.append(np.concatenate([rng.permutation(seq.shape[0]) for _ in range(reps)])[:need])
        return domains, orders

    def step_rows(
        self, epoch: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start_step: int = 0,
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """(step, domain, this rank's row indices [batch_size]) for steps ``start_step ..`` of ``epoch``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        g = batch_size * world_size
        domains, orders = self.epoch_plan(epoch, seed, g)
        used = np.zeros(len(self.rows), dtype=np.int64)
        for step, d in enumerate(domains):
            k = int(used[d])
            used[d] += 1
            if step < start_step:
                continue
            yield step, int(d), orders[d][k * g + rank * batch_size : k * g + (rank + 1) * batch_size]

    def batch(self, domain: int, idx: np.ndarray) -> Batch:
        """Rows ``idx`` of ``domain`` as a batch, cut to their longest history: seq [B, max len]."""
        seq, lens, tgt, usr = self.rows[domain]
        longest = int(lens[idx].max())
        return Batch(
            torch.from_numpy(seq[idx, :longest].astype(np.int64)),
            torch.from_numpy(lens[idx].astype(np.int64)),
            torch.from_numpy(tgt[idx].astype(np.int64)),
            torch.from_numpy(usr[idx].astype(np.int64)),
            torch.full((len(idx),), int(domain), dtype=torch.int64),
        )

    def batches(
        self, epoch: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start_step: int = 0,
    ) -> Iterator[tuple[int, Batch]]:
        """(step, this rank's batch of ``batch_size`` rows) for steps ``start_step ..`` of ``epoch``."""
        for step, d, idx in self.step_rows(epoch, batch_size, rank, world_size, seed, start_step):
            yield step, self.batch(d, idx)
