"""Published pre-filtered formats (``unisrec`` .inter/.item, ``sequences`` user_sequence/item_names) ->
atomic domains: the shared leave-one-out split and 50-item cut, determinism, bad lines, counted skips."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from missrec.cli import launch
from missrec.data.atomic import INTER_HEADER
from missrec.data.prepare import (
    SOURCE_DEFAULTS,
    PrepareConfig,
    prepare_generic,
    prepare_sequences,
    prepare_unisrec,
)
from missrec.errors import DataFormatError

QUIET = PrepareConfig(user_k=0, item_k=0, progress=False)
SKIP = PrepareConfig(user_k=0, item_k=0, progress=False, skip_malformed=True)
ITEM_HEADER = "item_id:token\ttitle:token_seq"
LONG = [f"X{k:02d}" for k in range(60)]
# u3 has two items (no leave-one-out split): dropped; E5 is used once by a kept user (no k-core: kept)
SEQS = {"u1": ["A1", "B2", "C3", "D4"], "u2": LONG, "u3": ["A1", "E5"], "u4": ["E5", "C3", "A1"]}
NAMES = {"A1": "apple pie", "B2": "blue  thing", "C3": "carrot", "D4": "dice game", "E5": "eel",
         **{x: f"name {x}" for x in LONG}}
OUTPUTS = ("train.inter", "valid.inter", "test.inter", "item2index", "user2index", "text", "items.tsv")


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _sequences(folder: Path, seqs=SEQS, names=NAMES) -> tuple[Path, Path]:
    s = _write(folder / "user_sequence.txt", "".join(f"{u} {' '.join(v)}\n" for u, v in seqs.items()))
    n = _write(folder / "item_names.txt", "".join(f"{i} {t}\n" for i, t in names.items()))
    return s, n


def _int_ids() -> tuple[dict, dict]:
    """SEQS / NAMES with integer ids (users u1.. -> 0.., items in NAMES order -> 0..)."""
    code = {raw: str(i) for i, raw in enumerate(NAMES)}
    return ({str(k): [code[i] for i in v] for k, v in enumerate(SEQS.values())},
            {code[i]: t for i, t in NAMES.items()})


def _unisrec(folder: Path, seqs: dict, names: dict) -> tuple[Path, Path]:
    rows = "".join(f"{u}\t{' '.join(v[:-1])}\t{v[-1]}\n" for u, v in seqs.items())
    inter = _write(folder / "D.test.inter", f"{INTER_HEADER}\n{rows}")
    item = _write(folder / "D.item", ITEM_HEADER + "\n" + "".join(f"{i}\t{t}\n" for i, t in names.items()))
    return inter, item


def _files(ddir: Path, d: str = "D") -> dict[str, bytes]:
    return {f: (ddir / f"{d}.{f}").read_bytes() for f in OUTPUTS}


def _rows(ddir: Path, split: str, d: str = "D") -> list[tuple[str, list[str], str]]:
    """Rows of a split with raw user / item ids."""
    items = [line.split("\t")[0] for line in (ddir / f"{d}.item2index").read_text().splitlines()]
    users = [line.split("\t")[0] for line in (ddir / f"{d}.user2index").read_text().splitlines()]
    out = []
    for line in (ddir / f"{d}.{split}.inter").read_text().splitlines()[1:]:
        u, h, t = line.split("\t")
        out.append((users[int(u)], [items[int(x)] for x in h.split()], items[int(t)]))
    return out


def _loo(seqs: dict, max_len: int = 50) -> dict[str, list]:
    """Leave-one-out rows written out by hand (train: longest prefix first)."""
    out = {"train": [], "valid": [], "test": []}
    for u, s in seqs.items():
        n = len(s)
        if n < 3:
            continue
        out["train"] += [(u, s[max(0, p - max_len):p], s[p]) for p in range(n - 3, 0, -1)]
        out["valid"].append((u, s[max(0, n - 2 - max_len):n - 2], s[n - 2]))
        out["test"].append((u, s[max(0, n - 1 - max_len):n - 1], s[n - 1]))
    return out


# --------------------------------------------------------------------------------------------- good input


def test_sequences_split_truncation_and_order(tmp_path):
    s = prepare_sequences(*_sequences(tmp_path / "raw"), "D", tmp_path / "out", QUIET)
    ddir = tmp_path / "out" / "D"
    assert (s["kind"], s["users"], s["items"], s["interactions"]) == ("sequences", 3, 65, 67)
    assert s["rows"] == {"train": 1 + 57, "valid": 3, "test": 3} and s["users_truncated"] == 1
    assert s["dropped"]["short_history"] == 2 and s["dropped"]["malformed_lines"] == 0
    assert s["config"]["user_k"] == 0 and s["config"]["item_k"] == 0  # kept as published
    for split, rows in _loo(SEQS).items():
        assert _rows(ddir, split) == rows, split
    assert _rows(ddir, "test")[1][1] == LONG[9:59]  # the last 50 items before the target
    assert (ddir / "D.user2index").read_text() == "u1\t0\nu2\t1\nu4\t2\n"
    items = [line.split("\t")[0] for line in (ddir / "D.item2index").read_text().splitlines()]
    assert items == ["A1", "B2", "C3", "D4", *LONG, "E5"]  # first appearance along the histories
    text = dict(line.split("\t", 1) for line in (ddir / "D.text").read_text().splitlines()[1:])
    assert text["B2"] == "blue  thing" and text["E5"] == "eel"
    assert json.loads((ddir / "D.prepare.json").read_text()) == s


def test_both_formats_and_the_generic_path_write_the_same_files(tmp_path):
    seqs, names = _int_ids()
    a = prepare_sequences(*_sequences(tmp_path / "s", seqs, names), "D", tmp_path / "a", QUIET)
    b = prepare_unisrec(*_unisrec(tmp_path / "u", seqs, names), "D", tmp_path / "b", QUIET)
    inter = _write(tmp_path / "g" / "inter.csv", "user,item,timestamp\n" + "".join(
        f"{u},{i},{p}\n" for u, v in seqs.items() for p, i in enumerate(v)))
    table = "".join(f"{i}\t{t}\n" for i, t in names.items())
    items = _write(tmp_path / "g" / "items.tsv", "item_id\ttext\n" + table)
    c = prepare_generic(inter, items, "D", tmp_path / "c", QUIET)
    assert b["kind"] == "unisrec"
    assert _files(tmp_path / "a" / "D") == _files(tmp_path / "b" / "D") == _files(tmp_path / "c" / "D")
    assert a["outputs"] == b["outputs"] == c["outputs"]


def test_rerun_writes_the_same_bytes(tmp_path):
    raw = _sequences(tmp_path / "raw")
    one = prepare_sequences(*raw, "D", tmp_path / "one", QUIET)
    two = prepare_sequences(*raw, "D", tmp_path / "two", QUIET)
    again = prepare_sequences(*raw, "D", tmp_path / "one", QUIET)  # over the earlier output
    assert one["outputs"] == two["outputs"] == again["outputs"] and again["other_files"] == []
    assert _files(tmp_path / "one" / "D") == _files(tmp_path / "two" / "D")


def test_k_core_and_max_len_stay_available(tmp_path):
    raw = _sequences(tmp_path / "raw")
    s = prepare_sequences(*raw, "D", tmp_path / "k", PrepareConfig(user_k=0, item_k=2, progress=False))
    assert s["filters"][2]["passes"] and s["items"] == 3 and s["users"] == 1  # only u4: E5 C3 A1
    short = PrepareConfig(user_k=0, item_k=0, max_len=5, progress=False)
    s = prepare_sequences(*raw, "D", tmp_path / "m", short)
    assert s["max_history"] == 60 and max(len(h) for _, h, _ in _rows(tmp_path / "m" / "D", "train")) == 5
    assert _rows(tmp_path / "m" / "D", "test")[1] == ("u2", LONG[54:59], LONG[59])
    assert SOURCE_DEFAULTS.user_k == SOURCE_DEFAULTS.item_k == 0


# --------------------------------------------------------------------------------------------- bad input


def _seq_case(seq_text: str | bytes, names_text: str):
    def make(tmp: Path):
        s = _write(tmp / "user_sequence.txt", seq_text)
        n = _write(tmp / "item_names.txt", names_text)
        return (lambda cfg: prepare_sequences(s, n, "D", tmp / "out", cfg)), {"s": s, "n": n}
    return make


def _uni_case(inter_rows: str, item_rows: str, inter_header: str = INTER_HEADER):
    def make(tmp: Path):
        i = _write(tmp / "D.test.inter", f"{inter_header}\n{inter_rows}")
        t = _write(tmp / "D.item", f"{ITEM_HEADER}\n{item_rows}")
        return (lambda cfg: prepare_unisrec(i, t, "D", tmp / "out", cfg)), {"s": i, "n": t}
    return make


NAMES_OK = "A1 apple\nB2 blue\nC3 carrot\n"
ITEMS_OK = "0\tapple\n1\tblue\n2\tcarrot\n"
# (case, which file the error names, line, words in the message)
BAD = {
    "seq_no_items": (_seq_case("u1 A1 B2 C3\nu2\n", NAMES_OK), "s", 2, "no items"),
    "seq_user_twice": (_seq_case("u1 A1 B2 C3\nu2 A1 B2\nu1 C3 B2 A1\n", NAMES_OK), "s", 3, "appears twice"),
    "seq_leading_space": (_seq_case("u1 A1 B2 C3\n A1 B2\n", NAMES_OK), "s", 2, "starts with a space"),
    "seq_not_utf8": (_seq_case(b"u1 A1 B2 C3\nu2 A1 \xff\xfe\n", NAMES_OK), "s", 2, "not valid UTF-8"),
    "seq_unknown_item": (_seq_case("u1 A1 B2 C3\nu2 A1 Z9 C3\n", NAMES_OK), "s", 2, "'Z9' has no text"),
    "seq_empty_name": (_seq_case("u1 A1 B2 C3\n", "A1 apple\nB2 \nC3 carrot\n"), "s", 1,
                       "item_names.txt:2 is empty"),
    "names_twice": (_seq_case("u1 A1 B2 C3\n", "A1 a\nB2 b\nA1 again\nC3 x\n"), "n", 3, "appears twice"),
    "names_tab_in_id": (_seq_case("u1 A1 B2 C3\n", "A1 apple\nB\t2 blue\n"), "n", 2, "tab"),
    "inter_fields": (_uni_case("0\t0 1\t2\n1\t0 1\n", ITEMS_OK), "s", 3, "expected 3 tab-separated fields"),
    "inter_item_not_int": (_uni_case("0\t0 x\t2\n", ITEMS_OK), "s", 2, "item id 'x' is not a non-negative"),
    "inter_user_not_int": (_uni_case("0\t0 1\t2\nu1\t0 1\t2\n", ITEMS_OK), "s", 3, "user id 'u1'"),
    "inter_last_negative": (_uni_case("0\t0 1\t-2\n", ITEMS_OK), "s", 2, "last item id '-2'"),
    "inter_empty_history": (_uni_case("0\t0 1\t2\n1\t \t2\n", ITEMS_OK), "s", 3, "empty history"),
    "inter_unknown_id": (_uni_case("0\t0 1\t2\n1\t0 7\t2\n", ITEMS_OK), "s", 3, "'7' has no text"),
    "inter_user_twice": (_uni_case("0\t0 1\t2\n0\t1 0\t2\n", ITEMS_OK), "s", 3, "appears twice"),
    "inter_header": (_uni_case("0\t0 1\t2\n", ITEMS_OK, "user\titems\titem"), "s", 1, "wrong header"),
    "item_not_int": (_uni_case("0\t0 1\t2\n", "0\tapple\nB\tblue\n2\tcarrot\n"), "n", 3, "item id 'B'"),
    "item_fields": (_uni_case("0\t0 1\t2\n", "0\tapple\n1\tblue\tx\n2\tcarrot\n"), "n", 3, "expected 2"),
    "item_empty_title": (_uni_case("0\t0 1\t2\n", "0\ta\n1\t  \n2\tcarrot\n"), "s", 2, "D.item:3 is empty"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_line_names_file_and_line(tmp_path, name):
    make, which, line, words = BAD[name]
    call, paths = make(tmp_path)
    with pytest.raises(DataFormatError) as err:
        call(QUIET)
    assert str(err.value).startswith(f"{paths[which]}:{line}: "), str(err.value)
    assert words in str(err.value)
    assert not (tmp_path / "out" / "D" / "D.prepare.json").exists()


def test_skip_malformed_counts_skipped_lines(tmp_path):
    seq = "u1 A1 B2 C3\nu2\nu1 A1 B2 C3\n\n A1\nu3 C3 B2 A1 B2\n"  # 3 malformed lines, 1 blank
    names = "A1 apple\nA1 again\nB2 blue\nB\t2 tab\nC3 carrot\nD4 unused\n"  # 2 malformed lines
    call, _ = _seq_case(seq, names)(tmp_path)
    s = call(SKIP)
    assert s["read"]["sequences"]["malformed_skipped"] == 3 and s["read"]["sequences"]["blank"] == 1
    assert s["read"]["names"]["malformed_skipped"] == 2 and s["read"]["names"]["unused"] == 1
    assert s["dropped"]["malformed_lines"] == 5
    assert (s["users"], s["interactions"]) == (2, 7)
    text = (tmp_path / "out" / "D" / "D.text").read_text()
    assert "A1\tapple\n" in text and "again" not in text
    bad = "0\t0 1\t2\n1\t0 x\t2\n2\t0\n3\t2 1\t0\n"
    call, _ = _uni_case(bad, "0\tapple\nB\tblue\n1\tblue\n2\tcarrot\n")(tmp_path / "u")
    s = call(SKIP)
    assert s["read"]["inter"]["malformed_skipped"] == 2 and s["read"]["items"]["malformed_skipped"] == 1
    assert (s["dropped"]["malformed_lines"], s["users"], s["interactions"]) == (3, 2, 6)


def test_drop_textless_counts_items_and_interactions(tmp_path):
    seq = "u1 A1 Z9 B2 C3\nu2 B2 E5 C3 A1\nu3 A1 E5 B2\nu4 Z9 Y8\n"
    names = "A1 apple\nB2 blue\nC3 carrot\nE5\n"  # E5: empty text; Z9, Y8: no line
    call, paths = _seq_case(seq, names)(tmp_path)
    with pytest.raises(DataFormatError, match=r"user_sequence.txt:1: item 'Z9' has no text"):
        call(QUIET)
    s = prepare_sequences(paths["s"], paths["n"], "D", tmp_path / "out", QUIET, drop_textless=True)
    assert s["drop_textless"] is True
    assert s["read"]["sequences"]["textless_items"] == {"no_metadata": 2, "empty_text": 1}
    assert s["read"]["sequences"]["textless_interactions"] == 5
    meta = s["filters"][1]
    assert meta["items_by_reason"] == {"no_metadata": 2, "empty_text": 1}
    assert meta["interactions_dropped_by_reason"] == {"no_metadata": 3, "empty_text": 2}
    assert s["dropped"]["short_history"] == 2  # u3 keeps A1 B2 only (u4 kept nothing)
    assert (s["users"], s["items"], s["interactions"]) == (2, 3, 6)
    assert _rows(tmp_path / "out" / "D", "test") == [("u1", ["A1", "B2"], "C3"), ("u2", ["B2", "C3"], "A1")]


def test_launcher_sequences_and_unisrec(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_data", Path(__file__).parents[1] / "launcher"
                                                  / "prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    s, n = _sequences(tmp_path / "raw")
    rc = launch(mod.main, ["sequences", "--sequences", str(s), "--names", str(n), "--domain", "D", "--out",
                   str(tmp_path / "a"), "--quiet"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["users"] == 3 and summary["config"]["item_k"] == 0
    i, t = _unisrec(tmp_path / "u", *_int_ids())
    rc = launch(mod.main, ["unisrec", "--inter", str(i), "--items", str(t), "--domain", "D", "--out",
                   str(tmp_path / "b"), "--quiet", "--k", "2"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["config"]["user_k"] == 2 and summary["kind"] == "unisrec"
    _write(n, "A1 apple\n")
    rc = launch(mod.main, ["sequences", "--sequences", str(s), "--names", str(n), "--domain", "D", "--out",
                   str(tmp_path / "c"), "--quiet"])
    assert rc == 2 and f"{s}:1: item 'B2' has no text" in capsys.readouterr().err
    rc = launch(mod.main, ["sequences", "--sequences", str(s), "--names", str(n), "--domain", "D", "--out",
                   str(tmp_path / "c"), "--quiet", "--drop-textless"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["users"] == 0 and summary["dropped"]["short_history"] == 3  # A1 of u1, u3, u4


def test_build_shards_reads_features_from_feature_dir(tmp_path, capsys):
    import numpy as np

    from missrec.data.atomic import write_features
    from missrec.data.shards import ShardSource

    spec = importlib.util.spec_from_file_location("build_shards", Path(__file__).parents[1] / "launcher"
                                                  / "build_shards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    s = prepare_sequences(*_sequences(tmp_path / "raw"), "D", tmp_path / "data", QUIET)
    feats = np.arange(s["items"] * 4, dtype=np.float32).reshape(s["items"], 4)
    write_features(tmp_path / "feat" / "D.minilm", feats)  # outside the domain folder
    args = ["--data-root", str(tmp_path / "data" / "D"), "--domain", "D", "--out", str(tmp_path / "shards"),
            "--features", "minilm", "--quiet"]
    with pytest.raises(FileNotFoundError, match="D.minilm"):
        mod.main(args)
    assert launch(mod.main, [*args, "--feature-dir", str(tmp_path / "feat")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["features"] == {"minilm": 4} and summary["splits"]["train"]["rows"] == s["rows"]["train"]
    np.testing.assert_array_equal(np.asarray(ShardSource(tmp_path / "shards").features("minilm")), feats)


# --------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_toys_counts_match_the_sources_readme(shared_datasets, tmp_path):
    src = shared_datasets / "sources" / "toys"
    if not (src / "user_sequence.txt").exists():
        pytest.skip(f"{src} not found")
    s = prepare_sequences(src / "user_sequence.txt", src / "item_names.txt", "Toys", tmp_path, QUIET)
    assert (s["users"], s["items"], s["interactions"]) == (19412, 11924, 167597)
    assert s["rows"] == {"train": 167597 - 3 * 19412, "valid": 19412, "test": 19412}
    assert sum(s["dropped"].values()) == 0 and s["read"]["names"]["unused"] == 0
    assert s["users_truncated"] == 112  # users with more than 51 items: histories cut to the last 50
