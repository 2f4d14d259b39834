"""Amazon Review Data (2018) as users download it: a ratings CSV and a metadata JSON-lines file.

- Ratings: ``item,user,rating,timestamp`` per line, no header (plain or gzip, found by magic bytes).
- Metadata: one JSON object per line with ``asin``, ``title``, ``category`` (list), ``brand``,
  ``imageURLHighRes`` / ``imageURL`` (lists). The first line of an ``asin`` wins; later ones are counted.

Item text follows UniSRec's ``process_amazon.py`` rule, so the paper's files come out the same: for each
of ``title``, ``category``, ``brand`` present (and not null) in the metadata, the field is cleaned --
a list joined by spaces, HTML entities unescaped, ``"``, ``\\n`` and ``\\r`` removed, trailing dots cut
and one ``.`` appended, and the whole field dropped (made empty) when it is ``max_field_chars`` long or
longer -- and the text is every cleaned field followed by one space: ``"TITLE. CAT1 CAT2. BRAND. "``.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

from missrec.data.raw_common import (
    InteractionBuilder,
    ItemInfo,
    RawCatalogue,
    describe_input,
    malformed_line,
    open_lines,
    sanitize_text,
)

log = logging.getLogger(__name__)

TEXT_FIELDS = ("title", "category", "brand")


def clean_field(value: object, max_chars: int = 2000) -> tuple[str, bool]:
    """One metadata field cleaned as UniSRec did; returns ``(text, dropped_for_length)``.

    ``max_chars`` 0 keeps fields of any length. The result always ends with ``.`` unless dropped.
    """
    if isinstance(value, list):
        text = " ".join(str(v) for v in value)
    else:
        text = str(value)
    text = html.unescape(text)
    text = text.replace('"', "").replace("\n", "").replace("\r", "")
    text = text[:1] + text[1:].rstrip(".") + "."  # cut trailing dots (never the first character)
    if max_chars and len(text) >= max_chars:
        return "", True
    return text, False


def item_text(meta: Mapping[str, object], max_chars: int = 2000) -> tuple[str, str, list[str]]:
    """``(text, cleaned title, fields dropped for length)`` of one metadata record."""
    parts: list[str] = []
    title = ""
    dropped: list[str] = []
    for key in TEXT_FIELDS:
        value = meta.get(key)
        if value is None:
            continue
        cleaned, too_long = clean_field(value, max_chars)
        if too_long:
            dropped.append(key)
        if key == "title":
            title = cleaned
        parts.append(cleaned + " ")
    return sanitize_text("".join(parts)), title, dropped


def image_url(meta: Mapping[str, object]) -> str:
    """The first high-resolution image URL, else the first image URL, else ``""``."""
    for key in ("imageURLHighRes", "imageURL"):
        urls = meta.get(key)
        if isinstance(urls, list):
            for url in urls:
                if isinstance(url, str) and url.strip():
                    return url.strip()
    return ""


def read_amazon_ratings(path: str | Path, skip_malformed: bool = False, progress: bool = True
                        ) -> tuple[InteractionBuilder, dict]:
    """Stream a ratings CSV (``item,user,rating,timestamp``) into an :class:`InteractionBuilder`.

    A malformed line (wrong field count, empty id, rating not a number, timestamp not an integer, not
    UTF-8) is a :class:`DataFormatError` naming file and line, or, with ``skip_malformed``, a counted skip
    (the first few are logged). Blank lines are ignored and counted.
    """
    path = Path(path)
    b = InteractionBuilder()
    stats = {"lines": 0, "blank": 0, "malformed_skipped": 0}
    skipped: list[int] = []
    with open_lines(path, "ratings", progress) as lines:
        for lineno, line in lines:
            stats["lines"] = lineno
            err = None
            if line is None:
                err = "not valid UTF-8"
            else:
                line = line.strip()
                if not line:
                    stats["blank"] += 1
                    continue
                parts = line.split(",")
                if len(parts) != 4:
                    err = f"expected 4 comma-separated fields item,user,rating,timestamp, got {len(parts)}"
                else:
                    item, user, rating, ts = parts
                    try:
                        r = float(rating)
                        if not math.isfinite(r):
                            raise ValueError(rating)
                        b.add(user, item, float(int(ts)), r)
                    except ValueError as e:
                        err = _explain(item, user, rating, ts, e)
            if err is not None:
                malformed_line(path, lineno, err, skip_malformed, stats, warn=len(skipped) < 5)
                if len(skipped) < 5:
                    skipped.append(lineno)
    stats["interactions"] = len(b)
    if skipped:
        stats["malformed_first_lines"] = skipped
    return b, stats


def _explain(item: str, user: str, rating: str, ts: str, e: ValueError) -> str:
    try:
        if not math.isfinite(float(rating)):
            raise ValueError(rating)
    except ValueError:
        return f"rating {rating[:40]!r} is not a finite number"
    try:
        int(ts)
    except ValueError:
        return f"timestamp {ts[:40]!r} is not an integer"
    return str(e)  # an empty or otherwise unusable id


def read_amazon_meta(path: str | Path, wanted: set[str] | Mapping[str, int], max_field_chars: int = 2000,
                     require_title: bool = False, skip_malformed: bool = False, progress: bool = True,
                     ) -> tuple[dict[str, ItemInfo], dict[str, str], dict]:
    """Read the metadata of the ``wanted`` items: ``(items, excluded, stats)``.

    ``items`` maps asin -> :class:`ItemInfo` (text, image URL); with ``require_title`` an item whose
    cleaned title is missing, empty or dropped for length goes to ``excluded`` (asin -> ``"no_title"``)
    instead. A line that is not a JSON object with a string ``asin`` is a :class:`DataFormatError`
    naming file and line, or a counted skip with ``skip_malformed``.
    """
    path = Path(path)
    items: dict[str, ItemInfo] = {}
    excluded: dict[str, str] = {}
    too_long = dict.fromkeys(TEXT_FIELDS, 0)
    stats = {"lines": 0, "blank": 0, "malformed_skipped": 0, "records": 0, "duplicate_asins": 0,
             "matched_items": 0, "no_title": 0}
    seen: set[str] = set()
    with open_lines(path, "metadata", progress) as lines:
        for lineno, line in lines:
            stats["lines"] = lineno
            if line is not None and not line.strip():
                stats["blank"] += 1
                continue
            err, meta = None, None
            if line is None:
                err = "not valid UTF-8"
            else:
                try:
                    meta = json.loads(line)
                except json.JSONDecodeError as e:
                    err = f"not valid JSON ({e.msg} at column {e.colno})"
                else:
                    if not isinstance(meta, dict) or not isinstance(meta.get("asin"), str) or not meta["asin"]:
                        err = "expected a JSON object with a non-empty string 'asin'"
            if err is not None:
                malformed_line(path, lineno, err, skip_malformed, stats)
                continue
            stats["records"] += 1
            asin = meta["asin"].strip()
            if asin in seen:
                stats["duplicate_asins"] += 1
                continue
            seen.add(asin)
            if asin not in wanted:
                continue
            stats["matched_items"] += 1
            text, title, dropped = item_text(meta, max_field_chars)
            for key in dropped:
                too_long[key] += 1
            if require_title and not title.rstrip(".").strip():
                excluded[asin] = "no_title"
                stats["no_title"] += 1
                continue
            items[asin] = ItemInfo(text, image_url(meta))
    stats["fields_dropped_too_long"] = too_long
    stats["with_image"] = sum(1 for info in items.values() if info.image)
    return items, excluded, stats


def read_amazon(ratings: str | Path, meta: str | Path, max_field_chars: int = 2000, require_title: bool = False,
                skip_malformed: bool = False, progress: bool = True) -> RawCatalogue:
    """Read a ratings CSV and its metadata file into a :class:`RawCatalogue` (nothing filtered yet)."""
    builder, rstats = read_amazon_ratings(ratings, skip_malformed, progress)
    items, excluded, mstats = read_amazon_meta(meta, builder.item_codes, max_field_chars, require_title,
                                               skip_malformed, progress)
    inputs = (describe_input(ratings, "ratings"), describe_input(meta, "metadata"))
    log.info("read %s: %s; %s: %s", ratings, rstats, meta, mstats)
    return builder.build(items, excluded, inputs, {"ratings": rstats, "metadata": mstats})


__all__ = ["clean_field", "image_url", "item_text", "read_amazon", "read_amazon_meta", "read_amazon_ratings"]
