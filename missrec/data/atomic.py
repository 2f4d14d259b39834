"""The UniSRec / MISSRec "atomic file" format: reader and writer.

A domain ``D`` in folder ``root`` is a set of files:

- ``D.train.inter`` / ``D.valid.inter`` / ``D.test.inter``: a header
  ``user_id:token<TAB>item_id_list:token_seq<TAB>item_id:token``, then one row per sample:
  user index, space-separated history of item indices (oldest first), target item index.
- ``D.item2index`` / ``D.user2index``: ``raw_id<TAB>index`` (dense, 0-based).
- ``D.text``: header ``item_id:token<TAB>text:token_seq``, then ``raw_item_id<TAB>text``.
- ``D.items.tsv`` (the prepared or synthetic catalogue's item table, input to feature extraction): header
  ``item_id<TAB>text<TAB>image``, then the raw item id, its text and its image path (empty: none).
- ``D.<suffix>`` feature files (``feat1CLS`` text, ``feat3CLS`` image, ...): raw little-endian float32,
  row ``i`` = item ``i``; an all-zero row means the modality is missing for that item.

Item indices in files are 0-based. Every error names the file and the line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from missrec.errors import ConfigError, DataFormatError, InputError, MissingInputError
from missrec.io import atomic_open

log = logging.getLogger(__name__)

INTER_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"
TEXT_HEADER = "item_id:token\ttext:token_seq"
SPLITS = ("train", "valid", "test")
ITEM_TABLE_HEADER = "item_id\ttext\timage"


@dataclass(frozen=True)
class Split:
    """One split of a domain in CSR layout.

    ``users`` [N], ``targets`` [N], ``offsets`` [N + 1], ``items`` [T]: row ``i`` has history
    ``items[offsets[i]:offsets[i + 1]]`` (oldest first) and next item ``targets[i]``.
    """

    users: np.ndarray
    targets: np.ndarray
    offsets: np.ndarray
    items: np.ndarray

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def history(self, i: int) -> np.ndarray:
        return self.items[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @staticmethod
    def from_rows(rows: Sequence[tuple[int, Sequence[int], int]]) -> Split:
        users = np.asarray([r[0] for r in rows], dtype=np.int64)
        targets = np.asarray([r[2] for r in rows], dtype=np.int64)
        lens = np.asarray([len(r[1]) for r in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        items = np.fromiter((i for r in rows for i in r[1]), dtype=np.int64, count=int(offsets[-1]))
        return Split(users, targets, offsets, items)

    def last_rows_per_user(self) -> np.ndarray:
        """Indices of each user's longest row (ties: the first). In the prefix layout of ``.train.inter``,
        that row's history + target holds all of the user's training transitions."""
        order = np.lexsort((-self.lengths, self.users))  # by user, then longest first
        users = self.users[order]
        first = np.ones(order.shape[0], dtype=bool)
        first[1:] = users[1:] != users[:-1]
        return np.sort(order[first])

    def rows(self) -> Iterable[tuple[int, np.ndarray, int]]:
        for i in range(len(self)):
            yield int(self.users[i]), self.history(i), int(self.targets[i])


@dataclass
class Domain:
    """A loaded domain. ``features`` maps a file suffix to a read-only ``[num_items, dim]`` float32 array."""

    name: str
    root: Path
    num_items: int
    num_users: int
    splits: dict[str, Split]
    item_ids: list[str] | None = None
    user_ids: list[str] | None = None
    texts: list[str] | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def valid(self) -> Split:
        return self.splits["valid"]

    @property
    def test(self) -> Split:
        return self.splits["test"]

    def path(self, suffix: str) -> Path:
        return self.root / f"{self.name}.{suffix}"


# --------------------------------------------------------------------------------------------- reading


def _text_lines(path: Path, start: int = 1) -> Iterator[tuple[int, str]]:
    """``(line number, line without newline)`` of a UTF-8 text file; bad UTF-8 names file and line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\n").rstrip("\r")
            except UnicodeDecodeError as e:
                raise DataFormatError(path, f"not valid UTF-8 ({e.reason} at byte {e.start})", lineno) from None


