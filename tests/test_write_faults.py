"""A full disk or a process death while an artefact is being written: the previous complete artefact
stays valid and is the one used, and a rerun completes the work (feature chunks, shard folders; the
checkpoint case is in test_pretrain.py). Faults are real: the child process's file size limit
(``RLIMIT_FSIZE``) makes the kernel fail the write (EFBIG) or kill the writer (SIGXFSZ) mid-write.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from missrec.data.atomic import load_domain
from missrec.data.shards import MANIFEST, ShardSource, shards_exist, write_domain_shards
from missrec.data.synthetic import SyntheticConfig, generate_catalogue
from missrec.features.chunks import ChunkStore, plan_chunks
from missrec.features.encode import EncoderSpec
from missrec.features.job import ExtractConfig, extract_features
from missrec.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
DOMAIN = "Garden"
MODES = ["diskfull", "die"]


def _faulty(tmp: Path, mode: str, target: str, nth: int, limit: int, job: dict) -> subprocess.CompletedProcess:
    job_file = tmp / f"job-{mode}.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "fault_driver.py"), mode, target, str(nth),
                           str(limit), str(job_file)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    if mode == "die":
        assert proc.returncode == -signal.SIGXFSZ, proc.stderr[-3000:]
    else:
        assert proc.returncode == 1 and "File too large" in proc.stderr, proc.stderr[-3000:]
    return proc


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    generate_catalogue(root, SyntheticConfig(items_per_domain=40, users_per_domain=120, domains=(DOMAIN,),
                                             target_domains=(), proxy_features=True))
    return root / DOMAIN


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> EncoderSpec:
    from missrec.features.clip import make_tiny_clip

    cfg_path, ckpt = make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    return EncoderSpec(backend="open_clip", model=cfg_path.stem, pretrained=str(ckpt), model_config=str(cfg_path),
                       batch_size=8)


@pytest.mark.parametrize("mode", MODES)
def test_feature_chunk_write_fault(catalogue, spec, tmp_path, mode):
    """Chunk 3 is redone and its write fails: every other chunk and the finished tables of the earlier
    run stay valid and untouched; the rerun encodes chunk 3 only and gives the same tables."""
    out = tmp_path / "out"
    cfg = ExtractConfig(str(catalogue), DOMAIN, spec, pool=None, out_dir=str(out), chunk_size=8, progress=False)
    first = extract_features(cfg)
    tables = {p.name: p.read_bytes() for p in out.glob(f"{DOMAIN}.feat*CLS")}
    meta_file = out / f"{DOMAIN}.features.json"
    assert len(tables) == 2 and meta_file.exists() and first["chunks"]["computed"] == 5
    store = ChunkStore(first["chunks"]["folder"], "")
    (store.folder / "chunk-000003.json").unlink()  # chunk 3 must be encoded again
    chunk_files = {p.name: p.read_bytes() for p in store.folder.glob("chunk-*") if "000003" not in p.name}

    _faulty(tmp_path, mode, "missrec.features.chunks:ChunkStore.write", 1, 256,
            {"job": "extract", "config": {**dataclasses.asdict(cfg), "pool": None}})
    assert not (store.folder / "chunk-000003.json").exists()  # the interrupted chunk is not committed
    assert {p.name: p.read_bytes() for p in store.folder.glob("chunk-*") if "000003" not in p.name} == chunk_files
    assert {p.name: p.read_bytes() for p in out.glob(f"{DOMAIN}.feat*CLS")} == tables  # old tables intact
    assert json.loads(meta_file.read_text())["tables"]["text"]["sha256"] == sha256_file(out / f"{DOMAIN}.feat1CLS")
    if mode == "die":  # the half-written temporary file is left, and never taken for a chunk
        assert list(store.folder.glob(".chunk-000003.*.tmp"))

    again = extract_features(cfg)
    assert again["chunks"]["computed"] == 1 and again["chunks"]["skipped"] == 4
    assert {p.name: p.read_bytes() for p in out.glob(f"{DOMAIN}.feat*CLS")} == tables
    assert len(plan_chunks(40, 8)) == 5


@pytest.mark.parametrize("mode", MODES)
def test_shard_write_fault(catalogue, tmp_path, mode):
    """Rewriting a shard folder (smaller shards) fails at the second shard: the folder still holds the
    complete earlier set, which reads and verifies; the rerun replaces it whole."""
    out = tmp_path / "shards"
    dom = load_domain(catalogue, DOMAIN, ["feat1CLS"])
    first = write_domain_shards(dom, out, samples_per_shard=400, feature_suffixes=["feat1CLS"], show_progress=False)
    before = _files(out)
    job = {"job": "shards", "data_root": str(catalogue), "domain": DOMAIN, "features": ["feat1CLS"],
           "out": str(out), "samples_per_shard": 100}
    _faulty(tmp_path, mode, "missrec.data.shard_writer:_write_shard", 2, 4096, job)
    assert _files(out) == before and shards_exist(out)
    src = ShardSource(out, verify=True)
    assert src.manifest == json.loads(json.dumps(first))
    rows = sum(len(b) for b in src.batches("train", 64, max_len=20))
    assert rows == first["splits"]["train"]["rows"]
    assert (tmp_path / ".shards.incoming").is_dir()  # the unfinished staging folder, never read

    second = write_domain_shards(dom, out, samples_per_shard=100, feature_suffixes=["feat1CLS"], show_progress=False)
    assert not (tmp_path / ".shards.incoming").exists()
    m = json.loads((out / MANIFEST).read_text())
    assert m == json.loads(json.dumps(second)) and len(m["splits"]["train"]["shards"]) > 1
    listed = {s["file"] for sp in m["splits"].values() for s in sp["shards"]}
    assert {p.name for p in out.glob("*.tar")} == listed  # no shard of the old set left behind
    assert sum(len(b) for b in ShardSource(out, verify=True).batches("train", 64, max_len=20)) == rows


def test_shards_refuse_to_replace_a_folder_with_other_files(catalogue, tmp_path):
    dom = load_domain(catalogue, DOMAIN)
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        write_domain_shards(dom, out, samples_per_shard=400, show_progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_replace_folder_swaps_whole_folders(tmp_path):
    from missrec.io import replace_folder

    old, new = tmp_path / "d", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "a").write_text("old")
    (new / "b").write_text("new")
    replace_folder(new, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert _files(old) == {"b": b"new"}
    np.testing.assert_equal(len(list(tmp_path.glob(".d.*"))), 0)


def test_shards_rewritten_through_a_symlink_and_a_relative_path(catalogue, tmp_path, monkeypatch):
    dom = load_domain(catalogue, DOMAIN)
    real = tmp_path / "real"

    def train_shards() -> int:
        return len(json.loads((real / MANIFEST).read_text())["splits"]["train"]["shards"])

    write_domain_shards(dom, real, samples_per_shard=400, show_progress=False)
    n400 = train_shards()
    (tmp_path / "link").symlink_to(real)
    write_domain_shards(dom, tmp_path / "link", samples_per_shard=100, show_progress=False)
    assert (tmp_path / "link").is_symlink() and shards_exist(tmp_path / "link") and train_shards() > n400
    monkeypatch.chdir(real)
    write_domain_shards(dom, ".", samples_per_shard=400, show_progress=False)  # the folder itself
    assert shards_exist(real) and train_shards() == n400
