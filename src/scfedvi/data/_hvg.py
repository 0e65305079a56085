"""The arithmetic of scanpy's ``highly_variable_genes(flavor="seurat_v3")``, split by who
computes what in a federation.

scanpy (``_highly_variable_genes_seurat_v3``), per batch ``b`` of the pooled matrix:

1. ``mean``, ``var`` per gene (unbiased, from sums and sums of squares);
2. a loess fit (``skmisc.loess``, span 0.3, degree 2) of ``log10 var`` on ``log10 mean``
   over the genes with ``var > 0``; constant genes get a fitted value of 0, i.e. ``reg_std=1``;
3. ``clip = reg_std * sqrt(n) + mean``; sums and sums of squares of ``min(x, clip)``;
4. ``norm_var = (n*mean**2 + S2 - 2*S1*mean) / ((n - 1) * reg_std**2)``.

Then ranks per batch (``argsort(argsort(-norm_var))``), the number of batches where a gene
ranks within ``n_top_genes``, the median of those ranks, and a sort on (median rank
ascending, number of batches descending, NaN last). Steps 1 and 3 need cells (they run at
the site); steps 2, 4 and the ranking need only per-gene aggregates (they run anywhere).
Every expression below keeps scanpy's order of floating-point operations, so a batch held by
one site gives bit-identical normalized variances.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

#: Loess span of scanpy's seurat_v3 flavor.
LOESS_SPAN = 0.3


def moments(x: sparse.csr_matrix) -> tuple[int, np.ndarray, np.ndarray]:
    """Return ``(n_cells, sum, sum of squares)`` per gene, in float64 (exact for counts)."""
    data = x.data.astype(np.float64)
    g = x.shape[1]
    sums = np.bincount(x.indices, weights=data, minlength=g)
    sums_sq = np.bincount(x.indices, weights=data * data, minlength=g)
    return int(x.shape[0]), sums, sums_sq


def mean_var(n: int, sums: np.ndarray, sums_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return scanpy's per-gene mean and unbiased variance from the moments."""
    mean = sums / n
    var = sums_sq / n - mean**2
    if n != 1:
        var *= n / (n - 1)
    return mean, var


def loess_fit(
    n: int, sums: np.ndarray, sums_sq: np.ndarray, span: float = LOESS_SPAN
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(mean, reg_std, clip)`` per gene for one batch, as scanpy computes them.

    Raises
    ------
    ImportError
        When scikit-misc (``skmisc``) is not installed.
    """
    try:
        from skmisc.loess import loess
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "seurat_v3 gene selection needs scikit-misc: pip install scikit-misc"
        ) from e
    mean, var = mean_var(n, sums, sums_sq)
    not_const = var > 0
    estimat_var = np.zeros(mean.shape[0], dtype=np.float64)
    y = np.log10(var[not_const])
    x = np.log10(mean[not_const])
    model = loess(x, y, span=span, degree=2)
    model.fit()
    estimat_var[not_const] = model.outputs.fitted_values
    reg_std = np.sqrt(10**estimat_var)
    clip = reg_std * np.sqrt(n) + mean
    return mean, reg_std, clip


def clipped_sums(x: sparse.csr_matrix, clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return per-gene sums and sums of squares of ``min(x, clip)`` (scanpy's loop order)."""
    element = np.minimum(x.data.astype(np.float64), clip[x.indices])
    g = x.shape[1]
    s1 = np.bincount(x.indices, weights=element, minlength=g)
    s2 = np.bincount(x.indices, weights=element**2, minlength=g)
    return s1, s2


def normalized_variance(
    n: int, mean: np.ndarray, reg_std: np.ndarray, s1: np.ndarray, s2: np.ndarray
) -> np.ndarray:
    """Return seurat_v3's normalized variance of one batch."""
    return (1 / ((n - 1) * np.square(reg_std))) * ((n * np.square(mean)) + s2 - 2 * s1 * mean)


def rank_genes(norm_vars: np.ndarray, genes: Any, n_top_genes: int) -> pd.DataFrame:
    """Combine per-batch normalized variances into scanpy's seurat_v3 selection.

    Parameters
    ----------
    norm_vars
        Array batches x genes (batches in sorted order, as ``np.unique`` gives them).
    genes
        Gene names (the columns), in the order of the pooled matrix.
    n_top_genes
        Number of genes to select.

    Returns
    -------
    DataFrame indexed by gene with ``variances_norm``, ``highly_variable_rank``,
    ``highly_variable_nbatches`` and ``highly_variable``, in the order of ``genes``.
    """
    ranked = np.argsort(np.argsort(-norm_vars, axis=1), axis=1).astype(np.float32)
    nbatches = np.sum((ranked < n_top_genes).astype(int), axis=0)
    ranked[ranked >= n_top_genes] = np.nan
    median_ranked = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
    df = pd.DataFrame(index=pd.Index(list(genes), name=None))
    df["highly_variable_rank"] = median_ranked
    df["highly_variable_nbatches"] = nbatches
    df["variances_norm"] = np.mean(norm_vars, axis=0)
    sort_cols = ["highly_variable_rank", "highly_variable_nbatches"]
    order = df[sort_cols].sort_values(sort_cols, ascending=[True, False], na_position="last")
    df["highly_variable"] = False
    df.loc[order.index[: int(n_top_genes)], "highly_variable"] = True
    return df
