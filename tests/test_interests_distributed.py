"""Distributed interest discovery (gloo ranks in subprocesses) against the single-process result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

import torch.distributed as dist
import torch.multiprocessing as mp

from missrec.bench.mid import adjusted_rand_index, clustered_tokens
from missrec.interests import InterestConfig, discover_interests
from missrec.interests.config import as_token_matrix
from missrec.train.dist import child_threads, free_port, init_loopback_gloo

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


# ---------------------------------------------------------------------------- cases
def _uniform(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, d)).astype(np.float32)


def _duplicated(n: int, d: int, seed: int) -> np.ndarray:
    """Tokens repeated 1 to 8 times: more copies than k + 1 make exact distance ties at the list ends."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d)).astype(np.float32)
    x = np.repeat(base, rng.integers(1, 9, n), axis=0)[:n]
    return x[rng.permutation(len(x))]


def case_tokens(name: str) -> np.ndarray:
    """The global token pool of a case (regenerated identically in every process)."""
    if name in ("planted", "planted_nc", "kmeans", "torch_input", "sampled"):
        return clustered_tokens(3000, 32, seed=1, points_per_centre=50)[0]
    if name in ("random", "random_nc"):
        return np.random.default_rng(5).standard_normal((3000, 32)).astype(np.float32)
    if name == "peaks":  # k=2 on structureless data: many tokens are denser than both neighbours
        return _uniform(1200, 8, seed=3)
    if name == "duplicates":
        return _duplicated(1500, 16, seed=4)
    if name in ("approx", "approx_ivf"):
        return clustered_tokens(3000, 32, seed=2, points_per_centre=60)[0]
    raise KeyError(name)


CASES: dict[str, InterestConfig] = {
    "planted": InterestConfig(cluster_ratio=0.02),
    "planted_nc": InterestConfig(cluster_ratio=0.02, assign="nearest_centre"),
    "random": InterestConfig(num_clusters=150, knn=4),
    "random_nc": InterestConfig(num_clusters=150, knn=4, assign="nearest_centre"),
    "peaks": InterestConfig(num_clusters=40, knn=2),
    "duplicates": InterestConfig(cluster_ratio=0.1, knn=3),
    "kmeans": InterestConfig(method="kmeans", cluster_ratio=0.02, kmeans_niter=10),
    "torch_input": InterestConfig(cluster_ratio=0.02),
    "approx": InterestConfig(cluster_ratio=0.02, approx_threshold=2000, approx_method="cells"),
    "approx_ivf": InterestConfig(cluster_ratio=0.02, approx_threshold=2000, approx_method="ivf"),
    "sampled": InterestConfig(cluster_ratio=0.02, sample_tokens=1000),
}


def shard_bounds(n: int, world: int, splits: tuple[float, ...]) -> np.ndarray:
    cuts = [round(f * n) for f in splits]
    return np.array([0, *cuts, n][: world + 1])


