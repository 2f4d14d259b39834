"""Shared pieces of raw-catalogue reading: the in-memory catalogue, a line reader for plain or gzip files.

A :class:`RawCatalogue` holds interactions in input order (as integer codes of raw ids, which the
preparation step filters, orders and re-indexes) plus the item metadata found for raw item ids.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import zlib
from array import array
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from missrec.errors import DataFormatError
from missrec.io import sha256_file

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BAD_ID_CHARS = ("\t", "\n", "\r")


@dataclass(frozen=True)
class ItemInfo:
    """Metadata of one raw item: its text and its image (a URL, an absolute local path, or empty)."""

    text: str
    image: str = ""


@dataclass(frozen=True)
class RawCatalogue:
    """Raw interactions in input order, as codes into ``user_ids`` / ``item_ids``, plus item metadata.

    ``user`` / ``item`` [N] int64 codes, ``timestamp`` [N] float64, ``rating`` [N] float64 (0 when the
    input has none; part of the duplicate key). ``items`` maps raw item id -> :class:`ItemInfo` for the
    items with usable metadata; ``excluded`` maps raw item id -> reason for items that had metadata but
    were refused (e.g. ``"no_title"``). ``inputs`` describes the files read; ``stats`` holds read counts.
    """

    user_ids: list[str]
    item_ids: list[str]
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rating: np.ndarray
    items: Mapping[str, ItemInfo]
    excluded: Mapping[str, str] = field(default_factory=dict)
    inputs: tuple[dict, ...] = ()
    stats: Mapping[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.user.shape[0])


class InteractionBuilder:
    """Collects interactions while a file is read, interning raw ids into dense codes."""

    def __init__(self) -> None:
        self.user_codes: dict[str, int] = {}
        self.item_codes: dict[str, int] = {}
        self.user = array("q")
        self.item = array("q")
        self.timestamp = array("d")
        self.rating = array("d")

    def add(self, user: str, item: str, timestamp: float, rating: float = 0.0) -> None:
        """Append one interaction; a bad raw id is a ``ValueError`` (the reader adds file and line)."""
        u = self.user_codes.get(user)
        if u is None:
            check_raw_id(user, "user id")
            u = self.user_codes[user] = len(self.user_codes)
        i = self.item_codes.get(item)
        if i is None:
            check_raw_id(item, "item id")
            i = self.item_codes[item] = len(self.item_codes)
        self.user.append(u)
        self.item.append(i)
        self.timestamp.append(timestamp)
        self.rating.append(rating)

    def __len__(self) -> int:
        return len(self.user)

    def build(self, items: Mapping[str, ItemInfo], excluded: Mapping[str, str] | None = None,
              inputs: tuple[dict, ...] = (), stats: Mapping[str, object] | None = None) -> RawCatalogue:
        """Freeze the collected interactions into a :class:`RawCatalogue`."""
        return RawCatalogue(
            user_ids=list(self.user_codes), item_ids=list(self.item_codes),
            user=np.frombuffer(self.user, dtype=np.int64).copy(),
            item=np.frombuffer(self.item, dtype=np.int64).copy(),
            timestamp=np.frombuffer(self.timestamp, dtype=np.float64).copy(),
            rating=np.frombuffer(self.rating, dtype=np.float64).copy(),
            items=dict(items), excluded=dict(excluded or {}), inputs=inputs, stats=dict(stats or {}),
        )


def malformed_line(path: Path, lineno: int, err: str, skip: bool, stats: dict, warn: bool = True) -> None:
    """A malformed input line: a :class:`DataFormatError` naming file and line, or, when the user chose
    ``skip``, a skip counted in ``stats["malformed_skipped"]`` (and logged when ``warn``)."""
    if not skip:
        raise DataFormatError(path, err, lineno)
    stats["malformed_skipped"] += 1
    if warn:
        log.warning("%s:%d: skipped (%s)", path, lineno, err)


def check_raw_id(raw: str, what: str) -> None:
    """Raw ids end up in tab-separated files: refuse empty ids and ids holding tabs or line breaks."""
    if not raw or any(c in raw for c in _BAD_ID_CHARS):
        raise ValueError(f"{what} {raw[:60]!r} is empty or holds a tab or line break")


def sanitize_text(text: str) -> str:
    """Tabs and line breaks would break the tab-separated item files: each becomes one space."""
    if "\t" in text or "\n" in text or "\r" in text:
        return text.replace("\r\n", " ").replace("\t", " ").replace("\n", " ").replace("\r", " ")
    return text


def is_url(value: str) -> bool:
    """``scheme://...`` (http, https, s3, gs, file, ...)."""
    return bool(_URL.match(value))


def is_gzip(path: str | Path) -> bool:
    """Detect gzip by its magic bytes, not by the file name."""
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def describe_input(path: str | Path, role: str) -> dict:
    """A summary record of one input file: path, role, size, gzip or not, sha256."""
    path = Path(path)
    return {"role": role, "path": str(path), "bytes": path.stat().st_size, "gzip": is_gzip(path),
            "sha256": sha256_file(path)}


@contextmanager
def open_lines(path: str | Path, desc: str = "", progress: bool = True) -> Iterator[Iterator[tuple[int, str | None]]]:
    """Iterate ``(line number, text)`` over a plain or gzip-compressed UTF-8 file (gzip found by magic bytes).

    Lines keep their line ending. A line that is not valid UTF-8 comes as ``(line number, None)`` so the
    caller can refuse it or count it as skipped. A truncated or corrupt gzip stream is a
    :class:`DataFormatError` naming the last line read. The progress bar counts (compressed) bytes.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        total = os.fstat(raw.fileno()).st_size
        gz = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc or path.name, disable=not progress,
                   leave=False)
        try:
            yield _lines(path, raw, stream, bar)
        finally:
            bar.close()
            if gz:
                stream.close()


def _lines(path: Path, raw, stream, bar) -> Iterator[tuple[int, str | None]]:
    lineno = 0
    done = 0
    it = iter(stream)
    while True:
        try:
            bline = next(it)
        except StopIteration:
            break
        except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise DataFormatError(path, f"truncated or corrupt gzip stream after this line ({e})", lineno) from None
        lineno += 1
        if not lineno & 0x3FFF:
            pos = raw.tell()
            bar.update(pos - done)
            done = pos
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError:
            yield lineno, None
            continue
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]
        yield lineno, line
    bar.update(max(0, bar.total - done))


__all__ = [
    "InteractionBuilder",
    "ItemInfo",
    "RawCatalogue",
    "check_raw_id",
    "describe_input",
    "is_gzip",
    "is_url",
    "open_lines",
    "sanitize_text",
]
