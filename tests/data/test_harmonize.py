"""Federated harmonization reproduces scanpy's seurat_v3 gene selection from summaries only."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from scfedvi.config import SitePolicy
from scfedvi.data import (
    SchemaMismatchError,
    SiteDataError,
    SiteSummary,
    batch_clip_values,
    build_schema,
    gene_universe,
    harmonize,
    hvg_table,
    paper_partition,
    simulate,
    site_genes,
    site_summary,
    split_by_groups,
)
from scfedvi.data.harmonize import pooled_moments

sc = pytest.importorskip("scanpy")


def _scanpy(pooled, n_top, batch_key):
    return sc.pp.highly_variable_genes(
        pooled, flavor="seurat_v3", n_top_genes=n_top, batch_key=batch_key, inplace=False
    )


def _by_batch(adata, key):
    return split_by_groups(adata, key, {str(b): [str(b)] for b in adata.obs[key].cat.categories})


def _summaries(sites, key, **kw):
    universe = gene_universe([site_genes(a) for a in sites.values()], kw.pop("min_sites", None))
    return [site_summary(a, site=s, batch_key=key, genes=universe, **kw) for s, a in sites.items()]


def _assert_same_table(ours, ref):
    assert list(ours.index) == list(ref.index)
    np.testing.assert_array_equal(ours["highly_variable"], ref["highly_variable"])
    np.testing.assert_array_equal(ours["highly_variable_rank"], ref["highly_variable_rank"])
    np.testing.assert_array_equal(ours["highly_variable_nbatches"], ref["highly_variable_nbatches"])
    np.testing.assert_allclose(ours["variances_norm"], ref["variances_norm"], rtol=1e-12)
    np.testing.assert_allclose(ours["means"], ref["means"], rtol=1e-12)
    np.testing.assert_allclose(ours["variances"], ref["variances"], rtol=1e-12)


@pytest.fixture(scope="module")
def sim():
    return simulate(600, 300, n_batches=3, n_cell_types=4, library_sizes=(500, 3000, 20000), seed=3)


def test_gene_universe():
    lists = [("a", "b", "c", "d"), ("d", "c", "x", "a"), ("c", "a", "x", "y")]
    assert gene_universe(lists) == ("a", "c")
    assert gene_universe(lists, min_sites=2) == ("a", "c", "d", "x")
    assert gene_universe(lists, min_sites=1) == ("a", "b", "c", "d", "x", "y")
    with pytest.raises(ValueError, match="min_sites=4"):
        gene_universe(lists, min_sites=4)
    with pytest.raises(ValueError, match="no gene is measured"):
        gene_universe([("a",), ("b",)])


@pytest.mark.parametrize("n_top", [40, 120])
@pytest.mark.parametrize("dense", [False, True])
def test_synthetic_oracle_one_site_per_batch(sim, n_top, dense):
    sites = _by_batch(sim, "batch")
    if dense:
        for a in sites.values():
            a.X = a.X.toarray()
    summaries = _summaries(sites, "batch")
    _assert_same_table(hvg_table(summaries, n_top_genes=n_top), _scanpy(sim, n_top, "batch"))
    schema = build_schema(summaries, batch_key="batch", n_top_genes=n_top)
    ref = _scanpy(sim, n_top, "batch")
    assert schema.genes == tuple(ref.index[ref["highly_variable"]])  # universe order
    assert schema.batches == ("batch-0", "batch-1", "batch-2")


def test_batches_spanning_sites_need_pooled_clip_values(sim):
    sites = {"s0": sim[::2].copy(), "s1": sim[1::2].copy()}
    summaries = _summaries(sites, "batch")
    with pytest.raises(
        SchemaMismatchError,
        match=r"site 's0': batch 'batch-0' is held by sites \['s0', 's1'\].*batch_clip_values",
    ):
        hvg_table(summaries, n_top_genes=50)
    clips = batch_clip_values(summaries)
    assert sorted(clips) == ["batch-0", "batch-1", "batch-2"]
    pooled = pooled_moments(summaries)  # the sites fit their clip values on these themselves
    summaries = _summaries(sites, "batch", clip_values=clips, pooled=pooled)
    ours, ref = hvg_table(summaries, n_top_genes=50), _scanpy(sim, 50, "batch")
    _assert_same_table(ours, ref)
    schema = harmonize(sites, batch_key="batch", n_top_genes=50)
    assert schema.genes == tuple(ref.index[ref["highly_variable"]])
    # a site holding a sliver of a shared batch (too few cells for its own loess fit), under
    # a policy that summarises batches of 2 cells or more
    sliver = {"big": sim[3:].copy(), "tiny": sim[:3].copy()}
    two = SitePolicy(min_batch_cells=2)
    with pytest.raises(SiteDataError, match="loess fit failed"):
        site_summary(sliver["tiny"], site="tiny", batch_key="batch", policy=two)
    schema = harmonize(sliver, batch_key="batch", n_top_genes=50, policy=two)
    assert schema.genes == tuple(ref.index[ref["highly_variable"]])
    # the default policy never summarises the sliver: it is counted (in the schema's batches),
    # and the genes are selected from the big site's summaries alone
    tiny = site_summary(sliver["tiny"], site="tiny", batch_key="batch")
    assert sum(tiny.batch_counts.values()) == 3 and tiny.stats == {}
    schema = harmonize(sliver, batch_key="batch", n_top_genes=50)
    big = _scanpy(sliver["big"], 50, "batch")
    assert schema.genes == tuple(big.index[big["highly_variable"]])
    assert set(tiny.batch_counts) <= set(schema.batches)


def test_min_sites_zero_fills_like_a_pooled_matrix(sim):
    a, b, c = (sim[sim.obs["batch"] == f"batch-{i}"].copy() for i in range(3))
    b, c = b[:, 20:].copy(), c[:, list(range(10)) + list(range(30, 300))].copy()
    sites = {"a": a, "b": b, "c": c}
    universe = gene_universe([site_genes(x) for x in sites.values()], min_sites=2)
    assert universe == tuple(sim.var_names[list(range(10)) + list(range(20, 300))])
    pooled = ad.concat(sites, join="outer", fill_value=0)[:, list(universe)].copy()
    pooled.X = sparse.csr_matrix(pooled.X)
    schema = harmonize(sites, batch_key="batch", n_top_genes=60, min_sites=2)
    ref = _scanpy(pooled, 60, "batch")
    assert schema.genes == tuple(ref.index[ref["highly_variable"]])


def test_build_schema_options(sim):
    sites = _by_batch(sim, "batch")
    summaries = _summaries(sites, "batch", label_key="cell_type")
    all_genes = build_schema(summaries, batch_key="batch", n_top_genes=None)
    assert all_genes.genes == tuple(sim.var_names) and all_genes.labels is None
    assert build_schema(summaries, batch_key="batch", n_top_genes=10_000).genes == all_genes.genes
    s = build_schema(
        summaries, batch_key="batch", n_top_genes=30, label_key="cell_type", layer="counts"
    )
    assert s.labels == ("type-0", "type-1", "type-2", "type-3") and s.layer == "counts"
    s = build_schema(summaries, batch_key="batch", label_key="cell_type", labels=["type-3", "x"])
    assert s.labels == ("type-3", "x")
    other = site_summary(sites["batch-0"][:, :-1].copy(), site="odd", batch_key="batch")
    with pytest.raises(
        SchemaMismatchError, match=r"site 'odd': summary genes differ.*genes=gene_universe"
    ):
        build_schema([*summaries, other], batch_key="batch")


def test_summary_has_no_cell_level_values(sim):
    site = sim[sim.obs["batch"].isin(["batch-0", "batch-1"])].copy()
    n_cells = site.n_obs
    assert n_cells != site.n_vars
    summary = site_summary(site, site="lab-a", batch_key="batch", label_key="cell_type")
    d = summary.to_dict()
    text = json.dumps(d, allow_nan=False)  # strict JSON

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, list):
            yield x
            for v in x:
                yield from walk(v)
        else:
            assert isinstance(x, str | int | float) or x is None

    lengths = {len(v) for v in walk(d)}
    assert n_cells not in lengths and lengths <= {site.n_vars, 4}
    assert not any(name in text for name in site.obs_names[:50])
    back = SiteSummary.from_dict(json.loads(text))
    assert back.batch_counts == {"batch-0": 200, "batch-1": 200}
    for b in back.stats:
        for k, v in back.stats[b].items():
            np.testing.assert_array_equal(v, summary.stats[b][k])


def test_small_batches_are_counted_not_summarised(sim):
    site = sim[:5].copy()
    site.obs["batch"] = pd.Categorical(["x", "x", "x", "x", "y"])
    s = site_summary(site, site="lab-a", batch_key="batch")  # default: >= 10 cells
    assert s.batch_counts == {"x": 4, "y": 1} and s.stats == {}
    with pytest.raises(SchemaMismatchError, match="no site summarised any batch"):
        build_schema([s], batch_key="batch", n_top_genes=2)
    assert build_schema([s], batch_key="batch", n_top_genes=None).batches == ("x", "y")
    site.obs["batch"] = "x"
    with pytest.raises(
        SiteDataError,
        match=r"site 'lab-a': obs\['batch'\] value 'x': the seurat_v3 loess fit failed",
    ):
        site_summary(
            site[:3].copy(), site="lab-a", batch_key="batch", policy=SitePolicy(min_batch_cells=2)
        )


@pytest.mark.parametrize("n_top", [500, 1000])
def test_real_pancreas_oracle(pancreas, n_top):
    sites = _by_batch(pancreas, "donor")
    schema = harmonize(sites, batch_key="donor", n_top_genes=n_top)
    ref = _scanpy(pancreas, n_top, "donor")
    assert schema.genes == tuple(ref.index[ref["highly_variable"]])
    _assert_same_table(hvg_table(_summaries(sites, "donor"), n_top_genes=n_top), ref)


@pytest.mark.parametrize("n_top", [500, 1000])
def test_real_cortex_oracle(cortex, n_top):
    sites = _by_batch(cortex, "batch")
    schema = harmonize(sites, batch_key="batch", n_top_genes=n_top)
    ref = _scanpy(cortex, n_top, "batch")
    assert schema.genes == tuple(ref.index[ref["highly_variable"]])
    _assert_same_table(hvg_table(_summaries(sites, "batch"), n_top_genes=n_top), ref)


@pytest.mark.parametrize(
    ("name", "key", "n_sites"), [("pancreas", "batch", 5), ("cortex", "batch", 3)]
)
def test_real_oracle_batches_spanning_sites(request, name, key, n_sites):
    adata = request.getfixturevalue(name)
    sites = paper_partition(name, adata, n_sites)
    pooled = ad.concat(list(sites.values()))
    schema = harmonize(sites, batch_key=key, n_top_genes=500)
    ref = _scanpy(pooled, 500, key)
    assert set(schema.genes) == set(ref.index[ref["highly_variable"]])
