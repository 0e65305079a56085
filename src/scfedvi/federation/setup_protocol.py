"""The setup round (harmonization) at the coordinator, the same in every runtime.

:func:`run_setup` orchestrates the protocol of :mod:`scfedvi.data.harmonize` over an ``ask``
function; a runtime only carries the queries: in process
(:func:`scfedvi.data.harmonize.harmonize`) ``ask`` calls each site's
:func:`~scfedvi.federation.setup_site.answer_setup` directly, over Flower
(:mod:`scfedvi.flower.setup`) it sends messages and waits for the replies. The steps, in order:

1. :data:`GENES` to every site: its genes and its cells per batch (:class:`SiteInventory`);
   the coordinator computes the gene universe and the batches held by several sites;
2. :data:`SUMMARY` to every site that answered: per-batch summaries over the universe, with
   only the moments of the batches held by several sites (``pooled_batches``);
3. only when some batch is summarised by several sites: :data:`SUMMARY` again to the sites that
   hold one, with the pooled moments and the clip values fitted on them;
4. the schema, from the summaries (:func:`~scfedvi.data.harmonize.build_schema`).

The federation's site order (it fixes the universe's gene order) is the ``sites`` given, or,
where sites announce themselves (``sites=None``), their names sorted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.data.schema import FederationSchema
    from scfedvi.data.summary import SiteSummary
    from scfedvi.privacy.policy import PooledBatch

log = logging.getLogger(__name__)

#: The two queries of the setup round.
GENES, SUMMARY = "genes", "summary"


@dataclass(frozen=True)
class SetupQuery:
    """What the coordinator asks a site in the setup round.

    Parameters
    ----------
    step
        :data:`GENES` or :data:`SUMMARY`.
    genes
        The gene universe (:data:`SUMMARY` only).
    pooled_batches
        Batches held by several sites: the first summary sends only their moments.
    pooled, clip_values
        The second summary pass (``pooled`` is not ``None``): per shared batch the site
        summarised, the pooled moments and the clip values fitted on them.
    """

    step: str
    genes: tuple[str, ...] = ()
    pooled_batches: tuple[str, ...] = ()
    pooled: dict[str, PooledBatch] | None = None
    clip_values: dict[str, list[float]] | None = None

    def __post_init__(self) -> None:
        if self.step not in (GENES, SUMMARY):
            raise ValueError(f"setup query step {self.step!r}: expected {GENES!r} or {SUMMARY!r}")


@dataclass(frozen=True)
class SiteInventory:
    """A site's answer to :data:`GENES`: its genes (its own order) and cells per batch."""

    site: str
    genes: tuple[str, ...]
    batch_counts: dict[str, int] = field(default_factory=dict)


#: ``ask(step, queries)``: send ``queries[site]`` to each site (``None``: the step's query to
#: every site of the federation) and return the replies ``{site: reply}`` of the sites that
#: answered (:class:`SiteInventory` for :data:`GENES`, a ``SiteSummary`` for :data:`SUMMARY`).
#: A transport raises if too few sites answer.
Ask = Callable[[str, Mapping[str, SetupQuery] | None], Mapping[str, Any]]


class SetupProtocolError(RuntimeError):
    """The setup round cannot go on (a site left between the two summary passes)."""


def run_setup(
    ask: Ask,
    sites: Sequence[str] | None = None,
    *,
    batch_key: str,
    n_top_genes: int | None = 2000,
    min_sites_per_gene: int | None = None,
    label_key: str | None = None,
    labels: Sequence[str] | None = None,
    layer: str | None = None,
) -> tuple[FederationSchema, list[str]]:
    """The coordinator's side of the setup round: returns the schema and the sites (in the
    federation's order) whose summaries built it.

    Parameters
    ----------
    ask
        The transport (:data:`Ask`).
    sites
        The sites in the federation's order; ``None``: every site ``ask`` reaches, by name.
    batch_key, n_top_genes, label_key, labels, layer
        As in :func:`~scfedvi.data.harmonize.build_schema`.
    min_sites_per_gene
        As ``min_sites`` in :func:`~scfedvi.data.harmonize.gene_universe`.
    """
    from scfedvi.data.harmonize import (
        batch_clip_values,
        build_schema,
        gene_universe,
        pooled_moments,
    )

    first = ask(GENES, None if sites is None else {s: SetupQuery(GENES) for s in sites})
    order = [s for s in sites if s in first] if sites is not None else sorted(first)
    inventory: list[SiteInventory] = [first[s] for s in order]
    universe = gene_universe([x.genes for x in inventory], min_sites_per_gene, sites=order)
    log.info("setup: %d sites, gene universe of %d genes", len(order), len(universe))
    held: dict[str, int] = {}
    for x in inventory:
        for b in x.batch_counts:
            held[b] = held.get(b, 0) + 1
    shared = tuple(sorted(b for b, n in held.items() if n > 1))
    query = SetupQuery(SUMMARY, genes=universe, pooled_batches=shared)
    replies = ask(SUMMARY, {s: query for s in order})
    summaries: dict[str, SiteSummary] = {s: replies[s] for s in order if s in replies}
    by_site = list(summaries.values())
    again = [s for s, x in summaries.items() if set(x.stats) & set(shared)]
    if again:  # those sites fit the pooled moments of the batches summarised by several
        pooled, clips = pooled_moments(by_site), batch_clip_values(by_site)
        second = {
            s: SetupQuery(
                SUMMARY,
                genes=universe,
                pooled={b: pooled[b] for b in summaries[s].stats if b in pooled},
                clip_values={b: clips[b] for b in summaries[s].stats if b in clips},
            )
            for s in again
        }
        replies = ask(SUMMARY, second)
        missing = sorted(set(second) - set(replies))
        if missing:
            raise SetupProtocolError(
                f"setup: sites {missing} did not answer the pooled summary pass, and the "
                "other sites' clip values include their cells; start the setup again"
            )
        summaries.update({s: replies[s] for s in again})
    kept = list(summaries)
    schema = build_schema(
        [summaries[s] for s in kept],
        batch_key=batch_key,
        n_top_genes=n_top_genes,
        label_key=label_key,
        labels=labels,
        layer=layer,
    )
    log.info(
        "setup: schema %s (%d genes, %d batches)",
        schema.short_hash,
        schema.n_genes,
        schema.n_batches,
    )
    return schema, kept