def read_index_map(path: Path) -> list[str]:
    """Read ``raw_id<TAB>index`` lines; indices must be exactly 0..n-1. Returns raw ids in index order."""
    pairs: dict[int, str] = {}
    for lineno, line in _text_lines(path):
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataFormatError(path, f"expected 'raw_id<TAB>index', got {line[:80]!r}", lineno)
        raw, idx = parts
        idx_i = _parse_int(idx, path, lineno, "index")
        if idx_i in pairs:
            raise DataFormatError(path, f"index {idx_i} appears twice", lineno)
        pairs[idx_i] = raw
    n = len(pairs)
    if n and (min(pairs) != 0 or max(pairs) != n - 1):
        raise DataFormatError(path, f"indices are not dense 0..{n - 1} (min {min(pairs)}, max {max(pairs)})")
    return [pairs[i] for i in range(n)]


def iter_table(path: Path, header: str, fields: int, names: str = "") -> Iterator[tuple[int, list[str]]]:
    """Rows of a tab-separated file with a fixed ``header``: yields ``(line number, fields)``, skipping
    blank lines. A wrong header or field count is a :class:`DataFormatError` naming file and line.
    The last field takes any further tabs when ``fields`` is 2 (free text)."""
    lines = _text_lines(path)
    first = next(lines, (1, ""))[1]
    if first != header:
        raise DataFormatError(path, f"wrong header {first[:120]!r}, expected {header!r}", 1)
    for lineno, line in lines:
        if not line:
            continue
        parts = line.split("\t", 1) if fields == 2 else line.split("\t")
        if len(parts) != fields:
            what = f" ({names})" if names else ""
            raise DataFormatError(path, f"expected {fields} tab-separated fields{what}, got {len(parts)}", lineno)
        yield lineno, parts


def read_inter(path: Path, num_items: int | None, max_len: int | None = None) -> Split:
    """Read a ``.inter`` file. Histories longer than ``max_len`` keep their last ``max_len`` items."""
    users: list[int] = []
    targets: list[int] = []
    lens: list[int] = []
    items: list[int] = []
    for lineno, parts in iter_table(path, INTER_HEADER, 3):
        user = _parse_int(parts[0], path, lineno, "user id")
        hist_tokens = parts[1].split()
        if not hist_tokens:
            raise DataFormatError(path, "empty history", lineno)
        hist = [_parse_int(t, path, lineno, "item id") for t in hist_tokens]
        target = _parse_int(parts[2], path, lineno, "target item id")
        if num_items is not None:
            for it in (*hist, target):
                if it < 0 or it >= num_items:
                    raise DataFormatError(
                        path, f"item id {it} outside the item table (0..{num_items - 1})", lineno
                    )
        elif min(*hist, target) < 0:
            raise DataFormatError(path, "negative item id", lineno)
        if max_len is not None and len(hist) > max_len:
            hist = hist[-max_len:]
        users.append(user)
        targets.append(target)
        lens.append(len(hist))
        items.extend(hist)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lens, dtype=np.int64), out=offsets[1:])
    return Split(
        np.asarray(users, dtype=np.int64),
        np.asarray(targets, dtype=np.int64),
        offsets,
        np.asarray(items, dtype=np.int64),
    )


def read_text(path: Path, item_ids: list[str] | None, num_items: int | None) -> list[str]:
    """Read a ``.text`` file into a list indexed by item index (raw ids mapped through ``item_ids``)."""
    index = {raw: i for i, raw in enumerate(item_ids)} if item_ids is not None else None
    out: dict[int, str] = {}
    for lineno, (raw, text) in iter_table(path, TEXT_HEADER, 2, "item_id, text"):
        if index is not None:
            if raw not in index:
                raise DataFormatError(path, f"item {raw!r} is not in the item table", lineno)
            idx = index[raw]
        else:
            idx = _parse_int(raw, path, lineno, "item id")
        out[idx] = text.strip()
    n = num_items if num_items is not None else (max(out) + 1 if out else 0)
    missing = [i for i in range(n) if i not in out]
    if missing:
        raise DataFormatError(path, f"{len(missing)} items have no text (first: index {missing[0]})")
    return [out[i] for i in range(n)]


