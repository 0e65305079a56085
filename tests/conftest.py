"""Shared fixtures: seeded small data, the real data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("SCFEDVI_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if not (d / "pancreas_neuca.h5ad").exists():
        pytest.skip(f"real data not found in {d}; set SCFEDVI_DATA_DIR")
    return d


def make_counts(n_cells: int, n_genes: int, *, n_batches: int = 2, n_types: int = 3, seed: int = 0):
    """A small AnnData of NB counts with cell types and a multiplicative batch effect."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n_cells)
    batches = np.arange(n_cells) % n_batches
    base = rng.gamma(0.6, 1.0, size=(n_types, n_genes)) + 0.05
    bfac = rng.lognormal(0.0, 0.5, size=(n_batches, n_genes))
    lib = rng.lognormal(np.log(500.0), 0.3, n_cells) * (1 + 4 * batches)
    mu = base[types] * bfac[batches]
    mu = mu / mu.sum(1, keepdims=True) * lib[:, None]
    counts = rng.negative_binomial(5, 5 / (5 + mu)).astype(np.int32)
    counts[:, 0] += 1  # no empty cells
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([f"b{b}" for b in batches]),
            "cell_type": pd.Categorical([f"t{t}" for t in types]),
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture
def small_adata():
    """240 cells x 60 genes, 2 batches, 3 cell types."""
    return make_counts(240, 60)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One torch thread: several test processes (and Flower sites) share 2 cores; more
    threads than cores slow small models down by orders of magnitude."""
    import torch

    torch.set_num_threads(1)
