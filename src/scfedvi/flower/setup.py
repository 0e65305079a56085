"""The setup round at the server: harmonize the sites' genes and batches into a schema.

The protocol of :mod:`scfedvi.data.harmonize`, carried by Flower messages: gene names, then
per-batch per-gene summaries over the universe (again with pooled clip values for batches
held by several sites), then the schema, which every site checks against its data and keeps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from scfedvi._constants import SCHEMA_HASH
from scfedvi.data.harmonize import (
    SiteSummary,
    batch_clip_values,
    build_schema,
    gene_universe,
    pooled_moments,
)
from scfedvi.data.schema import FederationSchema
from scfedvi.flower import messages as m
from scfedvi.flower.exchange import Exchange
from scfedvi.flower.settings import AppSettings

log = logging.getLogger(__name__)


class SetupError(RuntimeError):
    """The setup round cannot produce a schema (too few sites, duplicate names, ...)."""


@dataclass
class Federation:
    """Who takes part: ``sites[node_id] = site name``, and the schema they agreed to."""

    schema: FederationSchema
    sites: dict[int, str]
    #: site -> its number of cells (reported with the schema check; the schedule's input)
    n_cells: dict[str, int] = field(default_factory=dict)


def _check_enough(ok: dict[int, str], failed: dict[int, str], need: int, step: str) -> None:
    for node, reason in failed.items():
        log.warning("setup (%s): node %s failed: %s", step, node, reason)
    if len(ok) < need:
        detail = "; ".join(f"node {n}: {r}" for n, r in failed.items()) or "no nodes"
        raise SetupError(
            f"setup ({step}): {len(ok)} sites answered, fewer than min-sites={need} ({detail})"
        )
    names = list(ok.values())
    dup = sorted({s for s in names if names.count(s) > 1})
    if dup:
        raise SetupError(
            f"setup ({step}): several SuperNodes call themselves {dup}; give each SuperNode "
            "a unique --node-config site='...'"
        )


def harmonize(
    ex: Exchange, nodes: set[int], app: AppSettings, min_sites: int
) -> tuple[FederationSchema, dict[int, str]]:
    """Genes, summaries (and pooled clip values), schema: returns (schema, node -> site)."""
    t = app.setup_timeout
    res = ex.ask({n: RecordDict({m.CONFIG: ConfigRecord({})}) for n in nodes}, m.GENES, t)
    sites = {n: str(r.content.config_records[m.CONFIG][m.SITE]) for n, r in res.ok.items()}
    _check_enough(sites, res.failed, min_sites, "gene names")
    order = sorted(sites, key=lambda n: sites[n])
    gene_lists = [
        [str(g) for g in res.ok[n].content.config_records[m.CONFIG]["genes"]]  # type: ignore[union-attr]
        for n in order
    ]
    universe = gene_universe(gene_lists, app.min_sites_per_gene or None)
    log.info("setup: %d sites, gene universe of %d genes", len(order), len(universe))

    def ask_summaries(targets: list[int], clips: dict[str, list[float]] | None) -> dict:
        content = {}
        for n in targets:
            rd = RecordDict({m.CONFIG: ConfigRecord({"genes": list(universe)})})
            if clips is not None:  # the second pass: only the batches this site summarised
                own = [b for b in summaries[n].stats if b in clips]
                rd[m.STATS] = m.params_to_record({b: _arr(clips[b]) for b in own})
                rd[m.POOLED] = m.pooled_to_record({b: pooled[b] for b in own})
            content[n] = rd
        r = ex.ask(content, m.SUMMARY, t)
        ok = {n: sites[n] for n in r.ok}
        _check_enough(ok, r.failed, min_sites, "summaries")
        return {
            n: m.records_to_summary(
                x.content.config_records[m.CONFIG], x.content.array_records[m.STATS], universe
            )
            for n, x in r.ok.items()
        }

    summaries: dict[int, SiteSummary] = {}
    summaries = ask_summaries(order, None)
    by_site = [summaries[n] for n in sorted(summaries, key=lambda n: sites[n])]
    clips = batch_clip_values(by_site)
    if clips:  # batches summarised by several sites: those sites fit their pooled moments
        pooled = pooled_moments(by_site)
        again = [n for n, s in summaries.items() if set(s.stats) & set(clips)]
        summaries.update(ask_summaries(again, clips))
    kept = sorted(summaries, key=lambda n: sites[n])
    schema = build_schema(
        [summaries[n] for n in kept],
        batch_key=app.batch_key,
        n_top_genes=app.n_top_genes or None,
        label_key=app.label_key or None,
        layer=app.layer or None,
    )
    log.info(
        "setup: schema %s (%d genes, %d batches)",
        schema.short_hash,
        schema.n_genes,
        schema.n_batches,
    )
    return schema, {n: sites[n] for n in kept}


def _arr(v: list[float]) -> np.ndarray:
    return np.asarray(v, dtype=np.float64)


def deliver(
    ex: Exchange, schema: FederationSchema, nodes: set[int], app: AppSettings, min_sites: int
) -> tuple[dict[int, str], dict[str, int]]:
    """Send the schema; each site checks that its data fits and keeps it. Returns node ->
    site and site -> number of cells."""
    content = {
        n: RecordDict(
            {m.CONFIG: ConfigRecord({"schema": schema.to_json(), SCHEMA_HASH: schema.hash})}
        )
        for n in nodes
    }
    res = ex.ask(content, m.SCHEMA, app.setup_timeout)
    sites = {n: str(r.content.config_records[m.CONFIG][m.SITE]) for n, r in res.ok.items()}
    _check_enough(sites, res.failed, min_sites, "schema")
    return sites, {
        sites[n]: int(r.content.config_records[m.CONFIG].get(m.N_CELLS, 0))  # type: ignore[arg-type]
        for n, r in res.ok.items()
    }


def setup(
    ex: Exchange,
    app: AppSettings,
    min_sites: int,
    schema: FederationSchema | None = None,
) -> Federation:
    """Wait for the sites, harmonize (unless ``schema`` is given: a resumed run), deliver."""
    want = max(app.num_sites, min_sites)
    nodes = ex.wait_for_nodes(want, app.wait_timeout)
    if len(nodes) < min_sites:
        raise SetupError(
            f"{len(nodes)} SuperNodes connected within {app.wait_timeout:g} s, fewer than "
            f"min-sites={min_sites}; start the sites' SuperNodes or raise wait-timeout"
        )
    if schema is None:
        schema, sites = harmonize(ex, nodes, app, min_sites)
        nodes = set(sites)
    sites, n_cells = deliver(ex, schema, nodes, app, min_sites)
    return Federation(schema, sites, n_cells)