# ---------------------------------------------------------------------------- worker
def _worker(rank: int, world: int, port: int, out: str, splits: tuple[float, ...], cases: list[str]) -> None:
    from missrec.interests.distributed import discover_interests_distributed

    torch.set_num_threads(1)
    init_loopback_gloo(rank, world, port, timeout_s=120)
    try:
        for name in cases:
            x = case_tokens(name)
            b = shard_bounds(len(x), world, splits)
            mine = x[b[rank] : b[rank + 1]]
            if name == "torch_input":
                mine = torch.from_numpy(mine.copy())
            if name == "sampled":
                from missrec.interests.sampled import discover_interests_sampled

                res = discover_interests_sampled(mine, CASES[name])
            else:
                res = discover_interests_distributed(mine, CASES[name], chunk_rows=700)
            _save(Path(out), name, rank, res)
        if world == 2:
            _denser_ring(rank, Path(out))
        if world == 3:  # a subgroup of ranks 0 and 2 (peer ranks differ from group ranks)
            sub = dist.new_group([0, 2])
            if rank != 1:
                x = case_tokens("peaks")
                mine = x[:500] if rank == 0 else x[500:]
                _save(Path(out), "subgroup", rank, discover_interests_distributed(mine, CASES["peaks"], sub))
            dist.barrier()
        # bad input on one rank: every rank raises the same error instead of hanging
        x = case_tokens("random")[:100].copy()
        b = shard_bounds(len(x), world, splits)
        if rank == world - 1:
            x[b[rank] + 1, 3] = np.nan
        try:
            discover_interests_distributed(x[b[rank] : b[rank + 1]], InterestConfig(num_clusters=5))
            msg = "no error"
        except ValueError as exc:
            msg = str(exc)
        (Path(out) / f"nan.{rank}.txt").write_text(msg)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _denser_ring(rank: int, out: Path) -> None:
    """The approximate path's wider search for a denser token (each query's density travels the ring with it):
    every token it returns is denser than its query, and a second call returns the same."""
    from missrec.interests.dist_centres import denser
    from missrec.interests.dist_comm import Comm
    from missrec.interests.dist_index import ShardSearcher
    from missrec.interests.dist_knn import NO_ID, ring_knn

    x = case_tokens("approx")
    b = shard_bounds(len(x), dist.get_world_size(), (0.41,))
    comm = Comm()
    mine = np.ascontiguousarray(x[b[rank] : b[rank + 1]])
    searcher = ShardSearcher(comm, mine, b, approximate=True, cfg=CASES["approx"])
    lr = -np.random.default_rng(rank).random(len(mine))  # stand-in densities
    rows = np.arange(0, len(mine), 5)
    calls = [ring_knn(comm, mine, b, rows, 16, searcher, nprobe_factor=4, density=lr)[1][:, 0] for _ in range(2)]
    hit = calls[0] != NO_ID
    parent_lr = np.full(len(rows), np.nan)
    parent_lr[hit] = comm.fetch_values(lr, b, calls[0][hit])
    ok = denser(parent_lr, calls[0], lr[rows], b[rank] + rows) | ~hit
    (out / f"ring.{rank}.json").write_text(json.dumps({"hits": int(hit.sum()), "not_denser": int((~ok).sum()),
                                                       "same": bool(np.array_equal(*calls))}))


def _save(out: Path, name: str, rank: int, res) -> None:
    arrays = {"labels": res.labels, "centres": res.centres, "centroids": res.centroids}
    if res.rho is not None:
        arrays.update(rho=res.rho, delta=res.delta)
    np.savez(out / f"{name}.{rank}.npz", **arrays)
    (out / f"{name}.{rank}.json").write_text(json.dumps({"info": res.info, "timings": res.timings}))



def run_ranks(tmp: Path, world: int, splits: tuple[float, ...], cases: list[str]) -> Path:
    with child_threads(1):
        mp.spawn(_worker, args=(world, free_port(), str(tmp), splits, cases), nprocs=world, join=True)
    return tmp


def load(tmp: Path, name: str, rank: int) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(tmp / f"{name}.{rank}.npz") as z:
        arrays = {key: z[key] for key in z.files}
    return arrays, json.loads((tmp / f"{name}.{rank}.json").read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    # uneven shards: 41% / 59%
    return run_ranks(tmp_path_factory.mktemp("dist2"), 2, (0.41,), list(CASES))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory) -> Path:
    # the middle rank holds no tokens
    return run_ranks(tmp_path_factory.mktemp("dist3"), 3, (0.3, 0.3), ["random", "peaks", "planted_nc"])


SHARDED = ("labels", "rho", "delta")  # per-rank arrays: each rank holds its own tokens' values


