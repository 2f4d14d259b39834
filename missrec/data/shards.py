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

import json
import logging
import os
import random
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from missrec.data.atomic import SPLITS, read_features
from missrec.data.batching import DEFAULT_MAX_LEN, Batch, collate
from missrec.data.shard_format import (
    FORMAT_VERSION,
    MANIFEST,
    SAMPLE_EXT,
    ShardError,
    _read_manifest,
    shards_exist,
)
from missrec.data.shard_writer import write_domain_shards
from missrec.errors import DataFormatError
from missrec.io import sha256_file

log = logging.getLogger(__name__)

def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _ShardErrorHandler:
    """A WebDataset-style exception handler (returns True = continue) for shard errors.

    Re-raises as :class:`ShardError` naming the shard, or (``skip``) logs, counts and continues.
    """

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.skipped: dict[str, int] = {}

    def __call__(self, exn: Exception, url: str = "<unknown shard>") -> bool:
        if not isinstance(exn, ShardError):
            # webdataset appends (stream, url) to exn.args on its way up: keep the original message only
            first = exn.strerror if isinstance(exn, OSError) and exn.strerror else (exn.args[0] if exn.args else exn)
            exn = ShardError(url, f"unreadable shard: {type(exn).__name__}: {first}")
        if not self.skip:
            raise exn
        name = Path(exn.path).name
        self.skipped[name] = self.skipped.get(name, 0) + 1
        log.warning("skipping bad shard: %s", exn)
        return True


def _shard_list(shards: list[dict[str, Any]], shuffle: bool, seed: int, epoch: int) -> Iterator[dict[str, Any]]:
    """The split's shards as ``dict(url=...)``; train order permuted by (seed, epoch) only, so that every
    rank and worker sees the same list before splitting."""
    order = list(range(len(shards)))
    if shuffle:
        order = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(shards)).tolist()
    for i in order:
        yield dict(shards[i])


def _split_by_node(src: Iterable[dict], rank: int, world_size: int, enabled: bool) -> Iterator[dict]:
    yield from (islice(src, rank, None, world_size) if enabled and world_size > 1 else src)


def _split_by_worker(src: Iterable[dict], enabled: bool) -> Iterator[dict]:
    worker, num_workers = _worker_info()
    yield from (islice(src, worker, None, num_workers) if enabled and num_workers > 1 else src)


def _decode(data: bytes, key: str, url: str) -> tuple[int, int, list[int], int, bool]:
    try:
        rec = json.loads(data)
        row, user, hist, target = rec["row"], rec["user"], rec["history"], rec["target"]
        last = bool(rec.get("last", False))
        if not (isinstance(hist, list) and hist and all(isinstance(i, int) for i in hist)):
            raise ValueError("history must be a non-empty list of item indices")
        if not all(isinstance(x, int) for x in (row, user, target)):
            raise ValueError("row, user and target must be integers")
    except (ValueError, KeyError, TypeError) as exn:
        raise ShardError(url, f"sample {key!r}: malformed record ({type(exn).__name__}: {exn})") from None
    return row, user, hist, target, last


_BLOCK = 512


def _iter_tar_members(fh: Any, url: str) -> Iterator[tuple[str, bytes]]:
    """``(member name, data)`` of the regular files of a ustar tar stream, in order.

    The shards' tars are plain ustar (our writer makes no PAX headers), so this reads the 512-byte
    headers directly: about 4x less CPU per sample than ``tarfile``, which dominated the reader's time.
    Header checksums are verified; a short header or member is an error naming the shard.
    """
    while True:
        header = fh.read(_BLOCK)
        if not header:
            return  # end of file without the end-of-archive blocks: the sample count check catches a cut here
        if len(header) < _BLOCK:
            raise ShardError(url, "truncated tar header")
        if header.count(0) == _BLOCK:
            return  # end-of-archive marker
        stored = header[148:156].rstrip(b"\0 ")
        try:
            chksum = int(stored, 8)
        except ValueError:
            raise ShardError(url, "corrupt tar header (bad checksum field)") from None
        if chksum != sum(header) - sum(header[148:156]) + 8 * 32:
            raise ShardError(url, "corrupt tar header (checksum mismatch)")
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ShardError(url, "corrupt tar header (bad size field)") from None
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode("utf-8") + "/" + name
        data = fh.read(size)
        if len(data) < size:
            raise ShardError(url, f"member {name!r} truncated ({len(data)} of {size} bytes)")
        pad = -size % _BLOCK
        if pad:
            fh.read(pad)
        if header[156:157] in (b"0", b"\0"):
            yield name, data
        elif header[156:157] in (b"x", b"g", b"L", b"K"):
            raise ShardError(url, f"unsupported tar extension header (type {header[156:157]!r}) before {name!r}")


