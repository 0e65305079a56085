"""The setup round at the server: harmonize the sites' genes and batches into a schema.

The Flower transport of :func:`scfedvi.federation.setup_protocol.run_setup` (the orchestration
the in-process runtime runs too): each query becomes a message, each site's
:func:`~scfedvi.federation.setup_site.answer_setup` runs in its ClientApp
(:mod:`scfedvi.flower.client_app`), and the replies come back by site name. Then the schema,
which every site checks against its data and keeps (:func:`deliver`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from scfedvi._constants import SCHEMA_HASH
from scfedvi.data.schema import FederationSchema
from scfedvi.data.summary import SiteSummary
from scfedvi.federation import setup_protocol
from scfedvi.federation.setup_protocol import GENES, SUMMARY, SetupQuery, SiteInventory
from scfedvi.flower import messages as m

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.flower.exchange import Exchange
    from scfedvi.flower.settings import AppSettings

log = logging.getLogger(__name__)
#: The Flower message type of each setup step.
MESSAGE_TYPE = {GENES: m.GENES, SUMMARY: m.SUMMARY}


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


# -- the setup queries and replies as Flower records -----------------------------------------
def query_to_record(q: SetupQuery) -> RecordDict:
    """A :class:`SetupQuery` as a message's content (the step is the message type)."""
    if q.step == GENES:
        return RecordDict({m.CONFIG: ConfigRecord({})})
    cfg = {"genes": list(q.genes), "batches": list(q.pooled_batches)}
    rd = RecordDict({m.CONFIG: ConfigRecord(cfg)})  # type: ignore[arg-type]
    if q.pooled is not None:  # the second pass: pooled moments, clip values fitted on them
        clips = q.clip_values or {}
        rd[m.STATS] = m.params_to_record({b: _arr(v) for b, v in clips.items()})
        rd[m.POOLED] = m.pooled_to_record(q.pooled)
    return rd


def record_to_query(content: RecordDict, step: str) -> SetupQuery:
    """Inverse of :func:`query_to_record`."""
    if step == GENES:
        return SetupQuery(GENES)
    c = content.config_records[m.CONFIG]
    universe = tuple(str(g) for g in c["genes"])  # type: ignore[union-attr]
    shared = tuple(str(b) for b in c.get("batches", []))  # type: ignore[union-attr]
    if m.STATS not in content:
        return SetupQuery(SUMMARY, genes=universe, pooled_batches=shared)
    clips = {b: v.tolist() for b, v in m.record_to_params(content.array_records[m.STATS]).items()}
    rec = content.array_records.get(m.POOLED)
    pooled = {} if rec is None else m.record_to_pooled(rec)
    return SetupQuery(
        SUMMARY, genes=universe, pooled_batches=shared, pooled=pooled, clip_values=clips
    )


def reply_to_record(reply: SiteInventory | SiteSummary) -> RecordDict:
    """A site's setup reply as a message's content."""
    if isinstance(reply, SiteInventory):
        batches = list(reply.batch_counts)
        cfg = {
            m.SITE: reply.site,
            "genes": list(reply.genes),
            "batches": batches,
            "counts": [int(reply.batch_counts[b]) for b in batches],
        }
        return RecordDict({m.CONFIG: ConfigRecord(cfg)})  # type: ignore[arg-type]
    cfg_rec, arrays = m.summary_to_records(reply)
    return RecordDict({m.CONFIG: cfg_rec, m.STATS: arrays})


def record_to_reply(
    content: RecordDict, step: str, universe: tuple[str, ...]
) -> SiteInventory | SiteSummary:
    """Inverse of :func:`reply_to_record` (``universe``: the genes the summary query sent)."""
    c = content.config_records[m.CONFIG]
    if step == SUMMARY:
        return m.records_to_summary(c, content.array_records[m.STATS], universe)
    batches = [str(b) for b in c.get("batches", [])]  # type: ignore[union-attr]
    counts = [int(n) for n in c.get("counts", [])]  # type: ignore[union-attr]
    genes = tuple(str(g) for g in c["genes"])  # type: ignore[union-attr]
    return SiteInventory(str(c[m.SITE]), genes, dict(zip(batches, counts, strict=True)))


def harmonize(
    ex: Exchange, nodes: set[int], app: AppSettings, min_sites: int
) -> tuple[FederationSchema, dict[int, str]]:
    """:func:`~scfedvi.federation.setup_protocol.run_setup` over Flower messages: returns
    (schema, node -> site). A step that fewer than ``min_sites`` sites answer (in all) ends
    the setup with a :class:`SetupError`."""
    node_of: dict[str, int] = {}
    live: set[str] = set()

    def ask(step: str, queries: Mapping[str, SetupQuery] | None) -> dict[str, Any]:
        if queries is None:
            asked = {n: SetupQuery(step) for n in nodes}
        else:
            asked = {node_of[s]: q for s, q in queries.items()}
        res = ex.ask(
            {n: query_to_record(q) for n, q in asked.items()}, MESSAGE_TYPE[step], app.setup_timeout
        )
        if step == GENES and queries is None:  # the sites name themselves, once
            names = {n: str(r.content.config_records[m.CONFIG][m.SITE]) for n, r in res.ok.items()}
            _check_enough(names, res.failed, min_sites, "gene names")
            node_of.update({s: n for n, s in names.items()})
            live.update(names.values())
        else:  # a node's replies are filed under the name it gave first
            names = {n: s for s, n in node_of.items()}
            live.difference_update(s for s, n in node_of.items() if n in res.failed)
            _check_enough({node_of[s]: s for s in live}, res.failed, min_sites, f"{step}s")
        return {
            names[n]: record_to_reply(r.content, step, asked[n].genes) for n, r in res.ok.items()
        }

    schema, kept = setup_protocol.run_setup(
        ask,
        None,  # the sites announce themselves: the federation's order is their names sorted
        batch_key=app.batch_key,
        n_top_genes=app.n_top_genes or None,
        min_sites_per_gene=app.min_sites_per_gene or None,
        label_key=app.label_key or None,
        layer=app.layer or None,
    )
    return schema, {node_of[s]: s for s in kept}


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
