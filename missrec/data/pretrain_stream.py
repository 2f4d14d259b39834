"""Pre-training data, streamed: each rank reads only its share of the source domains' WebDataset shards.

The epoch plan is a pure function of (seed, epoch): ``steps = total training rows // global batch`` steps,
each drawing its global batch from one domain, the domains' shares of the steps proportional to their
weights (their row counts by default). The data is cut into ``streams`` logical streams (the world size by
default; a multiple of it): stream ``s`` reads shards ``s, s + S, ...`` of each domain's shard list (order
shuffled by (seed, epoch)), or, for a domain with fewer shards than readers, every row with
``row % readers == reader``. Rank ``r`` owns streams ``r * S / W ..``; at each step each of its streams gives
``batch_size * W / S`` rows of the step's domain, so the global batch is the same for any number of ranks
that divides S (1 rank with S = 2 trains on what 2 ranks train on). A stream that runs out of a domain's rows
within an epoch starts its own shards again, reshuffled (its ``pass`` counts up): the shards a stream reads
are fixed for the epoch.

Within a rank, DataLoader workers take steps ``w, w + n, ...`` (``num_workers = n``) and split each stream's
shards once more between them; records are shuffled in a buffer and cut into batches of similar history
length (windows of ``group_batches`` batches, sorted, emitted in random order). Every worker assembles its
batches completely (:func:`missrec.data.pretrain_batch.assemble`: feature rows gathered from the memory-mapped
tables, interests from the epoch's index files, the item-drop view), pinned when the step runs on a GPU.
Everything is a function of (seed, epoch, world size, streams, workers): resuming at step ``s`` of an epoch
replays the epoch's streams up to ``s`` without training on them and continues with the rows the
uninterrupted run trained on.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from missrec.data.feature_store import FeatureStore
from missrec.data.pretrain_batch import PretrainBatch, Record, assemble
from missrec.data.shard_stream import _read_shards, _seeded_shuffle, _shard_list, _ShardErrorHandler
from missrec.data.shards import ShardSource
from missrec.errors import ConfigError
from missrec.interests.tables import InterestTables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    """What a worker needs to produce its batches (pickled to DataLoader workers)."""

    folders: tuple[str, ...]
    item_offset: tuple[int, ...]
    user_offset: tuple[int, ...]
    streams: tuple[int, ...]  # this rank's stream ids
    total_streams: int
    rows_per_stream: int
    seed: int
    max_len: int
    drop_prob: float
    shuffle_buffer: int
    group_batches: int
    skip_bad_shards: bool


class PretrainData:
    """The source domains of pre-training (shard folders), streamed per rank."""

    def __init__(
        self,
        folders: Sequence[str | Path],
        features: Sequence[str],
        weights: Sequence[float] = (),
        *,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        streams: int = 0,
        seed: int = 0,
        max_len: int = 50,
        drop_prob: float = 0.2,
        num_workers: int = 0,
        shuffle_buffer: int = 10000,
        group_batches: int = 32,
        skip_bad_shards: bool = False,
    ) -> None:
        if not folders:
            raise ConfigError("pre-training needs at least one domain folder (--data)")
        if weights and len(weights) != len(folders):
            raise ConfigError(f"{len(weights)} domain weights for {len(folders)} domains")
        if any(w < 0 for w in weights) or (weights and sum(weights) <= 0):
            raise ConfigError(f"domain weights must be >= 0 and not all 0, got {list(weights)}")
        streams = streams or world_size
        if streams % world_size:
            raise ConfigError(f"streams ({streams}) must be a multiple of the world size ({world_size})")
        per_rank = streams // world_size
        if batch_size % per_rank:
            raise ConfigError(f"batch_size ({batch_size}) must be a multiple of the streams per rank ({per_rank})")
        sources = [ShardSource(f) for f in folders]
        self.names = [s.name for s in sources]
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"the same domain appears twice: {self.names}")
        self.rows = np.array([s.num_rows("train") for s in sources], dtype=np.int64)  # [D]
        empty = [n for n, r in zip(self.names, self.rows) if r == 0]
        if empty:
            raise ConfigError(f"domain(s) {empty}: no training rows")
        self.item_offset = np.concatenate([[0], np.cumsum([s.num_items for s in sources])]).astype(np.int64)
        self.user_offset = np.concatenate([[0], np.cumsum([s.num_users for s in sources])]).astype(np.int64)
        w = np.asarray(weights, dtype=np.float64) if weights else self.rows.astype(np.float64)
        self.weights = w / w.sum()
        self.store = FeatureStore.from_folders(folders, features)
        self.batch_size, self.world_size, self.rank = int(batch_size), int(world_size), int(rank)
        self.num_workers = int(num_workers)
        self.spec = StreamSpec(
            folders=tuple(str(f) for f in folders), item_offset=tuple(int(v) for v in self.item_offset[:-1]),
            user_offset=tuple(int(v) for v in self.user_offset[:-1]),
            streams=tuple(range(rank * per_rank, (rank + 1) * per_rank)), total_streams=streams,
            rows_per_stream=batch_size // per_rank, seed=int(seed), max_len=int(max_len),
            drop_prob=float(drop_prob), shuffle_buffer=int(shuffle_buffer), group_batches=int(group_batches),
            skip_bad_shards=skip_bad_shards,
        )
        log.info("pre-training data: %s; %d items, %s training rows, sampling weights %s; %d streams, this rank "
                 "reads %s", ", ".join(self.names), self.num_items, self.rows.tolist(),
                 np.round(self.weights, 4).tolist(), streams, list(self.spec.streams))

    @property
    def num_items(self) -> int:
        return int(self.item_offset[-1])

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def steps_per_epoch(self) -> int:
        """Global batches per epoch: all training rows once, on average, dropping the remainder."""
        steps = int(self.rows.sum()) // self.global_batch
        if steps < 1:
            raise ConfigError(f"global batch {self.global_batch} exceeds the {int(self.rows.sum())} training rows")
        return steps

    def domain_plan(self, epoch: int) -> np.ndarray:
        """The domain of each step of ``epoch`` [steps]; the same on every rank."""
        steps = self.steps_per_epoch()
        share = self.weights * steps
        count = np.floor(share).astype(np.int64)
        rest = steps - int(count.sum())
        if rest:
            count[np.argsort(-(share - count), kind="stable")[:rest]] += 1
        rng = np.random.default_rng([self.spec.seed, epoch, 0x6D697373])
        return rng.permutation(np.repeat(np.arange(len(self.rows)), count))

    def loader(self, epoch: int, interest_dir: str | Path, start_step: int = 0, steps: int | None = None,
               pin_memory: bool = False, prefetch: int = 2) -> Iterator[PretrainBatch]:
        """This rank's batches of steps ``start_step .. steps - 1`` of ``epoch`` in step order, assembled by
        ``num_workers`` DataLoader workers (or in this process) with the interest index in ``interest_dir``."""
        plan = self.domain_plan(epoch)
        steps = len(plan) if steps is None else min(int(steps), len(plan))
        ds = _StepStream(self.spec, self.store, plan[:steps], epoch, int(start_step), str(interest_dir))
        if self.num_workers <= 0:
            yield from ds
            return
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=pin_memory,
                                         prefetch_factor=prefetch, persistent_workers=False)
        pending: dict[int, PretrainBatch] = {}
        nxt = int(start_step)
        for batch in dl:  # workers answer round robin; restore step order (at most num_workers out of place)
            pending[batch.step] = batch
            while nxt in pending:
                yield pending.pop(nxt)
                nxt += 1


class _StepStream(torch.utils.data.IterableDataset):
    """One epoch of this rank's steps; a DataLoader worker yields the steps ``≡ worker (mod workers)``."""

    def __init__(self, spec: StreamSpec, store: FeatureStore, plan: np.ndarray, epoch: int, start_step: int,
                 interest_dir: str) -> None:
        super().__init__()
        self.spec, self.store, self.plan, self.epoch = spec, store, plan, epoch
        self.start_step, self.interest_dir = start_step, interest_dir

    def __iter__(self) -> Iterator[PretrainBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        tables = InterestTables(self.interest_dir)
        spec = self.spec
        chunkers: dict[tuple[int, int], Iterator[list[tuple[int, Record]]]] = {}
        for step in range(worker, len(self.plan), workers):
            d = int(self.plan[step])
            parts = []
            for s in spec.streams:
                if (d, s) not in chunkers:
                    chunkers[(d, s)] = _chunks(
                        _records(spec, d, s, self.epoch, worker, workers), spec.rows_per_stream,
                        spec.group_batches, np.random.default_rng([spec.seed, self.epoch, s, worker, d, 0x4C47]))
                parts.append(next(chunkers[(d, s)]))
            if step < self.start_step:
                continue  # replayed, not trained: a resumed run continues with the rows that come next
            yield assemble(
                parts, domain=d, item_offset=spec.item_offset[d], user_offset=spec.user_offset[d],
                max_len=spec.max_len, store=self.store, tables=tables, drop_prob=spec.drop_prob,
                view_seeds=[(spec.seed, 0x76696577, self.epoch, step, s) for s in spec.streams], step=step,
            )


def _records(spec: StreamSpec, d: int, stream: int, epoch: int, worker: int, workers: int
             ) -> Iterator[tuple[int, Record]]:
    """(pass, record) of domain ``d`` for ``stream``'s reader ``worker``, without end: pass ``p`` reads its
    shards in an order shuffled by (seed, epoch, p)."""
    source = ShardSource(spec.folders[d])
    shards = source.shard_entries("train")
    readers = spec.total_streams * workers
    reader = stream * workers + worker
    by_sample = len(shards) < readers
    handler = _ShardErrorHandler(spec.skip_bad_shards)
    listed = list(_shard_list(shards, True, spec.seed, epoch))  # which shards a stream reads: fixed per epoch
    mine = listed if by_sample else listed[stream :: spec.total_streams][worker::workers]
    for pas in itertools.count():
        mixed = epoch * 100_003 + pas  # a shuffle per (epoch, pass) of the reader's own shards
        order = np.random.default_rng([spec.seed, mixed, stream, worker, 0x7061]).permutation(len(mine))
        recs = _read_shards((mine[i] for i in order), handler=handler)
        if by_sample:
            recs = (r for r in recs if r[0] % readers == reader)
        count = 0
        for rec in _shuffled(recs, spec, mixed, stream, worker):
            count += 1
            yield pas, rec
        if count == 0:
            raise ConfigError(f"{source.folder}: stream {stream} reader {worker} got no training rows in a pass "
                              f"({int(source.num_rows('train'))} rows, {len(shards)} shards for {readers} readers)")


def _shuffled(recs: Iterator[Record], spec: StreamSpec, mixed: int, stream: int, worker: int) -> Iterator[Record]:
    # _seeded_shuffle reads the worker from the DataLoader; its (seed, epoch, rank) key is completed here
    yield from _seeded_shuffle(recs, spec.shuffle_buffer, spec.seed, mixed * 131 + worker, stream, True)


def _chunks(recs: Iterator[Any], size: int, group: int, rng: np.random.Generator) -> Iterator[list[Any]]:
    """Lists of ``size`` records of similar history length: windows of ``group * size`` records sorted by
    length, cut, emitted in random order."""
    while True:
        window = list(itertools.islice(recs, size * group))
        window.sort(key=lambda pr: len(pr[1][2]))
        cut = [window[s : s + size] for s in range(0, len(window) - size + 1, size)]
        for i in rng.permutation(len(cut)):
            yield cut[i]