FEATURE_DTYPES = {"float32": "<f4", "float16": "<f2"}  # storage types of feature tables (little-endian)


def read_features(
    path: Path, num_items: int, dim: int | None = None, check_finite: bool = True, dtype: str = "float32"
) -> np.ndarray:
    """Memory-map a raw feature file (``dtype`` float32, or float16 in shard folders that chose it) as
    ``[num_items, dim]`` (dim inferred when not given).

    Raises ``DataFormatError`` when the size does not divide into the item count, or (``check_finite``)
    when a row holds NaN or inf: the error names the row as the "line".
    """
    if dtype not in FEATURE_DTYPES:
        raise DataFormatError(path, f"feature dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
    width = np.dtype(FEATURE_DTYPES[dtype]).itemsize
    size = path.stat().st_size
    if size % width:
        raise DataFormatError(path, f"size {size} bytes is not a whole number of {dtype} values")
    n_values = size // width
    if num_items <= 0:
        raise DataFormatError(path, "the domain has no items")
    if dim is None:
        if n_values % num_items:
            raise DataFormatError(
                path, f"{n_values} {dtype} values do not divide into {num_items} items (size {size} bytes)"
            )
        dim = n_values // num_items
    if n_values != num_items * dim:
        raise DataFormatError(
            path, f"expected {num_items} x {dim} {dtype} = {num_items * dim * width} bytes, found {size}"
        )
    arr = np.memmap(path, dtype=FEATURE_DTYPES[dtype], mode="r", shape=(num_items, dim))
    if check_finite:
        step = max(1, (1 << 24) // max(dim, 1))
        for start in range(0, num_items, step):
            block = np.asarray(arr[start : start + step])
            bad = ~np.isfinite(block).all(axis=1)
            if bad.any():
                row = start + int(np.argmax(bad))
                raise DataFormatError(path, f"row {row} (item {row}) holds NaN or inf", row)
    return arr


def load_domain(
    root: str | Path,
    name: str,
    feature_suffixes: Sequence[str] = (),
    feature_dims: dict[str, int] | None = None,
    max_len: int | None = 50,
    load_text: bool = True,
    feature_dir: str | Path | None = None,
) -> Domain:
    """Load domain ``name`` from folder ``root``.

    The item count comes from ``.item2index`` when present, else from ``.text``, else from the largest
    item id in the splits. Feature files are memory-mapped read-only.
    """
    root = Path(root)
    prefix = root / name
    if not root.is_dir():
        raise MissingInputError(f"{root}: no such data folder")
    item_ids = read_index_map(Path(f"{prefix}.item2index")) if Path(f"{prefix}.item2index").exists() else None
    user_ids = read_index_map(Path(f"{prefix}.user2index")) if Path(f"{prefix}.user2index").exists() else None
    num_items = len(item_ids) if item_ids is not None else None
    texts = None
    text_path = Path(f"{prefix}.text")
    if load_text and text_path.exists():
        texts = read_text(text_path, item_ids, num_items)
        num_items = len(texts) if num_items is None else num_items
    splits = {}
    for split in SPLITS:
        p = Path(f"{prefix}.{split}.inter")
        if not p.exists():
            raise MissingInputError(f"{p}: missing split file of domain {name!r}")
        splits[split] = read_inter(p, num_items, max_len)
    if num_items is None:
        num_items = 1 + max(int(max(s.items.max(initial=-1), s.targets.max(initial=-1))) for s in splits.values())
    num_users = len(user_ids) if user_ids is not None else 1 + max(int(s.users.max(initial=-1)) for s in splits.values())
    features = {}
    for suffix in feature_suffixes:
        p = (Path(feature_dir) / f"{name}.{suffix}") if feature_dir else Path(f"{prefix}.{suffix}")
        if not p.exists():
            raise MissingInputError(f"{p}: feature file {suffix!r} of domain {name!r} not found")
        features[suffix] = read_features(p, num_items, (feature_dims or {}).get(suffix))
    dom = Domain(name, root, num_items, num_users, splits, item_ids, user_ids, texts, features)
    log.info(
        "loaded %s from %s: %d items, %d users, %s rows, features %s",
        name, root, num_items, num_users, {k: len(v) for k, v in splits.items()},
        {k: tuple(v.shape) for k, v in features.items()},
    )
    return dom


def _parse_int(tok: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(tok)
    except ValueError:
        raise DataFormatError(path, f"{what} {tok[:40]!r} is not an integer", lineno) from None


# --------------------------------------------------------------------------------------------- writing


def write_inter(path: str | Path, split: Split) -> None:
    """Write a split as a ``.inter`` file, atomically."""
    with atomic_open(path) as fh:
        fh.write(INTER_HEADER + "\n")
        for user, hist, target in split.rows():
            fh.write(f"{user}\t{' '.join(map(str, hist.tolist()))}\t{target}\n")


def write_index_map(path: str | Path, raw_ids: Sequence[str]) -> None:
    with atomic_open(path) as fh:
        for i, raw in enumerate(raw_ids):
            fh.write(f"{raw}\t{i}\n")


def write_text(path: str | Path, raw_ids: Sequence[str], texts: Sequence[str]) -> None:
    with atomic_open(path) as fh:
        fh.write(TEXT_HEADER + "\n")
        for raw, text in zip(raw_ids, texts, strict=True):
            fh.write(f"{raw}\t{_clean_field(text)}\n")


def write_features(path: str | Path, feats: np.ndarray, dtype: str = "float32") -> None:
    """Write ``[num_items, dim]`` features as raw little-endian ``dtype`` (float32 or float16), atomically, a block
    of rows at a time (a memory-mapped table is never copied whole). float16 halves the table; values beyond its
    range (65504) are refused rather than turned into inf."""
    if dtype not in FEATURE_DTYPES:
        raise ConfigError(f"feature dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
    if np.ndim(feats) != 2:
        raise InputError(f"features must be 2-D [num_items, dim], got shape {np.shape(feats)}")
    step = max(1, (1 << 24) // max(1, np.shape(feats)[1]))
    with atomic_open(path, "wb") as fh:
        for s in range(0, np.shape(feats)[0], step):
            src = np.asarray(feats[s : s + step])
            if not np.isfinite(src).all():
                raise InputError(f"refusing to write NaN/inf features to {path}")
            block = np.ascontiguousarray(src, dtype=FEATURE_DTYPES[dtype])
            if not np.isfinite(block).all():
                raise InputError(f"features of {path} exceed the {dtype} range (|x| > 65504): store them as float32")
            fh.write(block.tobytes())


def _clean_field(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def iter_item_table(path: str | Path) -> Iterator[tuple[int, str, str, str]]:
    """The rows of ``<D>.items.tsv`` in file order as ``(line number, item_id, text, image_rel_path_or_empty)``;
    an empty or repeated item id is an error naming its line."""
    path = Path(path)
    seen: set[str] = set()
    for lineno, (raw, text, image) in iter_table(path, ITEM_TABLE_HEADER, 3, "item_id, text, image"):
        if not raw:
            raise DataFormatError(path, "empty item_id", lineno)
        if raw in seen:
            raise DataFormatError(path, f"item {raw!r} appears twice", lineno)
        seen.add(raw)
        yield lineno, raw, text, image


def load_item_table(path: str | Path) -> list[tuple[str, str, str]]:
    """Read ``<D>.items.tsv`` into ``[(item_id, text, image_rel_path_or_empty), ...]`` in file order."""
    return [(raw, text, image) for _, raw, text, image in iter_item_table(path)]


__all__ = [
    "FEATURE_DTYPES",
    "INTER_HEADER",
    "ITEM_TABLE_HEADER",
    "TEXT_HEADER",
    "Domain",
    "Split",
    "iter_item_table",
    "load_domain",
    "load_item_table",
    "read_features",
    "read_index_map",
    "read_inter",
    "read_text",
    "write_features",
    "write_index_map",
    "write_inter",
    "write_text",
]
