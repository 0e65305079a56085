"""Conversions between the core's types and Flower records; the protocol's names.

Parameters travel as ``dict[str, numpy.ndarray]`` in the core and as :class:`ArrayRecord` on
the wire; metrics as :class:`MetricRecord`; everything else (schema hash, round, gene names,
counts) as :class:`ConfigRecord`. Nothing here knows the algorithm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from scfedvi._constants import NUM_EXAMPLES, SCHEMA_HASH
from scfedvi.privacy.policy import PooledBatch

if TYPE_CHECKING:  # harmonize imports pandas: only the setup summaries need it
    from scfedvi.data.harmonize import SiteSummary

#: Message types (``<category>.<action>``) of the protocol, in the order they are used.
GENES = "query.genes"  # setup 1: the site's gene names
SUMMARY = "query.summary"  # setup 2: per-batch, per-gene summaries over the universe
SCHEMA = "query.schema"  # setup 3: the schema; the site checks that its data fits
TRAIN = "train"  # one round of local training
BALANCE = "query.balance"  # after training: federated k-means for balanced statistics
EMBED = "query.embed"  # final: the site embeds its cells locally, returns a count
SECAGG = "query.secagg"  # secure aggregation's stages 2-4 of a round (scfedvi.flower.secagg)

#: Record names inside a message's content.
ARRAYS, CONTROL, CONFIG, METRICS, STATS = "arrays", "control", "config", "metrics", "stats"
#: Balancing: the steps so far, the coordinator's centroids, a site's cluster reply.
STEPS, CENTROIDS, CLUSTERS = "balance-steps", "centroids", "clusters"
#: Setup: the pooled moments of the batches held by several sites (with their clip values).
POOLED = "pooled"

ROUND = "round"
SITE = "site"
BATCH_COUNTS = "batch-counts"  # list of [index, count] flattened: [i0, n0, i1, n1, ...]
N_EMBEDDED = "n-embedded"
PHASE = "phase"
N_CLUSTERS = "n-clusters"
SEED = "seed"
#: Training: the site's local work this round, from the coordinator's schedule.
LOCAL_EPOCHS, LOCAL_STEPS = "local-epochs", "local-steps"
#: Setup: the site's number of cells (the schedule follows the federation's cells).
N_CELLS = "n-cells"


def work_to_config(work: tuple[int | None, int | None]) -> dict[str, int]:
    """A site's ``(local_epochs, local_steps)`` as round-config entries."""
    epochs, steps = work
    return {LOCAL_STEPS: int(steps)} if steps is not None else {LOCAL_EPOCHS: int(epochs or 0)}


def config_to_work(config: Mapping) -> tuple[int | None, int | None] | None:
    """Inverse of :func:`work_to_config` (``None``: the message carries no schedule)."""
    if LOCAL_STEPS in config:
        return None, int(config[LOCAL_STEPS])
    if LOCAL_EPOCHS in config:
        return int(config[LOCAL_EPOCHS]), None
    return None


