"""LISI at scale: the blocked kernel calibration, approximate neighbours against exact ones,
and the stratified subsample the scIB metrics and the UMAP use at 10^5-10^6 cells."""

from __future__ import annotations

import numpy as np
import pytest

from scfedvi.metrics import lisi as lisi_mod
from scfedvi.metrics import neighbors as nb
from scfedvi.metrics.lisi import compute_lisi, exact_lisi_of, lisi_per_cell, neighbor_weights
from scfedvi.metrics.neighbors import compute_neighbors
from scfedvi.metrics.subsample import stratified_subsample

from .conftest import gaussian_clusters


def test_blocked_calibration_equals_one_block(monkeypatch):
    X, _ = gaussian_clusters(700, n_dims=6, seed=2)
    nn = compute_neighbors(X, k=90, method="exact")
    P1, H1, _ = neighbor_weights(nn)
    monkeypatch.setattr(lisi_mod, "_BLOCK_ROWS", 64)
    P2, H2, _ = neighbor_weights(nn)
    np.testing.assert_array_equal(P1, P2)
    np.testing.assert_array_equal(H1, H2)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["faiss", "pynndescent"])
def test_approximate_neighbours_change_lisi_little(backend):
    """10^4 cells in a 10-D latent space (4 cell types, 3 batches mixed unevenly): LISI over
    pynndescent's graph is within 0.02 of exact kNN's in median, and per cell within 0.05 on
    average (the bound the benchmark's 10^6-cell LISI relies on)."""
    pytest.importorskip(backend)
    rng = np.random.default_rng(0)
    X, types = gaussian_clusters(10_000, n_dims=10, seed=11)
    batches = (types + rng.integers(0, 2, types.size)) % 3  # composition differs by type
    X = X + 0.8 * np.eye(10)[batches]  # and a batch effect
    labels = {"batch": batches, "type": types}
    exact = compute_lisi(None, labels, neighbors=compute_neighbors(X, k=90, method="exact"))
    approx = compute_lisi(
        None, labels, neighbors=compute_neighbors(X, k=90, method="approx", backend=backend)
    )
    assert isinstance(exact, dict) and isinstance(approx, dict)
    for key in labels:
        assert abs(np.median(approx[key]) - np.median(exact[key])) < 0.02, key
        assert np.mean(np.abs(approx[key] - exact[key])) < 0.05, key
    assert np.median(exact["batch"]) > 1.3  # the check is not on a trivial (unmixed) graph


def test_stratified_subsample_keeps_every_group():
    rng = np.random.default_rng(1)
    batch = rng.choice(["a", "b", "c"], 20_000, p=[0.7, 0.29, 0.01])
    label = rng.choice(["x", "y", "rare"], 20_000, p=[0.5, 0.495, 0.005])
    idx = stratified_subsample(batch, label, 2_000, seed=0)
    assert len(idx) == 2_000 and len(np.unique(idx)) == 2_000 and np.all(np.diff(idx) > 0)
    groups = {(b, la) for b, la in zip(batch, label, strict=True)}
    assert {(batch[i], label[i]) for i in idx} == groups  # every batch x label group kept
    share = np.mean(batch[idx] == "a")
    assert 0.6 < share < 0.75  # otherwise proportional
    np.testing.assert_array_equal(idx, stratified_subsample(batch, label, 2_000, seed=0))
    assert len(stratified_subsample(batch, label, 50_000)) == 20_000  # all when small
    with pytest.raises(ValueError, match="n must be >= 1"):
        stratified_subsample(batch, label, 0)


def test_lisi_per_cell_is_unchanged_by_blocks_on_real_shapes(monkeypatch):
    X, cl = gaussian_clusters(300, n_dims=4, seed=3)
    nn = compute_neighbors(X, k=90)
    a = lisi_per_cell(nn, cl)
    monkeypatch.setattr(lisi_mod, "_BLOCK_ROWS", 7)
    np.testing.assert_array_equal(a, lisi_per_cell(nn, cl))


