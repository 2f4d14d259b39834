"""Writing a domain's shard folder: tar shards (atomic), item tables, then the manifest (see ``shards.py``)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

from missrec.data.atomic import SPLITS, Domain, Split, write_features, write_index_map, write_text
from missrec.data.shard_format import _SHARD_RE, FORMAT, FORMAT_VERSION, MANIFEST, SAMPLE_EXT
from missrec.errors import ConfigError, InputError
from missrec.io import _fsync_dir, atomic_open, replace_folder, sha256_file, write_json

log = logging.getLogger(__name__)

class _HashingFile:
    """Forward writes to ``fh`` while hashing and counting the bytes (what tarfile's stream mode needs)."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.nbytes += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def _write_shard(path: Path, samples: Iterable[dict[str, Any]], mtime: int) -> tuple[int, str, int]:
    """Write one tar shard atomically (temp sibling, fsync, rename). Returns (samples, sha256, bytes)."""
    count = 0
    with atomic_open(path, "wb") as fh:
        hf = _HashingFile(fh)
        with wds.TarWriter(hf, encoder=False, user="missrec", group="missrec", mtime=mtime) as tw:
            for sample in samples:
                tw.write(sample)
                count += 1
    return count, hf.sha.hexdigest(), hf.nbytes


def _split_samples(
    split_name: str, split: Split, start: int, stop: int, last: np.ndarray
) -> Iterator[dict[str, Any]]:
    users, targets, offsets, items = split.users, split.targets, split.offsets, split.items
    for row in range(start, stop):
        rec = {
            "user": int(users[row]),
            "history": items[offsets[row] : offsets[row + 1]].tolist(),
            "target": int(targets[row]),
            "row": row,
            "last": bool(last[row]),
        }
        yield {
            "__key__": f"{split_name}-{row:09d}",
            SAMPLE_EXT: json.dumps(rec, separators=(",", ":")).encode("utf-8"),
        }


def _check_replaceable(dest: Path) -> None:
    """Refuse to replace a folder holding files that no shard write made (they would be deleted)."""
    if not dest.exists():
        return
    if not dest.is_dir():
        raise NotADirectoryError(f"{dest}: exists and is not a folder")
    ours = {MANIFEST}
    try:
        old = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
        ours |= {f["file"] for f in [*old.get("features", {}).values(), *old.get("tables", {}).values()]}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        pass
    foreign = sorted(p.name for p in dest.iterdir()
                     if p.name not in ours and not _SHARD_RE.match(p.name) and not p.name.startswith("."))
    if foreign:
        raise FileExistsError(
            f"{dest}: holds files a shard write did not make ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); writing shards replaces the whole folder, so give "
            "the shards a folder of their own")


def write_domain_shards(
    domain: Domain,
    out_dir: Path,
    samples_per_shard: int = 10000,
    feature_suffixes: Sequence[str] = (),
    show_progress: bool = True,
    feature_dtype: str = "float32",
) -> dict:
    """Write ``domain`` as WebDataset shards + item tables + ``manifest.json`` into ``out_dir``.

    ``feature_suffixes`` selects tables of ``domain.features`` to copy next to the shards, stored as
    ``feature_dtype`` (``float16`` halves them; readers memory-map them either way). Everything is
    written into a staging sibling, ``.<out_dir name>.incoming``, the manifest last; only the complete
    folder then replaces ``out_dir`` (:func:`missrec.io.replace_folder`: one atomic exchange). A write
    that fails or dies half-way (full disk, kill) leaves the previous complete ``out_dir`` as it was,
    and the next write clears the staging folder. ``out_dir`` may only hold what a shard write made
    (an earlier shard set): anything else is refused rather than deleted. Returns the manifest.
    """
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    missing = [s for s in feature_suffixes if s not in domain.features]
    if missing:
        raise KeyError(
            f"domain {domain.name!r} has no feature table(s) {missing}; loaded: {sorted(domain.features)}"
        )
    dest = Path(out_dir).resolve()  # a symlinked folder is replaced where it really is
    _check_replaceable(dest)
    out_dir = dest.parent / f".{dest.name}.incoming"
    if out_dir.exists():
        log.info("removing %s, left by an earlier write that did not finish", out_dir)
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    manifest_path = out_dir / MANIFEST
    t0 = time.time()
    # item tables first, then shards, then the manifest
    features = _write_feature_tables(domain, out_dir, feature_suffixes, feature_dtype)
    tables = _write_id_tables(domain, out_dir)
    splits: dict[str, Any] = {}
    for split_name in SPLITS:
        splits[split_name] = _write_split(domain, split_name, out_dir, samples_per_shard, show_progress)
    max_hist = max((int(domain.splits[s].lengths.max()) for s in SPLITS if len(domain.splits[s])), default=0)
    _fsync_dir(out_dir)

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "domain": domain.name,
        "num_items": int(domain.num_items),
        "num_users": int(domain.num_users),
        "max_history_len": max_hist,
        "samples_per_shard": samples_per_shard,
        "sample_member": SAMPLE_EXT,
        "splits": splits,
        "features": features,
        "tables": tables,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(domain.root),
    }
    write_json(manifest_path, manifest)
    replace_folder(out_dir, dest)
    log.info(
        "wrote %s shards to %s in %.1fs: %s", domain.name, dest, time.time() - t0,
        {k: (v["rows"], len(v["shards"])) for k, v in splits.items()},
    )
    return manifest


