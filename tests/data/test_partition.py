"""Partitions into simulated sites: deterministic, disjoint, as documented."""

from __future__ import annotations

import numpy as np
import pytest

from scfedvi.data import (
    auto_groups,
    dirichlet_split,
    paper_partition,
    random_split,
    simulate,
    sites_per_group,
    split_by_groups,
    split_within_group,
)

from .conftest import tiny


@pytest.fixture(scope="module")
def sim():
    return simulate(400, 30, n_batches=4, n_cell_types=5, library_sizes=(200,), seed=1)


def _disjoint_cover(adata, sites, complete=True):
    names = np.concatenate([np.asarray(a.obs_names) for a in sites.values()])
    assert len(names) == len(set(names))
    if complete:
        assert set(names) == set(adata.obs_names)
    for a in sites.values():  # original cell order kept
        pos = adata.obs_names.get_indexer(a.obs_names)
        assert (np.diff(pos) > 0).all()


def test_split_by_groups(sim):
    sites = split_by_groups(sim, "batch", {"x": ["batch-2", "batch-0"], "y": ["batch-1"]})
    assert list(sites) == ["x", "y"]
    assert set(sites["x"].obs["batch"]) == {"batch-0", "batch-2"} and sites["y"].n_obs == 100
    _disjoint_cover(sim, sites, complete=False)
    sites["x"].X[0, 0] = 999  # copies, not views
    assert sim.X[0, 0] != 999
    with pytest.raises(ValueError, match="'batch-1' is given to sites 'x' and 'y'"):
        split_by_groups(sim, "batch", {"x": ["batch-1"], "y": ["batch-1"]})
    with pytest.raises(ValueError, match="site 'x': obs\\['batch'\\] has no value 'nope'"):
        split_by_groups(sim, "batch", {"x": ["nope"]})
    with pytest.raises(ValueError, match="obs\\['tech'\\] is missing"):
        split_by_groups(sim, "tech", {"x": ["a"]})


def test_auto_groups_balanced_and_deterministic():
    a = tiny(100, 4, batches=("a", "b", "c", "d", "e", "a", "a", "b"))
    # cells: a 37, b 25, c 13, d 13 (tie, 'c' first), e 12
    # greedy: a->0 (37), b->1 (25), c->2 (13), d->2 (26), e->1 (37)
    assert auto_groups(a, "batch", 3) == {
        "site-0": ["a"],
        "site-1": ["b", "e"],
        "site-2": ["c", "d"],
    }
    # a->0 (37), b->1 (25), c->1 (38), d->0 (50), e->1 (50)
    assert auto_groups(a, "batch", 2) == {"site-0": ["a", "d"], "site-1": ["b", "c", "e"]}
    with pytest.raises(ValueError, match="n_sites=6 but obs\\['batch'\\] has 5 values"):
        auto_groups(a, "batch", 6)


def test_random_split(sim):
    sites = random_split(sim, 3, seed=4)
    assert list(sites) == ["site-0", "site-1", "site-2"]
    assert sorted(a.n_obs for a in sites.values()) == [133, 133, 134]
    _disjoint_cover(sim, sites)
    again = random_split(sim, 3, seed=4)
    assert all((again[k].obs_names == sites[k].obs_names).all() for k in sites)
    assert not (random_split(sim, 3, seed=5)["site-0"].obs_names == sites["site-0"].obs_names).all()


