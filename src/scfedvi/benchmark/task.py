"""The benchmark's data: which cells, which sites, which genes, and their fingerprints.

A :class:`DatasetSpec` names the data (``pancreas``, ``cortex``, ``simulated`` or an ``.h5ad``
path) and its keys; :func:`load_data` reads it (checking the keys, subsampling in quick mode);
:func:`make_partition` gives each site its cells; :class:`Task` is what a method receives: the
evaluation cells in one fixed order (every site's cells, in the data's own order), the sites,
the genes every method uses, and the seed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData

#: obs column of the evaluation AnnData naming each cell's site.
SITE_KEY = "_site"
#: Cells of the ``--quick`` subsample of a real or user data set.
QUICK_CELLS = 300
#: The simulated data set: (cells, genes) in full and quick mode (keyed by ``quick``).
SIMULATED_SIZE = {False: (3000, 1000), True: (400, 200)}
SIMULATED_BATCHES = 6


@dataclass(frozen=True)
class DatasetSpec:
    """What data a benchmark runs on.

    Parameters
    ----------
    name
        ``"pancreas"``, ``"cortex"``, ``"simulated"``, or the stem of ``path``.
    path
        An ``.h5ad`` file of raw counts (``None`` for the named data sets).
    batch_key, label_key
        ``obs`` columns of the batch and the cell type.
    n_cells
        Random subsample of this many cells (seed 0); ``None``: every cell.
    layer
        The layer of ``path`` that holds the raw counts; ``None``: ``X``.
    """

    name: str
    path: str | None
    batch_key: str
    label_key: str
    n_cells: int | None = None
    layer: str | None = None


def resolve_dataset(
    dataset: str,
    *,
    batch_key: str | None = None,
    label_key: str | None = None,
    quick: bool = False,
    n_cells: int | None = None,
    layer: str | None = None,
) -> DatasetSpec:
    """Turn a data set name or ``.h5ad`` path and optional keys into a :class:`DatasetSpec`."""
    from scfedvi.data.loaders import DATASETS

    sub = n_cells if n_cells is not None else (QUICK_CELLS if quick else None)
    if layer is not None and (dataset in DATASETS or dataset == "simulated"):
        raise ValueError(
            f"dataset {dataset!r}: --layer applies to your own .h5ad; the named data sets "
            "hold their counts in X: leave --layer out"
        )
    if dataset in DATASETS:
        info = DATASETS[dataset]
        return DatasetSpec(
            dataset, None, batch_key or info.batch_key, label_key or info.label_key, sub
        )
    if dataset == "simulated":
        n_sim = SIMULATED_SIZE[quick][0]
        return DatasetSpec("simulated", None, batch_key or "batch", label_key or "cell_type", n_sim)
    path = Path(dataset)
    if path.suffix != ".h5ad":
        raise ValueError(
            f"dataset {dataset!r}: not a known name ({', '.join([*DATASETS, 'simulated'])}) nor "
            "an .h5ad path; pass one of those names or a file ending in .h5ad"
        )
    if not path.exists():
        raise FileNotFoundError(f"dataset {dataset!r}: the file does not exist; check the path")
    if batch_key is None or label_key is None:
        raise ValueError(
            f"dataset {path.name!r}: pass --batch-key and --label-key (obs columns of the batch "
            "and of the cell type) for your own .h5ad"
        )
    return DatasetSpec(path.stem, str(path.resolve()), batch_key, label_key, sub, layer)


@lru_cache(maxsize=4)
def load_data(spec: DatasetSpec) -> AnnData:
    """Read the data of ``spec``: counts (``X`` or ``spec.layer``) and keys checked, unique cell
    names, cells without counts dropped.

    The result is cached per process; treat it as read-only.
    """
    import anndata as ad

    from scfedvi.data.errors import SiteDataError
    from scfedvi.data.loaders import DATASETS, load_dataset
    from scfedvi.data.validate import check_count_values

    if spec.name == "simulated" and spec.path is None:
        from scfedvi.data.simulate import simulate

        n = spec.n_cells or SIMULATED_SIZE[False][0]
        g = SIMULATED_SIZE[n <= SIMULATED_SIZE[True][0]][1]
        adata = simulate(n_cells=n, n_genes=g, n_batches=SIMULATED_BATCHES, n_cell_types=5, seed=0)
    elif spec.path is None and spec.name in DATASETS:
        adata = load_dataset(spec.name)
    else:
        adata = ad.read_h5ad(spec.path)
    where = f"dataset {spec.name!r}"
    if spec.layer is not None:
        if spec.layer not in adata.layers:
            names = ", ".join(repr(k) for k in adata.layers) or "none"
            raise ValueError(
                f"{where}: layers[{spec.layer!r}] (--layer) is missing; available layers: "
                f"{names}; pass --layer NAME, or leave it out to read X"
            )
        adata = ad.AnnData(adata.layers[spec.layer], obs=adata.obs, var=adata.var)
    try:
        check_count_values(adata.X, site=None, layer=spec.layer)
    except SiteDataError as err:  # the message names the API's layer=; add the option
        raise ValueError(f"{where}: {err}; on the command line: --layer NAME") from None
    for key, option in ((spec.batch_key, "--batch-key"), (spec.label_key, "--label-key")):
        if key not in adata.obs.columns:
            cols = ", ".join(repr(c) for c in adata.obs.columns)
            raise ValueError(
                f"{where}: obs[{key!r}] ({option}) is missing; available columns: {cols}; "
                f"pass {option} COLUMN"
            )
        if adata.obs[key].isna().any():
            raise ValueError(
                f"{where}: obs[{key!r}] ({option}) has {int(adata.obs[key].isna().sum())} missing "
                "values; label those cells or drop them"
            )
    adata = adata.copy()
    adata.obs_names_make_unique()
    totals = np.asarray(adata.X.sum(axis=1)).reshape(-1)
    adata = adata[totals > 0].copy()
    if spec.n_cells is not None and spec.name != "simulated" and adata.n_obs > spec.n_cells:
        keep = np.sort(np.random.default_rng(0).choice(adata.n_obs, spec.n_cells, replace=False))
        adata = adata[keep].copy()
    return adata


def fingerprint(adata: AnnData, keys: Sequence[str]) -> str:
    """sha256 of the counts, cell and gene names, and the ``obs`` columns ``keys``."""
    from scipy import sparse

    h = hashlib.sha256()
    X = adata.X
    if sparse.issparse(X):
        X = sparse.csr_matrix(X)
        for part in (X.data, X.indices, X.indptr):
            h.update(np.ascontiguousarray(part).tobytes())
    else:
        h.update(np.ascontiguousarray(np.asarray(X)).tobytes())
    for names in (adata.obs_names, adata.var_names, *(adata.obs[k].astype(str) for k in keys)):
        h.update("\x1f".join(map(str, names)).encode())
    return h.hexdigest()


def read_partition_file(path: str | Path) -> dict[int, dict[str, list[str]]]:
    """Read ``{site: [batch values]}`` (one partition) or ``{"n": {site: [...]}, ...}``."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--partition {path}: cannot read it as JSON ({err})") from err
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"--partition {path}: expected a JSON object {{site: [batch values]}}")
    if all(isinstance(v, list) for v in raw.values()):
        raw = {str(len(raw)): raw}
    out: dict[int, dict[str, list[str]]] = {}
    for n, groups in raw.items():
        if not str(n).isdigit() or not isinstance(groups, dict):
            raise ValueError(
                f"--partition {path}: key {n!r} must be a number of sites mapping to "
                "{site: [batch values]}"
            )
        out[int(n)] = {str(s): [str(v) for v in vals] for s, vals in groups.items()}
        if len(out[int(n)]) != int(n):
            raise ValueError(f"--partition {path}: entry {n!r} has {len(groups)} sites, not {n}")
    return out


