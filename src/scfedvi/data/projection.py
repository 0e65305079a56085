"""Projection of a site's data onto the federation schema: what local training consumes.

:func:`project` validates a site, reorders its genes into the schema order (absent genes
zero-filled), maps batches and labels to the schema's categories and drops cells without
counts over the schema genes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from scfedvi.data.errors import SchemaMismatchError, SiteDataWarning, site_prefix
from scfedvi.data.validate import (
    cell_totals,
    check_count_values,
    check_min_cells,
    check_obs_column,
    check_unique_genes,
    get_counts,
)

if TYPE_CHECKING:
    from anndata import AnnData

    from scfedvi.data.schema import FederationSchema


def _examples(values: Any, k: int = 5) -> str:
    values = list(values)
    more = f", ... ({len(values)} in all)" if len(values) > k else ""
    return ", ".join(repr(v) for v in values[:k]) + more


@dataclass(frozen=True)
class SiteData:
    """A site's cells projected onto the schema: what local training consumes.

    Parameters
    ----------
    site
        Site name.
    X
        Counts, float32 CSR, cells x schema genes in schema order.
    batch_index
        int64 index of each cell's batch in ``schema.batches``.
    labels
        Label of each cell (object array of str), or ``None`` when the site has no labels.
    obs_names
        Cell names, aligned with the rows of ``X``.
    missing_genes
        Schema genes the site lacks (zero-filled columns).
    """

    site: str
    X: sparse.csr_matrix
    batch_index: np.ndarray
    labels: np.ndarray | None
    obs_names: np.ndarray
    missing_genes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        n = self.X.shape[0]
        for name in ("batch_index", "labels", "obs_names"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != n:
                raise ValueError(f"SiteData {self.site!r}: {name} has {len(arr)} rows, X has {n}")

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return int(self.X.shape[0])

    @property
    def n_genes(self) -> int:
        """Number of genes (the schema's)."""
        return int(self.X.shape[1])


def _is_schema_csr(
    x: sparse.csr_matrix, cols: np.ndarray, positions: np.ndarray, n_genes: int, dtype: Any
) -> bool:
    """Whether ``x`` already is what :func:`_place_columns` would build: ``dtype`` CSR with
    every schema gene in schema order, sorted columns, no stored zeros, int32 indices."""
    return (
        x.dtype == np.dtype(dtype)
        and x.shape[1] == n_genes
        and len(cols) == n_genes
        and bool(np.array_equal(cols, np.arange(n_genes)))
        and bool(np.array_equal(positions, np.arange(n_genes)))
        and x.indices.dtype == np.int32
        and bool(x.has_sorted_indices)
        and not _has_stored_zeros(x.data)
    )


def _has_stored_zeros(data: np.ndarray, block: int = 1 << 24) -> bool:
    """Any explicit zero among the stored values (checked in blocks: bounded temporaries)."""
    return any(not np.all(data[i : i + block]) for i in range(0, data.size, block))


def _place_columns(
    x: Any,
    cols: np.ndarray,
    positions: np.ndarray,
    n_genes: int,
    dtype: Any,
    chunk_rows: int = 2048,
) -> sparse.csr_matrix:
    """Put column ``cols[j]`` of ``x`` at column ``positions[j]`` of a zero-filled CSR.

    Sparse input is mapped through one int32 lookup table (site column -> schema position) and
    written into a preallocated CSR, chunk of rows by chunk of rows, so that beyond the input
    and the result only one chunk is alive (peak memory about twice the data, not four times).
    """
    if not sparse.issparse(x):
        dense = np.zeros((x.shape[0], n_genes), dtype=dtype)
        dense[:, positions] = x[:, cols]
        out = sparse.csr_matrix(dense)
        out.eliminate_zeros()
        return out
    x = sparse.csr_matrix(x)
    if _is_schema_csr(x, cols, positions, n_genes, dtype):
        # already the result: a CSR over the same buffers, no copy (at 10^6 cells x 2,000
        # genes of the simulated density a copy of the counts is 8.6 GB); nothing that
        # consumes a SiteData writes into its X
        return sparse.csr_matrix((x.data, x.indices, x.indptr), shape=x.shape, copy=False)
    lut = np.full(x.shape[1], -1, dtype=np.int32)
    lut[np.asarray(cols)] = np.asarray(positions, dtype=np.int32)
    n = x.shape[0]
    counts = np.empty(n, dtype=np.int64)
    for s in range(0, n, chunk_rows):  # pass 1: kept entries per row
        e = min(s + chunk_rows, n)
        lo, hi = x.indptr[s], x.indptr[e]
        kept = (lut[x.indices[lo:hi]] >= 0) & (x.data[lo:hi] != 0)
        rows = np.repeat(np.arange(e - s), np.diff(x.indptr[s : e + 1]))
        counts[s:e] = np.bincount(rows[kept], minlength=e - s)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    data = np.empty(int(indptr[-1]), dtype=dtype)
    indices = np.empty(int(indptr[-1]), dtype=np.int32)
    for s in range(0, n, chunk_rows):  # pass 2: fill, with each row's columns sorted
        e = min(s + chunk_rows, n)
        lo, hi = x.indptr[s], x.indptr[e]
        new = lut[x.indices[lo:hi]]
        kept = (new >= 0) & (x.data[lo:hi] != 0)
        block = sparse.csr_matrix(
            (x.data[lo:hi][kept].astype(dtype), new[kept], indptr[s : e + 1] - indptr[s]),
            shape=(e - s, n_genes),
        )
        block.sort_indices()
        data[indptr[s] : indptr[e]] = block.data
        indices[indptr[s] : indptr[e]] = block.indices
    if indptr[-1] < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    return sparse.csr_matrix((data, indices, indptr), shape=(n, n_genes))


def align_genes(x: Any, var_names: Any, genes: Any, dtype: Any = np.float32) -> sparse.csr_matrix:
    """Return ``x`` (cells x ``var_names``) as CSR over ``genes``, absent genes zero-filled.

    Parameters
    ----------
    x
        Count matrix, sparse or dense.
    var_names
        Gene names of the columns of ``x``.
    genes
        Target genes, in the target order.
    dtype
        dtype of the result.
    """
    idx = pd.Index(var_names).get_indexer(list(genes))
    present = idx >= 0
    return _place_columns(x, idx[present], np.flatnonzero(present), len(idx), dtype)


def project(
    adata: AnnData,
    schema: FederationSchema,
    *,
    site: str,
    layer: str | None = None,
    batch_size: int = 128,
    min_gene_fraction: float = 0.5,
) -> SiteData:
    """Validate a site's data and project it onto the schema.

    Parameters
    ----------
    adata
        The site's data with raw counts.
    schema
        The federation schema.
    site
        Site name, used in every message.
    layer
        Layer holding raw counts; ``None`` uses ``schema.layer``.
    batch_size
        Minibatch size; the projected site needs at least this many cells.
    min_gene_fraction
        Smallest share of schema genes the site must have.

    Returns
    -------
    The site's :class:`SiteData`. Labels are read from ``obs[schema.label_key]`` when that
    column exists, else ``None`` (a site may embed without labels).

    Raises
    ------
    SiteDataError
        As :func:`~scfedvi.data.validate.validate_site`.
    SchemaMismatchError
        Batch or label values outside the schema, or too few schema genes.

    Warns
    -----
    SiteDataWarning
        Schema genes the site lacks (zero-filled), cells with no count over the schema genes
        (dropped).
    """
    p = site_prefix(site)
    layer = schema.layer if layer is None else layer
    x = get_counts(adata, layer, site=site)
    check_count_values(x, site=site, layer=layer)
    check_unique_genes(adata, site=site)
    check_obs_column(adata, schema.batch_key, site=site, role="batch_key")
    has_labels = schema.label_key is not None and schema.label_key in adata.obs.columns
    if has_labels:
        check_obs_column(adata, str(schema.label_key), site=site, role="label_key")

    idx = pd.Index(adata.var_names).get_indexer(list(schema.genes))
    present = idx >= 0
    n_present = int(present.sum())
    if n_present < min_gene_fraction * schema.n_genes:
        raise SchemaMismatchError(
            f"{p}var_names has only {n_present} of the {schema.n_genes} schema genes "
            f"(fewer than {min_gene_fraction:.0%}); check that gene identifiers match the "
            f"schema's (symbols vs Ensembl IDs, species, case), e.g. schema genes "
            f"{_examples(schema.genes)} vs site genes {_examples(adata.var_names)}"
        )

    batch_vals = adata.obs[schema.batch_key].astype(str).to_numpy()
    batch_index = pd.Index(schema.batches).get_indexer(batch_vals).astype(np.int64)
    if (batch_index < 0).any():
        unknown = sorted(set(batch_vals[batch_index < 0]))
        raise SchemaMismatchError(
            f"{p}obs[{schema.batch_key!r}] has values not in the schema's batches: "
            f"{_examples(unknown)} (schema batches: {_examples(schema.batches)}); rename them "
            "to schema batches or rebuild the schema including them"
        )
    labels = None
    if has_labels:
        labels = adata.obs[schema.label_key].astype(str).to_numpy().astype(object)
        if schema.labels is not None:
            unknown = sorted(set(labels) - set(schema.labels))
            if unknown:
                raise SchemaMismatchError(
                    f"{p}obs[{schema.label_key!r}] has labels not in the schema's labels: "
                    f"{_examples(unknown)} (schema labels: {_examples(schema.labels)}); "
                    "rename them to schema labels or rebuild the schema including them"
                )

    X = _place_columns(x, idx[present], np.flatnonzero(present), schema.n_genes, np.float32)
    missing = tuple(np.asarray(schema.genes, dtype=object)[~present].tolist())
    if missing:
        warnings.warn(
            f"{p}{len(missing)} of the {schema.n_genes} schema genes are absent from var_names "
            f"and zero-filled ({_examples(missing)}); add them if the site measured them",
            SiteDataWarning,
            stacklevel=2,
        )
    obs_names = np.asarray(adata.obs_names, dtype=object)
    keep = cell_totals(X) > 0
    if not keep.all():
        warnings.warn(
            f"{p}{int((~keep).sum())} of {len(keep)} cells have zero counts over the "
            f"{schema.n_genes} schema genes; they are dropped",
            SiteDataWarning,
            stacklevel=2,
        )
        X, batch_index, obs_names = X[keep], batch_index[keep], obs_names[keep]
        labels = None if labels is None else labels[keep]
    check_min_cells(X.shape[0], batch_size, site=site)
    return SiteData(site, X, batch_index, labels, obs_names, missing)
