"""Raw catalogue -> one atomic-format domain folder, the way UniSRec prepared the paper's data.

Steps, in order (each one's counts before/after go to ``<D>.prepare.json``):

1. ``dedupe``: an interaction repeating an earlier one's (user, item, timestamp, rating) is dropped
   (UniSRec read the ratings into a set). The same item at another time is kept.
2. ``metadata``: interactions with items that have no (usable) metadata are dropped.
3. ``k_core``: users with fewer than ``user_k`` and items with fewer than ``item_k`` interactions are
   dropped, both from the previous pass's counts, until a pass drops nothing (0 or 1 disables).
4. ``short_history``: users with fewer than 3 interactions (no leave-one-out split) are dropped.

Readers: ``raw_amazon`` (Amazon 2018 files), ``raw_generic`` (any interactions + item tables) and
``raw_sources`` (published, already filtered histories; timestamps are sequence positions, and
``SOURCE_DEFAULTS`` turns the k-core off so the data stays as published).

Ordering and indices (deterministic; UniSRec's own order came from a Python set):

- users are indexed in the order of their first remaining interaction in the input;
- each user's interactions are sorted by timestamp, ties broken by input order (line order);
- items are indexed in the order of first appearance when the users' sorted histories are read one
  after the other in user-index order.

Splits (UniSRec's ``convert_to_atomic_files``): for a user history ``s`` of ``n`` items, ``train`` has a
row per target position ``p = n-3 .. 1`` (longest first) with history ``s[:p]``; ``valid`` is
``s[:n-2] -> s[n-2]``, ``test`` is ``s[:n-1] -> s[n-1]``; every history keeps its last ``max_len`` items.

Output in ``out_dir/<D>/``: ``<D>.{train,valid,test}.inter``, ``<D>.item2index``, ``<D>.user2index``,
``<D>.text``, ``<D>.items.tsv`` (``item_id<TAB>text<TAB>image`` in index order; image a URL, a path
relative to the domain folder, or empty) and, written last, ``<D>.prepare.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from missrec.data.atomic import INTER_HEADER, ITEM_TABLE_HEADER, SPLITS, TEXT_HEADER, write_index_map
from missrec.data.raw_amazon import read_amazon
from missrec.data.raw_common import ItemInfo, RawCatalogue, is_url
from missrec.data.raw_generic import read_generic
from missrec.data.raw_sources import read_sequences, read_unisrec
from missrec.errors import ConfigError, MissingInputError
from missrec.io import atomic_open, sha256_file, write_json

log = logging.getLogger(__name__)

FORMAT = "missrec-prepare/1"
MIN_HISTORY = 3  # one valid and one test target, and a history of at least one item
ORDERING = ("users by first remaining interaction in input order; each history by timestamp, ties by "
            "input order; items by first appearance along the histories in user order")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class PrepareConfig:
    """How a raw catalogue becomes a domain. The defaults reproduce the paper's (UniSRec's) data."""

    user_k: int = 5  # k-core on users: keep users with >= user_k interactions (0/1: off)
    item_k: int = 5  # k-core on items
    max_len: int = 50  # histories in the .inter files keep their last max_len items
    dedupe: bool = True  # drop exact repeats of (user, item, timestamp, rating)
    skip_malformed: bool = False  # malformed input lines: error (False) or counted skip (True)
    require_title: bool = False  # Amazon: also drop items whose cleaned title is missing or empty
    max_field_chars: int = 2000  # Amazon: a cleaned text field this long or longer is dropped (0: keep all)
    progress: bool = True

    def __post_init__(self) -> None:
        bad = []
        if self.user_k < 0 or self.item_k < 0:
            bad.append(f"user_k and item_k must be >= 0, got {self.user_k}, {self.item_k}")
        if self.max_len < 1:
            bad.append(f"max_len must be >= 1, got {self.max_len}")
        if self.max_field_chars < 0:
            bad.append(f"max_field_chars must be >= 0, got {self.max_field_chars}")
        if bad:
            raise ConfigError("bad PrepareConfig: " + "; ".join(bad))


@dataclass(frozen=True)
class PreparedDomain:
    """A filtered, ordered, indexed domain. ``offsets`` [U + 1] and ``seq`` [T] hold user ``u``'s history
    as item indices ``seq[offsets[u]:offsets[u + 1]]`` (oldest first)."""

    user_ids: list[str]
    item_ids: list[str]
    offsets: np.ndarray
    seq: np.ndarray
    infos: list[ItemInfo]
    filters: list[dict]
    dropped: dict[str, int]


def check_domain_name(name: str) -> str:
    """Domain names become file prefixes and id prefixes: letters, digits, ``_``, ``.``, ``-``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"domain name {name!r} must match {_NAME.pattern}")
    return name


