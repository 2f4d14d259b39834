"""Two published raw formats of already-filtered Amazon domains: time-ordered histories plus item text.

- ``unisrec``: RecBole atomic files as UniSRec-style pipelines publish them. An item table
  (``<name>.item``: TSV, header ``item_id:token<TAB>title:token_seq``; a ``text:token_seq`` column
  stands in for ``title``; further columns are ignored) with non-negative integer item ids, and one
  ``.inter`` file (header ``user_id:token<TAB>item_id_list:token_seq<TAB>item_id:token``) holding one
  row per user: the history (space-separated item ids, oldest first) and the last item. History + last
  item is the user's whole sequence (e.g. the ``.test.inter`` of a leave-one-out split).
- ``sequences``: ``user_sequence.txt``, one user a line: the raw user id, then the item ids (ASINs)
  the user interacted with, oldest first, separated by spaces; and ``item_names.txt``, one item a
  line: the item id, one space, then the item's text (the rest of the line).

Both become a :class:`RawCatalogue` whose timestamps are the positions in each user's sequence, so the
shared preparation (``missrec.data.prepare``) keeps the published order. Item text is the title / name,
with tabs and line breaks made spaces and the ends stripped.

Bad input, each an error naming file and line, or a counted skip of the line with ``skip_malformed``:
a wrong field count, a non-integer id in the ``unisrec`` files, an empty id, a history with no items,
a user or an item listed twice, text that is not UTF-8. Blank lines are ignored and counted.

Items without text: an item named in a sequence that has no line in the item file, or whose text is
empty, is an error naming the sequence file and line; with ``drop_textless`` such items are dropped
from every history instead, by the preparation's ``metadata`` step, which counts them by reason
(``no_metadata``: no line in the item file; ``empty_text``) in ``<D>.prepare.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from missrec.data.atomic import INTER_HEADER
from missrec.data.raw_common import (
    InteractionBuilder,
    ItemInfo,
    RawCatalogue,
    check_raw_id,
    describe_input,
    malformed_line,
    open_lines,
    sanitize_text,
)
from missrec.errors import DataFormatError

log = logging.getLogger(__name__)

EMPTY_TEXT = "empty_text"  # reason of an item whose text is empty (``RawCatalogue.excluded``)
ITEM_ID_COLUMN = "item_id:token"
TEXT_COLUMNS = ("title:token_seq", "text:token_seq")
_WARN_FIRST = 5

# (line number, user id, item ids) of a well-formed history line, or (line number, error, None)
History = tuple[int, str, list[str] | None]


class ItemTable:
    """Item id -> text read from an item file; ``empty`` maps ids with empty text to their line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.text: dict[str, str] = {}
        self.empty: dict[str, int] = {}
        self.stats = {"lines": 0, "blank": 0, "malformed_skipped": 0, "items": 0, EMPTY_TEXT: 0}

    def add(self, lineno: int, raw: str, text: str, skip_malformed: bool) -> None:
        err = _id_error(raw, "item id")
        if err is None and (raw in self.text or raw in self.empty):
            err = f"item {raw!r} appears twice"
        if err is not None:
            malformed_line(self.path, lineno, err, skip_malformed, self.stats)
            return
        text = sanitize_text(text).strip()
        if text:
            self.text[raw] = text
        else:
            self.empty[raw] = lineno
        self.stats["items"] += 1
        self.stats[EMPTY_TEXT] += not text


def _id_error(raw: str, what: str) -> str | None:
    try:
        check_raw_id(raw, what)
    except ValueError as e:
        return str(e)
    return None


def _int_id(tok: str, what: str) -> str:
    """A non-negative integer id in canonical form (``"007"`` -> ``"7"``); ``ValueError`` otherwise."""
    if not tok.isascii() or not tok.isdigit():
        raise ValueError(f"{what} {tok[:40]!r} is not a non-negative integer")
    return str(int(tok))


# --------------------------------------------------------------------------------------------- unisrec


def _tsv_lines(path: Path, desc: str, progress: bool, stats: dict) -> Iterator[tuple[int, list[str] | None]]:
    """``(1, header fields)``, then ``(line number, fields or None if not UTF-8)`` of each non-blank line."""
    with open_lines(path, desc, progress) as lines:
        first = next(lines, None)
        if first is None or first[1] is None or not first[1].strip():
            raise DataFormatError(path, "missing header line", 1)
        yield 1, first[1].rstrip("\r\n").split("\t")
        for lineno, line in lines:
            stats["lines"] = lineno
            if line is None:
                yield lineno, None
                continue
            line = line.rstrip("\r\n")
            if not line.strip():
                stats["blank"] += 1
                continue
            yield lineno, line.split("\t")


