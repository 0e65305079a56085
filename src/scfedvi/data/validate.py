"""Validation of a site's count matrix and metadata, before anything leaves or trains.

Errors are :class:`~scfedvi.data.errors.SiteDataError` and name the site, the field and
the fix; benign oddities (empty cells, genes never detected) are
:class:`~scfedvi.data.errors.SiteDataWarning`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
from scipy import sparse

from scfedvi.data.errors import SiteDataError, SiteDataWarning, site_prefix

if TYPE_CHECKING:
    from anndata import AnnData

#: A count matrix as the data layer handles it: CSR or dense, cells x genes.
Counts: TypeAlias = "sparse.csr_matrix | np.ndarray"

#: Number of stored values inspected at a time (bounds the temporary memory of the checks).
_CHUNK = 1 << 22


def field_name(layer: str | None) -> str:
    """Return how a count matrix is named in messages: ``X`` or ``layers['counts']``."""
    return "X" if layer is None else f"layers[{layer!r}]"


def get_counts(adata: AnnData, layer: str | None = None, *, site: str | None = None) -> Counts:
    """Return the count matrix of ``adata`` as CSR (any sparse input) or a dense array.

    Parameters
    ----------
    adata
        The site's data.
    layer
        Key of ``adata.layers`` holding raw counts; ``None`` uses ``adata.X``.
    site
        Site name, used in error messages.

    Returns
    -------
    A :class:`scipy.sparse.csr_matrix` (CSC, COO and sparse arrays are converted) or a
    :class:`numpy.ndarray`; no copy is made when ``X`` already is one of those.
    """
    p = site_prefix(site)
    if layer is None:
        x = adata.X
        if x is None:
            raise SiteDataError(f"{p}X is empty (None); put raw counts in X or pass layer=...")
    else:
        if layer not in adata.layers:
            avail = ", ".join(repr(k) for k in adata.layers) or "none"
            raise SiteDataError(
                f"{p}layers[{layer!r}] is missing (available layers: {avail}); "
                "pass layer=None to use X, or layer= one of the available layers"
            )
        x = adata.layers[layer]
    if sparse.issparse(x):
        return x if isinstance(x, sparse.csr_matrix) else sparse.csr_matrix(x)
    return np.asarray(x)


def _value_blocks(x: Counts) -> Iterator[np.ndarray]:
    """Yield the stored values of ``x`` in bounded blocks (``.data`` for sparse)."""
    if isinstance(x, sparse.csr_matrix):
        data = np.asarray(x.data)
        for start in range(0, data.size, _CHUNK):
            yield data[start : start + _CHUNK]
    else:
        rows = max(1, _CHUNK // max(1, x.shape[1]))
        for start in range(0, x.shape[0], rows):
            yield np.asarray(x[start : start + rows])


def check_count_values(x: Counts, *, site: str | None, layer: str | None = None) -> None:
    """Raise :class:`SiteDataError` unless ``x`` holds finite, non-negative integer counts.

    Parameters
    ----------
    x
        Count matrix (cells x genes), CSR or dense.
    site
        Site name for messages.
    layer
        Layer the matrix came from, for messages.
    """
    p, field = site_prefix(site), field_name(layer)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise SiteDataError(
            f"{p}{field} is empty ({x.shape[0]} cells x {x.shape[1]} genes); "
            "a site needs at least one cell and one gene: check the filtering that produced it"
        )
    kind = np.dtype(x.dtype).kind
    if kind not in "iuf":
        raise SiteDataError(
            f"{p}{field} has dtype {x.dtype}, not a count type; pass raw integer counts"
        )
    n_bad = n_neg = n_frac = 0
    vmin, example = 0.0, 0.0
    for block in _value_blocks(x):
        if kind == "f":
            finite = np.isfinite(block)
            n_bad += block.size - int(np.count_nonzero(finite))
            if n_bad:
                continue
            frac = block != np.round(block)
            k = int(np.count_nonzero(frac))
            if k and not n_frac:
                example = float(block[frac][0])
            n_frac += k
        if kind != "u" and block.size:
            k = int(np.count_nonzero(block < 0))
            if k:
                vmin = min(vmin, float(block.min()))
            n_neg += k
    if n_bad:
        raise SiteDataError(
            f"{p}{field} contains {n_bad} NaN or infinite values; "
            "remove or fix those entries and pass raw integer counts"
        )
    if n_neg:
        raise SiteDataError(
            f"{p}{field} contains {n_neg} negative values (min {vmin:g}); it looks like "
            "scaled or centred data: pass raw counts (e.g. layer='counts')"
        )
    if n_frac:
        raise SiteDataError(
            f"{p}{field} contains {n_frac} non-integer values (e.g. {example:g}); it looks like "
            "normalized or log-transformed data: pass raw integer counts, or layer= naming the "
            "layer that holds them (e.g. layer='counts')"
        )


def check_unique_genes(adata: AnnData, *, site: str | None) -> None:
    """Raise :class:`SiteDataError` if ``adata.var_names`` has duplicates."""
    dup = adata.var_names[adata.var_names.duplicated()]
    if len(dup):
        ex = ", ".join(repr(g) for g in list(dict.fromkeys(dup.tolist()))[:5])
        raise SiteDataError(
            f"{site_prefix(site)}var_names has {len(dup)} duplicated gene names (e.g. {ex}); "
            "call adata.var_names_make_unique() or aggregate the duplicated genes"
        )


def check_obs_column(adata: AnnData, key: str, *, site: str | None, role: str) -> None:
    """Raise :class:`SiteDataError` if ``adata.obs[key]`` is absent or has missing values.

    Parameters
    ----------
    adata
        The site's data.
    key
        Column of ``adata.obs``.
    site
        Site name for messages.
    role
        Name of the argument that chose the column (``"batch_key"``, ``"label_key"``).
    """
    p = site_prefix(site)
    if key not in adata.obs.columns:
        avail = ", ".join(repr(c) for c in adata.obs.columns) or "none"
        raise SiteDataError(
            f"{p}obs[{key!r}] is missing; pass {role}=... or add the column "
            f"(available columns: {avail})"
        )
    n_na = int(adata.obs[key].isna().sum())
    if n_na:
        raise SiteDataError(
            f"{p}obs[{key!r}] has {n_na} missing values (NaN) among {adata.n_obs} cells; "
            "fill them (e.g. with 'unknown') or drop those cells"
        )


def check_min_cells(n_cells: int, batch_size: int, *, site: str | None) -> None:
    """Raise :class:`SiteDataError` if a site has fewer cells than one minibatch."""
    if n_cells < batch_size:
        raise SiteDataError(
            f"{site_prefix(site)}the site has {n_cells} cells < batch_size={batch_size} "
            "(fewer than one minibatch); lower batch_size or merge this site with another"
        )


def cell_totals(x: Counts) -> np.ndarray:
    """Return the total counts of every cell (float64)."""
    return np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()


def n_detected_cells(x: Counts) -> np.ndarray:
    """Return, per gene, the number of cells with a non-zero count."""
    if isinstance(x, sparse.csr_matrix):
        return np.bincount(x.indices[x.data != 0], minlength=x.shape[1])
    return np.count_nonzero(x, axis=0)


def validate_site(
    adata: AnnData,
    *,
    site: str,
    batch_key: str,
    label_key: str | None = None,
    layer: str | None = None,
    batch_size: int = 128,
) -> None:
    """Check that a site's data can join the federation; raise or warn with the fix.

    Parameters
    ----------
    adata
        The site's cells x genes data with raw counts in ``X`` or ``layers[layer]``.
    site
        Site name, used in every message.
    batch_key
        Column of ``adata.obs`` with the batch of each cell.
    label_key
        Optional column of ``adata.obs`` with cell labels.
    layer
        Layer holding raw counts (``None``: ``X``).
    batch_size
        Minibatch size of training; a site needs at least this many cells.

    Raises
    ------
    SiteDataError
        Missing layer or column, non-count values, empty matrix, duplicated genes, missing
        values in the batch or label column, or fewer cells than one minibatch.

    Warns
    -----
    SiteDataWarning
        Cells with zero total counts (dropped by :func:`~scfedvi.data.schema.project`, or
        :func:`drop_empty_cells`), genes never detected.
    """
    x = get_counts(adata, layer, site=site)
    check_count_values(x, site=site, layer=layer)
    check_unique_genes(adata, site=site)
    check_obs_column(adata, batch_key, site=site, role="batch_key")
    if label_key is not None:
        check_obs_column(adata, label_key, site=site, role="label_key")
    check_min_cells(adata.n_obs, batch_size, site=site)
    p, field = site_prefix(site), field_name(layer)
    n_empty = int(np.count_nonzero(cell_totals(x) == 0))
    if n_empty:
        warnings.warn(
            f"{p}{n_empty} of {adata.n_obs} cells have zero total counts in {field}; they will "
            "be dropped (call drop_empty_cells(adata) to drop them yourself)",
            SiteDataWarning,
            stacklevel=2,
        )
    n_never = int(np.count_nonzero(n_detected_cells(x) == 0))
    if n_never:
        warnings.warn(
            f"{p}{n_never} of {adata.n_vars} genes are never detected in {field} (zero in every "
            "cell); they carry no information at this site: remove them if that is unexpected",
            SiteDataWarning,
            stacklevel=2,
        )


def drop_empty_cells(adata: AnnData, layer: str | None = None) -> AnnData:
    """Return ``adata`` without the cells whose total count is zero.

    Parameters
    ----------
    adata
        The site's data.
    layer
        Layer holding raw counts (``None``: ``X``).

    Returns
    -------
    ``adata`` itself when no cell is empty, else a copy without the empty cells.
    """
    keep = cell_totals(get_counts(adata, layer)) > 0
    return adata if keep.all() else adata[keep].copy()
