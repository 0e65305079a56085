"""The kNN graph: exact against brute force, self removed by index, small and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from scfedvi.metrics import neighbors as nb
from scfedvi.metrics.neighbors import Neighbors, compute_neighbors

from .conftest import gaussian_clusters


def test_exact_matches_brute_force() -> None:
    X, _ = gaussian_clusters(300, seed=1)
    got = compute_neighbors(X, k=20, method="exact")
    d = cdist(X, X)
    np.fill_diagonal(d, np.inf)
    want_idx = np.argsort(d, axis=1)[:, :20]
    assert got.indices.shape == got.distances.shape == (300, 20)
    assert got.indices.dtype == np.int64 and got.distances.dtype == np.float64
    np.testing.assert_array_equal(got.indices, want_idx)
    np.testing.assert_allclose(got.distances, np.take_along_axis(d, want_idx, axis=1))
    assert not (got.indices == np.arange(300)[:, None]).any()
    assert (np.diff(got.distances, axis=1) >= 0).all()


def test_duplicates_are_neighbours_and_self_is_removed_by_index() -> None:
    X, _ = gaussian_clusters(200, seed=2)
    X[1] = X[0]
    X[2] = X[0]  # cells 0, 1, 2 coincide
    got = compute_neighbors(X, k=10, method="exact")
    for i, others in ((0, {1, 2}), (1, {0, 2}), (2, {0, 1})):
        assert set(got.indices[i, :2]) == others
        np.testing.assert_array_equal(got.distances[i, :2], 0.0)
        assert i not in got.indices[i]


def test_more_duplicates_than_k_keeps_k_zero_distances() -> None:
    X = np.zeros((30, 3))
    X[20:] = 1.0
    got = compute_neighbors(X, k=5)
    assert got.indices.shape == (30, 5)
    np.testing.assert_array_equal(got.distances, 0.0)
    assert not (got.indices == np.arange(30)[:, None]).any()
    assert (got.indices[:20] < 20).all() and (got.indices[20:] >= 20).all()


def test_fewer_cells_than_k_uses_every_other_cell() -> None:
    X, _ = gaussian_clusters(12, seed=3)
    got = compute_neighbors(X, k=90)
    assert got.indices.shape == (12, 11)
    for i in range(12):
        assert set(got.indices[i]) == set(range(12)) - {i}


@pytest.mark.parametrize(
    ("X", "kwargs", "match"),
    [
        (np.zeros((1, 3)), {}, "at least 2 cells"),
        (np.array([[0.0, np.nan], [1.0, 1.0]]), {}, "NaN"),
        (np.zeros(5), {}, "2-D"),
        (np.zeros((5, 2)), {"k": 0}, "k must be"),
        (np.zeros((5, 2)), {"method": "fast"}, "method"),
    ],
)
def test_bad_inputs_raise(X: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_neighbors(X, **kwargs)


def test_neighbors_validates_and_subsets() -> None:
    with pytest.raises(ValueError, match="same shape"):
        Neighbors(indices=np.zeros((3, 2), dtype=int), distances=np.zeros((3, 3)))
    X, _ = gaussian_clusters(50, seed=4)
    full = compute_neighbors(X, k=10)
    sub = full.subset(4)
    assert (sub.n_cells, sub.n_neighbors) == (50, 4)
    np.testing.assert_array_equal(sub.indices, full.indices[:, :4])
    with pytest.raises(ValueError, match="k must be"):
        full.subset(11)


def test_approx_falls_back_to_exact_without_pynndescent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nb, "_faiss_available", lambda: False)
    monkeypatch.setattr(nb, "_pynndescent_available", lambda: False)
    X, _ = gaussian_clusters(100, seed=5)
    got = compute_neighbors(X, k=8, method="approx")
    want = compute_neighbors(X, k=8, method="exact")
    np.testing.assert_array_equal(got.indices, want.indices)


def test_auto_uses_approx_only_for_large_high_dimensional_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(nb, "_approx", lambda X, k, seed, n_jobs: calls.append("approx"))
    monkeypatch.setattr(nb, "_exact", lambda X, k, n_jobs: calls.append("exact"))
    monkeypatch.setattr(nb, "APPROX_MIN_CELLS", 10)
    monkeypatch.setattr(nb, "_faiss_available", lambda: False)
    monkeypatch.setattr(nb, "_pynndescent_available", lambda: True)
    compute_neighbors(np.random.default_rng(0).normal(size=(20, nb.APPROX_MIN_DIMS + 1)))
    compute_neighbors(np.random.default_rng(0).normal(size=(20, nb.APPROX_MIN_DIMS)))
    compute_neighbors(np.random.default_rng(0).normal(size=(10, nb.APPROX_MIN_DIMS + 1)))
    assert calls == ["approx", "exact", "exact"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["faiss", "pynndescent"])
def test_approx_has_high_recall(backend: nb.ApproxBackend) -> None:
    pytest.importorskip(backend)
    X, _ = gaussian_clusters(2000, n_dims=10, seed=6)
    got = compute_neighbors(X, k=30, method="approx", seed=0, backend=backend)
    want = compute_neighbors(X, k=30, method="exact")
    assert not (got.indices == np.arange(2000)[:, None]).any()
    recall = np.mean(
        [len(set(a) & set(b)) / 30 for a, b in zip(got.indices, want.indices, strict=True)]
    )
    assert recall > 0.97
