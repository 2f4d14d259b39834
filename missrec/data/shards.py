"""Sequence shards: a domain's train/valid/test rows as WebDataset tar shards, plus the item tables.

Layout of one shard folder (one folder per domain, e.g. ``shards/Scientific/``)::

    train-000000.tar  train-000001.tar ...  valid-000000.tar ...  test-000000.tar ...
    Scientific.feat1CLS  Scientific.feat3CLS   raw float32 item tables (memory-mapped on read)
    Scientific.text  Scientific.item2index  Scientific.user2index   (where the domain has them)
    manifest.json                           written last; its presence marks a complete folder

A write stages the whole folder in ``.<name>.incoming`` next to it and swaps it in only when complete
(``shard_writer.py``), so a write that fails or dies leaves the previous complete folder in use.

A shard holds one tar member per row of its split, ``{split}-{row:09d}.json`` =
``{"user": int, "history": [0-based item indices, oldest first], "target": int, "row": int, "last": bool}``
(``last``: the row is its user's longest in the split, what causally trained models read).
Item features are not copied into samples: they are looked up from the item tables.

Reading (:meth:`ShardSource.batches`) is a WebDataset pipeline::

    shard list (order shuffled by (seed, epoch) for train, identical on every rank and worker)
      -> split by node (explicit ``rank`` / ``world_size``) -> split by DataLoader worker
      -> tar reading + JSON decoding (errors name the shard) -> [sample-level split, see below]
      -> shuffle buffer for train (RNG seeded by (seed, epoch, rank, worker)) -> collate -> batches

Exactly-once delivery. With ``P = world_size * max(1, num_workers)`` readers, when the split has at
least ``P`` shards each reader takes a disjoint subset of whole shards (``shards[rank::world_size]``
then ``[worker::num_workers]``); every sample is read exactly once, and the readers are balanced when
the shards have equal size and their number is a multiple of ``P``. When there are fewer shards than
``P`` (small splits), every reader reads every shard of the split and keeps the rows with
``row % P == rank * max(1, num_workers) + worker``: still exactly once, at the cost of reading the
(small) split ``P`` times. ``split_by="shard"`` / ``"sample"`` forces one mode.

Bad shards. Truncation is detected from the file size and the sample count recorded in the manifest
(tar readers silently accept a tar cut at a member boundary); unreadable tar data and malformed JSON
are caught too. By default a :class:`ShardError` (a :class:`~missrec.errors.DataFormatError`) naming
the shard file is raised. With ``skip_bad_shards=True`` the rest of the bad shard is skipped (samples
already delivered from it before the corruption stay delivered; a truncated shard is detected before
any of its samples), a warning is logged and ``ShardSource.skipped[shard file name]`` is incremented.
The counts are exact when ``num_workers == 0``; with DataLoader workers the counting happens in the
worker processes, so the main-process ``skipped`` dict does not see them: the workers' log warnings
are the record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from missrec.data.atomic import SPLITS, read_features
from missrec.data.batching import DEFAULT_MAX_LEN, Batch
from missrec.data.shard_format import (
    FORMAT_VERSION,
    MANIFEST,
    ShardError,
    _read_manifest,
    shards_exist,
)
from missrec.data.shard_stream import (
    _collate_records,
    _last_filter,
    _length_grouped,
    _read_shards,
    _sample_filter,
    _seeded_shuffle,
    _shard_list,
    _ShardErrorHandler,
    _split_by_node,
    _split_by_worker,
)
from missrec.data.shard_writer import write_domain_shards
from missrec.errors import ConfigError, DataFormatError
from missrec.io import sha256_file

log = logging.getLogger(__name__)

class ShardSource:
    """Reader of a shard folder written by :func:`write_domain_shards`.

    ``verify=True`` checks every shard's sha256 against the manifest now (a mismatch raises a
    :class:`ShardError` naming the shard; with ``skip_bad_shards`` the shard is logged, counted in
    ``skipped`` and left out of every later read).
    """

    def __init__(self, folder: str | Path, verify: bool = False, skip_bad_shards: bool = False) -> None:
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        self.skip_bad_shards = skip_bad_shards
        self._handler = _ShardErrorHandler(skip_bad_shards)
        self._excluded: set[str] = set()
        self._features: dict[str, np.ndarray] = {}
        if verify:
            self.verify()

    # ---- metadata
    @property
    def name(self) -> str:
        return str(self.manifest["domain"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def num_users(self) -> int:
        return int(self.manifest["num_users"])

    @property
    def max_history_len(self) -> int:
        return int(self.manifest.get("max_history_len", 0))

    @property
    def feature_suffixes(self) -> list[str]:
        return list(self.manifest["features"])

    @property
    def skipped(self) -> dict[str, int]:
        """Shard file name -> times it was skipped (main process only; see the module docstring)."""
        return self._handler.skipped

    def num_rows(self, split: str, last_per_user: bool = False) -> int:
        sp = self._split(split)
        return int(sp["last_rows"] if last_per_user else sp["rows"])

    def shard_entries(self, split: str) -> list[dict]:
        """The shards of ``split`` the readers take: ``{"url", "samples", "bytes"}`` each, in manifest order
        (shards excluded by :meth:`verify` left out)."""
        return [
            {"url": str(self.folder / s["file"]), "samples": int(s["samples"]), "bytes": s.get("bytes")}
            for s in self._split(split)["shards"]
            if s["file"] not in self._excluded
        ]

    def shard_paths(self, split: str) -> list[Path]:
        return [self.folder / s["file"] for s in self._split(split)["shards"]]

    def _split(self, split: str) -> dict:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise KeyError(f"unknown split {split!r}; the manifest has {sorted(self.manifest['splits'])}") from None

    # ---- item tables
    def features(self, suffix: str, check_finite: bool = True) -> np.ndarray:
        """The ``[num_items, dim]`` table ``suffix`` as a read-only memmap (float32, or float16 when the
        folder was written so). ``check_finite=False`` skips the scan of every row (large tables whose rows
        are checked when gathered, :class:`missrec.data.feature_store.FeatureStore`)."""
        if suffix not in self._features:
            info = self.feature_info(suffix)
            self._features[suffix] = read_features(self.folder / info["file"], self.num_items, int(info["dim"]),
                                                   check_finite, info.get("dtype", "float32"))
        return self._features[suffix]

    def feature_info(self, suffix: str) -> dict:
        """The manifest's entry of table ``suffix``: file, dim, dtype (float32 when absent), sha256."""
        info = self.manifest["features"].get(suffix)
        if info is None:
            raise KeyError(f"{self.folder}: no feature table {suffix!r}; available: {self.feature_suffixes}")
        return info

    def table_path(self, kind: str) -> Path | None:
        """Path of the ``text`` / ``item2index`` / ``user2index`` table, or None when not written."""
        info = self.manifest.get("tables", {}).get(kind)
        return None if info is None else self.folder / info["file"]

    # ---- integrity
    def verify(self) -> None:
        """Check every shard's sha256 (and the feature tables') against the manifest."""
        for split in SPLITS:
            for s in self._split(split)["shards"]:
                path = self.folder / s["file"]
                try:
                    if not path.is_file():
                        raise ShardError(path, "shard listed in the manifest is missing")
                    digest = sha256_file(path)
                    if digest != s["sha256"]:
                        raise ShardError(path, f"sha256 {digest[:16]}... does not match the manifest's {s['sha256'][:16]}...")
                except ShardError as exn:
                    self._handler(exn)  # raises unless skip_bad_shards
                    self._excluded.add(s["file"])
        for suffix, info in self.manifest["features"].items():
            path = self.folder / info["file"]
            if "sha256" in info and (not path.is_file() or sha256_file(path) != info["sha256"]):
                raise DataFormatError(path, f"feature table {suffix!r} is missing or does not match the manifest's sha256")

    # ---- batches
    def pipeline(
        self,
        split: str,
        batch_size: int,
        *,
        epoch: int = 0,
        seed: int = 0,
        shuffle: bool | None = None,
        max_len: int = DEFAULT_MAX_LEN,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        drop_last: bool = False,
        domain: int = 0,
        shuffle_buffer: int = 10000,
        split_by: str = "auto",
        last_per_user: bool = False,
        group_by_length: bool = False,
    ) -> wds.DataPipeline:
        """The WebDataset pipeline behind :meth:`batches` (not wrapped in a DataLoader)."""
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} outside world_size {world_size}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if split_by not in ("auto", "shard", "sample"):
            raise ConfigError(f"split_by must be 'auto', 'shard' or 'sample', got {split_by!r}")
        shuffle = (split == "train") if shuffle is None else shuffle
        shards = self.shard_entries(split)
        readers = world_size * max(1, num_workers)
        by_sample = split_by == "sample" or (split_by == "auto" and len(shards) < readers)
        collate_fn = partial(_collate_records, max_len=max_len, domain=domain)
        if group_by_length:
            batcher = partial(
                _length_grouped, batch_size=batch_size, group_batches=32, collate_fn=collate_fn,
                drop_last=drop_last, seed=seed, epoch=epoch, rank=rank,
            )
        else:
            batcher = wds.batched(batch_size, collation_fn=collate_fn, partial=not drop_last)
        return wds.DataPipeline(
            partial(_shard_list, shards, shuffle, seed, epoch),
            partial(_split_by_node, rank=rank, world_size=world_size, enabled=not by_sample),
            partial(_split_by_worker, enabled=not by_sample),
            partial(_read_shards, handler=self._handler),
            partial(_sample_filter, rank=rank, world_size=world_size, num_workers=num_workers, enabled=by_sample),
            partial(_last_filter, enabled=last_per_user),
            partial(_seeded_shuffle, bufsize=shuffle_buffer, seed=seed, epoch=epoch, rank=rank, enabled=shuffle),
            batcher,
        )

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        epoch: int = 0,
        seed: int = 0,
        shuffle: bool | None = None,
        max_len: int = DEFAULT_MAX_LEN,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        drop_last: bool = False,
        domain: int = 0,
        shuffle_buffer: int = 10000,
        split_by: str = "auto",
        last_per_user: bool = False,
        group_by_length: bool = False,
    ) -> Iterable[Batch]:
        """Batches of ``split`` for reader ``rank`` of ``world_size``; see the module docstring.

        ``shuffle`` defaults to True for train only. The order is a function of (seed, epoch, rank,
        world_size, num_workers) alone. With ``num_workers > 0`` a ``DataLoader(batch_size=None)`` over
        the pipeline is returned; batching happens inside each worker, so the last batch of each worker
        may be short (``drop_last`` drops them per worker).
        """
        pipe = self.pipeline(
            split, batch_size, epoch=epoch, seed=seed, shuffle=shuffle, max_len=max_len, rank=rank,
            world_size=world_size, num_workers=num_workers, drop_last=drop_last, domain=domain,
            shuffle_buffer=shuffle_buffer, split_by=split_by, last_per_user=last_per_user,
            group_by_length=group_by_length,
        )
        if num_workers <= 0:
            return pipe
        return torch.utils.data.DataLoader(
            pipe, batch_size=None, num_workers=num_workers, persistent_workers=False
        )


__all__ = ["FORMAT_VERSION", "MANIFEST", "ShardError", "ShardSource", "shards_exist", "write_domain_shards"]