def gathered(tmp: Path, name: str, ranks: tuple[int, ...]) -> tuple[dict[str, np.ndarray], dict]:
    """The global result of ``ranks``: sharded arrays concatenated in rank order; the replicated ones (centres,
    centroids) checked equal on every rank."""
    parts = [load(tmp, name, r) for r in ranks]
    got, meta = dict(parts[0][0]), parts[0][1]
    for key, value in list(got.items()):
        if key in SHARDED:
            got[key] = np.concatenate([p[0][key] for p in parts])
        else:
            for other, _ in parts[1:]:
                assert np.array_equal(value, other[key]), (name, key)
    offsets = [p[1]["info"]["offset"] for p in parts]
    sizes = [len(p[0]["labels"]) for p in parts]
    assert offsets == list(np.concatenate([[0], np.cumsum(sizes)[:-1]])), offsets  # rank order, contiguous
    return got, meta


def assert_same_as_single(tmp: Path, name: str, ranks: tuple[int, ...], tag: str = "") -> dict:
    """The results saved by ``ranks`` (files ``tag or name``) together equal single-process ``name``."""
    x = case_tokens(name)
    ref = discover_interests(x, CASES[name])
    got, meta = gathered(tmp, tag or name, ranks)
    assert np.array_equal(got["labels"], ref.labels), name
    assert np.array_equal(got["centres"], ref.centres), name
    np.testing.assert_array_equal(got["rho"], ref.rho)
    np.testing.assert_array_equal(got["delta"], ref.delta)
    np.testing.assert_allclose(got["centroids"], ref.centroids, rtol=1e-6, atol=1e-6)
    assert meta["info"]["peaks_after_knn"] == ref.info["peaks_after_knn"]
    return meta


# ---------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.parametrize("name", ["planted", "random", "torch_input"])
def test_two_ranks_equal_single_process(two_ranks, name):
    meta = assert_same_as_single(two_ranks, name, (0, 1))
    info = meta["info"]
    assert info["world_size"] == 2 and info["shard_sizes"] == [1230, 1770]
    assert info["bytes_sent"] > 0 and info["bytes_received"] > 0
    assert set(meta["timings"]) >= {"knn", "density", "delta", "assign", "total"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["planted_nc", "random_nc"])
def test_two_ranks_nearest_centre_assignment(two_ranks, name):
    assert_same_as_single(two_ranks, name, (0, 1))
    got, _ = gathered(two_ranks, name, (0, 1))
    x = case_tokens(name)
    d2 = ((x[:, None, :] - x[got["centres"]][None]) ** 2).sum(-1)
    assert np.array_equal(got["labels"], d2.argmin(1))


@pytest.mark.slow
def test_restricted_denser_search_across_ranks(two_ranks):
    meta = assert_same_as_single(two_ranks, "peaks", (0, 1))
    # many tokens have no denser token among their 2 neighbours: the distributed brute force found them
    assert meta["info"]["peaks_bruteforce"] > 50


@pytest.mark.slow
def test_duplicated_tokens_break_ties_like_single_process(two_ranks):
    assert_same_as_single(two_ranks, "duplicates", (0, 1))


@pytest.mark.slow
def test_three_ranks_with_an_empty_shard(three_ranks):
    for name in ("random", "peaks", "planted_nc"):
        meta = assert_same_as_single(three_ranks, name, (0, 1, 2))
        assert meta["info"]["shard_sizes"][1] == 0


@pytest.mark.slow
def test_subgroup_of_ranks(three_ranks):
    meta = assert_same_as_single(three_ranks, "peaks", (0, 2), tag="subgroup")
    assert meta["info"]["world_size"] == 2 and meta["info"]["shard_sizes"] == [500, 700]


@pytest.mark.slow
def test_bad_token_on_one_rank_raises_everywhere(two_ranks, three_ranks):
    for tmp, world, row in ((two_ranks, 2, 42), (three_ranks, 3, 31)):
        msgs = {(tmp / f"nan.{r}.txt").read_text() for r in range(world)}
        assert len(msgs) == 1
        msg = msgs.pop()
        assert "NaN or inf" in msg and f"first bad row is {row}" in msg


