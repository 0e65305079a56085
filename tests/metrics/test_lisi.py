"""LISI per cell against harmonypy (the oracle), the summaries, and bad inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scfedvi.metrics import (
    compute_lisi,
    compute_neighbors,
    factorize_labels,
    lisi_per_cell,
    scaled_median_lisi,
    summarize_lisi,
)

from .conftest import gaussian_clusters

harmonypy = pytest.importorskip("harmonypy")

ATOL = 1e-4


def _random_labels(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "balanced": rng.integers(0, 3, n).astype(str),
            "unbalanced": rng.choice(["a", "b", "c", "d", "e"], n, p=[0.8, 0.1, 0.05, 0.04, 0.01]),
            "single": np.full(n, "only"),
            "many_int": rng.integers(0, 12, n),
            "categorical": pd.Categorical(rng.choice(["x", "y"], n), categories=["z", "y", "x"]),
        }
    )


def _oracle(X: np.ndarray, meta: pd.DataFrame, perplexity: float = 30) -> dict[str, np.ndarray]:
    ref = harmonypy.compute_lisi(X, meta, list(meta.columns), perplexity=perplexity)
    return {col: ref[:, i] for i, col in enumerate(meta.columns)}


@pytest.mark.parametrize(("n", "n_dims", "seed"), [(500, 5, 0), (1200, 10, 1), (800, 2, 2)])
def test_matches_harmonypy_on_random_data(n: int, n_dims: int, seed: int) -> None:
    X, cluster = gaussian_clusters(n, n_dims=n_dims, seed=seed)
    meta = _random_labels(n, seed)
    meta["cluster"] = cluster
    got = compute_lisi(X, meta)
    assert isinstance(got, dict)
    for col, want in _oracle(X, meta).items():
        np.testing.assert_allclose(got[col], want, atol=ATOL, rtol=0, err_msg=col)
    np.testing.assert_allclose(got["single"], 1.0)
    assert got["balanced"].min() >= 1 - ATOL and got["balanced"].max() <= 3 + ATOL


def test_matches_harmonypy_with_duplicate_cells() -> None:
    X, _ = gaussian_clusters(400, seed=3)
    X[10:15] = X[9]  # six coinciding cells
    X[100] = X[200]
    meta = _random_labels(400, 3)
    got = compute_lisi(X, meta)
    for col, want in _oracle(X, meta).items():
        np.testing.assert_allclose(got[col], want, atol=ATOL, rtol=0, err_msg=col)


@pytest.mark.parametrize("perplexity", [5, 10.5, 20])
def test_matches_harmonypy_at_other_perplexities(perplexity: float) -> None:
    X, _ = gaussian_clusters(300, seed=4)
    meta = _random_labels(300, 4)[["balanced", "unbalanced"]]
    got = compute_lisi(X, meta, perplexity=perplexity)
    for col, want in _oracle(X, meta, perplexity).items():
        np.testing.assert_allclose(got[col], want, atol=ATOL, rtol=0, err_msg=col)


@pytest.mark.parametrize("n", [40, 90, 91])
def test_few_cells_use_every_other_cell_as_harmonypy(n: int) -> None:
    X, _ = gaussian_clusters(n, seed=5)
    meta = _random_labels(n, 5)[["balanced", "unbalanced"]]
    got = compute_lisi(X, meta)
    for col, want in _oracle(X, meta).items():
        np.testing.assert_allclose(got[col], want, atol=ATOL, rtol=0, err_msg=col)


def test_matches_harmonypy_on_pancreas(pancreas_pca: tuple[np.ndarray, pd.DataFrame]) -> None:
    X, obs = pancreas_pca
    neighbors = compute_neighbors(X, k=90)
    for col, want in _oracle(X, obs).items():
        got = lisi_per_cell(neighbors, obs[col])
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=col)
    # Unintegrated PCA: donors stay apart, cell types stay apart.
    donor = summarize_lisi(lisi_per_cell(neighbors, obs["donor"]))
    assert 1.0 <= donor["mean"] < 2.5


def test_one_graph_serves_several_label_sets() -> None:
    X, _ = gaussian_clusters(300, seed=6)
    meta = _random_labels(300, 6)
    neighbors = compute_neighbors(X, k=120)  # more neighbours than needed: the first 90 are used
    together = compute_lisi(None, meta, neighbors=neighbors)
    assert isinstance(together, dict)
    for col in meta.columns:
        np.testing.assert_allclose(together[col], compute_lisi(X, meta[col]), atol=1e-12)
        np.testing.assert_allclose(together[col], lisi_per_cell(neighbors, meta[col].to_numpy()))
    as_dict = compute_lisi(X, {"b": meta["balanced"].to_list()})
    assert isinstance(as_dict, dict)
    np.testing.assert_allclose(as_dict["b"], together["balanced"])


@pytest.mark.parametrize(
    "labels",
    [
        np.array([0.0, 1.0, np.nan] * 50),
        np.array(["a", None, "b"] * 50, dtype=object),
        pd.Series(["a", "b", None] * 50, dtype="category"),
        pd.Series(["a", pd.NA, "b"] * 50, dtype="string"),
    ],
    ids=["float-nan", "object-none", "categorical-nan", "string-na"],
)
def test_missing_labels_raise(labels: object) -> None:
    X, _ = gaussian_clusters(150, seed=7)
    with pytest.raises(ValueError, match="missing values"):
        compute_lisi(X, labels)


def test_bad_inputs_raise() -> None:
    X, _ = gaussian_clusters(150, seed=8)
    neighbors = compute_neighbors(X, k=30)
    with pytest.raises(ValueError, match="needs 90 neighbours"):
        lisi_per_cell(neighbors, np.zeros(150))
    with pytest.raises(ValueError, match="entries"):
        lisi_per_cell(neighbors, np.zeros(149), perplexity=10)
    with pytest.raises(ValueError, match="perplexity must be positive"):
        lisi_per_cell(neighbors, np.zeros(150), perplexity=0)
    with pytest.raises(ValueError, match="pass an embedding"):
        compute_lisi(None, np.zeros(150))


def test_factorize_labels() -> None:
    codes, n = factorize_labels(pd.Categorical(["b", "a", "b"], categories=["c", "b", "a"]))
    assert n == 2 and codes.tolist() == [0, 1, 0]
    codes, n = factorize_labels(np.array([5, 3, 5, 9]))
    assert n == 3 and codes.tolist() == [1, 0, 1, 2]


def test_summarize_lisi_uses_sample_sd() -> None:
    got = summarize_lisi(np.array([1.0, 2.0, 3.0, 4.0]))
    assert got == {"mean": 2.5, "sd": pytest.approx(np.sqrt(5 / 3)), "median": 2.5, "n_cells": 4}
    with pytest.raises(ValueError, match="at least 2"):
        summarize_lisi(np.array([1.0]))


def test_scaled_median_lisi() -> None:
    values = np.array([1.0, 2.0, 3.0, np.nan])
    assert scaled_median_lisi(values, 3, "ilisi") == pytest.approx(0.5)
    assert scaled_median_lisi(values, 5, "clisi") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least 2 categories"):
        scaled_median_lisi(values, 1, "ilisi")
    with pytest.raises(ValueError, match="kind"):
        scaled_median_lisi(values, 3, "blisi")  # type: ignore[arg-type]