def _write_feature_tables(domain: Domain, out_dir: Path, suffixes: Sequence[str], dtype: str) -> dict[str, Any]:
    features = {}
    for suffix in suffixes:
        arr = np.asarray(domain.features[suffix])
        if arr.ndim != 2 or arr.shape[0] != domain.num_items:
            raise InputError(f"feature table {suffix!r} has shape {arr.shape}, expected [{domain.num_items}, dim]")
        fname = f"{domain.name}.{suffix}"
        write_features(out_dir / fname, arr, dtype)
        features[suffix] = {"file": fname, "dim": int(arr.shape[1]), "dtype": dtype,
                            "sha256": sha256_file(out_dir / fname)}
    return features


def _write_id_tables(domain: Domain, out_dir: Path) -> dict[str, Any]:
    """The raw item / user id maps and the item texts, where the domain has them."""
    tables = {}
    item_ids = domain.item_ids
    if item_ids is not None:
        tables["item2index"] = f"{domain.name}.item2index"
        write_index_map(out_dir / tables["item2index"], item_ids)
    if domain.user_ids is not None:
        tables["user2index"] = f"{domain.name}.user2index"
        write_index_map(out_dir / tables["user2index"], domain.user_ids)
    if domain.texts is not None:
        tables["text"] = f"{domain.name}.text"
        raw = item_ids if item_ids is not None else [str(i) for i in range(len(domain.texts))]
        write_text(out_dir / tables["text"], raw, domain.texts)
    return {k: {"file": v, "sha256": sha256_file(out_dir / v)} for k, v in tables.items()}


def _write_split(domain: Domain, split_name: str, out_dir: Path, samples_per_shard: int, show_progress: bool
                 ) -> dict[str, Any]:
    """The shards of one split; its manifest entry."""
    split = domain.splits[split_name]
    n = len(split)
    shards = []
    last = np.zeros(n, dtype=bool)
    last[split.last_rows_per_user()] = True
    # fixed member mtime: the same domain gives byte-identical shards (same sha256); an int, because a
    # float mtime costs a PAX header (512 bytes more) per member
    mtime = 0
    bar = tqdm(total=n, desc=f"{domain.name}/{split_name}", unit="rows", disable=not show_progress)
    for k, start in enumerate(range(0, n, samples_per_shard)):
        stop = min(n, start + samples_per_shard)
        fname = f"{split_name}-{k:06d}.tar"
        count, sha, nbytes = _write_shard(out_dir / fname, _split_samples(split_name, split, start, stop, last), mtime)
        shards.append({"file": fname, "samples": count, "sha256": sha, "bytes": nbytes})
        bar.update(count)
    bar.close()
    log.info("%s/%s: %d rows in %d shards", domain.name, split_name, n, len(shards))
    return {"rows": n, "last_rows": int(last.sum()), "shards": shards}
