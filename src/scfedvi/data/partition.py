"""Splitting one AnnData into simulated sites: by batch groups, at random, non-IID over
labels, and the partitions of the paper's experiments.

Every function is deterministic (given its seed), returns ``{site name: AnnData copy}`` in a
fixed order, and keeps the cells of each site in their original order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData


def _column(adata: AnnData, key: str) -> pd.Series:
    if key not in adata.obs.columns:
        avail = ", ".join(repr(c) for c in adata.obs.columns)
        raise ValueError(f"obs[{key!r}] is missing (available columns: {avail}); pass key=...")
    return adata.obs[key].astype(str)


def _take(adata: AnnData, mask: np.ndarray) -> AnnData:
    return adata[np.asarray(mask, dtype=bool)].copy()


def split_by_groups(
    adata: AnnData, key: str, groups: Mapping[str, Sequence[str]]
) -> dict[str, AnnData]:
    """Give each site the cells whose ``obs[key]`` is in its group of values.

    Parameters
    ----------
    adata
        The pooled data.
    key
        Column of ``obs`` (e.g. the batch).
    groups
        ``{site: [values]}``; a value may belong to one site only. Values in no group are
        left out.

    Returns
    -------
    ``{site: AnnData}`` in the order of ``groups``.
    """
    values = _column(adata, key)
    present = set(values.unique())
    owner: dict[str, str] = {}
    for site, vals in groups.items():
        if isinstance(vals, str):
            raise ValueError(f"site {site!r}: groups[{site!r}] must be a list of values")
        for v in vals:
            if v in owner:
                raise ValueError(
                    f"obs[{key!r}] value {v!r} is given to sites {owner[v]!r} and {site!r}; "
                    "give each value to one site"
                )
            if v not in present:
                raise ValueError(
                    f"site {site!r}: obs[{key!r}] has no value {v!r} (values: "
                    f"{sorted(present)}); fix the groups"
                )
            owner[v] = site
    return {site: _take(adata, values.isin(list(vals)).to_numpy()) for site, vals in groups.items()}


def auto_groups(adata: AnnData, key: str, n_sites: int) -> dict[str, list[str]]:
    """Group the values of ``obs[key]`` into ``n_sites`` sites balanced by cell count.

    Greedy: values by decreasing cell count (ties by name) each go to the site with the fewest
    cells so far (ties: the lowest site number). Sites are named ``site-0``, ``site-1``, ...
    """
    counts = _column(adata, key).value_counts()
    if not 1 <= n_sites <= len(counts):
        raise ValueError(
            f"auto_groups: n_sites={n_sites} but obs[{key!r}] has {len(counts)} values; "
            "choose 1..number of values, or use split_within_group/random_split"
        )
    order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    load = [0] * n_sites
    groups: dict[str, list[str]] = {f"site-{i}": [] for i in range(n_sites)}
    for value, n in order:
        i = min(range(n_sites), key=lambda j: (load[j], j))
        groups[f"site-{i}"].append(str(value))
        load[i] += int(n)
    return groups


def random_split(adata: AnnData, n_sites: int, seed: int = 0) -> dict[str, AnnData]:
    """Split the cells uniformly at random into ``n_sites`` sites of near-equal size
    (``site-0``, ...)."""
    if not 1 <= n_sites <= adata.n_obs:
        raise ValueError(f"random_split: n_sites={n_sites} must be in 1..{adata.n_obs}")
    perm = np.random.default_rng(seed).permutation(adata.n_obs)
    out = {}
    for i, part in enumerate(np.array_split(perm, n_sites)):
        mask = np.zeros(adata.n_obs, dtype=bool)
        mask[part] = True
        out[f"site-{i}"] = _take(adata, mask)
    return out


def dirichlet_split(
    adata: AnnData,
    n_sites: int,
    *,
    label_key: str,
    alpha: float,
    seed: int = 0,
    min_cells: int = 1,
    max_tries: int = 100,
) -> dict[str, AnnData]:
    """Non-IID split over labels: each label's cells are shared among sites by proportions
    drawn from ``Dirichlet(alpha, ..., alpha)`` (small ``alpha``: each site sees few labels).

    Draws again (up to ``max_tries``) until every site has at least ``min_cells`` cells.
    Sites are named ``site-0``, ...
    """
    labels = _column(adata, label_key).to_numpy()
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        site_of = np.empty(adata.n_obs, dtype=np.int64)
        for lab in sorted(set(labels)):
            idx = rng.permutation(np.flatnonzero(labels == lab))
            props = rng.dirichlet(np.full(n_sites, float(alpha)))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for i, part in enumerate(np.split(idx, cuts)):
                site_of[part] = i
        if np.bincount(site_of, minlength=n_sites).min() >= min_cells:
            return {f"site-{i}": _take(adata, site_of == i) for i in range(n_sites)}
    raise ValueError(
        f"dirichlet_split: no draw in {max_tries} tries gave every site >= {min_cells} cells; "
        "raise alpha, lower n_sites or min_cells"
    )


def sites_per_group(counts: Mapping[str, int], n_sites: int) -> dict[str, int]:
    """Share ``n_sites`` among groups so that sites are balanced and hold one group each.

    Every group gets one site; each further site goes to the group with the most cells per
    site (ties by name). Returns ``{group: number of sites}`` in sorted group order.
    """
    groups = sorted(counts)
    if n_sites < len(groups):
        raise ValueError(f"sites_per_group: n_sites={n_sites} < {len(groups)} groups")
    k = dict.fromkeys(groups, 1)
    for _ in range(n_sites - len(groups)):
        best = groups[0]
        for g in groups[1:]:
            if counts[g] / k[g] > counts[best] / k[best]:
                best = g
        k[best] += 1
    return k


def split_within_group(
    adata: AnnData,
    key: str,
    n_splits: Mapping[str, int],
    *,
    seed: int = 0,
    names: Mapping[str, str] | None = None,
) -> dict[str, AnnData]:
    """Split the cells of each value of ``obs[key]`` at random into near-equal sites.

    Parameters
    ----------
    adata
        The pooled data.
    key
        Column of ``obs``; every site holds cells of one value only.
    n_splits
        ``{value: number of sites}``; values not listed are left out.
    seed
        Seed of the shuffles (values are shuffled in the order of ``n_splits``).
    names
        ``{value: site name prefix}``; defaults to the value. A value split once gives a site
        named by the prefix, else ``prefix-0``, ``prefix-1``, ...
    """
    values = _column(adata, key).to_numpy()
    rng = np.random.default_rng(seed)
    out = {}
    for value, k in n_splits.items():
        idx = np.flatnonzero(values == value)
        if not 1 <= k <= len(idx):
            raise ValueError(f"obs[{key!r}] value {value!r} has {len(idx)} cells; cannot split {k}")
        prefix = (names or {}).get(value, value)
        for i, part in enumerate(np.array_split(rng.permutation(idx), k)):
            mask = np.zeros(adata.n_obs, dtype=bool)
            mask[part] = True
            out[prefix if k == 1 else f"{prefix}-{i}"] = _take(adata, mask)
    return out


def _slug(value: str) -> str:
    inner = re.search(r"\(([^)]*)\)", value)
    return re.sub(r"[^a-z0-9]+", "-", (inner.group(1) if inner else value).lower()).strip("-")


def _pancreas_groups(adata: AnnData, n_sites: int) -> dict[str, list[str]]:
    obs = adata.obs[["study", "donor"]].astype(str).drop_duplicates()
    study = {s: sorted(obs.loc[obs["study"] == s, "donor"]) for s in sorted(obs["study"].unique())}
    baron, seger = study.get("Baron2016", []), study.get("Segerstolpe2016", [])
    if not baron or not seger:
        raise ValueError(
            "paper_partition('pancreas'): obs['study'] needs Baron2016 and Segerstolpe2016"
        )
    if n_sites == 2:
        return {"baron": baron, "segerstolpe": seger}
    if n_sites == 3:
        return {**{f"baron-{d}": [d] for d in baron}, "segerstolpe": seger}
    if n_sites == 5:
        return {**{f"baron-{d}": [d] for d in baron}, **{f"segerstolpe-{d}": [d] for d in seger}}
    raise ValueError("paper_partition('pancreas'): n_sites must be 2, 3 or 5 (as in the paper)")


def paper_partition(name: str, adata: AnnData, n_sites: int, seed: int = 0) -> dict[str, AnnData]:
    """The site partitions of the experiments, with informative, deterministic site names.

    ``"pancreas"`` (batch ``donor``; Baron donors human2, human4; three Segerstolpe donors):
    2 sites ``baron`` / ``segerstolpe``; 3 sites ``baron-human2`` / ``baron-human4`` /
    ``segerstolpe``; 5 sites one donor each (``baron-<donor>``, ``segerstolpe-<donor>``).

    ``"cortex"`` (batch ``batch``, one value per study): every site holds cells of one study
    only; each study gets one site and each further site goes to the study with the most
    cells per site (:func:`sites_per_group`), whose cells are split at random (``seed``).
    2 sites: ``tasic2016`` (761 cells) / ``zeisel2015`` (290); 3 sites: ``tasic2016-0``,
    ``tasic2016-1`` (381, 380), ``zeisel2015`` (290); 5 sites: ``tasic2016-0`` ..
    ``tasic2016-2`` (254, 254, 253), ``zeisel2015-0``, ``zeisel2015-1`` (145, 145).
    """
    if name == "pancreas":
        return split_by_groups(adata, "donor", _pancreas_groups(adata, n_sites))
    if name == "cortex":
        counts = _column(adata, "batch").value_counts()
        k = sites_per_group({str(b): int(n) for b, n in counts.items()}, n_sites)
        names = {b: _slug(b) for b in k}
        return split_within_group(adata, "batch", k, seed=seed, names=names)
    raise ValueError(f"paper_partition: unknown name {name!r}; use 'pancreas' or 'cortex'")
