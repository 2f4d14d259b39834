"""Prepared domains back to raw form: history reconstruction, export to generic raw files, merging.

A prepared domain's split files hold every user's full history: each row is a prefix ``s[:p] -> s[p]``
with the history cut to its last ``max_len`` items. Rows shorter than the longest row length ``L`` are
exact (their length is the target's position); the rest are chained: the row whose history equals the
last ``L`` items reconstructed so far gives the next item. So histories longer than ``max_len`` come
back whole, and re-preparing an export reproduces the domain index for index.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from missrec.data.atomic import (
    ITEM_TABLE_HEADER,
    SPLITS,
    TEXT_HEADER,
    Split,
    iter_table,
    load_item_table,
    read_index_map,
    read_inter,
)
from missrec.data.prepare import PrepareConfig, check_domain_name, finish, prepared_domains
from missrec.data.raw_common import ItemInfo, RawCatalogue, describe_input, is_url
from missrec.errors import ConfigError, DataFormatError
from missrec.io import atomic_open

log = logging.getLogger(__name__)

ID_SEPARATOR = ":"  # merged ids read "Domain:raw_id"


def reconstruct_histories(splits: dict[str, Split], num_users: int, where: str | Path = "",
                          progress: bool = False) -> list[list[int]]:
    """Each user's full history (item indices, oldest first) from the prefix rows of its splits.

    Raises :class:`DataFormatError` (naming ``where``) when a user's rows do not form one history.
    """
    rows: list[list[tuple[np.ndarray, int]]] = [[] for _ in range(num_users)]
    longest = 0
    for split in splits.values():
        for i in range(len(split)):
            u = int(split.users[i])
            if not 0 <= u < num_users:
                raise DataFormatError(where, f"user index {u} outside the user table (0..{num_users - 1})")
            h = split.history(i)
            longest = max(longest, h.shape[0])
            rows[u].append((h, int(split.targets[i])))
    out: list[list[int]] = []
    for u in tqdm(range(num_users), desc="histories", disable=not progress, leave=False):
        out.append(_one_history(rows[u], longest, u, where))
    return out


def _one_history(rows: list[tuple[np.ndarray, int]], longest: int, u: int, where: str | Path) -> list[int]:
    if not rows:
        return []
    exact = [(h, t) for h, t in rows if h.shape[0] < longest]
    chain: dict[tuple[int, ...], deque[int]] = defaultdict(deque)
    for h, t in rows:
        if h.shape[0] >= longest:
            chain[tuple(h.tolist())].append(t)
    size = 1 + max((h.shape[0] for h, _ in exact), default=-1)
    s: list[int | None] = [None] * size
    for h, t in exact:
        for pos, x in enumerate((*h.tolist(), t)):
            if s[pos] is None:
                s[pos] = x
            elif s[pos] != x:
                raise DataFormatError(where, f"user {u}: rows disagree on history position {pos}")
    if None in s or not s:
        raise DataFormatError(where, f"user {u}: the rows leave gaps in the history (no prefix rows?)")
    while True:
        key = tuple(s[-longest:])
        nxt = chain.get(key)
        if not nxt:
            break
        s.append(nxt.popleft())
    left = sum(len(v) for v in chain.values())
    if left:
        raise DataFormatError(where, f"user {u}: {left} row(s) do not continue the history")
    return s  # type: ignore[return-value]


def load_prepared(domain_dir: str | Path, name: str, progress: bool = False) -> RawCatalogue:
    """A prepared domain as a :class:`RawCatalogue`: users and items in index order, timestamp = position.

    Item metadata comes from ``<D>.items.tsv`` (local image paths made absolute) when present, else from
    ``<D>.text`` (no images); a domain with neither gets empty texts.
    """
    ddir = Path(domain_dir)
    prefix = ddir / name
    item_path, user_path = Path(f"{prefix}.item2index"), Path(f"{prefix}.user2index")
    item_ids = read_index_map(item_path)
    files = [item_path]
    splits = {}
    for s in SPLITS:
        p = Path(f"{prefix}.{s}.inter")
        splits[s] = read_inter(p, len(item_ids), max_len=None)
        files.append(p)
    if user_path.exists():
        user_ids = read_index_map(user_path)
        files.append(user_path)
    else:
        user_ids = [str(u) for u in range(1 + max(int(s.users.max(initial=-1)) for s in splits.values()))]
    hist = reconstruct_histories(splits, len(user_ids), Path(f"{prefix}.train.inter"), progress)
    items_tsv, text_path = Path(f"{prefix}.items.tsv"), Path(f"{prefix}.text")
    if items_tsv.exists():
        table = {raw: ItemInfo(text, _absolute(image, ddir)) for raw, text, image in load_item_table(items_tsv)}
        files.append(items_tsv)
    elif text_path.exists():
        table = {raw: ItemInfo(text) for _, (raw, text) in iter_table(text_path, TEXT_HEADER, 2, "item_id, text")}
        files.append(text_path)
    else:
        log.warning("%s: no items.tsv or .text: items get empty texts", prefix)
        table = {raw: ItemInfo("") for raw in item_ids}
    lens = np.asarray([len(h) for h in hist], dtype=np.int64)
    user = np.repeat(np.arange(len(user_ids), dtype=np.int64), lens)
    item = np.fromiter((x for h in hist for x in h), dtype=np.int64, count=int(lens.sum()))
    pos = np.concatenate([np.arange(n, dtype=np.float64) for n in lens]) if lens.size else np.zeros(0)
    stats = {"users": len(user_ids), "items": len(item_ids), "interactions": int(lens.sum()),
             "rows": {s: len(v) for s, v in splits.items()}}
    return RawCatalogue(user_ids, item_ids, user, item, pos, np.zeros_like(pos), table, {},
                        tuple(describe_input(f, "prepared") for f in files), stats)


def _absolute(image: str, base: Path) -> str:
    if not image or is_url(image) or os.path.isabs(image):
        return image
    return os.path.normpath(base.absolute() / image)


def export_interactions(domain_dir: str | Path, name: str, out_dir: str | Path, progress: bool = False) -> dict:
    """Export a prepared domain to generic raw files in ``out_dir``; returns their paths and counts.

    Writes ``<name>.interactions.csv`` (``user,item,timestamp``: raw ids, timestamp = position in the
    user's history) and ``<name>.items.tsv`` (``item_id<TAB>text<TAB>image`` in item-index order, image
    paths relative to ``out_dir``), which :func:`missrec.data.prepare.prepare_generic` reads back.
    """
    cat = load_prepared(domain_dir, name, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inter_path, items_path = out / f"{name}.interactions.csv", out / f"{name}.items.tsv"
    with atomic_open(inter_path) as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(("user", "item", "timestamp"))
        for u, i, t in zip(cat.user.tolist(), cat.item.tolist(), cat.timestamp.tolist(), strict=True):
            w.writerow((cat.user_ids[u], cat.item_ids[i], int(t)))
    missing = 0
    with atomic_open(items_path) as fh:
        fh.write(ITEM_TABLE_HEADER + "\n")
        for raw in cat.item_ids:
            info = cat.items.get(raw)
            if info is None:
                missing += 1
                continue
            image = info.image
            if image and not is_url(image):
                image = os.path.relpath(image, out.absolute())
            fh.write(f"{raw}\t{info.text}\t{image}\n")
    if missing:
        log.warning("%s: %d items have no text/metadata row; left out of %s", domain_dir, missing, items_path)
    return {"interactions_csv": str(inter_path), "items_table": str(items_path), "users": len(cat.user_ids),
            "items": len(cat.item_ids), "interactions": len(cat), "items_without_metadata": missing}


def merge_catalogues(sources: Sequence[tuple[str, RawCatalogue]]) -> RawCatalogue:
    """One catalogue from several: user and item ids become ``Name:raw_id``; inputs and stats are kept."""
    names = [n for n, _ in sources]
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"merge needs one or more distinct domain names, got {names}")
    user_ids: list[str] = []
    item_ids: list[str] = []
    cols: dict[str, list[np.ndarray]] = {"user": [], "item": [], "timestamp": [], "rating": []}
    items: dict[str, ItemInfo] = {}
    excluded: dict[str, str] = {}
    inputs: list[dict] = []
    for name, cat in sources:
        check_domain_name(name)
        pre = f"{name}{ID_SEPARATOR}"
        cols["user"].append(cat.user + len(user_ids))
        cols["item"].append(cat.item + len(item_ids))
        cols["timestamp"].append(cat.timestamp)
        cols["rating"].append(cat.rating)
        user_ids += [pre + u for u in cat.user_ids]
        item_ids += [pre + i for i in cat.item_ids]
        items.update((pre + k, v) for k, v in cat.items.items())
        excluded.update((pre + k, v) for k, v in cat.excluded.items())
        inputs += [{"domain": name, **rec} for rec in cat.inputs]
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    return RawCatalogue(user_ids, item_ids, arrays["user"], arrays["item"], arrays["timestamp"], arrays["rating"],
                        items, excluded, tuple(inputs), {n: dict(c.stats) for n, c in sources})


MERGE_DEFAULTS = PrepareConfig(user_k=0, item_k=0)  # sources are prepared already: no second k-core


def merge_domains(inputs: Sequence[str | Path], domain: str, out_dir: str | Path,
                  cfg: PrepareConfig = MERGE_DEFAULTS) -> dict:
    """Merge prepared domain folders (``path`` or ``LABEL=path``) into ``out_dir/<domain>/``; the summary.

    Ids become ``Label:raw_id`` (the label defaults to the domain's file prefix) and image paths are rewritten relative to the new folder. Each source
    keeps its histories, so with k-core off (the default) its rows come out unchanged (re-indexed).
    """
    t0 = time.perf_counter()
    check_domain_name(domain)
    folders = prepared_domains(inputs)
    sources = [(label, load_prepared(folder, name, cfg.progress)) for label, folder, name in folders]
    merged = merge_catalogues(sources)
    extra = {"sources": {label: {"folder": str(folder), "file_prefix": name, **dict(cat.stats)}
                         for (label, folder, name), (_, cat) in zip(folders, sources, strict=True)}}
    return finish(merged, domain, out_dir, cfg, "merge", extra=extra, t0=t0)


__all__ = [
    "ID_SEPARATOR",
    "MERGE_DEFAULTS",
    "export_interactions",
    "load_prepared",
    "merge_catalogues",
    "merge_domains",
    "reconstruct_histories",
]