def make_partition(
    spec: DatasetSpec,
    adata: AnnData,
    n_sites: int,
    *,
    mode: str = "paper",
    groups: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[str]]:
    """Each site's cell names: the paper's partition, balanced whole batches, or ``groups``.

    Parameters
    ----------
    mode
        ``"paper"`` (pancreas and cortex; other data fall back to ``"auto"``), ``"auto"``
        (:func:`~scfedvi.data.auto_groups`) or ``"groups"`` (batch values per site).
    """
    from scfedvi.data.partition import auto_groups, paper_partition, split_by_groups

    key = spec.batch_key
    n_batches = adata.obs[key].nunique()
    if mode == "groups":
        if groups is None:
            raise ValueError("make_partition: mode='groups' needs groups={site: [batch values]}")
        sites = split_by_groups(adata, key, groups)
    elif mode == "paper" and spec.name in ("pancreas", "cortex") and spec.path is None:
        if spec.name == "pancreas" and n_sites not in (2, 3, 5):
            raise ValueError(
                f"--clients {n_sites}: the paper's pancreas partitions have 2, 3 or 5 sites; "
                "choose those or pass --partition auto"
            )
        sites = paper_partition(spec.name, adata, n_sites, seed=0)
    else:
        if n_sites > n_batches:
            raise ValueError(
                f"--clients {n_sites}: obs[{key!r}] has only {n_batches} batches, and each site "
                f"holds whole batches; choose at most {n_batches} sites, another --batch-key, or "
                "--partition FILE.json"
            )
        sites = split_by_groups(adata, key, auto_groups(adata, key, n_sites))
    for name, site in sites.items():
        if site.n_obs < 2:
            raise ValueError(f"site {name!r}: {site.n_obs} cells; give it more batches or cells")
    return {name: list(site.obs_names) for name, site in sites.items()}


