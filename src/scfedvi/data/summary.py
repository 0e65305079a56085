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

    from scfedvi.config import SitePolicy
    from scfedvi.privacy.policy import PooledBatch, QueryLedger

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
        batch; for a batch that spans sites ``clip`` is fitted on the pooled moments and
        ``reg_std`` is zero (unused: the coordinator fits the pooled batch). A batch with fewer
        cells than the site's ``SitePolicy.min_batch_cells`` has a count but no statistics.
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
    policy: SitePolicy | None = None,
    pooled: Mapping[str, PooledBatch] | None = None,
    ledger: QueryLedger | None = None,
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
        Optional label column; its categories are reported (no counts). It must be allowed by
        ``policy`` (``SitePolicy.allowed_label_keys``).
    clip_values
        Per batch, the clip values sent by the coordinator (:func:`batch_clip_values`) for
        batches held by several sites; other batches are fitted locally. Accepted only with
        the batch's ``pooled`` moments, and only if equal to the site's own fit of them.
    pooled_batches
        Batches known to be held by several sites (see :func:`site_batches`): only their
        moments are computed (no local fit, zero clipped sums) until ``clip_values`` come.
    span
        Loess span (scanpy's default 0.3).
    policy
        The site's :class:`~scfedvi.config.SitePolicy`, checked before anything is computed
        (:func:`scfedvi.privacy.policy.check_summary`). ``None``: the default policy with
        ``label_key`` allowed (a direct call is the site's own). Batches with fewer than
        ``policy.min_batch_cells`` cells are counted but never summarised.
    pooled
        Per batch held by several sites, the coordinator's pooled moments
        (:func:`pooled_moments`): the site checks that they contain its own share, then fits
        the clip values on them itself.
    ledger
        The site's query budget for the run (``policy.summary_passes`` passes: one query
        without, one with pooled moments); ``None``: not counted.
    """
    from scfedvi.config import SitePolicy
    from scfedvi.privacy.policy import check_pooled_batch, check_summary, refuse

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
    policy = SitePolicy().allowing_label_key(label_key) if policy is None else policy
    held = {str(b): int(n) for b, n in zip(uniq, sizes, strict=True)}
    pooled_arg, pooled = pooled, dict(pooled or {})
    kept = check_summary(policy, site or "?", label_key, clip_values, held, pooled)
    if ledger is not None:
        kind = "summary" if pooled_arg is None and clip_values is None else "summary-pooled"
        ledger.spend(site or "?", kind, policy.summary_passes)
    for b in uniq:
        counts[str(b)] = int(held[str(b)])
        if b not in kept:  # too few cells: counted, never summarised
            continue
        xb = x[batches == b]
        n, sums, sums_sq = _hvg.moments(xb)
        zeros = np.zeros(len(genes))
        if b in pooled:  # batch spans sites: the site fits the pooled moments itself
            check_pooled_batch(policy, site or "?", str(b), sums, sums_sq, pooled[b])
            pb = pooled[b]
            clip = _hvg.loess_fit(int(pb.n), np.asarray(pb.sums), np.asarray(pb.sums_sq), span)[2]
            sent = None if clip_values is None else clip_values.get(b)
            if sent is not None and (
                np.shape(sent) != clip.shape or not np.allclose(sent, clip, rtol=1e-9, atol=0)
            ):
                raise refuse(
                    str(site),
                    f"the clip values sent for batch {b!r} are not the loess fit of the pooled "
                    "moments sent with them",
                    "the coordinator must send batch_clip_values() of the same summaries (or "
                    "only the pooled moments)",
                )
            reg_std = zeros
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
        stats[str(b)] = dict(zip(BATCH_FIELDS, (sums, sums_sq, reg_std, clip, s1, s2), strict=True))
    labels = None
    if label_key is not None:
        check_obs_column(adata, label_key, site=site, role="label_key")
        labels = tuple(sorted(adata.obs[label_key].astype(str).unique()))
    return SiteSummary(site, genes, counts, stats, labels)
