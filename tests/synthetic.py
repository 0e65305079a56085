"""Small synthetic count data for tests (importable from any test module)."""

from __future__ import annotations


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