@pytest.mark.slow
def test_distributed_kmeans(two_ranks):
    got, _ = gathered(two_ranks, "kmeans", (0, 1))
    x, planted = clustered_tokens(3000, 32, seed=1, points_per_centre=50)
    c = 60
    assert got["labels"].shape == (3000,) and got["centroids"].shape == (c, 32)
    assert adjusted_rand_index(got["labels"], planted) > 0.8
    for j in np.unique(got["labels"])[:5]:
        np.testing.assert_allclose(got["centroids"][j], x[got["labels"] == j].mean(0), rtol=1e-5, atol=1e-5)
    ok = got["centres"] >= 0
    assert np.array_equal(got["labels"][got["centres"][ok]], np.flatnonzero(ok))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["approx", "approx_ivf"])
def test_approximate_path_close_to_single_process(two_ranks, name):
    got, meta = gathered(two_ranks, name, (0, 1))
    x = case_tokens(name)
    ref = discover_interests(x, CASES[name])
    assert meta["info"]["approximate"] is True
    assert meta["info"]["knn_backend"] == ("ivf" if name == "approx_ivf" else "cells")
    assert adjusted_rand_index(got["labels"], ref.labels) > 0.9


@pytest.mark.slow
def test_wider_denser_search_returns_denser_tokens_every_time(two_ranks):
    for rank in (0, 1):
        got = json.loads((two_ranks / f"ring.{rank}.json").read_text())
        assert got["hits"] > 0 and got["not_denser"] == 0 and got["same"], got


@pytest.mark.slow
def test_sampled_discovery_labels_every_token(two_ranks):
    """Above ``sample_tokens`` tokens, DPC-KNN runs on a sample into as many interests as the whole pool has
    (C = 0.02 x 3000) and the rest join their nearest centroid: every token gets a label, and the planted
    clusters are still found."""
    got, meta = gathered(two_ranks, "sampled", (0, 1))
    x, planted = clustered_tokens(3000, 32, seed=1, points_per_centre=50)
    assert got["labels"].shape == (3000,) and got["centroids"].shape == (60, 32)
    assert meta["info"]["sampled"] == 1000 and meta["info"]["pool"] == 3000
    nearest = ((x[:, None, :] - got["centroids"][None]) ** 2).sum(-1).argmin(1)
    assert (nearest == got["labels"]).mean() > 0.6  # the 2000 left out by construction, sampled ones mostly
    assert adjusted_rand_index(got["labels"], planted) > 0.8


def test_falls_back_to_single_process_when_not_initialised():
    from missrec.interests.distributed import discover_interests_distributed

    assert not dist.is_initialized()
    x = case_tokens("peaks")
    res = discover_interests_distributed(x, CASES["peaks"])
    ref = discover_interests(x, CASES["peaks"])
    assert np.array_equal(res.labels, ref.labels) and np.array_equal(res.centres, ref.centres)
    assert as_token_matrix(x).shape == (1200, 8)


def test_shard_tokens_slices_equal_the_whole_pool():
    from missrec.bench.mid_dist import shard_tokens

    x, comp = shard_tokens(10_000, 8, 0, 10_000, seed=3)
    part, part_comp = shard_tokens(10_000, 8, 4000, 9001, seed=3)
    assert np.array_equal(part, x[4000:9001]) and np.array_equal(part_comp, comp[4000:9001])
    assert shard_tokens(10_000, 8, 5, 5, seed=3)[0].shape == (0, 8)


@pytest.mark.slow
def test_mid_dist_benchmark_small():
    from missrec.bench.mid_dist import run_mid_dist_benchmark

    out = run_mid_dist_benchmark(2000, 16, world_size=2, clusters_ratio=0.02)
    assert out["same_labels"] and out["same_centres"] and out["ari_dist_vs_single"] == 1.0
    ranks = out["distributed"]["ranks"]
    assert len(ranks) == 2 and all(r["ru_maxrss_gib"] > 0 and r["seconds_wall"] > 0 for r in ranks)
    assert ranks[0]["info"]["bytes_sent"] > 0 and out["single"]["seconds_wall"] > 0