def read_unisrec_items(path: str | Path, skip_malformed: bool = False, progress: bool = True) -> ItemTable:
    """Read a RecBole ``.item`` file (``item_id:token`` + ``title:token_seq`` or ``text:token_seq``)."""
    path = Path(path)
    table = ItemTable(path)
    rows = _tsv_lines(path, "items", progress, table.stats)
    _, header = next(rows)
    text_col = next((c for c in TEXT_COLUMNS if c in header), None)
    if ITEM_ID_COLUMN not in header or text_col is None:
        need = f"{ITEM_ID_COLUMN!r} and one of {list(TEXT_COLUMNS)}"
        raise DataFormatError(path, f"header {header} needs {need}", 1)
    id_col, text_i = header.index(ITEM_ID_COLUMN), header.index(text_col)
    for lineno, fields in rows:
        err = _shape_error(fields, len(header))
        if err is not None:
            malformed_line(path, lineno, err, skip_malformed, table.stats)
            continue
        try:
            raw = _int_id(fields[id_col].strip(), "item id")
        except ValueError as e:
            malformed_line(path, lineno, str(e), skip_malformed, table.stats)
            continue
        table.add(lineno, raw, fields[text_i], skip_malformed)
    return table


def _shape_error(fields: list[str] | None, expected: int) -> str | None:
    if fields is None:
        return "not valid UTF-8"
    return None if len(fields) == expected else f"expected {expected} tab-separated fields, got {len(fields)}"


def unisrec_histories(path: str | Path, progress: bool, stats: dict) -> Iterator[History]:
    """The histories of a one-row-per-user ``.inter`` file: history items + the last item, as strings."""
    path = Path(path)
    rows = _tsv_lines(path, "histories", progress, stats)
    _, header = next(rows)
    if "\t".join(header) != INTER_HEADER:
        raise DataFormatError(path, f"wrong header {header}, expected {INTER_HEADER.split(chr(9))}", 1)
    for lineno, fields in rows:
        err = _shape_error(fields, 3)
        if err is not None:
            yield lineno, err, None
            continue
        try:
            user = _int_id(fields[0].strip(), "user id")
            hist = [_int_id(t, "item id") for t in fields[1].split()]
            last = _int_id(fields[2].strip(), "last item id")
        except ValueError as e:
            yield lineno, str(e), None
            continue
        if not hist:
            yield lineno, "empty history", None
            continue
        yield lineno, user, [*hist, last]


# --------------------------------------------------------------------------------------------- sequences


def _space_lines(path: Path, desc: str, progress: bool, stats: dict) -> Iterator[tuple[int, str | None]]:
    """``(line number, line without its line ending, or None if not UTF-8)`` of each non-blank line."""
    with open_lines(path, desc, progress) as lines:
        for lineno, line in lines:
            stats["lines"] = lineno
            if line is not None:
                line = line.rstrip("\r\n")
                if not line.strip():
                    stats["blank"] += 1
                    continue
            yield lineno, line


def read_item_names(path: str | Path, skip_malformed: bool = False, progress: bool = True) -> ItemTable:
    """Read ``item_names.txt``: the item id, one space, the text (a line with no space: empty text)."""
    path = Path(path)
    table = ItemTable(path)
    for lineno, line in _space_lines(path, "items", progress, table.stats):
        if line is None:
            malformed_line(path, lineno, "not valid UTF-8", skip_malformed, table.stats)
            continue
        raw, _, text = line.partition(" ")
        table.add(lineno, raw, text, skip_malformed)
    return table


def sequence_histories(path: str | Path, progress: bool, stats: dict) -> Iterator[History]:
    """The histories of ``user_sequence.txt``: the user id, then its items, space-separated."""
    path = Path(path)
    for lineno, line in _space_lines(path, "histories", progress, stats):
        if line is None:
            yield lineno, "not valid UTF-8", None
            continue
        if line[:1].isspace():
            yield lineno, "the line starts with a space instead of the user id", None
            continue
        user, *items = line.split()
        if not items:
            yield lineno, f"user {user[:40]!r} has no items", None
            continue
        yield lineno, user, items


