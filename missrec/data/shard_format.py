"""The shard folder's format: names, the manifest reader, and the shard error (see ``shards.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from missrec.data.atomic import SPLITS
from missrec.errors import DataFormatError

FORMAT = "missrec-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAMPLE_EXT = "json"
_SHARD_RE = re.compile(r"^(train|valid|test)-\d{6}\.tar$")


class ShardError(DataFormatError):
    """A shard that cannot be read (truncated, corrupt, missing, checksum mismatch); names the shard file."""


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise DataFormatError(path, "missing shard manifest (no shards written here, or the write did not finish)")
    try:
        with open(path, encoding="utf-8") as fh:
            m = json.load(fh)
    except json.JSONDecodeError as exn:
        raise DataFormatError(path, f"malformed manifest: {exn.msg}", exn.lineno) from None
    except UnicodeDecodeError as exn:
        raise DataFormatError(path, f"malformed manifest: {exn}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataFormatError(path, f"not a {FORMAT} manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise DataFormatError(path, f"format_version {m.get('format_version')!r}, this reader reads {FORMAT_VERSION}")
    try:
        for key in ("domain", "num_items", "num_users", "splits", "features"):
            if key not in m:
                raise KeyError(key)
        for split in SPLITS:
            sp = m["splits"][split]
            int(sp["rows"])
            for s in sp["shards"]:
                str(s["file"]), int(s["samples"]), str(s["sha256"])
            if sum(int(s["samples"]) for s in sp["shards"]) != int(sp["rows"]):
                raise DataFormatError(path, f"split {split!r}: shard sample counts do not add up to its rows")
        for f in m["features"].values():
            str(f["file"]), int(f["dim"])
    except (KeyError, TypeError, ValueError) as exn:
        if isinstance(exn, DataFormatError):
            raise
        raise DataFormatError(path, f"malformed manifest: missing or bad field {exn!s}") from None
    return m


def shards_exist(folder: str | Path) -> bool:
    """True when ``folder`` holds a readable manifest and every shard file it lists (no checksums)."""
    folder = Path(folder)
    try:
        m = _read_manifest(folder)
    except DataFormatError:
        return False
    return all((folder / s["file"]).is_file() for sp in m["splits"].values() for s in sp["shards"])