def test_dirichlet_split_is_non_iid(sim):
    sites = dirichlet_split(sim, 4, label_key="cell_type", alpha=0.1, seed=0, min_cells=5)
    _disjoint_cover(sim, sites)
    mix = np.array(
        [
            a.obs["cell_type"].value_counts().reindex(sim.obs["cell_type"].cat.categories).fillna(0)
            for a in sites.values()
        ]
    )
    share = mix / mix.sum(axis=1, keepdims=True)
    assert share.max(axis=1).mean() > 0.5  # each site dominated by few types
    even = dirichlet_split(sim, 4, label_key="cell_type", alpha=1000.0, seed=0)
    even_mix = np.array(
        [a.obs["cell_type"].value_counts(normalize=True).sort_index() for a in even.values()]
    )
    assert np.abs(even_mix - even_mix.mean(axis=0)).max() < 0.1
    again = dirichlet_split(sim, 4, label_key="cell_type", alpha=0.1, seed=0, min_cells=5)
    assert all((again[k].obs_names == sites[k].obs_names).all() for k in sites)
    with pytest.raises(ValueError, match="raise alpha"):
        dirichlet_split(sim, 4, label_key="cell_type", alpha=0.01, min_cells=150, max_tries=3)


def test_sites_per_group_and_split_within_group(sim):
    assert sites_per_group({"a": 761, "b": 290}, 3) == {"a": 2, "b": 1}
    assert sites_per_group({"a": 761, "b": 290}, 5) == {"a": 3, "b": 2}
    assert sites_per_group({"a": 10, "b": 10}, 3) == {"a": 2, "b": 1}
    with pytest.raises(ValueError, match="n_sites=1 < 2 groups"):
        sites_per_group({"a": 1, "b": 1}, 1)
    sites = split_within_group(
        sim, "batch", {"batch-1": 2, "batch-3": 1}, seed=0, names={"batch-1": "one"}
    )
    assert list(sites) == ["one-0", "one-1", "batch-3"]
    assert [a.n_obs for a in sites.values()] == [50, 50, 100]
    assert all(a.obs["batch"].nunique() == 1 for a in sites.values())
    _disjoint_cover(sim, sites, complete=False)


PANCREAS = {
    2: {"baron": 2812, "segerstolpe": 702},
    3: {"baron-human2": 1582, "baron-human4": 1230, "segerstolpe": 702},
    5: {
        "baron-human2": 1582,
        "baron-human4": 1230,
        "segerstolpe-HP1504101T2D": 234,
        "segerstolpe-HP1504901": 192,
        "segerstolpe-HP1526901T2D": 276,
    },
}
CORTEX = {
    2: {"tasic2016": 761, "zeisel2015": 290},
    3: {"tasic2016-0": 381, "tasic2016-1": 380, "zeisel2015": 290},
    5: {
        "tasic2016-0": 254,
        "tasic2016-1": 254,
        "tasic2016-2": 253,
        "zeisel2015-0": 145,
        "zeisel2015-1": 145,
    },
}


@pytest.mark.parametrize("n_sites", [2, 3, 5])
def test_paper_partition_pancreas(pancreas, n_sites):
    sites = paper_partition("pancreas", pancreas, n_sites)
    assert {k: a.n_obs for k, a in sites.items()} == PANCREAS[n_sites]
    assert list(sites) == list(PANCREAS[n_sites])
    _disjoint_cover(pancreas, sites)
    assert all(a.obs["study"].nunique() == 1 for a in sites.values())


@pytest.mark.parametrize("n_sites", [2, 3, 5])
def test_paper_partition_cortex(cortex, n_sites):
    sites = paper_partition("cortex", cortex, n_sites, seed=0)
    assert {k: a.n_obs for k, a in sites.items()} == CORTEX[n_sites]
    assert list(sites) == list(CORTEX[n_sites])
    _disjoint_cover(cortex, sites)
    assert all(a.obs["batch"].nunique() == 1 for a in sites.values())
    again = paper_partition("cortex", cortex, n_sites, seed=0)
    assert all((again[k].obs_names == sites[k].obs_names).all() for k in sites)


def test_paper_partition_errors(pancreas):
    with pytest.raises(ValueError, match="n_sites must be 2, 3 or 5"):
        paper_partition("pancreas", pancreas, 4)
    with pytest.raises(ValueError, match="unknown name 'lung'"):
        paper_partition("lung", pancreas, 2)
