"""Label harmonization for federated scANVI: only label counts leave a site.

1. each site sends :func:`site_label_counts` (cells per label name in its label column);
2. the coordinator calls :func:`harmonize_labels`: the label categories are the sorted union of
   the sites' names without the unlabelled category. It warns about labels held by one site
   only and names that differ only by case or whitespace (kept apart: a silent merge could
   join different cell types), and about sites without any labelled cell (they train
   unsupervised and receive predictions).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

from scfedvi.data.errors import SiteDataError, SiteDataWarning, site_prefix

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger(__name__)


def site_label_counts(
    adata: AnnData, *, site: str, label_key: str, unlabeled_category: str
) -> dict[str, int]:
    """Site: cells per label name in ``obs[label_key]`` (an aggregate that may leave the site)."""
    p = site_prefix(site)
    if label_key not in adata.obs.columns:
        raise SiteDataError(
            f"{p}obs[{label_key!r}] (the label column) is missing; add it, with "
            f"{unlabeled_category!r} for every cell if the site has no labels "
            f"(columns: {', '.join(repr(c) for c in adata.obs.columns) or 'none'})"
        )
    col = adata.obs[label_key]
    n_na = int(col.isna().sum())
    if n_na:
        raise SiteDataError(
            f"{p}obs[{label_key!r}] has {n_na} missing values (NaN); set them to "
            f"{unlabeled_category!r} (the unlabelled category) or to a label"
        )
    counts = col.astype(str).value_counts()
    return {str(k): int(v) for k, v in counts.items() if v > 0}


def _norm(name: str) -> str:
    return " ".join(name.split()).casefold()


def harmonize_labels(
    counts: Mapping[str, Mapping[str, int]], *, label_key: str, unlabeled_category: str
) -> tuple[str, ...]:
    """Coordinator: the federation's label categories from the sites' label counts.

    Parameters
    ----------
    counts
        Site -> its :func:`site_label_counts`.
    label_key
        The label column (for messages).
    unlabeled_category
        The name of unlabelled cells (scvi-tools' ``unlabeled_category``).

    Returns
    -------
    The known labels, sorted; the unlabelled category is not among them.

    Raises
    ------
    SiteDataError
        No site has a labelled cell.
    """
    holders: dict[str, list[str]] = {}
    for site, c in counts.items():
        known = {k: n for k, n in c.items() if k != unlabeled_category and n > 0}
        if not known:
            warnings.warn(
                f"{site_prefix(site)}every cell of obs[{label_key!r}] is "
                f"{unlabeled_category!r} (unlabelled): the site trains without labels and its "
                "cells get predicted labels; if it has labels, check the column and "
                "unlabeled_category",
                SiteDataWarning,
                stacklevel=2,
            )
        for k in known:
            holders.setdefault(k, []).append(site)
    if not holders:
        raise SiteDataError(
            f"no site has a labelled cell: every value of obs[{label_key!r}] at sites "
            f"{sorted(counts)} is {unlabeled_category!r}; label some cells at one site at least, "
            "or pass the right unlabeled_category"
        )
    if len(counts) > 1:
        for k, sites in sorted(holders.items()):
            if len(sites) == 1:
                warnings.warn(
                    f"label {k!r} of obs[{label_key!r}] is held by site {sites[0]!r} only: the "
                    "other sites' cells of that type can only be recognized from its cells",
                    SiteDataWarning,
                    stacklevel=2,
                )
    groups: dict[str, list[str]] = {}
    for k in holders:
        groups.setdefault(_norm(k), []).append(k)
    for names in groups.values():
        if len(names) > 1:
            where = "; ".join(f"{n!r} at {sorted(holders[n])}" for n in sorted(names))
            warnings.warn(
                f"labels of obs[{label_key!r}] differ only by case or whitespace: {where}; they "
                "are kept as different labels: rename them to one name at the sites if they "
                "are the same cell type",
                SiteDataWarning,
                stacklevel=2,
            )
    return tuple(sorted(holders))
