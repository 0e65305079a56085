"""Federated harmonization: the gene universe, per-site summaries, and the schema.

The protocol (each step sends only per-gene or per-batch aggregates):

1. each site sends :func:`site_genes` and :func:`site_batches` (cells per batch); the
   coordinator computes :func:`gene_universe` and the batches held by several sites;
2. each site sends :func:`site_summary` over the universe: per batch, the cell count and
   per-gene sums, sums of squares, loess fit and clipped sums (scanpy's seurat_v3 terms);
   for batches held by several sites (``pooled_batches=``) only the sums and sums of squares;
3. only when a batch is held by several sites: the coordinator sends the pooled moments
   (:func:`pooled_moments`) and :func:`batch_clip_values` fitted on them, and those sites
   check the moments contain their own share, fit the clip values themselves and recompute
   their summary (``pooled=``, ``clip_values=``);
4. the coordinator calls :func:`build_schema`, which reproduces
   ``scanpy.pp.highly_variable_genes(pooled, flavor="seurat_v3", batch_key=...)``.

Each site answers within its :class:`~scfedvi.config.SitePolicy`: a batch with fewer cells
than ``min_batch_cells`` at a site is counted but not summarised (it is in the schema, and gene
selection uses the batches that were summarised), the label key must be allowed, clip values
are accepted only with pooled moments, and a site answers one summary pass per run.

:func:`harmonize` runs the protocol in one process: the orchestration is
:func:`scfedvi.federation.setup_protocol.run_setup` (the Flower runtime's too), each site's
answer :func:`scfedvi.federation.setup_site.answer_setup`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scfedvi.data import _hvg
from scfedvi.data.errors import SchemaMismatchError
from scfedvi.data.schema import FederationSchema
from scfedvi.data.summary import (
    BATCH_FIELDS,
    SiteSummary,
    site_batches,
    site_genes,
    site_summary,
)

__all__ = [
    "BATCH_FIELDS",
    "SiteSummary",
    "batch_clip_values",
    "build_schema",
    "gene_universe",
    "harmonize",
    "hvg_table",
    "pooled_moments",
    "shared_batches",
    "site_batches",
    "site_genes",
    "site_summary",
]

if TYPE_CHECKING:
    from anndata import AnnData

    from scfedvi.config import SitePolicy
    from scfedvi.privacy.policy import PooledBatch


def gene_universe(
    gene_lists: Sequence[Sequence[str]],
    min_sites: int | None = None,
    sites: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Coordinator: the genes every model will use, before gene selection.

    Parameters
    ----------
    gene_lists
        Each site's genes (from :func:`site_genes`), in site order.
    min_sites
        Keep genes measured at ``>= min_sites`` sites (zero-filled elsewhere); ``None``
        keeps genes measured at every site (the intersection).
    sites
        The sites' names, in the same order, for the error when no gene is shared (which
        lists each site's first identifiers and their kind: symbols or Ensembl IDs).

    Returns
    -------
    The genes in order of first appearance: the first site's order, then genes new at the
    second site in its order, and so on. For the intersection this is the first site's order.
    """
    if not gene_lists:
        raise ValueError("gene_universe: no site gene lists given")
    need = len(gene_lists) if min_sites is None else int(min_sites)
    if not 1 <= need <= len(gene_lists):
        raise ValueError(f"gene_universe: min_sites={min_sites} must be in 1..{len(gene_lists)}")
    counts: dict[str, int] = {}
    for genes in gene_lists:
        for g in dict.fromkeys(str(g) for g in genes):
            counts[g] = counts.get(g, 0) + 1
    universe = tuple(g for g, c in counts.items() if c >= need)
    if not universe:
        from scfedvi.data.gene_ids import no_shared_genes_message

        raise ValueError(no_shared_genes_message(gene_lists, sites, need))
    return universe


def shared_batches(summaries: Sequence[SiteSummary]) -> dict[str, list[str]]:
    """Return ``{batch: [sites]}`` for the batches summarised by more than one site (a site's
    batch too small for its policy is counted but not summarised, so it is not shared)."""
    holders: dict[str, list[str]] = {}
    for s in summaries:
        for b in s.stats:
            holders.setdefault(b, []).append(s.site)
    return {b: sites for b, sites in sorted(holders.items()) if len(sites) > 1}