# --------------------------------------------------------------------------------------------- pipeline


def _counts(cat: RawCatalogue, keep: np.ndarray) -> dict[str, int]:
    return {
        "interactions": int(keep.sum()),
        "users": int(np.count_nonzero(np.bincount(cat.user[keep], minlength=len(cat.user_ids)))),
        "items": int(np.count_nonzero(np.bincount(cat.item[keep], minlength=len(cat.item_ids)))),
    }


def _duplicates(cat: RawCatalogue, keep: np.ndarray) -> np.ndarray:
    """[N] bool: a later repeat of an earlier kept interaction's (user, item, timestamp, rating)."""
    idx = np.flatnonzero(keep)
    order = idx[np.lexsort((idx, cat.rating[idx], cat.timestamp[idx], cat.item[idx], cat.user[idx]))]
    same = np.ones(order.shape[0], dtype=bool)
    same[0:1] = False
    for col in (cat.user, cat.item, cat.timestamp, cat.rating):
        v = col[order]
        same[1:] &= v[1:] == v[:-1]
    dup = np.zeros(len(cat), dtype=bool)
    dup[order[same]] = True
    return dup


def _k_core(cat: RawCatalogue, keep: np.ndarray, user_k: int, item_k: int) -> tuple[np.ndarray, list[dict]]:
    """Iterate: drop users < user_k and items < item_k (counts of the previous pass) until stable."""
    keep = keep.copy()
    passes: list[dict] = []
    if user_k <= 1 and item_k <= 1:
        return keep, passes
    while True:
        uc = np.bincount(cat.user[keep], minlength=len(cat.user_ids))
        ic = np.bincount(cat.item[keep], minlength=len(cat.item_ids))
        bad_u = (uc > 0) & (uc < user_k)
        bad_i = (ic > 0) & (ic < item_k)
        if not bad_u.any() and not bad_i.any():
            return keep, passes
        keep &= ~(bad_u[cat.user] | bad_i[cat.item])
        passes.append({"users_dropped": int(bad_u.sum()), "items_dropped": int(bad_i.sum()),
                       **_counts(cat, keep)})
        log.info("k-core pass %d: %s", len(passes), passes[-1])


