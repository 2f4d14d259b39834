"""WebDataset sequence shards: writer, reader, exactly-once delivery, determinism, bad shards."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from missrec.data import shard_writer
from missrec.data.atomic import Domain, Split, load_domain, read_index_map, read_text
from missrec.data.shards import MANIFEST, ShardError, ShardSource, shards_exist, write_domain_shards
from missrec.errors import DataFormatError
from missrec.io import sha256_file

MAX_LEN = 20
NUM_ITEMS = 40


def _datasets_root() -> Path:
    env = os.environ.get("MISSREC_DATASETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _rows(rng: np.random.Generator, n: int, user0: int) -> list[tuple[int, list[int], int]]:
    # user = a unique id per row, so a batch row can be traced back to its split row
    out = []
    for r in range(n):
        length = int(rng.integers(1, 31))  # some histories longer than MAX_LEN
        hist = rng.integers(0, NUM_ITEMS, size=length).tolist()
        out.append((user0 + r, hist, int(rng.integers(0, NUM_ITEMS))))
    return out


def make_domain(root: Path, n_train: int = 300, n_eval: int = 40, seed: int = 0) -> Domain:
    rng = np.random.default_rng(seed)
    splits = {
        "train": Split.from_rows(_rows(rng, n_train, 0)),
        "valid": Split.from_rows(_rows(rng, n_eval, 10_000)),
        "test": Split.from_rows(_rows(rng, n_eval, 20_000)),
    }
    feats = {
        "feat1CLS": rng.standard_normal((NUM_ITEMS, 8)).astype(np.float32),
        "feat3CLS": rng.standard_normal((NUM_ITEMS, 4)).astype(np.float32),
    }
    feats["feat3CLS"][3] = 0.0  # a missing image
    item_ids = [f"I{i:04d}" for i in range(NUM_ITEMS)]
    texts = [f"item {i} text" for i in range(NUM_ITEMS)]
    return Domain("Toy", root, NUM_ITEMS, 20_000 + n_eval, splits, item_ids, None, texts, feats)


@pytest.fixture
def domain(tmp_path: Path) -> Domain:
    return make_domain(tmp_path / "src")


def _write(domain: Domain, out: Path, per_shard: int = 50) -> dict:
    return write_domain_shards(domain, out, samples_per_shard=per_shard,
                               feature_suffixes=("feat1CLS", "feat3CLS"), show_progress=False)


def _expected_seq(hist) -> np.ndarray:
    h = np.asarray(hist, dtype=np.int64)[-MAX_LEN:]
    seq = np.zeros(MAX_LEN, dtype=np.int64)
    seq[: h.size] = h + 1
    return seq


def _collect(batches) -> list[tuple[int, int, np.ndarray, int]]:
    out = []
    for b in batches:
        assert b.seq.shape[1] == min(MAX_LEN, int(b.seq_len.max()))  # cut to the batch's longest history
        seq = np.zeros((len(b), MAX_LEN), dtype=np.int64)
        seq[:, : b.seq.shape[1]] = b.seq.numpy()
        for i in range(len(b)):
            out.append((int(b.user[i]), int(b.seq_len[i]), seq[i], int(b.target[i])))
    return out


def _check_against_split(got, split: Split, user0: int = 0) -> None:
    counts = Counter(u for u, *_ in got)
    assert len(counts) == len(split), f"{len(counts)} distinct rows read, split has {len(split)}"
    assert max(counts.values()) == 1, "a row was delivered more than once"
    for user, seq_len, seq, target in got:
        row = user - user0
        hist = split.history(row)
        assert seq_len == min(len(hist), MAX_LEN)
        np.testing.assert_array_equal(seq, _expected_seq(hist))
        assert target == int(split.targets[row])
        assert int(split.users[row]) == user


# --------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("per_shard", [50, 200])  # 6 shards (split by shard) / 2 shards (split by row)
def test_round_trip_two_ranks_two_workers(domain: Domain, tmp_path: Path, per_shard: int) -> None:
    out = tmp_path / "shards" / "Toy"
    _write(domain, out, per_shard)
    src = ShardSource(out)
    assert src.num_rows("train") == 300 and src.num_items == NUM_ITEMS and src.name == "Toy"
    got = []
    for rank in (0, 1):
        part = _collect(src.batches("train", 32, epoch=1, seed=3, max_len=MAX_LEN,
                                    rank=rank, world_size=2, num_workers=2))
        assert part, f"rank {rank} read nothing"
        got += part
    _check_against_split(got, domain.train)


def test_single_reader_reads_every_split(domain: Domain, tmp_path: Path) -> None:
    out = tmp_path / "Toy"
    _write(domain, out)
    src = ShardSource(out)
    _check_against_split(_collect(src.batches("train", 64, max_len=MAX_LEN)), domain.train)
    valid = _collect(src.batches("valid", 16, max_len=MAX_LEN))
    assert [u for u, *_ in valid] == list(range(10_000, 10_040)), "valid must not be shuffled"
    _check_against_split(valid, domain.valid, 10_000)
    _check_against_split(_collect(src.batches("test", 7, max_len=MAX_LEN)), domain.test, 20_000)
    sizes = [len(b) for b in src.batches("train", 64, max_len=MAX_LEN, drop_last=True)]
    assert sizes == [64] * 4


# --------------------------------------------------------------------------------------------- determinism


def _order(src: ShardSource, **kw) -> list[int]:
    return [u for u, *_ in _collect(src.batches("train", 32, max_len=MAX_LEN, **kw))]


def test_shuffle_is_a_function_of_seed_and_epoch(domain: Domain, tmp_path: Path) -> None:
    out = tmp_path / "Toy"
    _write(domain, out)
    src = ShardSource(out)
    a = _order(src, seed=5, epoch=2)
    assert a == _order(src, seed=5, epoch=2)
    assert a != _order(src, seed=5, epoch=3)
    assert a != _order(src, seed=6, epoch=2)
    assert a != sorted(a) and sorted(a) == list(range(300))
    assert _order(src, shuffle=False) == list(range(300))
    # with workers too: same arguments, same order
    w = _order(src, seed=5, epoch=2, num_workers=2)
    assert w == _order(src, seed=5, epoch=2, num_workers=2) and sorted(w) == list(range(300))


# --------------------------------------------------------------------------------------------- bad shards


def test_truncated_shard_raises_naming_it_or_is_skipped(domain: Domain, tmp_path: Path) -> None:
    out = tmp_path / "Toy"
    _write(domain, out)
    bad = out / "train-000002.tar"
    os.truncate(bad, bad.stat().st_size // 2 + 100)  # mid-member cut
    with pytest.raises(DataFormatError, match="train-000002.tar"):
        _collect(ShardSource(out).batches("train", 32, max_len=MAX_LEN))

    src = ShardSource(out, skip_bad_shards=True)
    got = _collect(src.batches("train", 32, max_len=MAX_LEN))
    assert src.skipped == {"train-000002.tar": 1}
    assert sorted(u for u, *_ in got) == [r for r in range(300) if not 100 <= r < 150]
    # the other splits are untouched
    assert len(_collect(src.batches("valid", 32, max_len=MAX_LEN))) == 40


def test_missing_shard_names_it(domain: Domain, tmp_path: Path) -> None:
    out = tmp_path / "Toy"
    _write(domain, out)
    (out / "valid-000000.tar").unlink()
    assert not shards_exist(out)
    with pytest.raises(ShardError, match="valid-000000.tar.*No such file"):
        _collect(ShardSource(out).batches("valid", 8, max_len=MAX_LEN))


def test_truncation_at_a_member_boundary_is_caught_by_the_sample_count(domain: Domain, tmp_path: Path) -> None:
    out = tmp_path / "Toy"
    _write(domain, out)
    m = json.loads((out / MANIFEST).read_text())
    for s in m["splits"]["train"]["shards"]:
        del s["bytes"]  # an older/foreign manifest without sizes: only the count check is left
    (out / MANIFEST).write_text(json.dumps(m))
    bad = out / "train-000001.tar"
    os.truncate(bad, 1024 * 10)  # 10 whole members (512 header + 512 data each); tarfile reads it as valid
    with pytest.raises(ShardError, match=r"train-000001.tar.*10 samples"):
        _collect(ShardSource(out).batches("train", 32, max_len=MAX_LEN))


def test_corrupt_record_names_the_shard(domain: Domain, tmp_path: Path) -> None:
    out = tmp_path / "Toy"
    _write(domain, out)
    bad = out / "test-000000.tar"
    data = bytearray(bad.read_bytes())
    pos = data.index(b'{"user"')
    data[pos : pos + 7] = b"#######"  # same size: only the content is wrong
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="test-000000.tar.*malformed record"):
        _collect(ShardSource(out).batches("test", 32, max_len=MAX_LEN))


def test_corrupt_tar_header_names_the_shard(domain: Domain, tmp_path: Path) -> None:
    out = tmp_path / "Toy"
    _write(domain, out)
    bad = out / "valid-000000.tar"
    data = bytearray(bad.read_bytes())
    data[3] ^= 0x01  # a byte of the first member's name: its header checksum no longer matches
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="valid-000000.tar.*checksum mismatch"):
        _collect(ShardSource(out).batches("valid", 32, max_len=MAX_LEN))


def test_verify_detects_a_modified_shard(domain: Domain, tmp_path: Path) -> None:
    out = tmp_path / "Toy"
    _write(domain, out)
    ShardSource(out, verify=True)  # clean folder passes
    bad = out / "train-000004.tar"
    data = bytearray(bad.read_bytes())
    data[-2000] ^= 0xFF  # inside the last members / end padding: same size
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train-000004.tar.*sha256"):
        ShardSource(out, verify=True)
    src = ShardSource(out, verify=True, skip_bad_shards=True)
    assert src.skipped == {"train-000004.tar": 1}
    assert len(_collect(src.batches("train", 64, max_len=MAX_LEN))) == 250


def test_missing_or_malformed_manifest(domain: Domain, tmp_path: Path) -> None:
    out = tmp_path / "Toy"
    assert not shards_exist(out)
    with pytest.raises(DataFormatError, match=MANIFEST):
        ShardSource(out)
    _write(domain, out)
    assert shards_exist(out)
    (out / MANIFEST).write_text("{not json")
    assert not shards_exist(out)
    with pytest.raises(DataFormatError, match=MANIFEST):
        ShardSource(out)
    (out / MANIFEST).write_text(json.dumps({"format": "missrec-shards", "format_version": 1}))
    with pytest.raises(DataFormatError, match="manifest.json.*malformed"):
        ShardSource(out)


# --------------------------------------------------------------------------------------------- manifest + tables


def test_manifest_written_last_with_shard_checksums(domain: Domain, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "Toy"
    seen = {}
    real = shard_writer.write_json

    def spy(path, obj):
        seen["manifest_existed"] = Path(path).exists()
        seen["files"] = sorted(p.name for p in Path(path).parent.iterdir() if not p.name.startswith("."))
        real(path, obj)

    monkeypatch.setattr(shard_writer, "write_json", spy)
    m = _write(domain, out)
    assert seen["manifest_existed"] is False
    listed = [s["file"] for sp in m["splits"].values() for s in sp["shards"]]
    assert len(listed) == 6 + 1 + 1
    assert set(listed) <= set(seen["files"]), "every shard is in place under its final name before the manifest"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == json.loads(json.dumps(m))
    assert on_disk["num_items"] == NUM_ITEMS and on_disk["max_history_len"] == 30
    for sp, n in (("train", 300), ("valid", 40), ("test", 40)):
        assert on_disk["splits"][sp]["rows"] == n
        for s in on_disk["splits"][sp]["shards"]:
            assert s["sha256"] == sha256_file(out / s["file"])
            assert s["bytes"] == (out / s["file"]).stat().st_size
    assert {k: v["dim"] for k, v in on_disk["features"].items()} == {"feat1CLS": 8, "feat3CLS": 4}
    for f in on_disk["features"].values():
        assert f["sha256"] == sha256_file(out / f["file"])
    assert "created" in on_disk and on_disk["format_version"] == 1

    # rewriting with bigger shards leaves no stale shard files behind, and the same bytes give the same sha
    m2 = _write(domain, out, per_shard=1000)
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar", "valid-000000.tar"]
    assert m2["splits"]["valid"]["shards"][0]["sha256"] == m["splits"]["valid"]["shards"][0]["sha256"]


def test_feature_and_text_tables_round_trip(domain: Domain, tmp_path: Path) -> None:
    out = tmp_path / "Toy"
    _write(domain, out)
    src = ShardSource(out)
    assert src.feature_suffixes == ["feat1CLS", "feat3CLS"]
    for suffix, arr in domain.features.items():
        got = src.features(suffix)
        assert isinstance(got, np.memmap) and not got.flags.writeable
        assert got.dtype == np.float32 and got.shape == arr.shape
        np.testing.assert_array_equal(np.asarray(got), arr)
    with pytest.raises(KeyError, match="feat9"):
        src.features("feat9")
    assert read_index_map(src.table_path("item2index")) == domain.item_ids
    assert read_text(src.table_path("text"), domain.item_ids, NUM_ITEMS) == domain.texts
    assert src.table_path("user2index") is None  # the toy domain has no user map


def test_unknown_feature_suffix_is_refused(domain: Domain, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="feat2CLS"):
        write_domain_shards(domain, tmp_path / "Toy", feature_suffixes=("feat2CLS",), show_progress=False)


# --------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_scientific_mm_round_trip(tmp_path: Path) -> None:
    root = _datasets_root() / "scientific_mm"
    if not root.is_dir():
        pytest.skip(f"{root} not available")
    dom = load_domain(root, "Scientific", feature_suffixes=("feat1CLS", "feat3CLS"), max_len=None)
    out = tmp_path / "Scientific"
    m = write_domain_shards(dom, out, samples_per_shard=3000, feature_suffixes=("feat1CLS", "feat3CLS"),
                            show_progress=False)
    assert m["splits"]["train"]["rows"] == len(dom.train) == 10_928
    src = ShardSource(out, verify=True)
    assert src.num_items == dom.num_items == 1585
    for suffix in ("feat1CLS", "feat3CLS"):
        assert src.features(suffix).shape == (1585, 512)
        np.testing.assert_array_equal(np.asarray(src.features(suffix)), np.asarray(dom.features[suffix]))
    rows = Counter()
    n = 0
    for b in src.batches("train", 512, max_len=50, num_workers=2, seed=1):
        n += len(b)
        for u, t, k in zip(b.user.tolist(), b.target.tolist(), b.seq_len.tolist()):
            rows[(u, t, k)] += 1
    assert n == len(dom.train)
    expected = Counter(
        (int(dom.train.users[i]), int(dom.train.targets[i]), int(min(50, dom.train.lengths[i])))
        for i in range(len(dom.train))
    )
    assert rows == expected