@dataclass
class Task:
    """What a method gets: the cells to embed, the sites, the genes and the seed.

    Attributes
    ----------
    adata
        The evaluation cells (every site's, in the data's order), all genes; ``obs[SITE_KEY]``
        names each cell's site.
    sites
        Site names in partition order.
    genes
        The genes every method uses (scFedVI's schema genes).
    """

    adata: AnnData
    sites: list[str]
    batch_key: str
    label_key: str
    genes: list[str]
    seed: int
    quick: bool
    n_top_genes: int | None

    def site_adata(self, name: str, genes: bool = False) -> AnnData:
        """One site's cells (a copy), all genes or only :attr:`genes`."""
        a = self.adata[(self.adata.obs[SITE_KEY] == name).to_numpy()]
        return (a[:, self.genes] if genes else a).copy()

    def site_dict(self) -> dict[str, AnnData]:
        """``{site: AnnData}`` with every gene (scFedVI selects genes itself)."""
        return {s: self.site_adata(s) for s in self.sites}

    def pooled(self) -> AnnData:
        """Every evaluation cell, restricted to :attr:`genes`."""
        return self.adata[:, self.genes].copy()


def eval_adata(adata: AnnData, partition: Mapping[str, Sequence[str]]) -> AnnData:
    """The cells of every site in the data's own order, with ``obs[SITE_KEY]``."""
    site_of = pd.Series({c: s for s, cells in partition.items() for c in cells}, dtype=object)
    mask = adata.obs_names.isin(site_of.index)
    out = adata[mask].copy()
    out.obs[SITE_KEY] = pd.Categorical(
        site_of.loc[out.obs_names].to_numpy(), categories=list(partition)
    )
    return out


def select_genes(adata: AnnData, batch_key: str, n_top_genes: int | None) -> list[str]:
    """The genes of the federation schema, computed on the pooled cells (identical result)."""
    from scfedvi.data.harmonize import harmonize

    if n_top_genes is not None and n_top_genes >= adata.n_vars:
        n_top_genes = None
    schema = harmonize({"pooled": adata}, batch_key=batch_key, n_top_genes=n_top_genes)
    return list(schema.genes)