def test_auto_uses_approx_above_the_always_threshold_in_any_dimension(monkeypatch):
    from scfedvi.metrics import neighbors as nb

    calls: list[str] = []
    monkeypatch.setattr(nb, "_approx", lambda X, k, seed, n_jobs: calls.append("approx"))
    monkeypatch.setattr(nb, "_exact", lambda X, k, n_jobs: calls.append("exact"))
    monkeypatch.setattr(nb, "APPROX_ALWAYS_CELLS", 30)
    monkeypatch.setattr(nb, "_faiss_available", lambda: False)
    monkeypatch.setattr(nb, "_pynndescent_available", lambda: True)
    rng = np.random.default_rng(0)
    compute_neighbors(rng.normal(size=(31, 10)))  # above: approximate, even in 10-D
    compute_neighbors(rng.normal(size=(30, 10)))  # not above, low dimensions: exact
    assert calls == ["approx", "exact"]


def test_exact_lisi_of_a_sample_equals_exact_lisi_over_all_cells():
    X, types = gaussian_clusters(1_500, n_dims=6, seed=2)
    batches = (types + np.random.default_rng(0).integers(0, 2, types.size)) % 3
    labels = {"batch": batches, "type": types}
    full = compute_lisi(None, labels, neighbors=compute_neighbors(X, k=90, method="exact"))
    rows = np.random.default_rng(1).choice(1_500, 100, replace=False)
    part = exact_lisi_of(X, labels, rows)
    assert isinstance(full, dict) and isinstance(part, dict)
    for key in labels:
        np.testing.assert_array_equal(part[key], full[key][rows])
    np.testing.assert_array_equal(exact_lisi_of(X, batches, rows[:5]), full["batch"][rows[:5]])


def _mixed_atlas(n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """10 cell types x 4 batches in a 10-D latent space, batches mixed unevenly per type."""
    rng = np.random.default_rng(0)
    X, types = gaussian_clusters(n, n_dims=10, n_clusters=10, seed=11)
    batches = (types + rng.integers(0, 3, types.size)) % 4
    return X + 0.8 * np.eye(10)[batches], {"batch": batches, "type": types}


def _error_on_sample(X, labels, rows, exact):
    nn = compute_neighbors(X, k=90, method="approx", backend="faiss")
    approx = compute_lisi(None, labels, neighbors=nn)
    assert isinstance(approx, dict)
    return {
        key: (
            np.mean(np.abs(approx[key][rows] - exact[key])),
            np.quantile(np.abs(approx[key][rows] - exact[key]), 0.99),
        )
        for key in labels
    }


@pytest.mark.slow
def test_lisi_over_faiss_neighbours_is_bounded_on_1e5_cells(monkeypatch):
    """10^5 cells: per cell, LISI over faiss' inverted-list neighbours (the default above
    200,000 cells) differs from exact kNN's by < 0.02 on average and < 0.1 at the 99th
    percentile (on 3,000 cells drawn at random, whose exact LISI is computed from their exact
    neighbours among all 10^5). With a deliberately poor index (4 lists searched instead of
    32) the same bound fails: the check has power."""
    pytest.importorskip("faiss")
    X, labels = _mixed_atlas(100_000)
    rows = np.random.default_rng(1).choice(len(X), 3_000, replace=False)
    exact = exact_lisi_of(X, labels, rows)
    assert isinstance(exact, dict)
    assert np.median(exact["batch"]) > 1.5  # the batches are mixed: not a trivial graph
    err = _error_on_sample(X, labels, rows, exact)
    for key, (mean, p99) in err.items():
        assert mean < 0.02 and p99 < 0.1, (key, mean, p99)
    monkeypatch.setattr(nb, "IVF_NPROBE", 4)
    mean, p99 = _error_on_sample(X, labels, rows, exact)["batch"]
    assert mean > 0.02 or p99 > 0.1, (mean, p99)  # the bound detects a poor index


def test_faiss_neighbours_are_exact_when_every_list_is_searched(monkeypatch):
    pytest.importorskip("faiss")
    X, _ = gaussian_clusters(600, n_dims=5, seed=4)
    monkeypatch.setattr(nb, "IVF_CELLS_PER_LIST", 100)  # 6 lists ...
    monkeypatch.setattr(nb, "IVF_NPROBE", 6)  # ... all searched: an exact search
    got = compute_neighbors(X, k=30, method="approx", backend="faiss")
    want = compute_neighbors(X, k=30, method="exact")
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.distances, want.distances, rtol=0, atol=1e-12)
    assert got.distances.dtype == np.float64
    with pytest.raises(ValueError, match="backend must be"):
        compute_neighbors(X, k=5, backend="annoy")  # type: ignore[arg-type]