def _pooled(summaries: Sequence[SiteSummary], batch: str) -> tuple[int, np.ndarray, np.ndarray]:
    parts = [s for s in summaries if batch in s.stats]
    n = sum(s.batch_counts[batch] for s in parts)
    sums = np.sum([s.stats[batch]["sum"] for s in parts], axis=0)
    sums_sq = np.sum([s.stats[batch]["sum_sq"] for s in parts], axis=0)
    return n, sums, sums_sq


def batch_clip_values(
    summaries: Sequence[SiteSummary], *, span: float = _hvg.LOESS_SPAN
) -> dict[str, list[float]]:
    """Coordinator, phase 3: clip values of every batch held by several sites.

    They come from the loess fit on the pooled per-gene moments, exactly as scanpy fits the
    pooled batch; send them back to those sites' :func:`site_summary` (``clip_values=``).
    """
    out = {}
    for b in shared_batches(summaries):
        out[b] = _hvg.loess_fit(*_pooled(summaries, b), span)[2].tolist()
    return out


def pooled_moments(summaries: Sequence[SiteSummary]) -> dict[str, PooledBatch]:
    """Coordinator, phase 3: the pooled cell count, per-gene sums and sums of squares of every
    batch summarised by several sites. Sent with (or instead of) :func:`batch_clip_values`: a
    site fits its clip values on them itself after checking they contain its own share."""
    from scfedvi.privacy.policy import PooledBatch

    return {b: PooledBatch(*_pooled(summaries, b)) for b in shared_batches(summaries)}


def _check_genes(summaries: Sequence[SiteSummary]) -> tuple[str, ...]:
    if not summaries:
        raise ValueError("build_schema: no site summaries given")
    genes = summaries[0].genes
    for s in summaries[1:]:
        if s.genes != genes:
            raise SchemaMismatchError(
                f"site {s.site!r}: summary genes differ from site {summaries[0].site!r}'s; "
                "compute every site_summary with genes=gene_universe(...)"
            )
    return genes


def hvg_table(
    summaries: Sequence[SiteSummary], *, n_top_genes: int, span: float = _hvg.LOESS_SPAN
) -> pd.DataFrame:
    """Coordinator: scanpy's seurat_v3 table (``means``, ``variances``, ``variances_norm``,
    ``highly_variable_rank``, ``highly_variable_nbatches``, ``highly_variable``), from
    summaries only, indexed by the universe genes in universe order."""
    genes = _check_genes(summaries)
    shared = shared_batches(summaries)
    batches = sorted({b for s in summaries for b in s.stats})
    if not batches:
        small = sorted(
            {
                f"{b!r} at {s.site!r} ({n} cells)"
                for s in summaries
                for b, n in s.batch_counts.items()
            }
        )
        raise SchemaMismatchError(
            "no site summarised any batch: each batch is smaller than its site's "
            f"SitePolicy.min_batch_cells ({', '.join(small[:5])}); merge small batches, "
            "or pass n_top_genes=None to keep every universe gene"
        )
    norm_vars = []
    for b in batches:
        n, sums, sums_sq = _pooled(summaries, b)
        parts = [s for s in summaries if b in s.stats]
        if b in shared:
            mean, reg_std, clip = _hvg.loess_fit(n, sums, sums_sq, span)
            stale = [s.site for s in parts if not np.array_equal(s.stats[b]["clip"], clip)]
            if stale:
                raise SchemaMismatchError(
                    f"site {stale[0]!r}: batch {b!r} is held by sites {shared[b]} but the "
                    "summary was not computed with the pooled clip values; send "
                    "batch_clip_values(summaries) to those sites and recompute site_summary("
                    "..., clip_values=...) (harmonize() does this)"
                )
        else:
            mean, reg_std = _hvg.mean_var(n, sums, sums_sq)[0], parts[0].stats[b]["reg_std"]
        s1 = np.sum([s.stats[b]["clipped_sum"] for s in parts], axis=0)
        s2 = np.sum([s.stats[b]["clipped_sum_sq"] for s in parts], axis=0)
        norm_vars.append(_hvg.normalized_variance(n, mean, reg_std, s1, s2))
    df = _hvg.rank_genes(np.vstack(norm_vars), genes, n_top_genes)
    n_all = sum(s.batch_counts[b] for s in summaries for b in s.stats)
    tot_sum = np.sum([st["sum"] for s in summaries for st in s.stats.values()], axis=0)
    tot_sq = np.sum([st["sum_sq"] for s in summaries for st in s.stats.values()], axis=0)
    means, variances = _hvg.mean_var(n_all, tot_sum, tot_sq)
    df.insert(0, "means", means)
    df.insert(1, "variances", variances)
    return df


