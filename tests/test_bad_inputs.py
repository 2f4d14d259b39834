"""Every reader refuses malformed input with an error naming the file (and ``:LINE`` where it has lines).

One table of ``reader x malformation`` (:data:`CASES`): each case writes the bad file(s) under
``tmp_path`` and returns a :class:`Bad`: the call to make, the file the error must name and an optional
check run after the error (e.g. nothing left behind marked complete). A second table checks that
incomplete or corrupt checkpoints are skipped, never chosen.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from missrec.config import PretrainConfig, RunConfig, build
from missrec.data.atomic import (
    INTER_HEADER,
    ITEM_TABLE_HEADER,
    TEXT_HEADER,
    Domain,
    Split,
    load_domain,
    read_features,
)
from missrec.data.prepare import PrepareConfig, prepare_amazon, prepare_generic
from missrec.data.shards import MANIFEST, ShardError, ShardSource, shards_exist, write_domain_shards
from missrec.errors import ConfigError, DataFormatError, InputError
from missrec.features.chunks import ChunkRange, ChunkStore
from missrec.features.items import read_item_source
from missrec.io import sha256_file
from missrec.models.build import load_backbone
from missrec.models.missrec import MISSRec
from missrec.models.sasrec import SASRec
from missrec.train.checkpoint import COMPLETE, latest_tag
from missrec.train.engine import deepspeed_config, read_ds_config
from missrec.transfer.artefacts import BackboneMismatchError, load_adapter, save_adapter

ANY_LINE = -1  # the error must name some line (``path:N:``); which one depends on buffering
QUIET = PrepareConfig(user_k=0, item_k=0, progress=False)


@dataclass(frozen=True)
class Bad:
    """A prepared malformed input: ``call()`` must raise naming ``path``; ``after()`` checks what is left."""

    call: Callable[[], object]
    path: Path
    after: Callable[[], None] | None = None


Make = Callable[[Path], Bad]


def _w(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- atomic files

GOOD_INTER = INTER_HEADER + "\n0\t0 1\t2\n"


def atomic(bad: str, train: str | bytes = GOOD_INTER, index: str | bytes | None = None,
           text: str | bytes | None = None, drop: str = "", **load_kw) -> Make:
    """Domain ``D`` of 5 items (good valid/test splits) with ``D.train.inter`` = ``train``, optional
    ``D.item2index`` / ``D.text`` replacements and ``D.<drop>`` removed; ``load_domain`` must name
    ``D.<bad>``."""
    def make(t: Path) -> Bad:
        _w(t / "D.item2index", "".join(f"i{i}\t{i}\n" for i in range(5)) if index is None else index)
        _w(t / "D.train.inter", train)
        _w(t / "D.valid.inter", GOOD_INTER)
        _w(t / "D.test.inter", GOOD_INTER)
        if text is not None:
            _w(t / "D.text", text)
        if drop:
            (t / f"D.{drop}").unlink()
        return Bad(lambda: load_domain(t, "D", **load_kw), t / f"D.{bad}")
    return make


def inter(rows: str) -> str:
    return INTER_HEADER + "\n" + rows


def feature(data: np.ndarray | bytes, **kw) -> Make:
    """A feature file for 5 items holding ``data``; ``read_features`` must refuse it."""
    def make(t: Path) -> Bad:
        path = _w(t / "D.feat1CLS", data if isinstance(data, bytes) else np.asarray(data, "<f4").tobytes())
        return Bad(lambda: read_features(path, 5, **kw), path)
    return make


def _nonfinite(row: int, value: float) -> np.ndarray:
    a = np.ones((5, 3))
    a[row, 1] = value
    return a


# ------------------------------------------------------------------------------------- raw inputs + prepare

GOOD_RATINGS = "".join(f"I{i},U{u},5.0,{100 * u + i}\n" for u in range(3) for i in range(3))
GOOD_META = "".join(json.dumps({"asin": f"I{i}", "title": f"thing {i}"}) + "\n" for i in range(3))


def _not_complete(out: Path) -> Callable[[], None]:
    def check() -> None:
        assert not (out / "D" / "D.prepare.json").exists(), "a failed preparation is marked complete"
        assert not list(out.rglob("*.tmp")), "temporary files left behind"
    return check


def amazon(ratings: str | bytes = GOOD_RATINGS, meta: str | bytes = GOOD_META) -> Make:
    """``prepare_amazon`` over these raw files must name the bad one and leave nothing marked complete."""
    def make(t: Path) -> Bad:
        r, m = _w(t / "raw" / "ratings.csv", ratings), _w(t / "raw" / "meta.json", meta)
        out = t / "out"
        return Bad(lambda: prepare_amazon(r, m, "D", out, QUIET), r if ratings != GOOD_RATINGS else m,
                   _not_complete(out))
    return make


def generic(interactions: str, items: str = "item_id\ttext\na\tA\nb\tB\n", bad: str = "inter.csv") -> Make:
    """``prepare_generic`` over these raw files must name ``raw/<bad>`` and leave nothing marked complete."""
    def make(t: Path) -> Bad:
        i, it = _w(t / "raw" / "inter.csv", interactions), _w(t / "raw" / "items.tsv", items)
        out = t / "out"
        return Bad(lambda: prepare_generic(i, it, "D", out, QUIET), t / "raw" / bad, _not_complete(out))
    return make


GOOD_CSV = "user,item,timestamp\nu,a,1\nu,b,2\n"


def amazon_rerun_keeps_previous_complete(t: Path) -> Bad:
    """A bad rerun over a complete earlier preparation: what is marked complete still matches its files."""
    out = t / "out"
    r, m = _w(t / "raw" / "ratings.csv", GOOD_RATINGS), _w(t / "raw" / "meta.json", GOOD_META)
    prepare_amazon(r, m, "D", out, QUIET)
    _w(r, "I0,U0,5.0,1\nI1,U0\n")

    def after() -> None:
        summary = json.loads((out / "D" / "D.prepare.json").read_text())
        outputs = summary["outputs"]
        assert outputs and all(sha256_file(out / "D" / f) == h for f, h in outputs.items())
        assert not list(out.rglob("*.tmp"))

    return Bad(lambda: prepare_amazon(r, m, "D", out, QUIET), r, after)


# ------------------------------------------------------------------------------------- extraction inputs


def items_tsv(rows: list[str], index: str = "a\t0\nb\t1\nc\t2\n", bad: str = "items.tsv") -> Make:
    """``D.items.tsv`` (rows under the standard header) next to ``D.item2index``; ``read_item_source``."""
    def make(t: Path) -> Bad:
        _w(t / "D.item2index", index)
        _w(t / "D.items.tsv", ITEM_TABLE_HEADER + "\n" + "".join(r + "\n" for r in rows))
        return Bad(lambda: read_item_source(t, "D"), t / f"D.{bad}")
    return make


def chunk_checksum(t: Path) -> Bad:
    store = ChunkStore(t / ".chunks" / "D.clip", fp="run-1")
    chunk = ChunkRange(0, 0, 4)
    store.write(chunk, {"text": np.ones((4, 3), dtype=np.float32)}, {"empty_texts": 0})
    npy = store.folder / "chunk-000000.text.npy"
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    npy.write_bytes(bytes(data))

    def after() -> None:
        assert store.status(chunk) == "stale", "a chunk with a bad checksum must be redone"

    return Bad(lambda: store.load(chunk), store.folder / "chunk-000000.json", after)


# ------------------------------------------------------------------------------------- shards


def _shard_domain(root: Path, nan: bool = False) -> Domain:
    rng = np.random.default_rng(0)

    def rows(n: int, u0: int) -> Split:
        return Split.from_rows([(u0 + r, rng.integers(0, 12, size=int(rng.integers(1, 6))).tolist(),
                                 int(rng.integers(0, 12))) for r in range(n)])

    feats = rng.standard_normal((12, 4)).astype(np.float32)
    if nan:
        feats[5, 0] = np.nan
    splits = {"train": rows(30, 0), "valid": rows(8, 100), "test": rows(8, 200)}
    return Domain("Toy", root, 12, 300, splits, [f"I{i}" for i in range(12)], None, None, {"f": feats})


def _write_shards(t: Path, nan: bool = False) -> dict:
    return write_domain_shards(_shard_domain(t, nan), t / "Toy", samples_per_shard=10,
                               feature_suffixes=("f",), show_progress=False)


def _flip(path: Path, pos: int, new: bytes | None = None) -> None:
    """Overwrite bytes at ``pos`` (default: flip one bit), keeping the file size."""
    data = bytearray(path.read_bytes())
    if new is None:
        data[pos] ^= 0x01
    else:
        data[pos : pos + len(new)] = new
    path.write_bytes(bytes(data))


def shards(damage: Callable[[Path], Path], read: str = "open", **kw) -> Make:
    """A written shard folder ``t/Toy`` damaged by ``damage(folder) -> bad file``, then opened
    (``read="open"``), read to the end (a split name) or asked for feature table ``f`` (``"features"``)."""
    def make(t: Path) -> Bad:
        _write_shards(t)
        out = t / "Toy"
        bad = damage(out)
        def call() -> object:
            src = ShardSource(out, **kw)
            if read == "open":
                return src
            if read == "features":
                return src.features("f")
            return [len(b) for b in src.batches(read, 8, max_len=5)]

        return Bad(call, bad)
    return make


def _no_manifest(out: Path) -> Path:
    (out / MANIFEST).unlink()
    return out / MANIFEST


def _manifest(edit: Callable[[dict], None]) -> Callable[[Path], Path]:
    def damage(out: Path) -> Path:
        m = json.loads((out / MANIFEST).read_text())
        edit(m)
        _w(out / MANIFEST, json.dumps(m))
        return out / MANIFEST
    return damage


def _manifest_line4_bad(out: Path) -> Path:
    lines = (out / MANIFEST).read_text().splitlines()
    lines[3] = lines[3].replace(":", "", 1)  # line 4 '"domain": "Toy",' loses its colon
    _w(out / MANIFEST, "\n".join(lines) + "\n")
    return out / MANIFEST


def _truncate(name: str, size: Callable[[int], int]) -> Callable[[Path], Path]:
    def damage(out: Path) -> Path:
        os.truncate(out / name, size((out / name).stat().st_size))
        return out / name
    return damage


def _bytes(name: str, pos: int | bytes, new: bytes | None = None) -> Callable[[Path], Path]:
    """Flip a bit at ``pos``, or replace the first occurrence of bytes ``pos`` with ``new`` (same size)."""
    def damage(out: Path) -> Path:
        path = out / name
        if isinstance(pos, bytes):
            _flip(path, path.read_bytes().index(pos), new)
        else:
            _flip(path, pos)
        return path
    return damage


def shard_rewrite_fails(t: Path) -> Bad:
    """A rewrite that fails (NaN features, caught while staging) leaves the previous complete folder as it was."""
    _write_shards(t)
    out = t / "Toy"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def after() -> None:
        assert shards_exist(out) and {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert ShardSource(out, verify=True).num_items > 0

    return Bad(lambda: _write_shards(t, nan=True), t / ".Toy.incoming" / "Toy.f", after)


# ------------------------------------------------------------------------------------- configs


def config(name: str, text: str | None, cls: type = RunConfig) -> Make:
    """``build(cls, [file])`` over a config file holding ``text`` (``None``: the file does not exist)."""
    def make(t: Path) -> Bad:
        path = t / name if text is None else _w(t / name, text)
        return Bad(lambda: build(cls, [path]), path)
    return make


def ds(text: str, cfg: PretrainConfig | None = None, world_size: int = 1) -> Make:
    """``read_ds_config`` of a DeepSpeed JSON, then (``cfg`` given) ``deepspeed_config`` naming that file."""
    def make(t: Path) -> Bad:
        path = _w(t / "zero.json", text)
        if cfg is None:
            return Bad(lambda: read_ds_config(path), path)
        return Bad(lambda: deepspeed_config(read_ds_config(path), cfg, world_size, str(path)), path)
    return make


# ------------------------------------------------------------------------------------- checkpoints


def adapter(damage: str) -> Make:
    """An adapter saved on ``backbone.pt``, then loaded after ``damage``: other_backbone, other_format,
    other_model or truncated."""
    def make(t: Path) -> Bad:
        torch.manual_seed(0)
        model, path = nn.Linear(3, 2), t / "D.adapter.pt"
        backbone = _w(t / "backbone.pt", b"backbone bytes v1")
        save_adapter(model, path, backbone)
        if damage == "other_backbone":
            backbone = _w(t / "other.pt", b"backbone bytes v2")
        elif damage == "other_format":
            torch.save({**torch.load(path, weights_only=True), "format": "missrec-adapter/0"}, path)
        elif damage == "other_model":
            model = nn.Sequential(nn.Linear(3, 2))
        else:
            os.truncate(path, path.stat().st_size // 2)
        return Bad(lambda: load_adapter(model, path, backbone), path)
    return make


def _missrec(hidden: int = 8) -> MISSRec:
    from missrec.config import MISSRecConfig
    from missrec.models.build import missrec_from_config

    torch.manual_seed(0)
    feats = [np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)]
    return missrec_from_config(MISSRecConfig(hidden=hidden, heads=2, inner=16), 10, feats, max_len=5, seed=0)


def backbone(obj: Callable[[], object], truncate: bool = False) -> Make:
    """``load_backbone`` of a tiny MISSRec from a checkpoint holding ``obj()`` (cut in half: ``truncate``)."""
    def make(t: Path) -> Bad:
        path = t / "backbone.pt"
        torch.save(obj(), path)
        if truncate:
            os.truncate(path, path.stat().st_size // 2)
        return Bad(lambda: load_backbone(_missrec(), str(path)), path)
    return make


# ------------------------------------------------------------------------------------- the table


DFE = DataFormatError


def case(name: str, exc: type[BaseException], line: int | None, needle: str, make: Make):
    """One row: ``make`` prepares the input; the call raises ``exc`` naming the file (and ``:line``, None when
    the fault is not on one line) with ``needle`` in the message."""
    return pytest.param(make, exc, line, needle, id=name)


CASES = [
    # atomic files
    case("inter-wrong-header", DFE, 1, "wrong header",
         atomic("train.inter", "user\titems\ttarget\n0\t0 1\t2\n")),
    case("inter-item-not-int", DFE, 3, "item id 'x' is not an integer",
         atomic("train.inter", inter("0\t0 1\t2\n1\t0 x\t2\n"))),
    case("inter-user-not-int", DFE, 4, "user id 'u' is not an integer",  # the blank line counts
         atomic("train.inter", inter("0\t0 1\t2\n\nu\t0 1\t2\n"))),
    case("inter-target-not-int", DFE, 2, "target item id '2.5'",
         atomic("train.inter", inter("0\t0 1\t2.5\n"))),
    case("inter-out-of-range", DFE, 3, "item id 9 outside the item table",
         atomic("train.inter", inter("0\t0 1\t2\n1\t0 9\t2\n"))),
    case("inter-negative-id", DFE, 3, "negative item id",
         atomic("train.inter", inter("0\t0 1\t2\n1\t-1\t2\n"), drop="item2index")),
    case("inter-empty-history", DFE, 3, "empty history", atomic("train.inter", inter("0\t0 1\t2\n1\t\t2\n"))),
    case("inter-field-count", DFE, 3, "expected 3 tab-separated fields",
         atomic("train.inter", inter("0\t0 1\t2\n1\t0 1\n"))),
    case("inter-not-utf8", DFE, 3, "UTF-8",
         atomic("train.inter", inter("0\t0 1\t2\n").encode() + b"1\t0 \xff\t2\n")),
    case("inter-missing-split", FileNotFoundError, None, "missing split file",
         atomic("test.inter", drop="test.inter")),
    case("item2index-field-count", DFE, 2, "raw_id<TAB>index", atomic("item2index", index="i0\t0\ni1 1\n")),
    case("item2index-not-int", DFE, 2, "'one' is not an integer",
         atomic("item2index", index="i0\t0\ni1\tone\n")),
    case("item2index-twice", DFE, 3, "index 1 appears twice",
         atomic("item2index", index="i0\t0\ni1\t1\ni2\t1\n")),
    case("item2index-not-dense", DFE, None, "not dense", atomic("item2index", index="i0\t0\ni1\t1\ni2\t7\n")),
    case("item2index-not-utf8", DFE, 2, "UTF-8", atomic("item2index", index=b"i0\t0\n\xffi1\t1\n")),
    case("text-wrong-header", DFE, 1, "wrong header", atomic("text", text="item\ttext\ni0\tfoo\n")),
    case("text-field-count", DFE, 3, "expected 2 tab-separated",
         atomic("text", text=f"{TEXT_HEADER}\ni0\tfoo\ni1 bar\n")),
    case("text-unknown-item", DFE, 3, "'zz' is not in the item table",
         atomic("text", text=f"{TEXT_HEADER}\ni0\tfoo\nzz\tbar\n")),
    case("text-missing-items", DFE, None, "4 items have no text",
         atomic("text", text=f"{TEXT_HEADER}\ni0\tfoo\n")),
    case("text-not-utf8", DFE, 2, "UTF-8",
         atomic("text", text=TEXT_HEADER.encode() + b"\ni0\tcaf\xe9\n")),
    case("feat-not-float32", DFE, None, "not a whole number of float32", feature(b"\0" * 41)),
    case("feat-not-dividing", DFE, None, "do not divide into 5 items", feature(np.zeros(16))),
    case("feat-wrong-dim", DFE, None, "expected 5 x 4 float32", feature(np.zeros((5, 3)), dim=4)),
    case("feat-nan-row", DFE, 3, "row 3 (item 3) holds NaN or inf", feature(_nonfinite(3, np.nan))),
    case("feat-inf-row", DFE, 0, "row 0 (item 0) holds NaN or inf", feature(_nonfinite(0, -np.inf))),
    case("feat-missing-file", FileNotFoundError, None, "feature file 'feat3CLS'",
         atomic("feat3CLS", feature_suffixes=("feat3CLS",))),
    # raw Amazon / generic inputs through prepare_*: nothing marked complete after a failure
    case("amazon-meta-bad-json", DFE, 2, "not valid JSON",
         amazon(meta='{"asin": "I0", "title": "a"}\n{"asin": "I1", "title": \n')),
    case("amazon-meta-no-asin", DFE, 3, "non-empty string 'asin'", amazon(meta='{"asin": "I0"}\n\n["I1"]\n')),
    case("amazon-meta-not-utf8", DFE, 2, "not valid UTF-8",
         amazon(meta=b'{"asin": "I0"}\n{"asin": "I1", "title": "caf\xe9"}\n')),
    case("amazon-ratings-fields", DFE, 2, "expected 4 comma-separated fields",
         amazon("I0,U0,5.0,1\nI1,U0,5.0\n")),
    case("amazon-ratings-timestamp", DFE, 3, "timestamp 'yesterday' is not an integer",
         amazon("I0,U0,5.0,1\nI1,U0,5.0,1\nI2,U0,5.0,yesterday\n")),
    case("amazon-ratings-nan", DFE, 1, "rating 'nan' is not a finite number", amazon("I0,U0,nan,1\n")),
    case("amazon-ratings-empty-user", DFE, 2, "user id '' is empty", amazon("I0,U0,5.0,1\nI1,,5.0,2\n")),
    case("amazon-ratings-truncated-gzip", DFE, ANY_LINE, "truncated or corrupt gzip",
         amazon(gzip.compress(GOOD_RATINGS.encode() * 3000, mtime=0)[:-20])),
    case("amazon-rerun-keeps-previous", DFE, 2, "expected 4", amazon_rerun_keeps_previous_complete),
    case("generic-missing-column", DFE, 1, "lacks column(s) ['timestamp']",
         generic("user,item,time\nu,a,1\n")),
    case("generic-empty-file", DFE, 1, "missing header line", generic("")),
    case("generic-field-count", DFE, 3, "expected 3 fields", generic("user,item,timestamp\nu,a,1\nu,b\n")),
    case("generic-timestamp", DFE, 3, "timestamp 'soon' is not a finite",
         generic("user,item,timestamp\nu,a,1\nu,b,soon\n")),
    case("generic-items-duplicate", DFE, 4, "item 'a' appears twice",
         generic(GOOD_CSV, "item_id\ttext\na\tA\nb\tB\na\tagain\n", "items.tsv")),
    case("generic-items-no-text", DFE, 1, "lacks column(s) ['text']",
         generic(GOOD_CSV, "item_id,title\na,A\n", "items.tsv")),
    # extraction inputs
    case("items-tsv-out-of-order", DFE, 3, "rows must be in item-index order",
         items_tsv(["a\tA\t", "c\tC\t", "b\tB\t"])),
    case("items-tsv-beyond-index", DFE, 5, "beyond the 3 items of D.item2index",
         items_tsv(["a\tA\t", "b\tB\t", "c\tC\t", "d\tD\t"])),
    case("items-tsv-fewer", DFE, None, "2 item rows but D.item2index lists 3",
         items_tsv(["a\tA\t", "b\tB\t"])),
    case("items-tsv-duplicate", DFE, 3, "item 'a' appears twice", items_tsv(["a\tA\t", "a\tA\t", "c\tC\t"])),
    case("items-tsv-fields", DFE, 3, "expected 3 tab-separated fields", items_tsv(["a\tA\t", "b\tB"])),
    case("items-tsv-bad-item2index", DFE, 2, "raw_id<TAB>index",
         items_tsv(["a\tA\t"], index="a\t0\nb\n", bad="item2index")),
    case("chunk-checksum", InputError, None, "chunk 0 is missing or corrupt", chunk_checksum),
    # shards and manifests
    case("shard-no-manifest", DFE, None, "missing shard manifest", shards(_no_manifest)),
    case("shard-manifest-bad-json", DFE, 4, "malformed manifest", shards(_manifest_line4_bad)),
    case("shard-manifest-version", DFE, None, "format_version 99",
         shards(_manifest(lambda m: m.update(format_version=99)))),
    case("shard-manifest-counts", DFE, None, "do not add up",
         shards(_manifest(lambda m: m["splits"]["valid"].update(rows=9)))),
    case("shard-truncated", ShardError, None, "truncated",
         shards(_truncate("train-000001.tar", lambda n: n // 2 + 100), "train")),
    case("shard-sha256", ShardError, None, "does not match the manifest",
         shards(_bytes("valid-000000.tar", -700), verify=True)),
    case("shard-bad-sample-json", ShardError, None, "malformed record",
         shards(_bytes("test-000000.tar", b'"history"', b'"history '), "test")),
    case("shard-feature-sha256", DFE, None, "does not match the manifest's sha256",
         shards(_bytes("Toy.f", 0), verify=True)),
    case("shard-feature-truncated", DFE, None, "expected 12 x 4 float32",
         shards(_truncate("Toy.f", lambda n: n - 16), "features")),
    case("shard-rewrite-fails", ValueError, None, "refusing to write NaN/inf", shard_rewrite_fails),
    # configs
    case("config-unknown-key", ConfigError, None, "train.lrr: unknown key",
         config("run.yaml", "train:\n  lr: 0.01\n  lrr: 1\n")),
    case("config-wrong-type", ConfigError, None, "train.epochs: expected an integer",
         config("run.yaml", "train:\n  epochs: many\n")),
    case("config-wrong-type-json", ConfigError, None, "batch_size: expected an integer",
         config("pre.json", '{"batch_size": "big"}', PretrainConfig)),
    case("config-not-a-mapping", ConfigError, None, "must be a mapping",
         config("run.yaml", "- train\n- data\n")),
    case("config-missing-file", ConfigError, None, "cannot read config", config("nowhere.yaml", None)),
    case("config-bad-yaml", ConfigError, 3, "not valid YAML",
         config("run.yaml", "train:\n  lr: 0.01\n bad: [1, 2\n")),
    case("config-bad-json", ConfigError, 3, "not valid JSON",
         config("run.json", '{\n "train": {\n  "lr": ,\n }\n}\n')),
    case("ds-bad-json", ConfigError, 4, "not valid JSON",
         ds('{\n "zero_optimization": {\n  "stage": 2,\n }\n}\n')),
    case("ds-not-object", ConfigError, None, "top level must be a mapping", ds("[1, 2]\n")),
    case("ds-batch-disagrees", ConfigError, None, "train_batch_size=99 disagrees with the toolkit's value 16",
         ds('{"train_batch_size": 99}', PretrainConfig(batch_size=8), 2)),
    case("ds-bad-stage", ConfigError, None, "zero_optimization.stage",
         ds('{"zero_optimization": {"stage": 9}}', PretrainConfig())),
    # checkpoints
    case("adapter-other-backbone", BackboneMismatchError, None, "backbone.pt", adapter("other_backbone")),
    case("adapter-other-format", ValueError, None, "not a missrec-adapter/1", adapter("other_format")),
    case("adapter-other-model", ValueError, None, "parameters the model does not", adapter("other_model")),
    case("adapter-truncated", ValueError, None, "unreadable", adapter("truncated")),
    case("backbone-other-model", ValueError, None, "lacks backbone parameters",
         backbone(lambda: {"model": SASRec(10, max_len=5, hidden=8, layers=1, heads=2, inner=16, dropout=0.5, attn_dropout=0.5).state_dict()})),
    case("backbone-other-size", ValueError, None, "lacks backbone parameters",
         backbone(lambda: _missrec(hidden=16).state_dict())),
    case("backbone-not-a-state-dict", ValueError, None, "not a state dict", backbone(lambda: torch.zeros(3))),
    case("backbone-truncated", ValueError, None, "unreadable",
         backbone(lambda: _missrec().state_dict(), True)),
]


@pytest.mark.parametrize("make, exc, line, needle", CASES)
def test_bad_input_names_file_and_line(tmp_path: Path, make: Make, exc, line, needle) -> None:
    bad = make(tmp_path)
    with pytest.raises(exc) as info:
        bad.call()
    msg = str(info.value)
    assert str(bad.path) in msg, f"the error does not name {bad.path}: {msg}"
    if line == ANY_LINE:
        assert re.search(re.escape(str(bad.path)) + r":\d+: ", msg), f"no {bad.path}:LINE in: {msg}"
    elif line is not None:
        assert f"{bad.path}:{line}: " in msg, f"no {bad.path}:{line} in: {msg}"
    if isinstance(info.value, DataFormatError):
        assert info.value.path == str(bad.path)
        assert info.value.line == line or (line == ANY_LINE and info.value.line is not None)
    assert needle in msg, f"{needle!r} not in: {msg}"
    if bad.after is not None:
        bad.after()


# ------------------------------------------------------------------------------------- checkpoint markers


def _mark(run: Path, step: int, marker: str | bytes | None = "good") -> None:
    folder = run / "checkpoints" / f"step{step:08d}"
    folder.mkdir(parents=True)
    _w(folder / "mp_rank_00_model_states.pt", b"weights")
    if marker == "good":
        marker = json.dumps({"global_step": step, "epoch": 0, "step_in_epoch": step})
    if marker is not None:
        _w(folder / COMPLETE, marker)


@pytest.mark.parametrize("marker", [
    pytest.param(None, id="no-complete-json"),
    pytest.param("", id="empty"),
    pytest.param('{"global_step": 30', id="truncated-json"),
    pytest.param(b"\xff\xfe", id="not-utf8"),
    pytest.param("[30]", id="not-an-object"),
    pytest.param('{"epoch": 3}', id="no-global-step"),
    pytest.param('{"global_step": "thirty"}', id="step-not-a-number"),
    pytest.param('{"global_step": null}', id="step-null"),
])
def test_incomplete_checkpoint_is_skipped(tmp_path: Path, marker) -> None:
    """The newest checkpoint folder without a readable ``complete.json`` is never chosen."""
    _mark(tmp_path, 10)
    _mark(tmp_path, 20)
    _mark(tmp_path, 30, marker)
    assert latest_tag(tmp_path) == "step00000020"
    (tmp_path / "checkpoints" / "step00000010" / COMPLETE).unlink()
    (tmp_path / "checkpoints" / "step00000020" / COMPLETE).unlink()
    assert latest_tag(tmp_path) is None, "with no complete checkpoint there is nothing to resume from"