def _read_shards(
    src: Iterable[dict[str, Any]], handler: _ShardErrorHandler, check_size: bool = True
) -> Iterator[tuple[int, int, list[int], int, bool]]:
    """Tar reading + decoding: yields ``(row, user, history, target, last)``. Each shard is checked against the
    manifest (file size before reading, sample count after), and every error goes through ``handler``."""
    for shard in src:
        url = shard["url"]
        count = 0
        try:
            # opened here rather than through webdataset's gopen: plain local paths, closed when done
            # (an OSError, e.g. a missing shard, goes to the handler like any other error)
            with open(url, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                expected_bytes = shard.get("bytes")
                if check_size and expected_bytes is not None and size != expected_bytes:
                    raise ShardError(
                        url, f"size {size} bytes, manifest says {expected_bytes} (truncated or replaced shard)"
                    )
                for name, data in _iter_tar_members(fh, url):
                    key, _, ext = name.rpartition("/")[2].partition(".")
                    if ext != SAMPLE_EXT:
                        raise ShardError(url, f"member {name!r} is not a .{SAMPLE_EXT} sample")
                    rec = _decode(data, key, url)
                    count += 1
                    yield rec
            if count != shard["samples"]:
                raise ShardError(url, f"holds {count} samples, manifest says {shard['samples']} (truncated shard?)")
        except Exception as exn:  # everything goes to the handler, which re-raises or skips
            if handler(exn, url):
                continue
            raise


def _sample_filter(
    src: Iterable[tuple], rank: int, world_size: int, num_workers: int, enabled: bool
) -> Iterator[tuple]:
    if not enabled:
        yield from src
        return
    worker, _ = _worker_info()
    parts = world_size * max(1, num_workers)
    slot = rank * max(1, num_workers) + worker
    for rec in src:
        if rec[0] % parts == slot:
            yield rec


def _last_filter(src: Iterable[tuple], enabled: bool) -> Iterator[tuple]:
    yield from (rec for rec in src if rec[4]) if enabled else src


def _length_grouped(
    src: Iterable[tuple], batch_size: int, group_batches: int, collate_fn: Any, drop_last: bool, seed: int,
    epoch: int, rank: int,
) -> Iterator[Batch]:
    """Batches of similar history length (training speed): sort windows of ``group_batches`` batches
    by length, cut them into batches, emit those in a seeded random order."""
    worker, _ = _worker_info()
    rng = np.random.default_rng([seed, epoch, rank, worker, 0x4C47])
    window = batch_size * group_batches
    it = iter(src)
    while True:
        buf = list(islice(it, window))
        if not buf:
            return
        buf.sort(key=lambda r: len(r[2]))
        chunks = [buf[s : s + batch_size] for s in range(0, len(buf), batch_size)]
        if drop_last and len(chunks[-1]) < batch_size:
            chunks.pop()
        for i in rng.permutation(len(chunks)):
            yield collate_fn(chunks[i])


def _seeded_shuffle(
    src: Iterator[tuple], bufsize: int, seed: int, epoch: int, rank: int, enabled: bool
) -> Iterator[tuple]:
    if not enabled or bufsize <= 1:
        yield from src
        return
    worker, _ = _worker_info()
    state = np.random.SeedSequence([seed, epoch, rank, worker]).generate_state(2)
    rng = random.Random(int(state[0]) << 32 | int(state[1]))
    yield from wds.shuffle(bufsize=bufsize, initial=bufsize, rng=rng)(iter(src))


def _collate_records(recs: list[tuple], max_len: int, domain: int) -> Batch:
    return collate([(r[1], r[2], r[3]) for r in recs], max_len, domain)


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

    def shard_paths(self, split: str) -> list[Path]:
        return [self.folder / s["file"] for s in self._split(split)["shards"]]

    def _split(self, split: str) -> dict:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise KeyError(f"unknown split {split!r}; the manifest has {sorted(self.manifest['splits'])}") from None

    # ---- item tables
    def features(self, suffix: str) -> np.ndarray:
        """The ``[num_items, dim]`` float32 table ``suffix`` as a read-only memmap."""
        if suffix not in self._features:
            info = self.manifest["features"].get(suffix)
            if info is None:
                raise KeyError(f"{self.folder}: no feature table {suffix!r}; available: {self.feature_suffixes}")
            self._features[suffix] = read_features(self.folder / info["file"], self.num_items, int(info["dim"]))
        return self._features[suffix]

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
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if split_by not in ("auto", "shard", "sample"):
            raise ValueError(f"split_by must be 'auto', 'shard' or 'sample', got {split_by!r}")
        shuffle = (split == "train") if shuffle is None else shuffle
        shards = [
            {"url": str(self.folder / s["file"]), "samples": int(s["samples"]), "bytes": s.get("bytes")}
            for s in self._split(split)["shards"]
            if s["file"] not in self._excluded
        ]
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
