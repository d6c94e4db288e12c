"""The nearest-neighbour index: exact when small, approximate when large, true distances."""

from __future__ import annotations

import numpy as np
import pytest

from unpersonal.errors import UserError
from unpersonal.privacy.knn import NeighbourIndex


def clustered(count: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Points around a few random centres: the structure real embeddings have and IVF relies on."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 3
    return (centres[rng.integers(clusters, size=count)] + rng.normal(size=(count, dim))
            ).astype(np.float32)


def brute_force(train: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """All query-to-train distances [M, N] in float64, written the obvious way."""
    train, queries = train.astype(np.float64), queries.astype(np.float64)
    if metric == "l2":
        return np.sqrt(((queries[:, None, :] - train[None, :, :]) ** 2).sum(-1))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return 1 - unit(queries) @ unit(train).T


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exact_index_matches_brute_force(metric: str) -> None:
    train, queries = clustered(400, 12, 5, seed=0), clustered(60, 12, 5, seed=1)
    index = NeighbourIndex(metric).fit(train)
    distances, indices = index.search(queries, k=5)
    expected = brute_force(train, queries, metric)
    assert index.kind == "exact" and len(index) == 400 and index.dim == 12
    np.testing.assert_array_equal(indices, np.argsort(expected, axis=1)[:, :5])
    np.testing.assert_allclose(distances, np.sort(expected, axis=1)[:, :5], atol=1e-4)


def test_distances_are_true_euclidean_and_cosine_distances() -> None:
    train = np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    distances, indices = NeighbourIndex("l2").fit(train).search(np.array([[0.0, 0.0]]), k=2)
    np.testing.assert_allclose(distances, [[0.0, 5.0]], atol=1e-6)  # not 25: not squared
    np.testing.assert_array_equal(indices, [[0, 1]])

    train = np.array([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]], dtype=np.float32)
    distances, indices = NeighbourIndex("cosine").fit(train).search(np.array([[3.0, 0.0]]), k=3)
    np.testing.assert_allclose(distances, [[0.0, 1.0, 2.0]], atol=1e-6)  # 1 - cos, any length
    np.testing.assert_array_equal(indices, [[0, 1, 2]])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_approximate_index_has_high_recall_on_clustered_data(metric: str) -> None:
    train, queries = clustered(4000, 16, 20, seed=2), clustered(200, 16, 20, seed=3)
    approximate = NeighbourIndex(metric, exact_max=1000).fit(train)
    exact = NeighbourIndex(metric).fit(train)
    assert approximate.kind == "approximate" and exact.kind == "exact"
    assert approximate.lists_used is not None and 1 < approximate.lists_used < len(train)
    found_distances, found = approximate.search(queries, k=10)
    _, truth = exact.search(queries, k=10)
    recall = np.mean([len(set(a) & set(t)) / 10 for a, t in zip(found, truth)])
    assert recall >= 0.9
    # The returned distances are true distances to the returned vectors, whatever the backend.
    expected = brute_force(train, queries, metric)
    np.testing.assert_allclose(found_distances, np.take_along_axis(expected, found, 1), atol=1e-4)


def test_few_probes_lose_recall() -> None:
    """The approximation is real: probing one cell of many misses neighbours in other cells."""
    train, queries = clustered(4000, 16, 20, seed=2), clustered(200, 16, 20, seed=3)
    _, truth = NeighbourIndex("l2").fit(train).search(queries, k=10)
    one_probe = NeighbourIndex("l2", exact_max=1000, lists=80, probe=1).fit(train)
    _, found = one_probe.search(queries, 10)
    recall = np.mean([len(set(a) & set(t)) / 10 for a, t in zip(found, truth)])
    assert recall < 0.95


@pytest.mark.parametrize("exact_max", [50_000, 500])
def test_chunked_queries_equal_unchunked(exact_max: int) -> None:
    train, queries = clustered(1500, 8, 6, seed=4), clustered(101, 8, 6, seed=5)
    whole = NeighbourIndex("cosine", exact_max=exact_max).fit(train).search(queries, k=4)
    chunked = NeighbourIndex("cosine", exact_max=exact_max, query_chunk=7).fit(train)
    parts = chunked.search(queries, k=4)
    np.testing.assert_array_equal(parts[1], whole[1])
    np.testing.assert_array_equal(parts[0], whole[0])


def test_same_seed_builds_the_same_approximate_index() -> None:
    train, queries = clustered(3000, 8, 10, seed=6), clustered(100, 8, 10, seed=7)
    first = NeighbourIndex("l2", exact_max=100, probe=2, seed=3).fit(train).search(queries, 5)
    again = NeighbourIndex("l2", exact_max=100, probe=2, seed=3).fit(train).search(queries, 5)
    np.testing.assert_array_equal(first[1], again[1])


@pytest.mark.parametrize("exact_max", [50_000, 500])
def test_save_load_round_trip(tmp_path, exact_max: int) -> None:
    train, queries = clustered(2000, 8, 6, seed=8), clustered(50, 8, 6, seed=9)
    index = NeighbourIndex("cosine", exact_max=exact_max, probe=3).fit(train)
    index.save(tmp_path / "nested" / "train.faiss")
    loaded = NeighbourIndex.load(tmp_path / "nested" / "train.faiss")
    assert (tmp_path / "nested" / "train.faiss.json").is_file()
    assert not [p for p in (tmp_path / "nested").iterdir() if ".tmp-" in p.name]
    assert (loaded.kind, loaded.metric, loaded.probe) == (index.kind, "cosine", 3)
    assert len(loaded) == 2000
    for got, expected in zip(loaded.search(queries, 6), index.search(queries, 6)):
        np.testing.assert_array_equal(got, expected)


def test_load_missing_index_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="train.faiss"):
        NeighbourIndex.load(tmp_path / "train.faiss")


def test_more_neighbours_than_vectors_come_back_missing() -> None:
    distances, indices = NeighbourIndex("l2").fit(np.eye(3)).search(np.zeros((2, 3)), k=5)
    np.testing.assert_array_equal(indices[:, 3:], -1)
    assert np.isinf(distances[:, 3:]).all() and np.isfinite(distances[:, :3]).all()


def test_bad_vectors_are_refused() -> None:
    with pytest.raises(UserError, match="all-zero"):
        NeighbourIndex("cosine").fit(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(UserError, match="NaN"):
        NeighbourIndex("l2").fit(np.array([[np.nan, 0.0]]))
    with pytest.raises(UserError, match="at least one"):
        NeighbourIndex("l2").fit(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="dimensions"):
        NeighbourIndex("l2").fit(np.zeros((3, 4))).search(np.zeros((1, 5)), k=1)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_approximate_index_always_finds_exact_copies(metric: str) -> None:
    """What the filter relies on: a copy lands in its original's cell; one probe finds it."""
    train = clustered(3000, 16, 20, seed=11)
    index = NeighbourIndex(metric, exact_max=500, probe=1).fit(train)
    copies = np.random.default_rng(12).choice(len(train), 200, replace=False)
    distances, indices = index.search(train[copies], k=1)
    np.testing.assert_array_equal(indices[:, 0], copies)
    assert distances.max() < 1e-3