def build_domain(cat: RawCatalogue, cfg: PrepareConfig = PrepareConfig()) -> PreparedDomain:
    """Filter, order and index a raw catalogue (see the module docstring for the rules)."""
    keep = np.ones(len(cat), dtype=bool)
    filters: list[dict] = []
    dropped: dict[str, int] = {}

    def step(name: str, new_keep: np.ndarray, before: dict, **extra) -> np.ndarray:
        after = _counts(cat, new_keep)
        dropped[name] = before["interactions"] - after["interactions"]
        filters.append({"step": name, "before": before, "after": after, **extra})
        return new_keep

    counts = _counts(cat, keep)
    dup = _duplicates(cat, keep) if cfg.dedupe and len(cat) else np.zeros(len(cat), dtype=bool)
    keep = step("duplicates", keep & ~dup, counts, enabled=cfg.dedupe)
    counts = filters[-1]["after"]
    reasons = ["ok", "no_metadata", *sorted(set(cat.excluded.values()))]
    code = {r: i for i, r in enumerate(reasons)}
    item_reason = np.fromiter(
        (0 if raw in cat.items else code[cat.excluded.get(raw, "no_metadata")] for raw in cat.item_ids),
        dtype=np.int64, count=len(cat.item_ids))
    per = np.bincount(item_reason[cat.item[keep]], minlength=len(reasons))
    bad_items = np.bincount(item_reason, minlength=len(reasons))
    keep = step("metadata", keep & (item_reason[cat.item] == 0), counts,
                interactions_dropped_by_reason={r: int(per[i]) for i, r in enumerate(reasons) if i},
                items_by_reason={r: int(bad_items[i]) for i, r in enumerate(reasons) if i})
    for r in reasons[1:]:
        dropped[r] = int(per[code[r]])
    dropped.pop("metadata")
    counts = filters[-1]["after"]
    kept, passes = _k_core(cat, keep, cfg.user_k, cfg.item_k)
    keep = step("k_core", kept, counts, user_k=cfg.user_k, item_k=cfg.item_k, passes=passes)
    counts = filters[-1]["after"]
    uc = np.bincount(cat.user[keep], minlength=len(cat.user_ids))
    keep = step("short_history", keep & (uc[cat.user] >= MIN_HISTORY), counts, min_interactions=MIN_HISTORY)
    return _order(cat, keep, filters, dropped)


