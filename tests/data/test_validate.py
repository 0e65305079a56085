"""Validation: each error names the site, the field and the fix; warnings count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import sparse

from scfedvi.data import SiteDataError, SiteDataWarning, drop_empty_cells, get_counts, validate_site

from .conftest import tiny

FORMATS = ["csr", "csc", "dense"]


def _validate(adata, **kw):
    kw.setdefault("batch_size", 8)
    validate_site(adata, site="lab-b", batch_key="batch", **kw)


def _set_value(adata, value):
    x = adata.X.toarray() if sparse.issparse(adata.X) else np.array(adata.X)
    x[3, 2] = value
    adata.X = type(adata.X)(x) if sparse.issparse(adata.X) else x


@pytest.mark.parametrize("fmt", FORMATS)
def test_valid_site_passes_silently(fmt):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _validate(tiny(fmt=fmt), label_key="cell_type")


@pytest.mark.parametrize("fmt", FORMATS)
def test_get_counts_returns_csr_or_dense(fmt):
    x = get_counts(tiny(fmt=fmt), None)
    assert isinstance(x, np.ndarray if fmt == "dense" else sparse.csr_matrix)


def test_missing_layer():
    with pytest.raises(
        SiteDataError, match=r"site 'lab-b': layers\['counts'\] is missing.*pass layer="
    ):
        _validate(tiny(), layer="counts")


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_is_used(fmt):
    a = tiny(fmt=fmt)
    a.layers["counts"] = a.X.copy()
    a.X = a.X * 0.5
    _validate(a, layer="counts")
    with pytest.raises(SiteDataError, match="non-integer"):
        _validate(a)


@pytest.mark.parametrize("fmt", FORMATS)
def test_normalized_data_is_refused(fmt):
    a = tiny(fmt=fmt)
    a.X = np.log1p(a.X) if fmt == "dense" else a.X.log1p()
    with pytest.raises(
        SiteDataError,
        match=r"site 'lab-b': X contains \d+ non-integer values.*normalized or log-transformed.*raw integer counts.*layer=",
    ):
        _validate(a)


@pytest.mark.parametrize("fmt", FORMATS)
def test_negative_values(fmt):
    a = tiny(fmt=fmt)
    _set_value(a, -2.0)
    with pytest.raises(
        SiteDataError, match=r"site 'lab-b': X contains 1 negative values \(min -2\).*raw counts"
    ):
        _validate(a)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf(fmt, value):
    a = tiny(fmt=fmt)
    _set_value(a, value)
    with pytest.raises(
        SiteDataError, match=r"site 'lab-b': X contains 1 NaN or infinite values; remove"
    ):
        _validate(a)


def test_integer_dtype_negative():
    a = tiny()
    a.X = a.X.astype(np.int32)
    _set_value(a, -1)
    with pytest.raises(SiteDataError, match="negative"):
        _validate(a)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_empty_matrix(shape):
    a = tiny()[: shape[0], : shape[1]].copy()
    with pytest.raises(
        SiteDataError,
        match=rf"site 'lab-b': X is empty \({shape[0]} cells x {shape[1]} genes\).*check the filtering",
    ):
        _validate(a)


def test_duplicate_genes():
    a = tiny()
    a.var_names = ["g0", "g1", "g0", *a.var_names[3:]]
    with pytest.raises(
        SiteDataError,
        match=r"site 'lab-b': var_names has 1 duplicated gene names \(e.g. 'g0'\); call adata.var_names_make_unique\(\)",
    ):
        _validate(a)


def test_missing_batch_column():
    with pytest.raises(
        SiteDataError,
        match=r"site 'lab-b': obs\['tech'\] is missing; pass batch_key=\.\.\. or add the column \(available columns: 'batch', 'cell_type'\)",
    ):
        validate_site(tiny(), site="lab-b", batch_key="tech", batch_size=8)


def test_missing_label_column():
    with pytest.raises(SiteDataError, match=r"obs\['celltype'\] is missing.*pass label_key="):
        _validate(tiny(), label_key="celltype")


@pytest.mark.parametrize("key", ["batch", "cell_type"])
def test_nan_in_columns(key):
    a = tiny()
    a.obs[key] = a.obs[key].astype(object)
    a.obs.iloc[[1, 4, 7], a.obs.columns.get_loc(key)] = np.nan
    with pytest.raises(
        SiteDataError,
        match=rf"site 'lab-b': obs\['{key}'\] has 3 missing values \(NaN\) among 40 cells; fill them",
    ):
        _validate(a, label_key="cell_type")


def test_fewer_cells_than_a_minibatch():
    with pytest.raises(
        SiteDataError,
        match=r"site 'lab-b': the site has 40 cells < batch_size=128.*lower batch_size or merge",
    ):
        validate_site(tiny(), site="lab-b", batch_key="batch")


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_cells_warn_and_drop(fmt):
    a = tiny(fmt=fmt)
    x = a.X.toarray() if sparse.issparse(a.X) else a.X
    x[[5, 9]] = 0
    a.X = type(a.X)(x) if sparse.issparse(a.X) else x
    with pytest.warns(
        SiteDataWarning,
        match=r"site 'lab-b': 2 of 40 cells have zero total counts in X; they will be dropped",
    ):
        _validate(a)
    b = drop_empty_cells(a)
    assert b.n_obs == 38 and "c5" not in b.obs_names
    assert drop_empty_cells(b) is b


@pytest.mark.parametrize("fmt", FORMATS)
def test_undetected_genes_warn(fmt):
    a = tiny(fmt=fmt)
    x = a.X.toarray() if sparse.issparse(a.X) else a.X
    x[:, [3, 4, 7]] = 0
    a.X = type(a.X)(x) if sparse.issparse(a.X) else x
    with pytest.warns(
        SiteDataWarning, match=r"site 'lab-b': 3 of 12 genes are never detected in X"
    ):
        _validate(a)


def test_large_sparse_check_is_chunked(monkeypatch):
    import scfedvi.data.validate as v

    monkeypatch.setattr(v, "_CHUNK", 7)
    a = tiny()
    _validate(a)
    _set_value(a, 0.5)
    with pytest.raises(SiteDataError, match="1 non-integer values"):
        _validate(a)
