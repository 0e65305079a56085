"""scIB metrics through scib-metrics: oracle of our LISI scaling, and the Benchmarker wrapper.

Importing scib-metrics (jax) and compiling its metrics takes tens of seconds: these tests are
marked slow (they still run in CI).
"""

from __future__ import annotations

import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scfedvi.metrics import (
    clisi_score,
    compute_neighbors,
    ilisi_score,
    lisi_per_cell,
)

from .conftest import gaussian_clusters

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scib_metrics():  # type: ignore[no-untyped-def]
    return pytest.importorskip("scib_metrics")


def _two_embeddings(n: int = 600, seed: int = 0) -> ad.AnnData:
    """One embedding with batches mixed within cell types, one with batches pushed apart."""
    rng = np.random.default_rng(seed)
    mixed, cell_type = gaussian_clusters(n, n_dims=8, n_clusters=4, seed=seed)
    batch = rng.integers(0, 3, n)
    separated = mixed + 6.0 * np.eye(8)[batch]
    obs = pd.DataFrame(
        {"batch": pd.Categorical(batch.astype(str)), "cell_type": pd.Categorical(cell_type)},
        index=[f"cell{i}" for i in range(n)],
    )
    adata = ad.AnnData(X=rng.poisson(1.0, (n, 40)).astype(np.float32), obs=obs)
    adata.obsm["mixed"] = mixed
    adata.obsm["separated"] = separated
    return adata


def test_to_scib_prepends_self(scib_metrics) -> None:  # type: ignore[no-untyped-def]
    X, _ = gaussian_clusters(200, seed=1)
    res = compute_neighbors(X, k=90).to_scib()
    assert res.indices.shape == (200, 91)
    np.testing.assert_array_equal(res.indices[:, 0], np.arange(200))
    np.testing.assert_array_equal(res.distances[:, 0], 0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_lisi_matches_scib_metrics_on_the_same_graph(scib_metrics, seed: int) -> None:  # type: ignore[no-untyped-def]
    adata = _two_embeddings(500, seed)
    for key in ("mixed", "separated"):
        neighbors = compute_neighbors(adata.obsm[key], k=90)
        res = neighbors.to_scib()
        batch, cell_type = adata.obs["batch"], adata.obs["cell_type"]
        per_cell = scib_metrics.lisi_knn(res, batch.to_numpy())
        # scib-metrics computes in float32.
        np.testing.assert_allclose(lisi_per_cell(neighbors, batch), per_cell, atol=1e-3)
        assert ilisi_score(neighbors, batch) == pytest.approx(
            float(scib_metrics.ilisi_knn(res, batch.to_numpy())), abs=1e-4
        )
        assert clisi_score(neighbors, cell_type) == pytest.approx(
            float(scib_metrics.clisi_knn(res, cell_type.to_numpy())), abs=1e-4
        )


@pytest.fixture(scope="module")
def fast_scores(scib_metrics) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    from scfedvi.metrics.scib import scib_scores

    return scib_scores(
        _two_embeddings(),
        batch_key="batch",
        label_key="cell_type",
        embedding_keys=["mixed", "separated"],
        fast=True,
    )


def test_fast_scores_are_in_unit_interval(fast_scores: pd.DataFrame) -> None:
    from scfedvi.metrics.scib import AGGREGATE_COLUMNS

    assert list(fast_scores.index) == ["mixed", "separated"]
    assert fast_scores.index.name == "embedding"
    expected = {
        "Isolated labels", "KMeans NMI", "KMeans ARI", "Silhouette label", "cLISI",
        "Silhouette batch", "iLISI", "Graph connectivity", "PCR comparison", *AGGREGATE_COLUMNS,
    }  # fmt: skip
    assert set(fast_scores.columns) == expected
    values = fast_scores.to_numpy()
    assert np.isfinite(values).all()
    assert (values >= 0).all() and (values <= 1 + 1e-6).all()  # float32 in scib-metrics
    assert fast_scores.attrs["metric_type"]["iLISI"] == "Batch correction"
    total = 0.6 * fast_scores["Bio conservation"] + 0.4 * fast_scores["Batch correction"]
    np.testing.assert_allclose(fast_scores["Total"], total)


def test_mixing_scores_higher_batch_correction(fast_scores: pd.DataFrame) -> None:
    mixed, separated = fast_scores.loc["mixed"], fast_scores.loc["separated"]
    assert mixed["Batch correction"] > separated["Batch correction"] + 0.2
    assert mixed["iLISI"] > separated["iLISI"]
    assert mixed["Silhouette batch"] > separated["Silhouette batch"]


def test_full_scores_add_kbet_and_leiden(scib_metrics) -> None:  # type: ignore[no-untyped-def]
    from scfedvi.metrics.scib import scib_scores

    adata = _two_embeddings(300, seed=2)
    adata.obsm["X_pca"] = adata.obsm["separated"]  # used as the unintegrated embedding
    df = scib_scores(
        adata, batch_key="batch", label_key="cell_type", embedding_keys=["mixed"], batch_asw="bras"
    )
    assert {"KBET", "Leiden NMI", "Leiden ARI", "BRAS"} <= set(df.columns)
    assert (df.to_numpy() >= 0).all() and (df.to_numpy() <= 1 + 1e-6).all()
    assert df.loc["mixed", "PCR comparison"] > 0.5  # batch variance removed relative to X_pca
    assert set(adata.obsm) == {"mixed", "separated", "X_pca"}  # not modified


def test_bad_keys_raise(scib_metrics) -> None:  # type: ignore[no-untyped-def]
    from scfedvi.metrics.scib import scib_scores

    adata = _two_embeddings(100)
    kw = {"batch_key": "batch", "label_key": "cell_type"}
    with pytest.raises(KeyError, match="obsm\\['nope'\\]"):
        scib_scores(adata, embedding_keys=["nope"], **kw)
    with pytest.raises(KeyError, match="obs\\['donor'\\]"):
        scib_scores(adata, batch_key="donor", label_key="cell_type", embedding_keys=["mixed"])
    with pytest.raises(KeyError, match="pre_integrated_key"):
        scib_scores(adata, embedding_keys=["mixed"], pre_integrated_key="X_x", **kw)


def test_missing_scib_metrics_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from scfedvi.metrics.scib import scib_scores

    monkeypatch.setitem(sys.modules, "scib_metrics", None)
    with pytest.raises(ImportError, match=r"pip install 'scfedvi\[benchmark\]'"):
        scib_scores(
            _two_embeddings(100), batch_key="batch", label_key="cell_type", embedding_keys=["mixed"]
        )
