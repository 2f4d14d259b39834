"""Serving: FAISS item index + exact re-ranking, the Recommender library call, the launcher, and items
added inductively from their features. Tiny models trained for two epochs on the synthetic catalogue."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from missrec.config import RunConfig, build
from missrec.data.atomic import Split, load_domain, write_features, write_index_map, write_inter, write_text
from missrec.data.batching import collate
from missrec.eval.policy import ScoringPolicy
from missrec.serve.index import IndexConfig, ItemIndex
from missrec.serve.recommend import Recommender, ServeConfig, UnknownItemError
from missrec.serve.scorers import TransductiveItemsError
from missrec.transfer.finetune import run_finetune

REPO = Path(__file__).resolve().parents[1]
FEATS = ("feat1CLS", "feat3CLS")
SMALL = [
    "train.epochs=2", "train.batch_size=128", "train.progress=false", "train.threads=1",
    "sasrec.hidden=32", "sasrec.inner=64", "missrec.hidden=32", "missrec.inner=64", "missrec.heads=2",
    "data.max_len=20",
]
MISSREC = ["model=missrec", f"data.features=[{','.join(FEATS)}]"]
HELD_OUT = [7, 50, 93, 136]  # Office items withheld from the inductive run's catalogue
QUIET = ServeConfig(progress=False)


def _train(data_root: Path, out: Path, *extra: str) -> Path:
    cfg = build(RunConfig, [], [f"data.data_root={data_root}", "data.domain=Office", f"output_dir={out}",
                                *SMALL, *extra])
    run_finetune(cfg)
    return out


@pytest.fixture(scope="module")
def sasrec_run(synthetic_root, tmp_path_factory) -> Path:
    return _train(synthetic_root, tmp_path_factory.mktemp("serve") / "sasrec", "model=sasrec")


@pytest.fixture(scope="module")
def transductive_run(synthetic_root, tmp_path_factory) -> Path:
    return _train(synthetic_root, tmp_path_factory.mktemp("serve") / "trans", *MISSREC,
                  "missrec.mode=transductive")


def _withhold(root: Path, out: Path, withheld: list[int]) -> np.ndarray:
    """Write Office without the ``withheld`` items (rows targeting them dropped, histories filtered);
    returns the kept original indices (new index i = original index keep[i])."""
    dom = load_domain(root / "Office", "Office", FEATS)
    keep = np.setdiff1d(np.arange(dom.num_items), withheld)
    new_of = np.full(dom.num_items, -1)
    new_of[keep] = np.arange(keep.size)
    out.mkdir(parents=True)
    for name, split in dom.splits.items():
        rows = []
        for user, hist, target in split.rows():
            h = [int(new_of[i]) for i in hist if new_of[i] >= 0]
            if new_of[target] >= 0 and h:
                rows.append((user, h, int(new_of[target])))
        write_inter(out / f"Office.{name}.inter", Split.from_rows(rows))
    write_index_map(out / "Office.item2index", [dom.item_ids[i] for i in keep])
    write_text(out / "Office.text", [dom.item_ids[i] for i in keep], [dom.texts[i] for i in keep])
    for s in FEATS:
        write_features(out / f"Office.{s}", np.asarray(dom.features[s])[keep])
    return keep


@pytest.fixture(scope="module")
def inductive_run(synthetic_root, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """An inductive MISSRec trained on Office minus HELD_OUT; (run folder, kept original indices)."""
    base = tmp_path_factory.mktemp("held")
    keep = _withhold(synthetic_root, base / "data" / "Office", HELD_OUT)
    run = _train(base / "data", base / "run", *MISSREC, "missrec.mode=inductive")
    return run, keep


def _test_histories(rec: Recommender) -> list[list[int]]:
    return rec.split_histories("test")


def _model_scores(rec: Recommender, histories: list[list[int]]) -> torch.Tensor:
    """The model's full ranking scores [B, N] with the recommender's policy terms, through the model's public API
    and the evaluation's :class:`ScoringPolicy` (history items kept)."""
    model = rec.model
    batch = collate([(0, h, 0) for h in histories], rec.max_len)
    with torch.no_grad():
        if hasattr(model, "begin_eval"):
            model.begin_eval()
        scores = rec.policy.scores(model, batch)
        if hasattr(model, "end_eval"):
            model.end_eval()
    return scores


