"""The embedded synthetic catalogue and the proxy encoders."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from missrec.data.atomic import load_domain, load_item_table
from missrec.data.synthetic import (
    SyntheticConfig,
    _make_items,
    _rng,
    generate_catalogue,
)
from missrec.errors import ConfigError, DataFormatError
from missrec.features.proxy import hash_text_features, pixel_image_features, write_proxy_features

SMALL = SyntheticConfig(
    seed=7, domains=("Kitchen", "Toys"), target_domains=("Toys",), items_per_domain=120,
    users_per_domain=300, num_interests=6, image_size=24, missing_image_frac=0.1,
)
FEATS = ["feat1CLS", "feat3CLS"]


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("syn")
    return root, generate_catalogue(root, SMALL)


def test_deterministic_and_seed_sensitive(catalogue, tmp_path):
    root, summary = catalogue
    again = tmp_path / "again"
    assert generate_catalogue(again, SMALL) == summary
    assert _tree_hash(again) == _tree_hash(root)
    other = tmp_path / "other"
    generate_catalogue(other, replace(SMALL, seed=8))
    h1, h2 = _tree_hash(root), _tree_hash(other)
    for f in ("Kitchen/Kitchen.train.inter", "Kitchen/Kitchen.text", "Kitchen/Kitchen.feat3CLS"):
        assert h1[f] != h2[f], f


def test_regenerate_in_place_is_clean(catalogue, tmp_path):
    out = tmp_path / "cat"
    generate_catalogue(out, replace(SMALL, seed=3, missing_image_frac=0.0))
    generate_catalogue(out, SMALL)  # stale images of the first run must not survive
    assert _tree_hash(out) == _tree_hash(catalogue[0])


def test_summary_and_layout(catalogue):
    root, summary = catalogue
    assert json.loads((root / "catalogue.json").read_text())["domains"] == summary["domains"]
    assert summary["source_domains"] == ["Kitchen"] and summary["target_domains"] == ["Toys"]
    for name in SMALL.domains:
        ddir = root / name
        for suffix in ("train.inter", "valid.inter", "test.inter", "text", "item2index", "user2index",
                       "items.tsv", *FEATS):
            assert (ddir / f"{name}.{suffix}").is_file(), suffix
        table = load_item_table(ddir / f"{name}.items.tsv")
        assert [t[0] for t in table] == [f"{name}-{i:06d}" for i in range(SMALL.items_per_domain)]
        for _, text, img in table:
            assert text
            if img:
                with Image.open(ddir / img) as im:
                    assert im.mode == "RGB" and im.size == (SMALL.image_size,) * 2


def test_loads_and_leave_one_out(catalogue):
    root, summary = catalogue
    for name in SMALL.domains:
        d = load_domain(root / name, name, feature_suffixes=FEATS)
        assert d.num_items == SMALL.items_per_domain and d.num_users == SMALL.users_per_domain
        assert d.features["feat1CLS"].shape == (d.num_items, SMALL.proxy_dim)
        assert len(d.valid) == len(d.test) == d.num_users
        assert summary["domains"][name]["rows"] == {k: len(v) for k, v in d.splits.items()}
        longest: dict[int, list[int]] = {}
        for u, h, t in d.train.rows():
            seq = h.tolist() + [t]
            if len(seq) > len(longest.get(u, [])):
                assert longest.get(u, []) == seq[: len(longest.get(u, []))]  # prefixes of one sequence
                longest[u] = seq
        for (u, hv, tv), (u2, ht, tt) in zip(d.valid.rows(), d.test.rows()):
            assert u == u2
            assert hv.tolist() == longest[u]
            assert ht.tolist() == hv.tolist() + [tv]
            assert SMALL.min_len <= len(ht) + 1 <= SMALL.max_len


def test_missing_images_are_zero_rows(catalogue):
    root, summary = catalogue
    for name in SMALL.domains:
        d = load_domain(root / name, name, feature_suffixes=FEATS)
        table = load_item_table(root / name / f"{name}.items.tsv")
        missing = np.asarray([img == "" for _, _, img in table])
        img_zero = ~np.asarray(d.features["feat3CLS"]).any(axis=1)
        assert (img_zero == missing).all()
        assert missing.sum() == round(SMALL.missing_image_frac * d.num_items)
        assert summary["domains"][name]["missing_images"] == missing.sum()
        assert np.asarray(d.features["feat1CLS"]).any(axis=1).all()
        assert len(list((root / name / "images").glob("*.png"))) == d.num_items - missing.sum()


def _within_vs_across(feats: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    norm = np.linalg.norm(feats, axis=1)
    ok = norm > 0
    g = feats[ok] / norm[ok, None]
    lab = labels[ok]
    sim = g @ g.T
    same = lab[:, None] == lab[None, :]
    off = ~np.eye(len(lab), dtype=bool)
    return float(sim[same & off].mean()), float(sim[~same].mean())


def test_features_cluster_by_interest(catalogue):
    root, _ = catalogue
    for name in SMALL.domains:
        d = load_domain(root / name, name, feature_suffixes=FEATS)
        labels = _make_items(SMALL, _rng(SMALL, name, "items")).primary
        for suffix in FEATS:
            within, across = _within_vs_across(np.asarray(d.features[suffix]), labels)
            assert within > across + 0.03, (name, suffix, within, across)


def test_next_item_is_predictable_beyond_popularity(catalogue):
    root, _ = catalogue
    for name in SMALL.domains:
        d = load_domain(root / name, name)
        succ: dict[int, Counter] = defaultdict(Counter)
        for _, h, t in d.train.rows():
            succ[int(h[-1])][t] += 1
        top_pop = [i for i, _ in Counter(d.train.targets.tolist()).most_common(10)]
        hit_succ = hit_pop = 0
        for _, h, t in d.test.rows():
            cand = [i for i, _ in succ[int(h[-1])].most_common(10)]
            cand += [i for i in top_pop if i not in cand][: 10 - len(cand)]
            hit_succ += t in cand
            hit_pop += t in top_pop
        assert hit_succ > 2 * hit_pop and hit_succ / len(d.test) > 0.3, (name, hit_succ, hit_pop)


def test_proxy_encoders():
    texts = ["Red Oak table", "red oak TABLE", "blue steel lamp", ""]
    t = hash_text_features(texts, dim=32, seed=1)
    assert t.shape == (4, 32) and t.dtype == np.float32
    assert np.allclose(t[0], t[1]) and not np.allclose(t[0], t[2]) and not t[3].any()
    assert np.allclose(np.linalg.norm(t[:3], axis=1), np.sqrt(32), rtol=1e-5)
    assert np.array_equal(t, hash_text_features(texts, dim=32, seed=1))
    assert not np.allclose(t, hash_text_features(texts, dim=32, seed=2))
    red = Image.new("RGB", (20, 20), (200, 30, 30))
    red.paste((240, 240, 240), (0, 0, 10, 20))
    blue = Image.new("RGB", (20, 20), (30, 30, 200))
    blue.paste((240, 240, 240), (0, 0, 10, 20))
    f = pixel_image_features([red, None, blue, red.copy()], dim=16)
    assert f.shape == (4, 16) and f.dtype == np.float32
    assert not f[1].any() and np.allclose(f[0], f[3]) and not np.allclose(f[0], f[2])


def test_write_proxy_features_follows_item_index(tmp_path):
    ddir = tmp_path / "D"
    (ddir / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(ddir / "images" / "x.png")
    (ddir / "D.items.tsv").write_text("item_id\ttext\timage\nx\tred thing\timages/x.png\ny\tblue thing\t\n")
    (ddir / "D.item2index").write_text("y\t0\nx\t1\n")
    info = write_proxy_features(ddir, "D", dim=8)
    assert info["missing_images"] == 1 and info["num_items"] == 2
    img = np.fromfile(ddir / "D.feat3CLS", dtype="<f4").reshape(2, 8)
    txt = np.fromfile(ddir / "D.feat1CLS", dtype="<f4").reshape(2, 8)
    assert not img[0].any() and img[1].any()
    assert np.allclose(txt, hash_text_features(["blue thing", "red thing"], dim=8))


def test_load_item_table_errors_name_file_and_line(tmp_path):
    p = tmp_path / "X.items.tsv"
    p.write_text("item_id\ttext\timage\na\tfine\t\nb\tonly two fields\n")
    with pytest.raises(DataFormatError) as err:
        load_item_table(p)
    assert err.value.line == 3 and str(p) in str(err.value) and f"{p}:3:" in str(err.value)
    p.write_text("id\ttext\n")
    with pytest.raises(DataFormatError, match=":1: wrong header"):
        load_item_table(p)
    p.write_text("item_id\ttext\timage\na\tx\t\na\ty\t\n")
    with pytest.raises(DataFormatError, match=":3: item 'a' appears twice"):
        load_item_table(p)


def test_config_validation():
    with pytest.raises(ConfigError, match="target_domains"):
        SyntheticConfig(domains=("A", "B"), target_domains=("C",))
    with pytest.raises(ConfigError, match="min_len"):
        SyntheticConfig(min_len=3)
    assert SyntheticConfig().source_domains == ("Kitchen", "Garden")