def params_to_record(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``dict[str, ndarray]`` -> :class:`ArrayRecord` (names and order kept)."""
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
    return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in params.items()})


def record_to_params(record: ArrayRecord) -> dict[str, np.ndarray]:
    """:class:`ArrayRecord` -> ``dict[str, ndarray]``."""
    return {k: np.asarray(a.numpy()) for k, a in record.items()}


def metrics_to_record(metrics: Mapping[str, float], num_examples: int) -> MetricRecord:
    """Scalar metrics plus ``num-examples`` (the weight of the site's update)."""
    out: dict[str, int | float | list[int] | list[float]] = {
        k: float(v) for k, v in metrics.items()
    }
    out[NUM_EXAMPLES] = int(num_examples)
    return MetricRecord(out)


def record_to_metrics(record: MetricRecord) -> tuple[dict[str, float], int]:
    """Inverse of :func:`metrics_to_record`: ``(metrics, num_examples)``."""
    d = {k: v for k, v in record.items() if isinstance(v, int | float)}
    n = int(d.pop(NUM_EXAMPLES))
    return {k: float(v) for k, v in d.items()}, n


def batch_counts_to_list(counts: Mapping[int, int]) -> list[int]:
    return [int(x) for b, n in sorted(counts.items()) for x in (b, n)]


def list_to_batch_counts(values: list[int]) -> dict[int, int]:
    return {int(values[i]): int(values[i + 1]) for i in range(0, len(values), 2)}


def round_config(
    schema_hash: str, round_idx: int, **extra: str | int | float | list[int]
) -> ConfigRecord:
    """What every message from the server carries: the schema hash and the round index."""
    return ConfigRecord({SCHEMA_HASH: schema_hash, ROUND: int(round_idx), **extra})


# -- harmonization summaries -----------------------------------------------------------------
def summary_to_records(s: SiteSummary) -> tuple[ConfigRecord, ArrayRecord]:
    """A :class:`SiteSummary` as (names and counts, per-batch per-gene vectors).

    Batch ``i`` (in ``batches`` order) has arrays ``"<i>/<field>"``, unless the site did not
    summarise it (too few cells for its policy: a count only); the gene names are not
    repeated (they are the universe the server sent).
    """
    from scfedvi.data.harmonize import BATCH_FIELDS

    batches = list(s.batch_counts)
    cfg: dict = {SITE: s.site, "batches": batches, "counts": [s.batch_counts[b] for b in batches]}
    if s.labels is not None:
        cfg["labels"] = list(s.labels)
    arrays = {
        f"{i}/{f}": np.asarray(s.stats[b][f], dtype=np.float64)
        for i, b in enumerate(batches)
        if b in s.stats
        for f in BATCH_FIELDS
    }
    return ConfigRecord(cfg), params_to_record(arrays)


def records_to_summary(
    cfg: ConfigRecord, arrays: ArrayRecord, genes: tuple[str, ...]
) -> SiteSummary:
    """Inverse of :func:`summary_to_records` given the universe ``genes``."""
    from scfedvi.data.harmonize import BATCH_FIELDS, SiteSummary

    batches = [str(b) for b in cfg["batches"]]  # type: ignore[union-attr]
    counts = [int(n) for n in cfg["counts"]]  # type: ignore[union-attr]
    p = record_to_params(arrays)
    stats = {
        b: {f: p[f"{i}/{f}"] for f in BATCH_FIELDS}
        for i, b in enumerate(batches)
        if f"{i}/{BATCH_FIELDS[0]}" in p
    }
    labels = cfg.get("labels")
    return SiteSummary(
        site=str(cfg[SITE]),
        genes=genes,
        batch_counts=dict(zip(batches, counts, strict=True)),
        stats=stats,
        labels=None if labels is None else tuple(str(x) for x in labels),  # type: ignore[union-attr]
    )


def pooled_to_record(pooled: Mapping[str, PooledBatch]) -> ArrayRecord:
    """Pooled moments per batch as arrays ``"<field>/<batch>"`` (``n``, ``sums``, ``sums_sq``)."""
    out: dict[str, np.ndarray] = {}
    for b, pb in pooled.items():
        out[f"n/{b}"] = np.asarray([pb.n], dtype=np.int64)
        out[f"sums/{b}"] = np.asarray(pb.sums, dtype=np.float64)
        out[f"sums_sq/{b}"] = np.asarray(pb.sums_sq, dtype=np.float64)
    return params_to_record(out)


def record_to_pooled(record: ArrayRecord) -> dict[str, PooledBatch]:
    """Inverse of :func:`pooled_to_record`."""
    p = record_to_params(record)
    batches = [k.split("/", 1)[1] for k in p if k.startswith("n/")]
    return {b: PooledBatch(int(p[f"n/{b}"][0]), p[f"sums/{b}"], p[f"sums_sq/{b}"]) for b in batches}