# --------------------------------------------------------------------------------------------- catalogue


def collect(path: Path, histories: Iterator[History], table: ItemTable, stats: dict, skip_malformed: bool,
            drop_textless: bool) -> InteractionBuilder:
    """Histories -> interactions (timestamp = position in the sequence), checking each line first.

    A malformed line is an error or a counted skip; an item without text (see the module docstring) is
    an error unless ``drop_textless``, in which case it is counted here and dropped by the preparation.
    """
    b = InteractionBuilder()
    seen: set[str] = set()
    textless: dict[str, set[str]] = {"no_metadata": set(), EMPTY_TEXT: set()}
    stats["textless_interactions"] = 0
    for lineno, user, items in histories:
        err = user if items is None else _id_error(user, "user id")
        if err is None and user in seen:
            err = f"user {user!r} appears twice"
        for it in items if err is None else ():
            err = _id_error(it, "item id")
            if err is not None:
                break
        if err is not None:
            warn = stats["malformed_skipped"] < _WARN_FIRST
            malformed_line(path, lineno, err, skip_malformed, stats, warn=warn)
            continue
        for it in items:
            if it in table.text:
                continue
            why = EMPTY_TEXT if it in table.empty else "no_metadata"
            if not drop_textless:
                where = (f"its text at {table.path}:{table.empty[it]} is empty" if why == EMPTY_TEXT
                         else f"it has no line in {table.path}")
                raise DataFormatError(
                    path, f"item {it!r} has no text: {where} (drop_textless drops such items)", lineno)
            textless[why].add(it)
            stats["textless_interactions"] += 1
        seen.add(user)
        for pos, it in enumerate(items):
            b.add(user, it, float(pos))
    stats["users"] = len(seen)
    stats["interactions"] = len(b)
    stats["textless_items"] = textless_counts = {k: len(v) for k, v in textless.items()}
    if drop_textless and stats["textless_interactions"]:
        log.warning("%s: %d items without text (%s) drop %d interactions", path,
                    sum(textless_counts.values()), textless_counts, stats["textless_interactions"])
    return b


def _catalogue(seq_path: Path, item_path: Path, histories: Iterator[History], table: ItemTable,
               roles: tuple[str, str], stats: dict, skip_malformed: bool,
               drop_textless: bool) -> RawCatalogue:
    b = collect(seq_path, histories, table, stats, skip_malformed, drop_textless)
    used = set(b.item_codes)
    table.stats["unused"] = sum(1 for raw in (*table.text, *table.empty) if raw not in used)
    inputs = (describe_input(seq_path, roles[0]), describe_input(item_path, roles[1]))
    log.info("read %s: %s; %s: %s", seq_path, stats, item_path, table.stats)
    items = {raw: ItemInfo(text) for raw, text in table.text.items()}
    return b.build(items, dict.fromkeys(table.empty, EMPTY_TEXT), inputs,
                   {roles[0]: stats, roles[1]: table.stats})


def read_unisrec(inter: str | Path, items: str | Path, skip_malformed: bool = False,
                 drop_textless: bool = False, progress: bool = True) -> RawCatalogue:
    """Read a one-row-per-user ``.inter`` file and its ``.item`` file into a :class:`RawCatalogue`."""
    table = read_unisrec_items(items, skip_malformed, progress)
    stats = {"lines": 0, "blank": 0, "malformed_skipped": 0}
    hist = unisrec_histories(inter, progress, stats)
    return _catalogue(Path(inter), Path(items), hist, table, ("inter", "items"), stats, skip_malformed,
                      drop_textless)


def read_sequences(sequences: str | Path, names: str | Path, skip_malformed: bool = False,
                   drop_textless: bool = False, progress: bool = True) -> RawCatalogue:
    """Read ``user_sequence.txt`` and ``item_names.txt`` into a :class:`RawCatalogue`."""
    table = read_item_names(names, skip_malformed, progress)
    stats = {"lines": 0, "blank": 0, "malformed_skipped": 0}
    hist = sequence_histories(sequences, progress, stats)
    return _catalogue(Path(sequences), Path(names), hist, table, ("sequences", "names"), stats,
                      skip_malformed, drop_textless)


__all__ = [
    "EMPTY_TEXT",
    "ItemTable",
    "read_item_names",
    "read_sequences",
    "read_unisrec",
    "read_unisrec_items",
    "sequence_histories",
    "unisrec_histories",
]