def build_schema(
    summaries: Sequence[SiteSummary],
    *,
    batch_key: str,
    n_top_genes: int | None = 2000,
    label_key: str | None = None,
    labels: Sequence[str] | None = None,
    layer: str | None = None,
    span: float = _hvg.LOESS_SPAN,
) -> FederationSchema:
    """Coordinator: the federation schema from the sites' summaries.

    Parameters
    ----------
    summaries
        One :class:`SiteSummary` per site, over the same gene universe.
    batch_key
        Column of ``obs`` with the batch.
    n_top_genes
        Number of highly variable genes (scanpy's seurat_v3 with ``batch_key``); ``None`` or
        at least the universe size keeps every universe gene.
    label_key
        Label column; with ``labels=None`` the labels are the sorted union of the sites'.
    labels
        Label categories, in the order to use.
    layer
        Layer with raw counts at the sites.
    span
        Loess span.

    Returns
    -------
    A :class:`FederationSchema` whose genes are the selected genes **in universe order** (not
    in rank order) and whose batches are the sorted union of the sites' batches.
    """
    genes = _check_genes(summaries)
    if n_top_genes is not None and n_top_genes < len(genes):
        table = hvg_table(summaries, n_top_genes=n_top_genes, span=span)
        genes = tuple(table.index[table["highly_variable"].to_numpy()])
    batches = tuple(sorted({b for s in summaries for b in s.batch_counts}))
    if label_key is not None and labels is None:
        seen = [s.labels for s in summaries if s.labels is not None]
        labels = tuple(sorted(set().union(*seen))) if seen else None
    return FederationSchema(
        genes=genes,
        batches=batches,
        batch_key=batch_key,
        labels=None if labels is None else tuple(labels),
        label_key=label_key,
        layer=layer,
    )


def harmonize(
    sites: Mapping[str, AnnData],
    *,
    batch_key: str,
    n_top_genes: int | None = 2000,
    min_sites: int | None = None,
    label_key: str | None = None,
    labels: Sequence[str] | None = None,
    layer: str | None = None,
    policy: SitePolicy | Mapping[str, SitePolicy] | None = None,
) -> FederationSchema:
    """Run the harmonization protocol in one process over ``{site: AnnData}``.

    The in-process transport of :func:`~scfedvi.federation.setup_protocol.run_setup`: its
    ``ask`` calls each site's :func:`~scfedvi.federation.setup_site.answer_setup`, so a site's
    data is read only there and the coordinator side sees the replies only. Parameters are
    those of :func:`gene_universe`, :func:`site_summary` and :func:`build_schema`; ``policy`` is every site's :class:`~scfedvi.config.SitePolicy` (or
    one per site; default ``SitePolicy()``), with ``label_key`` as the sites' own label key.
    """
    from scfedvi.federation import setup_protocol
    from scfedvi.federation.setup_protocol import SetupQuery
    from scfedvi.federation.setup_site import answer_setup
    from scfedvi.privacy.policy import QueryLedger, site_policy

    ledger = QueryLedger()  # each site's query budget for this run
    pol = {s: site_policy(policy, s).allowing_label_key(label_key) for s in sites}

    def ask(step: str, queries: Mapping[str, SetupQuery] | None) -> dict[str, Any]:
        asked = queries if queries is not None else {s: SetupQuery(step) for s in sites}
        return {
            s: answer_setup(
                q,
                sites[s],
                site=s,
                batch_key=batch_key,
                layer=layer,
                label_key=label_key,
                policy=pol[s],
                ledger=ledger,
            )
            for s, q in asked.items()
        }

    schema, _ = setup_protocol.run_setup(
        ask,
        list(sites),
        batch_key=batch_key,
        n_top_genes=n_top_genes,
        min_sites_per_gene=min_sites,
        label_key=label_key,
        labels=labels,
        layer=layer,
    )
    return schema
