"""The atomic-file reader: both real datasets load; every bad input names its file and line."""

from __future__ import annotations

import numpy as np
import pytest

from missrec.data.atomic import INTER_HEADER, Split, load_domain, read_features, write_features, write_inter
from missrec.errors import DataFormatError


@pytest.mark.realdata
def test_real_scientific_loads(shared_datasets):
    d = load_domain(shared_datasets / "scientific", "Scientific")
    assert (d.num_items, d.num_users) == (4385, 8442)
    assert (len(d.train), len(d.valid), len(d.test)) == (34101, 8442, 8442)
    # texts are mapped through item2index (the .text file is in another order)
    assert d.texts[0].startswith("eSUN Bronze filament") and d.item_ids[0] == "B00TNNWMXI"
    assert d.train.items.max() < d.num_items


@pytest.mark.realdata
def test_real_scientific_mm_loads_with_features(shared_datasets):
    d = load_domain(shared_datasets / "scientific_mm", "Scientific", ["feat1CLS", "feat3CLS"])
    assert d.num_items == 1585
    assert d.features["feat1CLS"].shape == (1585, 512) and d.features["feat3CLS"].shape == (1585, 512)
    norms = np.linalg.norm(np.asarray(d.features["feat1CLS"]), axis=1)
    assert 6 < norms.mean() < 9


def _domain(tmp_path, train_lines, items=5, header=INTER_HEADER):
    (tmp_path / "D.item2index").write_text("".join(f"i{i}\t{i}\n" for i in range(items)))
    (tmp_path / "D.train.inter").write_text(header + "\n" + "".join(line + "\n" for line in train_lines))
    ok = INTER_HEADER + "\n0\t0 1\t2\n"
    (tmp_path / "D.valid.inter").write_text(ok)
    (tmp_path / "D.test.inter").write_text(ok)
    return tmp_path


def test_good_domain_round_trip(tmp_path):
    _domain(tmp_path, ["0\t0 1 2\t3", "1\t4\t0"])
    d = load_domain(tmp_path, "D")
    assert d.train.history(0).tolist() == [0, 1, 2] and int(d.train.targets[1]) == 0
    write_inter(tmp_path / "copy.inter", d.train)
    assert (tmp_path / "copy.inter").read_text() == (tmp_path / "D.train.inter").read_text()


@pytest.mark.parametrize(
    "lines, header, needle, line",
    [
        (["0\t0 1\t2"], "user_id\titems\ttarget", "wrong header", 1),
        (["0\t0 1\t2", "1\t0 x\t2"], INTER_HEADER, "'x' is not an integer", 3),
        (["0\t0 1\t2", "1\t0 9\t2"], INTER_HEADER, "item id 9 outside the item table", 3),
        (["0\t0 1\t2", "1\t\t2"], INTER_HEADER, "empty history", 3),
        (["0\t0 1"], INTER_HEADER, "expected 3 tab-separated fields", 2),
        (["u\t0 1\t2"], INTER_HEADER, "user id 'u' is not an integer", 2),
    ],
)
def test_bad_inter_names_file_and_line(tmp_path, lines, header, needle, line):
    _domain(tmp_path, lines, header=header)
    with pytest.raises(DataFormatError) as err:
        load_domain(tmp_path, "D")
    assert err.value.line == line
    assert str(err.value).startswith(f"{tmp_path / 'D.train.inter'}:{line}:")
    assert needle in str(err.value)


def test_feature_size_must_divide_item_count(tmp_path):
    path = tmp_path / "D.feat1CLS"
    np.zeros(5 * 3 + 1, dtype="<f4").tofile(path)
    with pytest.raises(DataFormatError, match="do not divide into 5 items") as err:
        read_features(path, 5)
    assert str(path) in str(err.value)
    with pytest.raises(DataFormatError, match="expected 5 x 4"):
        read_features(path, 5, dim=4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_features_name_the_row(tmp_path, bad):
    feats = np.ones((6, 4), dtype="<f4")
    feats[4, 2] = bad
    path = tmp_path / "D.feat3CLS"
    feats.tofile(path)
    with pytest.raises(DataFormatError, match="row 4") as err:
        read_features(path, 6)
    assert err.value.line == 4 and str(path) in str(err.value)


def test_features_inferred_dim_and_writer_refuses_nan(tmp_path):
    feats = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    write_features(tmp_path / "D.f", feats)
    back = read_features(tmp_path / "D.f", 7)
    assert back.shape == (7, 3) and np.array_equal(np.asarray(back), feats)
    feats[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_features(tmp_path / "D.g", feats)
    assert not (tmp_path / "D.g").exists()


def test_last_rows_per_user():
    split = Split.from_rows([(0, [1, 2], 3), (0, [1], 2), (1, [5], 6), (0, [1, 2, 3], 4), (1, [5, 6], 7)])
    assert split.last_rows_per_user().tolist() == [3, 4]
