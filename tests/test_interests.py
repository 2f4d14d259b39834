"""Tests of multi-modal interest discovery (DPC-KNN on FAISS, k-means) and the interest index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from missrec.bench.mid import adjusted_rand_index, clustered_tokens, run_mid_benchmark
from missrec.errors import ConfigError
from missrec.interests import (
    InterestConfig,
    InterestIndex,
    build_token_pool,
    discover_interests,
)
from missrec.interests.dpc_knn import assign_by_parent, density_rank, select_centres
from missrec.interests.exact_knn import exact_knn_sample
from missrec.interests.knn import KnnSearcher
from missrec.interests.reference import dpc_knn_exact


def blobs(n_blobs: int, per_blob: int, dim: int, seed: int = 0, sep: float = 10.0, spread: float = 0.5):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, dim)) * sep
    truth = np.repeat(np.arange(n_blobs), per_blob)
    x = centres[truth] + spread * rng.standard_normal((n_blobs * per_blob, dim))
    perm = rng.permutation(len(truth))
    return x[perm].astype(np.float32), truth[perm]


# ---------------------------------------------------------------------------- DPC-KNN
def test_planted_blobs_recovered_exactly():
    x, truth = blobs(8, 50, 16)
    res = discover_interests(x, InterestConfig(num_clusters=8))
    assert res.num_clusters == 8
    assert adjusted_rand_index(res.labels, truth) == 1.0
    assert res.labels.dtype == np.int64 and res.labels.shape == (400,)
    assert res.centroids.shape == (8, 16) and res.centroids.dtype == np.float32
    # each centre belongs to its own cluster, and centroids are member means
    assert np.array_equal(res.labels[res.centres], np.arange(8))
    np.testing.assert_allclose(res.centroids[0], x[res.labels == 0].mean(0), rtol=1e-5, atol=1e-5)
    assert set(res.timings) >= {"knn", "density", "delta", "assign", "total"}


def test_nearest_centre_assignment():
    x, truth = blobs(8, 50, 16)
    res = discover_interests(x, InterestConfig(num_clusters=8, assign="nearest_centre"))
    assert adjusted_rand_index(res.labels, truth) == 1.0
    assert np.array_equal(res.labels[res.centres], np.arange(8))
    # every token's label is its nearest centre
    d2 = ((x[:, None, :] - x[res.centres][None]) ** 2).sum(-1)
    assert np.array_equal(res.labels, d2.argmin(1))


@pytest.mark.parametrize("ratio", [0.5, 0.05])
def test_agrees_with_exact_reference(ratio):
    x, _ = clustered_tokens(2000, 32, seed=1, points_per_centre=50)
    res = discover_interests(x, InterestConfig(cluster_ratio=ratio))
    ref = dpc_knn_exact(x, res.num_clusters, 5)
    assert adjusted_rand_index(res.labels, ref.labels) >= 0.95
    np.testing.assert_allclose(res.rho, ref.rho, rtol=1e-9)
    np.testing.assert_allclose(res.delta, ref.delta, rtol=1e-6)
    assert np.array_equal(res.centres, ref.centres)


def test_peak_search_matches_reference_delta():
    # k=2 on structureless data: many tokens are denser than both their neighbours
    rng = np.random.default_rng(3)
    x = rng.uniform(size=(600, 8)).astype(np.float32)
    res = discover_interests(x, InterestConfig(num_clusters=30, knn=2))
    assert res.info["peaks_after_knn"] > 50
    ref = dpc_knn_exact(x, 30, 2)
    np.testing.assert_allclose(res.delta, ref.delta, rtol=1e-6)
    assert adjusted_rand_index(res.labels, ref.labels) == 1.0


@pytest.mark.parametrize("method", ["cells", "ivf"])
def test_approximate_index_path(method):
    x, truth = blobs(10, 100, 24, seed=4, sep=6.0, spread=1.0)
    cfg = InterestConfig(num_clusters=10, approx_threshold=100, approx_method=method, recall_sample=200)
    res = discover_interests(x, cfg)
    assert res.info["approximate"] and res.info["knn_backend"] == method
    assert res.info["knn_recall"] >= 0.9
    assert adjusted_rand_index(res.labels, truth) >= 0.9


def test_knn_ratio_and_searcher_excludes_self():
    x, _ = clustered_tokens(500, 8, seed=5)
    searcher = KnnSearcher(x, approximate=False)
    _, idx = searcher.search_rows(None, 4)
    assert not (idx == np.arange(500)[:, None]).any()
    _, eidx = exact_knn_sample(x, np.arange(500), 4)
    assert (np.sort(idx, 1) == np.sort(eidx, 1)).mean() > 0.99
    res = discover_interests(x, InterestConfig(num_clusters=10, knn=0.01))
    assert res.info["k"] == 5


def test_density_maximum_is_forced_centre_and_chains_end_at_centres():
    log_rho = np.array([0.0, -1.0, -2.0, -3.0])
    delta = np.array([1.0, 5.0, 0.5, 0.5])  # token 1 outscores the density maximum when C=1
    order, rank = density_rank(log_rho)
    assert order.tolist() == [0, 1, 2, 3] and rank.tolist() == [0, 1, 2, 3]
    centres = select_centres(log_rho, delta, order, 1)
    assert centres.tolist() == [0]
    parent = np.array([0, 0, 1, 2])
    assert assign_by_parent(parent, np.array([0, 2])).tolist() == [0, 0, 1, 1]


# ---------------------------------------------------------------------------- k-means, errors
def test_kmeans_returns_c_clusters():
    x, truth = blobs(6, 40, 8, seed=6)
    res = discover_interests(x, InterestConfig(method="kmeans", num_clusters=6, seed=0))
    assert res.method == "kmeans" and res.num_clusters == 6
    assert res.labels.min() >= 0 and res.labels.max() < 6
    assert res.centroids.shape == (6, 8)
    ok = res.centres >= 0
    assert np.array_equal(res.labels[res.centres[ok]], np.flatnonzero(ok))
    assert np.isfinite(res.info["objective"])
    assert adjusted_rand_index(res.labels, truth) > 0.3


def test_bad_input_raises():
    x = np.zeros((10, 4), dtype=np.float32)
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 token.*first bad row is 3"):
        discover_interests(x)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        discover_interests(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="only 5 tokens"):
        discover_interests(np.random.rand(5, 3), InterestConfig(num_clusters=6))
    with pytest.raises(ValueError, match="2-D"):
        discover_interests(np.zeros(5))
    with pytest.raises(ConfigError):
        InterestConfig(method="spectral")
    with pytest.raises(ConfigError):
        InterestConfig(cluster_ratio=0.0)
    with pytest.raises(ConfigError):
        InterestConfig(knn=0)


def test_torch_input_and_tiny_pool():
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    res = discover_interests(x, InterestConfig(num_clusters=3))
    assert sorted(res.labels.tolist()) == [0, 1, 2]
    res = discover_interests(x[:2], InterestConfig(num_clusters=1))
    assert res.labels.tolist() == [0, 0]


# ---------------------------------------------------------------------------- ARI, benchmark
def test_adjusted_rand_index():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, np.array([5, 5, 3, 3, 9, 9])) == 1.0
    assert adjusted_rand_index(a, np.array([0, 1, 0, 1, 0, 1])) < 0
    # by hand: sum_ij=3, sum_a=3, sum_b=7, pairs=15 -> (3 - 1.4) / (5 - 1.4)
    b = np.array([0, 0, 1, 1, 1, 1])
    assert adjusted_rand_index(a, b) == pytest.approx(1.6 / 3.6, abs=1e-12)


def test_run_mid_benchmark_small():
    out = run_mid_benchmark(1000, dim=16, clusters_ratio=0.05, knn=5, method="dpc_knn", seed=0)
    assert out["clusters"] == 50 and out["ari_vs_exact"] == 1.0
    assert out["official_nxn_gib"] == pytest.approx(1000 * 1000 * 4 / 2**30)
    assert {"knn", "density", "delta", "assign"} <= set(out["seconds"])
    assert out["peak_rss_gib"] > 0


# ---------------------------------------------------------------------------- interest index
def hand_index() -> InterestIndex:
    # 4 items x 2 modalities (text, image); items 1 and 3 have no image
    item_interest = torch.tensor([[0, 2], [1, -1], [0, 3], [4, -1]])
    return InterestIndex(item_interest, torch.zeros(5, 3))


def test_sequence_interests_hand_made():
    idx = hand_index()
    seq = torch.tensor(
        [
            [1, 2, 3, 0],  # items 0,1,2 + padding -> {0, 2} u {1} u {0, 3}
            [2, 0, 0, 0],  # length 1
            [2, 4, 2, 0],  # every item misses the image; duplicates
        ]
    )
    ids, mask = idx.sequence_interests(seq)
    assert ids.tolist() == [[0, 1, 2, 3], [1, -1, -1, -1], [1, 4, -1, -1]]
    assert mask.tolist() == [[True] * 4, [True, False, False, False], [True, True, False, False]]
    ids, _ = idx.sequence_interests(seq[1:2], pad_id=99)
    assert ids.tolist() == [[1]]
    ids, mask = idx.sequence_interests(torch.tensor([[2, 0], [1, 3]]), pad_id=7)
    assert ids.tolist() == [[1, 7, 7], [0, 2, 3]] and mask.sum().item() == 4
    with pytest.raises(ValueError):
        idx.sequence_interests(torch.tensor([[5]]))


def test_token_pool_roundtrip_and_state_dict():
    m, i, d = 2, 5, 4
    tokens = torch.arange(m * i * d, dtype=torch.float32).reshape(m, i, d)
    mask = torch.ones(i, m, dtype=torch.bool)
    mask[1, 1] = False  # item 1 has no image
    mask[4, 0] = False  # item 4 has no text
    pool = build_token_pool(tokens, mask)
    assert pool.tokens.shape == (8, d)
    assert pool.flat.tolist() == [0, 1, 2, 3, 5, 7, 8, 9]  # modality-major m * I + i
    assert torch.equal(pool.tokens[4], tokens[1, 0])
    labels = np.arange(8) % 3
    mat = pool.to_item_matrix(labels)
    assert mat.shape == (i, m) and mat[1, 1] == -1 and mat[4, 0] == -1 and mat[0, 1] == labels[4]
    from missrec.interests import ClusterResult

    res = ClusterResult(labels=labels, centres=np.array([0, 1, 2]), centroids=np.zeros((3, d), np.float32))
    back = InterestIndex(pool.to_item_matrix(res.labels), torch.from_numpy(res.centroids))
    assert torch.equal(back.item_interest, mat)
    seq = torch.tensor([[2, 5, 0]])  # items 1 and 4: one token each
    ids, mask_out = back.sequence_interests(seq)
    assert ids[mask_out].tolist() == sorted({int(mat[1, 0]), int(mat[4, 1])})