def _assert_topk_matches(ids: np.ndarray, scores: np.ndarray, ref: torch.Tensor, k: int) -> None:
    """Every returned item is in the exact top-k (ties within 1e-4 allowed), with the exact score."""
    kth = ref.topk(k, dim=1).values[:, -1].numpy()
    ref = ref.numpy()
    assert (ids >= 0).all()
    for r in range(ids.shape[0]):
        assert len(set(ids[r].tolist())) == k
        got = ref[r, ids[r]]
        assert (got >= kth[r] - 1e-4).all(), (r, ids[r], got, kth[r])
        np.testing.assert_allclose(scores[r], got, rtol=1e-5, atol=1e-4)
        assert (np.diff(scores[r]) <= 1e-6).all()


# ---------------------------------------------------------------------------------------- the index


def test_item_index_flat_ivf_hnsw_search_inner_product():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    flat = ItemIndex(16)
    flat.add(x[:300])
    flat.add(x[300:])  # appended rows get the next ids
    scores, ids = flat.search(q, 10)
    assert flat.ntotal == 500 and np.array_equal(ids, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, truth, 1), rtol=1e-5)
    ivf = ItemIndex(16, IndexConfig(kind="ivf", nprobe=1000))  # every cell probed: exact
    ivf.train(x)
    ivf.add(x)
    assert ivf.info["nlist"] >= 2 and np.array_equal(ivf.search(q, 10)[1], truth)
    hnsw = ItemIndex(16, IndexConfig(kind="hnsw"))
    hnsw.add(x)
    got = hnsw.search(q, 10)[1]
    assert np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)]) >= 0.9
    _, i = flat.search(q, 900)  # more than the index holds: capped
    assert i.shape == (7, 500)
    with pytest.raises(ValueError, match=r"\[n, 16\]"):
        flat.search(q[:, :8], 3)
    with pytest.raises(ValueError, match="kind"):
        IndexConfig(kind="lsh")


# ---------------------------------------------------------------------------------------- exactness


@pytest.mark.slow
def test_sasrec_index_top_k_equals_full_ranking(sasrec_run):
    rec = Recommender.from_run(sasrec_run, QUIET)
    assert rec.info["proxy_exact"] and rec.index.ntotal == rec.num_items
    hist = _test_histories(rec)
    ref = _model_scores(rec, hist)
    # the embedding inner product is the model's score: the index alone (pool = k) is exact
    ids, scores = rec.topk(hist, 10, exclude_history=False, candidate_factor=1)
    _assert_topk_matches(ids, scores, ref, 10)
    # history items are left out on request
    ids, scores = rec.topk(hist, 10, exclude_history=True, candidate_factor=1)
    masked = ref.clone()
    for r, h in enumerate(hist):
        masked[r, h] = float("-inf")
        assert not set(ids[r].tolist()) & set(h)
    _assert_topk_matches(ids, scores, masked, 10)


