"""What a site computes for gene selection: its genes, its batches, and per-batch,
per-gene aggregates (scanpy's seurat_v3 terms); never a cell-level value."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from scfedvi.data import _hvg
from scfedvi.data.errors import SiteDataError, site_prefix
from scfedvi.data.projection import align_genes
from scfedvi.data.validate import (
    check_count_values,
    check_obs_column,
    check_unique_genes,
    get_counts,
)

if TYPE_CHECKING:
    from anndata import AnnData

#: Per-gene vectors of one batch in a :class:`SiteSummary`.
BATCH_FIELDS = ("sum", "sum_sq", "reg_std", "clip", "clipped_sum", "clipped_sum_sq")


@dataclass
class SiteSummary:
    """What a site sends for gene selection: per-batch, per-gene aggregates only.

    Parameters
    ----------
    site
        Site name.
    genes
        The gene universe the statistics refer to (columns of every vector).
    batch_counts
        Number of cells per batch at this site.
    stats
        ``stats[batch][name]`` for ``name`` in :data:`BATCH_FIELDS`: float64 vectors over
        ``genes``. ``reg_std`` and ``clip`` come from the loess fit on this site's cells of the
        batch; for a batch that spans sites ``clip`` is the coordinator's and ``reg_std`` is
        zero (unused: the coordinator fits the pooled batch).
    labels
        Label categories seen at the site (sorted), when a label key was given.
    """

    site: str
    genes: tuple[str, ...]
    batch_counts: dict[str, int]
    stats: dict[str, dict[str, np.ndarray]] = field(repr=False)
    labels: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-able builtins only (lists, ints, floats, strings)."""
        return {
            "site": self.site,
            "genes": list(self.genes),
            "batch_counts": {b: int(n) for b, n in self.batch_counts.items()},
            "stats": {
                b: {k: np.asarray(v, dtype=np.float64).tolist() for k, v in s.items()}
                for b, s in self.stats.items()
            },
            "labels": None if self.labels is None else list(self.labels),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SiteSummary:
        """Inverse of :meth:`to_dict`."""
        return cls(
            site=str(d["site"]),
            genes=tuple(d["genes"]),
            batch_counts={str(b): int(n) for b, n in d["batch_counts"].items()},
            stats={
                b: {k: np.asarray(v, dtype=np.float64) for k, v in s.items()}
                for b, s in d["stats"].items()
            },
            labels=None if d.get("labels") is None else tuple(d["labels"]),
        )


def site_genes(adata: AnnData, *, site: str | None = None) -> tuple[str, ...]:
    """Phase 1 at a site: the gene names it measured (unique, in its own order)."""
    check_unique_genes(adata, site=site)
    return tuple(str(g) for g in adata.var_names)


def site_batches(adata: AnnData, *, site: str, batch_key: str) -> dict[str, int]:
    """Phase 1 at a site: the number of cells of each batch it holds."""
    check_obs_column(adata, batch_key, site=site, role="batch_key")
    counts = adata.obs[batch_key].astype(str).value_counts()
    return {str(b): int(n) for b, n in sorted(counts.items())}


def site_summary(
    adata: AnnData,
    *,
    site: str,
    batch_key: str,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    label_key: str | None = None,
    clip_values: Mapping[str, Sequence[float]] | None = None,
    pooled_batches: Collection[str] = (),
    span: float = _hvg.LOESS_SPAN,
) -> SiteSummary:
    """Phase 2 at a site: per-batch, per-gene statistics for seurat_v3 gene selection.

    Parameters
    ----------
    adata
        The site's data with raw counts.
    site
        Site name.
    batch_key
        Column of ``obs`` with the batch.
    genes
        The gene universe (:func:`gene_universe`); genes the site lacks count as zero.
        ``None`` uses the site's own genes (only right when every site has the same genes).
    layer
        Layer with raw counts (``None``: ``X``).
    label_key
        Optional label column; its categories are reported (no counts).
    clip_values
        Per batch, the clip values sent by the coordinator (:func:`batch_clip_values`) for
        batches held by several sites; other batches are fitted locally.
    pooled_batches
        Batches known to be held by several sites (see :func:`site_batches`): only their
        moments are computed (no local fit, zero clipped sums) until ``clip_values`` come.
    span
        Loess span (scanpy's default 0.3).
    """
    p = site_prefix(site)
    genes = site_genes(adata, site=site) if genes is None else tuple(genes)
    check_obs_column(adata, batch_key, site=site, role="batch_key")
    check_unique_genes(adata, site=site)
    raw = get_counts(adata, layer, site=site)
    check_count_values(raw, site=site, layer=layer)
    x = align_genes(raw, adata.var_names, genes, np.float64)
    batches = adata.obs[batch_key].astype(str).to_numpy()
    counts: dict[str, int] = {}
    stats: dict[str, dict[str, np.ndarray]] = {}
    uniq, sizes = np.unique(batches, return_counts=True)
    if sizes.min() < 2:
        b, n = uniq[sizes.argmin()], sizes.min()
        raise SiteDataError(
            f"{p}obs[{batch_key!r}] value {b!r} has {n} cell; gene selection needs at "
            "least 2 cells per batch: merge this batch into another or drop the cell"
        )
    for b in uniq:
        xb = x[batches == b]
        n, sums, sums_sq = _hvg.moments(xb)
        zeros = np.zeros(len(genes))
        if clip_values is not None and b in clip_values:  # batch spans sites: pooled fit
            reg_std, clip = zeros, np.asarray(clip_values[b], dtype=np.float64)
            s1, s2 = _hvg.clipped_sums(xb, clip)
        elif b in pooled_batches:  # moments only; clip values come from the coordinator
            reg_std = clip = s1 = s2 = zeros
        else:
            try:
                _, reg_std, clip = _hvg.loess_fit(n, sums, sums_sq, span)
            except ValueError as e:
                raise SiteDataError(
                    f"{p}obs[{batch_key!r}] value {b!r}: the seurat_v3 loess fit failed on its "
                    f"{n} cells and {int((sums > 0).sum())} detected genes ({e}); merge small "
                    "batches, or, if other sites hold this batch, pass pooled_batches="
                ) from e
            s1, s2 = _hvg.clipped_sums(xb, clip)
        counts[str(b)] = n
        stats[str(b)] = dict(zip(BATCH_FIELDS, (sums, sums_sq, reg_std, clip, s1, s2), strict=True))
    labels = None
    if label_key is not None:
        check_obs_column(adata, label_key, site=site, role="label_key")
        labels = tuple(sorted(adata.obs[label_key].astype(str).unique()))
    return SiteSummary(site, genes, counts, stats, labels)
