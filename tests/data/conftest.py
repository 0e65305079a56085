"""Fixtures of the data tests: tiny hand-made sites and the two real datasets."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse


def tiny(
    n_cells: int = 40,
    n_genes: int = 12,
    *,
    seed: int = 0,
    fmt: str = "csr",
    batches: tuple[str, ...] = ("b0", "b1"),
) -> ad.AnnData:
    """Poisson counts, no empty cell, every gene detected; ``fmt`` in csr, csc, dense."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32)
    x[:, 0] += 1
    x[0, :] += 1
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([batches[i % len(batches)] for i in range(n_cells)]),
            "cell_type": pd.Categorical([f"t{i % 3}" for i in range(n_cells)]),
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    mat = {"csr": sparse.csr_matrix, "csc": sparse.csc_matrix, "dense": np.asarray}[fmt](x)
    return ad.AnnData(mat, obs=obs, var=var)


@pytest.fixture(scope="session")
def pancreas(data_dir: Path) -> ad.AnnData:
    """The real pancreas dataset (read once; tests must not modify it)."""
    return ad.read_h5ad(data_dir / "pancreas_neuca.h5ad")


@pytest.fixture(scope="session")
def cortex(data_dir: Path) -> ad.AnnData:
    """The real cortex interneuron dataset (read once; tests must not modify it)."""
    return ad.read_h5ad(data_dir / "cortex_interneurons_mn.h5ad")
