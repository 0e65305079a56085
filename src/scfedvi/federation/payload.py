"""The privacy contract: what a site may send, checked against a whitelist.

A site sends (1) its harmonization summary (gene names, cells per batch, per-gene statistics),
(2) each round: parameter arrays named and shaped as the model's shared parameters (and, with
SCAFFOLD, control-variate deltas of the same shapes), its cell count, its cells per batch and
scalar metrics (:data:`METRIC_KEYS`: means over its cells, including the validation loss on its
held-out cells), (3) after training, for balanced statistics: cluster centroids or sums in
the latent space, of clusters holding at least ``MIN_CLUSTER_CELLS`` (or the site policy's
``min_cluster_cells``) of its cells, and per-cluster counts. Nothing with a cell dimension, no cell name, no label per cell.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # aggregate imports torch: a site's setup and balancing answers need none
    from scfedvi.federation.aggregate import SiteUpdate

#: (``labelled_cells``: federated scANVI's count of a site's labelled training cells, which
#: weights the classifier's average, :class:`scfedvi.annotate.protocol.LabelCoordinator`)
METRIC_KEYS = frozenset(
    {"loss", "reconstruction", "kl", "validation_loss", "steps", "seconds", "labelled_cells"}
)


class PayloadViolation(AssertionError):
    """A site was about to send something outside the whitelist."""


def check_update(
    update: SiteUpdate,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    control_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Check one round's answer of a site against the whitelist."""
    where = f"site {update.site!r}"
    if set(update.params) != set(shapes):
        extra, missing = set(update.params) - set(shapes), set(shapes) - set(update.params)
        raise PayloadViolation(
            f"{where}: parameter names differ (extra {sorted(extra)[:3]}, missing {sorted(missing)[:3]})"
        )
    for k, v in update.params.items():
        if tuple(np.shape(v)) != tuple(shapes[k]):
            raise PayloadViolation(f"{where}: {k!r} has shape {np.shape(v)}, expected {shapes[k]}")
    if update.control_delta is not None:
        allowed = control_shapes or {}
        for k, v in update.control_delta.items():
            if k not in allowed or tuple(np.shape(v)) != tuple(allowed[k]):
                raise PayloadViolation(f"{where}: control delta {k!r} is not a model parameter")
    if not isinstance(update.num_examples, numbers.Integral):
        raise PayloadViolation(f"{where}: num_examples must be an integer")
    for b, c in update.batch_counts.items():
        if not isinstance(b, numbers.Integral) or not isinstance(c, numbers.Integral):
            raise PayloadViolation(f"{where}: batch counts must map batch index -> cell count")
    for k, v in update.metrics.items():
        if k not in METRIC_KEYS or not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise PayloadViolation(f"{where}: metric {k!r}={v!r} is not a whitelisted scalar")


SUMMARY_KEYS = frozenset({"site", "genes", "batch_counts", "stats", "labels"})


def check_summary(summary: Mapping[str, Any], n_cells: int, *, site: str = "?") -> None:
    """Check a harmonization summary against its whitelist (structure, not guesses by length).

    Allowed: ``site`` (str), ``genes`` (gene names), ``batch_counts`` (batch -> int),
    ``stats`` (batch -> statistic -> one number per gene, or one scalar), ``labels`` (the
    distinct label categories, no repeats). Anything else, including a list with one entry per
    cell where a per-gene list belongs (``n_cells != n_genes``), is a violation.
    """
    where = f"site {site!r}"
    extra = set(summary) - SUMMARY_KEYS
    if extra:
        raise PayloadViolation(
            f"{where}: summary has fields outside the whitelist: {sorted(extra)}"
        )
    genes = summary.get("genes", [])
    if not isinstance(genes, list | tuple) or not all(isinstance(g, str) for g in genes):
        raise PayloadViolation(f"{where}: summary.genes must be a list of gene names")
    n_genes = len(genes)
    for b, c in (summary.get("batch_counts") or {}).items():
        if not isinstance(b, str) or not isinstance(c, numbers.Integral):
            raise PayloadViolation(f"{where}: summary.batch_counts must map batch -> cell count")
    for b, stats in (summary.get("stats") or {}).items():
        if not isinstance(stats, Mapping):
            raise PayloadViolation(f"{where}: summary.stats.{b} must map statistic -> values")
        for k, v in stats.items():
            path = f"summary.stats.{b}.{k}"
            if isinstance(v, numbers.Real) and not isinstance(v, bool):
                continue
            if not isinstance(v, list | tuple) or len(v) != n_genes:
                n = len(v) if isinstance(v, list | tuple) else type(v).__name__
                what = " (one entry per cell)" if n == n_cells else ""
                raise PayloadViolation(
                    f"{where}: {path} has {n} values, not one per gene ({n_genes}){what}"
                )
            if not all(isinstance(x, numbers.Real) for x in v[:50]):
                raise PayloadViolation(f"{where}: {path} holds non-numeric values")
    labels = summary.get("labels")
    if labels is not None:
        if not isinstance(labels, list | tuple) or len(set(labels)) != len(labels):
            raise PayloadViolation(f"{where}: summary.labels must be the distinct label categories")


def check_balance_reply(
    site: str,
    phase: str,
    values: np.ndarray,
    counts: np.ndarray,
    *,
    n_clusters: int,
    n_latent: int,
    min_cells: int | None = None,
) -> None:
    """Check a site's balancing reply: its local summary (``phase="centroids"``: at most
    ``n_clusters`` centroids, each of at least ``min_cells`` cells) or per-cluster sums
    (``"sums"``: nothing from a cluster of fewer than ``min_cells`` cells but its count), with
    their counts. ``min_cells`` defaults to
    :data:`~scfedvi.federation.balance.MIN_CLUSTER_CELLS` (a site's policy may ask more)."""
    from scfedvi.federation.balance import CENTROIDS, MIN_CLUSTER_CELLS, SUMS

    least = MIN_CLUSTER_CELLS if min_cells is None else int(min_cells)
    where = f"site {site!r}, balancing ({phase})"
    values, counts = np.asarray(values), np.asarray(counts)
    if phase not in (CENTROIDS, SUMS):
        raise PayloadViolation(f"{where}: unknown phase")
    if values.ndim != 2 or values.shape[1] != n_latent or len(values) > n_clusters:
        raise PayloadViolation(
            f"{where}: values of shape {values.shape}, expected at most {n_clusters} rows of "
            f"{n_latent}"
        )
    if counts.shape != (len(values),) or not np.issubdtype(counts.dtype, np.integer):
        raise PayloadViolation(f"{where}: counts must be one integer per cluster")
    if not np.isfinite(values).all():
        raise PayloadViolation(f"{where}: values that are not finite")
    small = counts < least
    if phase == CENTROIDS and small.any():
        raise PayloadViolation(f"{where}: a centroid of fewer than {least} cells")
    if phase == SUMS and np.any(values[small] != 0):
        raise PayloadViolation(f"{where}: a sum over fewer than {least} cells")