@pytest.mark.slow
def test_missrec_index_rerank_equals_full_ranking(transductive_run):
    from missrec.serve.agreement import topk_agreement

    rec = Recommender.from_run(transductive_run, QUIET)
    rec.policy = ScoringPolicy()  # the index path (with an affinity the run is ranked fully, tested below)
    assert rec.index.ntotal == rec.num_items and not rec.info["proxy_exact"]
    hist = _test_histories(rec)
    ref = _model_scores(rec, hist)
    whole = -(-rec.num_items // 10)  # a pool covering the catalogue
    ids, scores = rec.topk(hist, 10, exclude_history=False, candidate_factor=whole)
    _assert_topk_matches(ids, scores, ref, 10)
    full_ids, _ = rec.topk(hist, 10, exclude_history=False, full_ranking=True)
    assert np.array_equal(ids, full_ids)
    # a strong fusion factor makes the a = 0 proxy rank worse; re-ranking a bigger pool recovers the
    # exact top-10 monotonically (exact top-10 items in the pool always survive the re-rank)
    with torch.no_grad():
        rec.model.fusion_factor.fill_(5.0)
    agree = topk_agreement(rec, hist, 10, factors=(1, 2, 5, whole), exclude_history=False)
    overlap = [agree["factors"][f]["overlap"] for f in (1, 2, 5, whole)]
    assert overlap == sorted(overlap) and overlap[0] < 1.0, agree
    assert agree["factors"][whole]["equal"] == 1.0


def test_missrec_without_interests_serves_its_full_ranking_and_has_no_interest_picture(
    synthetic_root, tmp_path, sasrec_run
):
    """A run of the ablation without interests loads, serves the exact top-10 and rescores as trained; the
    interest picture refuses it (and a SASRec run) by name instead of failing on an empty token set."""
    from missrec.transfer.interest_plot import interest_picture
    from missrec.transfer.rescore import rescore_run

    run = _train(synthetic_root, tmp_path / "noint", *MISSREC, "missrec.mode=inductive", "missrec.use_interests=false")
    rec = Recommender.from_run(run, QUIET)
    assert rec.model.encoder is None
    hist = _test_histories(rec)
    ids, scores = rec.topk(hist, 10, exclude_history=False, full_ranking=True)
    _assert_topk_matches(ids, scores, _model_scores(rec, hist), 10)
    trained = json.loads((run / "metrics.json").read_text())["test"]
    assert rescore_run(run) == pytest.approx(trained, abs=1e-9)
    for other in (run, sasrec_run):
        with pytest.raises(ValueError, match="no interests to draw"):
            interest_picture(other, tmp_path / "x.png")


@pytest.mark.slow
def test_approximate_indexes_agree_with_exact(inductive_run):
    run, _ = inductive_run
    hist = None
    for kind in ("hnsw", "ivf"):
        rec = Recommender.from_run(run, ServeConfig(index=IndexConfig(kind=kind), progress=False))
        hist = hist or _test_histories(rec)[:200]
        assert rec.info["kind"] == kind and rec.info["approximate"]
        got, _ = rec.topk(hist, 10)
        ref, _ = rec.topk(hist, 10, full_ranking=True)
        overlap = np.mean([len(set(g) & set(r)) / 10 for g, r in zip(got, ref, strict=True)])
        assert overlap >= 0.9, (kind, overlap)


# ---------------------------------------------------------------------------------------- the library call


@pytest.mark.slow
def test_recommend_raw_ids_truncation_and_unknown_ids(inductive_run):
    run, _ = inductive_run
    rec = Recommender.from_run(run, QUIET)
    raw = rec.raw_ids
    long = list(range(30))  # longer than max_len = 20: the model sees the last 20
    a = rec.recommend([long], k=5, exclude_history=False)[0]
    b = rec.recommend([[raw[i] for i in long[-20:]]], k=5, exclude_history=False)[0]
    assert [r.item_index for r in a] == [r.item_index for r in b]
    assert all(r.raw_id == raw[r.item_index] and r.text == rec.texts[r.item_index] for r in a)
    excl = rec.recommend([long], k=5, exclude_history=True)[0]
    assert not {r.item_index for r in excl} & set(long)  # the whole history is excluded, not just the tail
    with pytest.raises(UnknownItemError, match="'NOPE-1'"):
        rec.recommend([[raw[0], "NOPE-1"]])
    with pytest.raises(UnknownItemError, match="outside the catalogue"):
        rec.recommend([[rec.num_items]])
    with pytest.raises(ValueError, match="empty"):
        rec.recommend([[]])
    with pytest.raises(UnknownItemError, match="index -1"):
        rec.topk([[0], [-1]])


@pytest.mark.slow
def test_launcher_prints_items_and_json(sasrec_run):
    rec = Recommender.from_run(sasrec_run, QUIET)
    history = rec.raw_ids[3:6]
    proc = subprocess.run(
        [sys.executable, "launcher/recommend.py", "--run", str(sasrec_run), "--history", ",".join(history),
         "--k", "5", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    items = result["users"][0]["items"]
    assert len(items) == 5 and result["index"]["kind"] == "flat"
    assert [it["raw_id"] for it in items] == [r.raw_id for r in rec.recommend([history], k=5)[0]]
    table = "\n".join(lines[:-1])
    assert "raw id" in table and all(it["raw_id"] in table for it in items)
    excluded = subprocess.run(
        [sys.executable, "launcher/recommend.py", "--run", str(sasrec_run), "--history", ",".join(history),
         "--k", "5", "--quiet", "--exclude-history"], cwd=REPO, capture_output=True, text=True, timeout=300,
        check=False)
    assert excluded.returncode == 0, excluded.stderr[-2000:]
    kept = json.loads(excluded.stdout.strip().splitlines()[-1])["users"][0]["items"]
    assert len(kept) == 5 and not {it["raw_id"] for it in kept} & set(history)  # off unless asked
    bad = subprocess.run(
        [sys.executable, "launcher/recommend.py", "--run", str(sasrec_run), "--history", "NOPE-1", "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2 and "'NOPE-1'" in bad.stderr


# ---------------------------------------------------------------------------------------- new items


def _full_catalogue_model(rec: Recommender, run: Path, synthetic_root: Path, keep: np.ndarray):
    """The same trained weights over the full Office catalogue; the interest index of kept items is the
    trained one, withheld items join their nearest centroid (computed here independently)."""
    from missrec.models.build import missrec_from_config
    from missrec.serve.loading import read_run_config

    cfg = read_run_config(run)
    dom = load_domain(synthetic_root / "Office", "Office", FEATS)
    model = missrec_from_config(cfg.missrec, dom.num_items, [dom.features[s] for s in FEATS], cfg.data.max_len, 0)
    state = torch.load(run / "best.pt", weights_only=True)["model"]
    trained_interest, centroids = state.pop("item_interest"), state.pop("centroids")
    model.load_state_dict(state, strict=False)
    model.eval()
    interest = torch.full((dom.num_items, 2), -1, dtype=torch.long)
    interest[torch.from_numpy(keep)] = trained_interest[1:]
    with torch.no_grad():
        tokens = model.item_tokens()[:, 1:]  # [M, N, D]
        for i in HELD_OUT:
            for m in range(2):
                if model.items.present[i + 1, m]:
                    interest[i, m] = int(((centroids - tokens[m, i]) ** 2).sum(1).argmin())
    model.set_interest_index(interest, centroids)
    return model, dom


@pytest.mark.slow
def test_held_out_items_added_by_features_are_recommended_at_once(inductive_run, synthetic_root):
    run, keep = inductive_run
    rec = Recommender.from_run(run, QUIET)
    n_old = rec.num_items
    assert n_old == 160 - len(HELD_OUT)
    dom = load_domain(synthetic_root / "Office", "Office", FEATS)
    new_raw = [dom.item_ids[i] for i in HELD_OUT]
    assert not set(new_raw) & set(rec.raw_ids)
    feats = {s: np.asarray(dom.features[s])[HELD_OUT] for s in FEATS}
    new = rec.add_items(feats, new_raw, [dom.texts[i] for i in HELD_OUT])
    assert new == list(range(n_old, n_old + len(HELD_OUT))) and rec.index.ntotal == rec.num_items

    # a history of each new item's nearest catalogue neighbours (in the index space) points to it
    vec = rec.scorer.item_vectors(torch.arange(rec.num_items))
    found = []
    for j in new:
        neighbours = np.argsort(-(vec[:n_old] @ vec[j]))[:5]
        top = rec.recommend([[rec.raw_ids[i] for i in neighbours]], k=10)[0]
        found.append(j in [r.item_index for r in top])
    assert any(found), found

    # scores equal those of a model built over the full catalogue with the same trained weights
    full, _ = _full_catalogue_model(rec, run, synthetic_root, keep)
    to_full = np.concatenate([keep, HELD_OUT])  # recommender index -> original index
    histories = [[rec.raw_ids[i] for i in h] for h in _test_histories(rec)[:50]]
    histories.append([new_raw[0], rec.raw_ids[0], new_raw[2]])  # new items inside a history, too
    hist_idx = rec.resolve(histories)
    ref = _model_scores_of(full, [[int(to_full[i]) for i in h] for h in hist_idx], rec.max_len, rec.policy)[:, to_full]
    ids, scores = rec.topk(hist_idx, rec.num_items, exclude_history=False, full_ranking=True)
    np.testing.assert_allclose(scores, np.take_along_axis(ref.numpy(), ids, 1), rtol=1e-5, atol=1e-4)
    got = rec.recommend(histories, k=10)
    for r, rows in enumerate(got):
        for item in rows:
            assert item.score == pytest.approx(float(ref[r, item.item_index]), rel=1e-5, abs=1e-4)


def _model_scores_of(model, histories: list[list[int]], max_len: int, policy: ScoringPolicy) -> torch.Tensor:
    batch = collate([(0, h, 0) for h in histories], max_len)
    with torch.no_grad():
        model.begin_eval()
        out = policy.scores(model, batch)
        model.end_eval()
    return out


@pytest.mark.slow
def test_add_items_checks_input_and_leaves_the_callers_model_alone(inductive_run, synthetic_root):
    from missrec.serve.loading import load_run

    run, _ = inductive_run
    loaded = load_run(run)
    rec = Recommender(loaded.model, loaded.raw_ids, loaded.texts, loaded.cfg.data.max_len, QUIET,
                      feature_names=loaded.cfg.data.features)
    dims = loaded.model.items.dims
    ok = {s: np.ones((1, d), np.float32) for s, d in zip(FEATS, dims, strict=True)}
    with pytest.raises(ValueError, match="already present"):
        rec.add_items(ok, [rec.raw_ids[0]])
    with pytest.raises(ValueError, match=r"must be \[1, "):
        rec.add_items({FEATS[0]: np.ones((1, dims[0] + 1), np.float32)}, ["X-1"])
    with pytest.raises(ValueError, match="unknown feature table"):
        rec.add_items({"feat9": np.ones((1, 4), np.float32)}, ["X-1"])
    with pytest.raises(ValueError, match="no features"):
        rec.add_items({s: np.zeros((1, d), np.float32) for s, d in zip(FEATS, dims, strict=True)}, ["X-1"])
    # text only (the image modality missing) is fine; the caller's model is not extended
    idx = rec.add_items({FEATS[0]: ok[FEATS[0]]}, ["X-1"], ["a new item"])
    assert idx == [loaded.model.num_items] and rec.num_items == loaded.model.num_items + 1
    assert rec.recommend([["X-1"]], k=3, exclude_history=False)


@pytest.mark.slow
def test_add_items_refused_for_id_models(transductive_run, sasrec_run):
    rec = Recommender.from_run(transductive_run, QUIET)
    feats = {s: np.ones((1, d), np.float32) for s, d in zip(FEATS, rec.model.items.dims, strict=True)}
    with pytest.raises(TransductiveItemsError, match="transductive"):
        rec.add_items(feats, ["X-1"])
    assert rec.num_items == rec.index.ntotal == 160
    with pytest.raises(TransductiveItemsError, match="SASRec"):
        Recommender.from_run(sasrec_run, QUIET).add_items({}, ["X-1"])


@pytest.mark.slow
def test_history_offset_is_served_when_history_items_are_kept(transductive_run):
    from missrec.serve.loading import load_run

    rec = Recommender.from_run(transductive_run, QUIET)
    assert rec.policy == load_run(transductive_run).policy  # the policy the run chose on validation
    rec.policy = ScoringPolicy(history_offset=-0.5)
    hist = _test_histories(rec)[:64]
    ref = _model_scores(rec, hist)  # the model's scores, offset included
    assert not torch.allclose(ref, replace(rec.policy, history_offset=0.0).scores(rec.model, collate(
        [(0, h, 0) for h in hist], rec.max_len)).detach())
    whole = -(-rec.num_items // 10)
    for kw in ({"full_ranking": True}, {"candidate_factor": whole}):
        ids, scores = rec.topk(hist, 10, exclude_history=False, **kw)
        _assert_topk_matches(ids, scores, ref, 10)
    # excluding history items still drops them whatever the offset
    ids, _ = rec.topk(hist, 10, exclude_history=True, full_ranking=True)
    assert all(not set(ids[r].tolist()) & set(h) for r, h in enumerate(hist))


@pytest.mark.slow
def test_history_affinity_is_served_from_two_indexes_and_exactly_in_full(transductive_run):
    from missrec.serve.agreement import topk_agreement

    rec = Recommender.from_run(transductive_run, QUIET)
    model = rec.model
    hist = _test_histories(rec)[:64]
    rec.policy = ScoringPolicy()
    rec.topk(hist, 10)
    assert not rec.neighbours.built  # no affinity, no second index
    plain = _model_scores(rec, hist)
    rec.policy = ScoringPolicy(affinity_weight=3.0)  # whatever the run chose on validation
    ref = _model_scores(rec, hist)  # the model's own scores, affinity included
    assert not torch.allclose(ref, plain)
    whole = -(-rec.num_items // 10)  # a pool covering the catalogue
    for kw in ({"full_ranking": True}, {"candidate_factor": whole}):
        ids, scores = rec.topk(hist, 10, exclude_history=False, **kw)
        _assert_topk_matches(ids, scores, ref, 10)
    # the affinity index (built on first use) holds every item; each history item's nearest neighbours by the
    # affinity's similarity (brute force) are in the row's pool
    aff = rec.neighbours.index
    assert aff.ntotal == rec.num_items
    vec = rec.scorer.affinity_vectors(torch.arange(rec.num_items))  # [N, K]
    batch = collate([(0, h, 0) for h in hist], rec.max_len)
    pool, _ = rec.neighbours.rerank(rec.scorer.encode(batch), batch, np.full((len(hist), 0), -1, np.int64), 3.0, 5)
    for r, h in enumerate(hist):
        for item in h[-rec.max_len:]:
            near = torch.topk(vec @ vec[item], 5).values[-1]
            must = set(torch.nonzero(vec @ vec[item] > near + 1e-5).ravel().tolist())
            assert must <= set(pool[r].tolist())
    # re-ranking a bigger pool recovers the exact top-10 monotonically; the history neighbours find more of it
    # than the user's pool alone
    factors = (1, 2, 5, whole)
    agree = topk_agreement(rec, hist, 10, factors=factors, exclude_history=False)
    overlap = [agree["factors"][f]["overlap"] for f in factors]
    assert overlap == sorted(overlap) and agree["factors"][whole]["equal"] == 1.0, agree
    alone = Recommender(model, rec.raw_ids, rec.texts, rec.max_len, replace(QUIET, history_neighbours=False),
                        policy=rec.policy)
    alone_agree = topk_agreement(alone, hist, 10, factors=(1,), exclude_history=False)
    assert alone_agree["factors"][1]["overlap"] < overlap[0], (alone_agree, agree)


@pytest.mark.slow
def test_serve_benchmark_grows_the_catalogue_and_compares_with_full_ranking(inductive_run):
    from missrec.bench.serve import run_serve_benchmark

    run, _ = inductive_run
    n = Recommender.from_run(run, QUIET).num_items
    whole = -(-(n + 300) // 10)
    out = run_serve_benchmark(run, extra_items=(0, 300), kinds=("flat",), users=40, factors=(1, whole),
                              affinity_weight=4.0)
    small, grown = out["results"]
    assert small["items"] == n and grown["items"] == n + 300 and grown["affinity_weight"] == 4.0
    for row in (small, grown):
        assert row["with_neighbours"][whole]["equal"] == 1.0  # a pool covering the catalogue is the full ranking
        assert row["with_neighbours"][1]["overlap"] >= row["index_alone"][1]["overlap"]
        assert row["full_ms_per_user"] > 0
