"""Finished chunks of an extraction on disk, so that a rerun redoes only what is missing.

Layout of a chunk folder (``<out>/.chunks/<D>.<name>/``), one chunk ``k`` = items ``[start, end)``:

- ``chunk-00000k.<table>.npy`` per table (``text``, ``image``): ``[end - start, D]`` float32;
- ``chunk-00000k.json`` written last (its presence commits the chunk): the run fingerprint, the item
  range, per-table file name, shape and sha256, and the chunk's stats (empty texts, missing images).

A chunk counts as done only when its JSON carries the current fingerprint and range and every table
file has the recorded sha256. Every file is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from missrec.errors import ConfigError, InputError
from missrec.io import atomic_open, write_json

log = logging.getLogger(__name__)

FORMAT = "missrec-feature-chunk/1"


@dataclass(frozen=True)
class ChunkRange:
    """Chunk ``index`` covers items ``[start, end)``."""

    index: int
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


def plan_chunks(num_items: int, chunk_size: int) -> list[ChunkRange]:
    """Split ``0..num_items-1`` into consecutive chunks of ``chunk_size`` (the last may be shorter)."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    return [ChunkRange(k, s, min(s + chunk_size, num_items)) for k, s in enumerate(range(0, num_items, chunk_size))]


def fingerprint(obj: dict) -> str:
    """sha256 of ``obj`` as canonical JSON: what makes a stored chunk reusable."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype="<f4"), allow_pickle=False)
    return buf.getvalue()


class ChunkStore:
    """The chunk folder of one extraction run (identified by ``fp``, see :func:`fingerprint`)."""

    def __init__(self, folder: str | Path, fp: str) -> None:
        self.folder = Path(folder)
        self.fp = fp

    def _meta_path(self, k: int) -> Path:
        return self.folder / f"chunk-{k:06d}.json"

    def _table_path(self, k: int, table: str) -> Path:
        return self.folder / f"chunk-{k:06d}.{table}.npy"

    def _read_meta(self, chunk: ChunkRange) -> dict | None:
        try:
            meta = json.loads(self._meta_path(chunk.index).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if (meta.get("format") != FORMAT or meta.get("fingerprint") != self.fp
                or [meta.get("start"), meta.get("end")] != [chunk.start, chunk.end]):
            return None
        return meta

    def status(self, chunk: ChunkRange) -> str:
        """``done`` (reusable), ``stale`` (from another run or corrupt) or ``absent``."""
        if not self._meta_path(chunk.index).exists():
            return "absent"
        return "done" if self._load(chunk, check_only=True) is not None else "stale"

    def write(self, chunk: ChunkRange, tables: dict[str, np.ndarray], stats: dict) -> None:
        """Store one finished chunk: each ``[len(chunk), D]`` table, then the committing JSON."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._meta_path(chunk.index).unlink(missing_ok=True)  # uncommitted while its tables change
        entries = {}
        for name, arr in tables.items():
            if arr.ndim != 2 or arr.shape[0] != len(chunk):
                raise ValueError(f"chunk {chunk.index}: table {name} has shape {arr.shape}, expected "
                                 f"[{len(chunk)}, D]")
            data = _npy_bytes(arr)
            path = self._table_path(chunk.index, name)
            with atomic_open(path, "wb") as fh:
                fh.write(data)
            entries[name] = {"file": path.name, "shape": list(arr.shape),
                             "sha256": hashlib.sha256(data).hexdigest()}
        write_json(self._meta_path(chunk.index), {
            "format": FORMAT, "fingerprint": self.fp, "chunk": chunk.index, "start": chunk.start,
            "end": chunk.end, "tables": entries, "stats": stats,
        })

    def load(self, chunk: ChunkRange) -> tuple[dict[str, np.ndarray], dict]:
        """The chunk's tables and stats, checksums verified; ``InputError`` when it is missing or corrupt."""
        got = self._load(chunk)
        if got is None:
            raise InputError(f"{self._meta_path(chunk.index)}: chunk {chunk.index} is missing or corrupt")
        return got

    def _load(self, chunk: ChunkRange, check_only: bool = False) -> tuple[dict[str, np.ndarray], dict] | None:
        meta = self._read_meta(chunk)
        if meta is None:
            return None
        tables = {}
        for name, entry in meta["tables"].items():
            try:
                data = (self.folder / entry["file"]).read_bytes()
            except FileNotFoundError:
                return None
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                log.warning("%s: sha256 mismatch; the chunk will be redone", self.folder / entry["file"])
                return None
            if not check_only:
                tables[name] = np.load(io.BytesIO(data), allow_pickle=False)
        return tables, meta["stats"]

    def prune(self, keep: Sequence[ChunkRange]) -> int:
        """Delete chunk files whose index is not in ``keep`` (left by a run with another chunking)."""
        wanted = {c.index for c in keep}
        removed = 0
        if not self.folder.is_dir():
            return 0
        for p in self.folder.glob("chunk-*"):
            try:
                k = int(p.name.split(".")[0].removeprefix("chunk-"))
            except ValueError:
                continue
            if k not in wanted:
                p.unlink(missing_ok=True)
                removed += 1
        return removed


def assemble(store: ChunkStore, chunks: Sequence[ChunkRange], num_items: int,
             tables: Sequence[str]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Stack the chunks' tables in index order into ``{table: [num_items, D]}``, plus their stats.

    Checks that the ranges cover ``0..num_items-1`` exactly once (no gap, no overlap) and that every
    chunk has every table with one common width.
    """
    order = sorted(chunks, key=lambda c: c.start)
    pos = 0
    for c in order:
        if c.start != pos or c.end <= c.start:
            raise AssertionError(f"chunk {c.index} covers [{c.start}, {c.end}) but the next item is {pos}: "
                                 "gap or overlap")
        pos = c.end
    if pos != num_items:
        raise AssertionError(f"chunks cover items 0..{pos - 1}, the domain has {num_items}")
    out: dict[str, np.ndarray] = {}
    stats = []
    for c in order:
        parts, st = store.load(c)
        if set(parts) != set(tables):
            raise RuntimeError(f"chunk {c.index} holds tables {sorted(parts)}, expected {sorted(tables)}")
        for name in tables:
            arr = parts[name]
            if name not in out:
                out[name] = np.zeros((num_items, arr.shape[1]), dtype=np.float32)
            if arr.shape != (len(c), out[name].shape[1]):
                raise RuntimeError(f"chunk {c.index} table {name}: shape {arr.shape}, expected "
                                   f"({len(c)}, {out[name].shape[1]})")
            out[name][c.start:c.end] = arr
        stats.append(st)
    return out, stats


__all__ = ["ChunkRange", "ChunkStore", "assemble", "fingerprint", "plan_chunks"]
