"""The federation schema (hash, JSON) and the projection of a site onto it."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
from scipy import sparse

from scfedvi.data import (
    FederationSchema,
    SchemaMismatchError,
    SiteData,
    SiteDataError,
    SiteDataWarning,
    project,
)

from .conftest import tiny


def _schema(**kw):
    d = dict(genes=("g3", "g1", "g0", "g7"), batches=("b0", "b1"), batch_key="batch")
    d.update(kw)
    return FederationSchema(**d)


def test_schema_properties_and_json_roundtrip(tmp_path):
    s = _schema(labels=("t0", "t1", "t2"), label_key="cell_type", layer="counts")
    assert (s.n_genes, s.n_batches, s.n_labels) == (4, 2, 3)
    assert FederationSchema.from_json(s.to_json()) == s
    s.save(tmp_path / "schema.json")
    back = FederationSchema.load(tmp_path / "schema.json")
    assert back == s and back.hash == s.hash
    assert s.hash == hashlib.sha256(s.to_json().encode()).hexdigest()
    assert s.short_hash == s.hash[:16] and len(s.short_hash) == 16
    assert json.loads(s.to_json())["genes"] == ["g3", "g1", "g0", "g7"]


def test_hash_depends_on_content_and_order():
    s = _schema()
    assert _schema().hash == s.hash
    assert _schema(genes=("g1", "g3", "g0", "g7")).hash != s.hash
    assert _schema(batches=("b1", "b0")).hash != s.hash
    assert _schema(layer="counts").hash != s.hash
    assert isinstance(_schema(genes=["g3", "g1"]).genes, tuple)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"genes": ()}, "genes is empty"),
        ({"batches": ()}, "batches is empty"),
        ({"genes": ("a", "b", "a")}, "genes has duplicates"),
        ({"batches": ("x", "x")}, "batches has duplicates"),
        ({"labels": ("t0",)}, "labels given without label_key"),
        ({"batch_key": ""}, "batch_key is empty"),
    ],
)
def test_schema_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _schema(**kw)


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_project_reorders_genes(fmt):
    a = tiny(fmt=fmt)
    s = _schema()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = project(a, s, site="lab-a", batch_size=8)
    assert isinstance(sd, SiteData) and isinstance(sd.X, sparse.csr_matrix)
    assert sd.X.dtype == np.float32 and sd.X.shape == (40, 4) and sd.n_cells == 40
    dense = a.X.toarray() if sparse.issparse(a.X) else a.X
    np.testing.assert_array_equal(sd.X.toarray(), dense[:, [3, 1, 0, 7]])
    np.testing.assert_array_equal(sd.batch_index, [i % 2 for i in range(40)])
    assert sd.batch_index.dtype == np.int64
    assert sd.labels is None and sd.missing_genes == ()
    np.testing.assert_array_equal(sd.obs_names, a.obs_names)


def test_project_zero_fills_missing_genes():
    a = tiny()
    s = _schema(genes=("g3", "zz1", "g0", "zz2"))
    with pytest.warns(
        SiteDataWarning,
        match=r"site 'lab-a': 2 of the 4 schema genes are absent from var_names and zero-filled \('zz1', 'zz2'\)",
    ):
        sd = project(a, s, site="lab-a", batch_size=8)
    assert sd.missing_genes == ("zz1", "zz2")
    assert sd.X[:, [1, 3]].nnz == 0
    np.testing.assert_array_equal(sd.X[:, [0, 2]].toarray(), a.X[:, [3, 0]].toarray())


def test_project_too_few_genes():
    s = _schema(genes=("g3", "x1", "x2", "x3"))
    with pytest.raises(
        SchemaMismatchError,
        match=r"site 'lab-a': var_names has only 1 of the 4 schema genes.*gene identifiers",
    ):
        project(tiny(), s, site="lab-a", batch_size=8)


def test_project_unknown_batch():
    a = tiny(batches=("b0", "b1", "b9"))
    with pytest.raises(
        SchemaMismatchError,
        match=r"site 'lab-a': obs\['batch'\] has values not in the schema's batches: 'b9'.*rebuild the schema",
    ):
        project(a, _schema(), site="lab-a", batch_size=8)


def test_project_labels():
    a = tiny()
    s = _schema(labels=("t0", "t1", "t2"), label_key="cell_type")
    sd = project(a, s, site="lab-a", batch_size=8)
    assert sd.labels is not None and sd.labels.dtype == object
    assert list(sd.labels[:4]) == ["t0", "t1", "t2", "t0"]
    with pytest.raises(
        SchemaMismatchError, match=r"obs\['cell_type'\] has labels not in the schema's labels: 't2'"
    ):
        project(a, _schema(labels=("t0", "t1"), label_key="cell_type"), site="lab-a", batch_size=8)
    del a.obs["cell_type"]  # a site without labels can still embed
    assert project(a, s, site="lab-a", batch_size=8).labels is None


def test_project_drops_cells_empty_over_schema_genes():
    a = tiny(fmt="dense")
    a.X[[2, 5], :] = 0
    a.X[6, :] = 0
    a.X[6, 11] = 4  # counts only outside the schema genes
    a.obs["cell_type"] = a.obs["cell_type"].astype(str)
    s = _schema(labels=("t0", "t1", "t2"), label_key="cell_type")
    with pytest.warns(
        SiteDataWarning,
        match=r"site 'lab-a': 3 of 40 cells have zero counts over the 4 schema genes; they are dropped",
    ):
        sd = project(a, s, site="lab-a", batch_size=8)
    assert sd.n_cells == 37 and "c6" not in set(sd.obs_names)
    assert len(sd.batch_index) == len(sd.labels) == 37
    with (
        pytest.warns(SiteDataWarning),
        pytest.raises(SiteDataError, match="the site has 37 cells < batch_size=38"),
    ):
        project(a, s, site="lab-a", batch_size=38)


def test_project_uses_schema_layer_and_checks_values():
    a = tiny()
    a.layers["counts"] = a.X.copy()
    a.X = a.X.log1p()
    sd = project(a, _schema(layer="counts"), site="lab-a", batch_size=8)
    np.testing.assert_array_equal(sd.X.toarray(), a.layers["counts"][:, [3, 1, 0, 7]].toarray())
    with pytest.raises(SiteDataError, match="non-integer"):
        project(a, _schema(), site="lab-a", batch_size=8)
    with pytest.raises(SiteDataError, match=r"layers\['raw'\] is missing"):
        project(a, _schema(), site="lab-a", layer="raw", batch_size=8)


def test_sitedata_checks_lengths():
    with pytest.raises(ValueError, match="batch_index has 2 rows"):
        SiteData("s", sparse.csr_matrix((3, 2), dtype=np.float32), np.zeros(2), None, np.arange(3))


def test_project_keeps_a_float32_csr_in_schema_order_without_copying():
    """A site already in the schema's form (float32 CSR, schema genes in order, sorted, no
    stored zeros) is projected onto the same buffers; anything else is copied, to the same
    result (the copy path is the reference)."""
    import anndata as ad

    rng = np.random.default_rng(0)
    dense = rng.poisson(0.7, (40, 4)).astype(np.float32)
    dense[:, 0] += 1.0  # no cell empty over the schema genes
    genes = ["g3", "g1", "g0", "g7"]
    obs = {"batch": ["b0", "b1"] * 20}
    x = sparse.csr_matrix(dense)
    a = ad.AnnData(X=x, obs=obs)
    a.var_names = genes
    sd = project(a, _schema(), site="s", batch_size=8)
    assert np.shares_memory(sd.X.data, x.data) and np.shares_memory(sd.X.indices, x.indices)
    np.testing.assert_array_equal(sd.X.toarray(), dense)
    # each departure from the schema's form takes the copying path, with the same values
    stored_zero = x.copy()
    stored_zero.data[0] = 0.0
    unsorted = x.copy()  # the first row's columns reversed
    r0, r1 = unsorted.indptr[0], unsorted.indptr[1]
    unsorted.indices[r0:r1] = unsorted.indices[r0:r1][::-1].copy()
    unsorted.data[r0:r1] = unsorted.data[r0:r1][::-1].copy()
    unsorted.has_sorted_indices = False
    for other in (x.astype(np.int32), x.astype(np.float64), stored_zero, unsorted):
        b = ad.AnnData(X=other, obs=obs)
        b.var_names = genes
        sd2 = project(b, _schema(), site="s", batch_size=8)
        assert not np.shares_memory(sd2.X.data, other.data)
        np.testing.assert_array_equal(sd2.X.toarray(), other.toarray().astype(np.float32))
        assert sd2.X.has_sorted_indices and np.all(sd2.X.data)
