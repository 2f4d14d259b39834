"""Generic raw input for any catalogue: an interactions table plus an item table.

- Interactions: CSV (or TSV) with a header naming at least ``user``, ``item``, ``timestamp`` (any order;
  further columns are ignored). The timestamp is any number; only its order matters.
- Items: TSV or CSV with a header naming ``item_id`` and ``text`` and optionally ``image``: a URL, a
  local path (relative paths are relative to the item table's folder), or empty.

A file whose header line holds a tab is read as TSV (fields split on tabs, no quoting), else as CSV
(standard quoting). Either file may be gzip-compressed (found by magic bytes).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

from missrec.data.raw_common import (
    InteractionBuilder,
    ItemInfo,
    RawCatalogue,
    check_raw_id,
    describe_input,
    is_url,
    malformed_line,
    open_lines,
    sanitize_text,
)
from missrec.errors import DataFormatError

log = logging.getLogger(__name__)

INTERACTION_COLUMNS = ("user", "item", "timestamp")
ITEM_COLUMNS = ("item_id", "text")


def _rows(path: Path, desc: str, progress: bool) -> Iterator[tuple[int, list[str] | None]]:
    """``(1, header fields)`` first, then ``(line number, fields or None if not UTF-8)`` per non-blank row."""
    with open_lines(path, desc, progress) as lines:
        first = next(lines, None)
        if first is None or first[1] is None or not first[1].strip():
            raise DataFormatError(path, "missing header line", 1)
        head_line = first[1].rstrip("\r\n")
        tsv = "\t" in head_line
        yield 1, [h.strip() for h in (head_line.split("\t") if tsv else next(csv.reader([head_line])))]
        if tsv:
            for lineno, line in lines:
                if line is None:
                    yield lineno, None
                    continue
                line = line.rstrip("\r\n")
                if line.strip():
                    yield lineno, line.split("\t")
        else:
            state = {"lineno": 1, "bad": False}

            def feed() -> Iterator[str]:
                for lineno, line in lines:
                    state["lineno"] = lineno
                    state["bad"] = line is None
                    yield "\n" if line is None else line

            reader = csv.reader(feed())
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise DataFormatError(path, f"bad CSV ({e})", state["lineno"]) from None
                if state["bad"]:
                    yield state["lineno"], None
                elif fields and any(f.strip() for f in fields):
                    yield state["lineno"], fields


def _columns(path: Path, header: list[str], needed: tuple[str, ...]) -> list[int]:
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataFormatError(path, f"header {header} lacks column(s) {missing}; needs {list(needed)}", 1)
    return [header.index(c) for c in needed]


def _shape_error(fields: list[str] | None, header: list[str]) -> str | None:
    """Why a CSV row cannot be read as a row of ``header`` (bad UTF-8, wrong field count), or None."""
    if fields is None:
        return "not valid UTF-8"
    if len(fields) != len(header):
        return f"expected {len(header)} fields ({', '.join(header)}), got {len(fields)}"
    return None


def read_interactions_table(path: str | Path, skip_malformed: bool = False, progress: bool = True
                            ) -> tuple[InteractionBuilder, dict]:
    """Stream an interactions table into an :class:`InteractionBuilder`: ``(builder, stats)``.

    A row with the wrong field count, an empty id or a timestamp that is not a number is a
    :class:`DataFormatError` naming file and line, or a counted skip with ``skip_malformed``.
    """
    path = Path(path)
    b = InteractionBuilder()
    stats = {"rows": 0, "malformed_skipped": 0}
    rows = _rows(path, "interactions", progress)
    _, header = next(rows)
    cols = _columns(path, header, INTERACTION_COLUMNS)
    for lineno, fields in rows:
        stats["rows"] += 1
        err = _shape_error(fields, header)
        if err is None:
            user, item, ts = (fields[c].strip() for c in cols)
            try:
                t = float(ts)
                if not math.isfinite(t):
                    raise ValueError(ts)
            except ValueError:
                err = f"timestamp {ts[:40]!r} is not a finite number"
            else:
                try:
                    b.add(user, item, t)
                except ValueError as e:
                    err = str(e)
        if err is not None:
            malformed_line(path, lineno, err, skip_malformed, stats)
    stats["interactions"] = len(b)
    return b, stats


def read_item_table(path: str | Path, skip_malformed: bool = False, progress: bool = True
                    ) -> tuple[dict[str, ItemInfo], dict]:
    """Read an item table into ``{raw item id: ItemInfo}`` and stats.

    Local image paths become absolute (relative ones are taken from the table's folder), URLs stay as
    they are. A wrong field count, an empty or repeated ``item_id`` is a :class:`DataFormatError`
    naming file and line, or a counted skip (the first occurrence kept) with ``skip_malformed``.
    """
    path = Path(path)
    base = path.absolute().parent
    items: dict[str, ItemInfo] = {}
    stats = {"rows": 0, "malformed_skipped": 0, "image_urls": 0, "image_paths": 0, "no_image": 0}
    rows = _rows(path, "items", progress)
    _, header = next(rows)
    cols = _columns(path, header, ITEM_COLUMNS)
    img_col = header.index("image") if "image" in header else None
    for lineno, fields in rows:
        stats["rows"] += 1
        err = _shape_error(fields, header)
        if err is None:
            raw = fields[cols[0]].strip()
            try:
                check_raw_id(raw, "item_id")
            except ValueError as e:
                err = str(e)
            else:
                if raw in items:
                    err = f"item {raw!r} appears twice"
        if err is not None:
            malformed_line(path, lineno, err, skip_malformed, stats)
            continue
        image = fields[img_col].strip() if img_col is not None else ""
        if not image:
            stats["no_image"] += 1
        elif is_url(image):
            stats["image_urls"] += 1
        else:
            image = os.path.normpath(base / image)
            stats["image_paths"] += 1
        items[raw] = ItemInfo(sanitize_text(fields[cols[1]]), image)
    stats["items"] = len(items)
    return items, stats


def read_generic(interactions: str | Path, items: str | Path, skip_malformed: bool = False,
                 progress: bool = True) -> RawCatalogue:
    """Read an interactions table and an item table into a :class:`RawCatalogue` (nothing filtered yet)."""
    builder, istats = read_interactions_table(interactions, skip_malformed, progress)
    table, tstats = read_item_table(items, skip_malformed, progress)
    inputs = (describe_input(interactions, "interactions"), describe_input(items, "items"))
    log.info("read %s: %s; %s: %s", interactions, istats, items, tstats)
    return builder.build(table, {}, inputs, {"interactions": istats, "items": tstats})


__all__ = ["read_generic", "read_interactions_table", "read_item_table"]
