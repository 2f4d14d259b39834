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
    if name in ("planted", "planted_nc", "kmeans", "torch_input"):
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
            res = discover_interests_distributed(mine, CASES[name], chunk_rows=700)
            _save(Path(out), name, rank, res)
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


def assert_same_as_single(tmp: Path, name: str, ranks: tuple[int, ...], tag: str = "") -> dict:
    """The results saved by ``ranks`` (files ``tag or name``) equal each other and single-process ``name``."""
    x = case_tokens(name)
    ref = discover_interests(x, CASES[name])
    got, meta = load(tmp, tag or name, ranks[0])
    for r in ranks[1:]:  # every rank holds the same global result
        other, _ = load(tmp, tag or name, r)
        for key, val in got.items():
            assert np.array_equal(val, other[key]), (name, key, r)
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
    got, _ = load(two_ranks, name, 0)
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
    got, _ = load(two_ranks, "kmeans", 0)
    other, _ = load(two_ranks, "kmeans", 1)
    assert all(np.array_equal(got[key], other[key]) for key in got)
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
    got, meta = load(two_ranks, name, 0)
    other, _ = load(two_ranks, name, 1)
    assert all(np.array_equal(got[key], other[key]) for key in got)
    x = case_tokens(name)
    ref = discover_interests(x, CASES[name])
    assert meta["info"]["approximate"] is True
    assert meta["info"]["knn_backend"] == ("ivf" if name == "approx_ivf" else "cells")
    assert adjusted_rand_index(got["labels"], ref.labels) > 0.9


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
