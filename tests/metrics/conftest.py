"""Fixtures of the metrics tests: seeded embeddings and a PCA of the real pancreas data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.sparse.linalg import eigsh


def gaussian_clusters(
    n: int, n_dims: int = 5, n_clusters: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Cells around ``n_clusters`` seeded centres; returns the embedding and the cluster ids."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 3.0, (n_clusters, n_dims))
    cluster = rng.integers(0, n_clusters, n)
    return centers[cluster] + rng.normal(size=(n, n_dims)), cluster


@pytest.fixture(scope="session")
def pancreas_pca(data_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """20-component PCA of the log-normalized pancreas counts, with obs 'donor', 'cell_type'."""
    import anndata as ad

    adata = ad.read_h5ad(data_dir / "pancreas_neuca.h5ad")
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    X = np.log1p(X / X.sum(axis=1, keepdims=True) * 1e4)
    X -= X.mean(axis=0)
    # Top 20 eigenvectors of the gene covariance (a full SVD takes 20 s on 2 busy cores).
    gram = X.T @ X
    _, vectors = eigsh(gram, k=20, v0=np.ones(gram.shape[0]))
    return X @ vectors[:, ::-1], adata.obs[["donor", "cell_type"]].copy()