def _order(cat: RawCatalogue, keep: np.ndarray, filters: list[dict], dropped: dict[str, int]) -> PreparedDomain:
    idx = np.flatnonzero(keep)  # ascending input order
    users_in, first = np.unique(cat.user[idx], return_index=True)
    user_rank = np.full(len(cat.user_ids), -1, dtype=np.int64)
    user_rank[users_in[np.argsort(first, kind="stable")]] = np.arange(users_in.shape[0])
    order = idx[np.lexsort((idx, cat.timestamp[idx], user_rank[cat.user[idx]]))]
    items_sorted = cat.item[order]
    items_in, ifirst = np.unique(items_sorted, return_index=True)
    item_rank = np.full(len(cat.item_ids), -1, dtype=np.int64)
    by_first = items_in[np.argsort(ifirst, kind="stable")]
    item_rank[by_first] = np.arange(by_first.shape[0])
    seq = item_rank[items_sorted]
    lens = np.bincount(user_rank[cat.user[order]], minlength=users_in.shape[0])
    offsets = np.zeros(users_in.shape[0] + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    user_order = users_in[np.argsort(first, kind="stable")]
    return PreparedDomain(
        user_ids=[cat.user_ids[u] for u in user_order.tolist()],
        item_ids=[cat.item_ids[i] for i in by_first.tolist()],
        offsets=offsets, seq=seq,
        infos=[cat.items[cat.item_ids[i]] for i in by_first.tolist()],
        filters=filters, dropped=dropped,
    )


# --------------------------------------------------------------------------------------------- writing


def _image_column(image: str, domain_dir: Path) -> str:
    if not image or is_url(image):
        return image
    return os.path.relpath(image, domain_dir) if os.path.isabs(image) else image


def write_domain(prep: PreparedDomain, domain: str, out_dir: str | Path, max_len: int = 50,
                 progress: bool = True) -> dict:
    """Write the atomic files of ``prep`` to ``out_dir/<domain>/``; returns counts and output sha256s.

    Does not write ``<D>.prepare.json`` (the caller writes it last, with the full summary).
    """
    ddir = Path(out_dir) / check_domain_name(domain)
    ddir.mkdir(parents=True, exist_ok=True)
    prefix = ddir / domain
    lens = np.diff(prep.offsets)
    rows = {"train": int(np.maximum(lens - 3, 0).sum()), "valid": len(prep.user_ids), "test": len(prep.user_ids)}
    paths = {s: Path(f"{prefix}.{s}.inter") for s in SPLITS}
    with atomic_open(paths["train"]) as ftr, atomic_open(paths["valid"]) as fva, atomic_open(paths["test"]) as fte:
        for fh in (ftr, fva, fte):
            fh.write(INTER_HEADER + "\n")
        seq = prep.seq
        for u in tqdm(range(len(prep.user_ids)), desc=f"{domain} splits", disable=not progress, leave=False):
            tok = [str(x) for x in seq[prep.offsets[u]:prep.offsets[u + 1]].tolist()]
            n = len(tok)
            for p in range(n - 3, 0, -1):
                ftr.write(f"{u}\t{' '.join(tok[max(0, p - max_len):p])}\t{tok[p]}\n")
            fva.write(f"{u}\t{' '.join(tok[max(0, n - 2 - max_len):n - 2])}\t{tok[n - 2]}\n")
            fte.write(f"{u}\t{' '.join(tok[max(0, n - 1 - max_len):n - 1])}\t{tok[n - 1]}\n")
    write_index_map(f"{prefix}.item2index", prep.item_ids)
    write_index_map(f"{prefix}.user2index", prep.user_ids)
    with atomic_open(f"{prefix}.text") as fh:  # verbatim (keeps UniSRec's trailing space), not re-spaced
        fh.write(TEXT_HEADER + "\n")
        for raw, info in zip(prep.item_ids, prep.infos, strict=True):
            fh.write(f"{raw}\t{info.text}\n")
    images = {"url": 0, "path": 0, "path_missing": 0, "none": 0}
    with atomic_open(f"{prefix}.items.tsv") as fh:
        fh.write(ITEM_TABLE_HEADER + "\n")
        for raw, info in zip(prep.item_ids, prep.infos, strict=True):
            col = _image_column(info.image, ddir)
            if not col:
                images["none"] += 1
            elif is_url(col):
                images["url"] += 1
            else:
                images["path"] += 1
                images["path_missing"] += not (ddir / col).exists()
            fh.write(f"{raw}\t{info.text}\t{col}\n")
    outputs = {Path(f).name: sha256_file(f) for f in (*paths.values(), f"{prefix}.item2index",
                                                     f"{prefix}.user2index", f"{prefix}.text", f"{prefix}.items.tsv")}
    return {
        "users": len(prep.user_ids), "items": len(prep.item_ids), "interactions": int(prep.seq.shape[0]),
        "rows": rows, "avg_len": round(float(lens.mean()), 4) if lens.size else 0.0,
        "max_history": int(lens.max(initial=0)), "users_truncated": int((lens - 1 > max_len).sum()),
        "images": images, "outputs": outputs,
    }


def finish(cat: RawCatalogue, domain: str, out_dir: str | Path, cfg: PrepareConfig, kind: str,
           extra: dict | None = None, t0: float | None = None) -> dict:
    """Build, write and summarise a domain; ``<D>.prepare.json`` is written last. Returns the summary."""
    t0 = time.perf_counter() if t0 is None else t0
    ddir = Path(out_dir) / check_domain_name(domain)
    (ddir / f"{domain}.prepare.json").unlink(missing_ok=True)  # not complete until rewritten at the end
    prep = build_domain(cat, cfg)
    if not prep.user_ids:
        log.warning("%s: no users left after filtering (%s)", domain, prep.dropped)
    written = write_domain(prep, domain, out_dir, cfg.max_len, cfg.progress)
    others = sorted(p.name for p in ddir.glob(f"{domain}.*")
                    if p.is_file() and p.name not in written["outputs"] and p.name != f"{domain}.prepare.json")
    if others:  # e.g. feature files of an earlier preparation: their rows follow the old item indices
        log.warning("%s holds files this preparation did not write; they may be stale: %s", ddir, others)
    summary = {
        "format": FORMAT, "kind": kind, "domain": domain, "out": str(ddir),
        "config": dataclasses.asdict(cfg), "inputs": list(cat.inputs), "read": dict(cat.stats),
        **(extra or {}),
        "filters": prep.filters, "dropped": {"malformed_lines": _malformed(cat.stats), **prep.dropped},
        "ordering": ORDERING,
        **written, "other_files": others, "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(ddir / f"{domain}.prepare.json", summary)
    log.info("prepared %s in %s: %d users, %d items, %d interactions, rows %s", domain, ddir,
             summary["users"], summary["items"], summary["interactions"], summary["rows"])
    return summary


def _malformed(stats: object) -> int:
    """Sum of every ``malformed_skipped`` count in the (nested) read stats."""
    if isinstance(stats, dict):
        return sum(int(v) if k == "malformed_skipped" else _malformed(v) for k, v in stats.items())
    return 0


def prepare_amazon(ratings: str | Path, meta: str | Path, domain: str, out_dir: str | Path,
                   cfg: PrepareConfig = PrepareConfig()) -> dict:
    """Amazon Review Data (2018) ratings CSV + metadata JSON lines -> ``out_dir/<domain>/``; the summary."""
    t0 = time.perf_counter()
    check_domain_name(domain)
    cat = read_amazon(ratings, meta, cfg.max_field_chars, cfg.require_title, cfg.skip_malformed, cfg.progress)
    return finish(cat, domain, out_dir, cfg, "amazon", t0=t0)


def prepare_generic(interactions: str | Path, items: str | Path, domain: str, out_dir: str | Path,
                    cfg: PrepareConfig = PrepareConfig()) -> dict:
    """Interactions CSV (``user,item,timestamp``) + item table (``item_id,text[,image]``) -> a domain."""
    t0 = time.perf_counter()
    check_domain_name(domain)
    cat = read_generic(interactions, items, cfg.skip_malformed, cfg.progress)
    return finish(cat, domain, out_dir, cfg, "generic", t0=t0)


SOURCE_DEFAULTS = PrepareConfig(user_k=0, item_k=0)  # published sources are filtered already: no re-filtering


def prepare_unisrec(inter: str | Path, items: str | Path, domain: str, out_dir: str | Path,
                    cfg: PrepareConfig = SOURCE_DEFAULTS, drop_textless: bool = False) -> dict:
    """A one-row-per-user RecBole ``.inter`` file + its ``.item`` file -> a domain (``raw_sources``)."""
    t0 = time.perf_counter()
    check_domain_name(domain)
    cat = read_unisrec(inter, items, cfg.skip_malformed, drop_textless, cfg.progress)
    return finish(cat, domain, out_dir, cfg, "unisrec", {"drop_textless": drop_textless}, t0)


def prepare_sequences(sequences: str | Path, names: str | Path, domain: str, out_dir: str | Path,
                      cfg: PrepareConfig = SOURCE_DEFAULTS, drop_textless: bool = False) -> dict:
    """``user_sequence.txt`` + ``item_names.txt`` -> a domain (see ``missrec.data.raw_sources``)."""
    t0 = time.perf_counter()
    check_domain_name(domain)
    cat = read_sequences(sequences, names, cfg.skip_malformed, drop_textless, cfg.progress)
    return finish(cat, domain, out_dir, cfg, "sequences", {"drop_textless": drop_textless}, t0)


def prepared_domains(paths: Sequence[str | Path]) -> list[tuple[str, Path, str]]:
    """``[(label, folder, file prefix)]`` for prepared domain folders given as ``path`` or ``LABEL=path``.

    The file prefix is ``LABEL`` when ``LABEL.train.inter`` exists there, else that of the folder's one
    ``*.train.inter``; the label (the id prefix of a merge) defaults to the file prefix.
    """
    out = []
    for spec in paths:
        label, sep, folder = str(spec).partition("=")
        if not sep:
            label, folder = "", str(spec)
        if label and Path(folder, f"{label}.train.inter").exists():
            name = label
        else:
            found = sorted(Path(folder).glob("*.train.inter"))
            if len(found) != 1:
                raise MissingInputError(f"{folder}: expected one <D>.train.inter, found {[p.name for p in found]}")
            name = found[0].name.removesuffix(".train.inter")
        out.append((check_domain_name(label or name), Path(folder), name))
    return out


__all__ = [
    "FORMAT",
    "SOURCE_DEFAULTS",
    "PrepareConfig",
    "PreparedDomain",
    "build_domain",
    "check_domain_name",
    "finish",
    "prepare_amazon",
    "prepare_generic",
    "prepare_sequences",
    "prepare_unisrec",
    "prepared_domains",
    "write_domain",
]
