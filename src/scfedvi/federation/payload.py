"""The privacy contract: what a site may send, checked against a whitelist.

A site sends (1) its harmonization summary (gene names, cells per batch, per-gene statistics),
(2) each round: parameter arrays named and shaped as the model's shared parameters (and, with
SCAFFOLD, control-variate deltas of the same shapes), its cell count, its cells per batch and
scalar metrics. Nothing with a cell dimension, no cell name, no label per cell.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from scfedvi.federation.aggregate import SiteUpdate

METRIC_KEYS = frozenset({"loss", "reconstruction", "kl", "steps", "seconds"})


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


def check_summary(summary: Mapping[str, Any], n_cells: int, *, site: str = "?") -> None:
    """Check a harmonization summary: JSON-able values, no list as long as the site's cells.

    Per-gene lists are allowed; a list with one entry per cell is not (checked by length, so a
    site whose gene count equals its cell count needs no special case only if lists hold genes).
    """

    def walk(x: Any, path: str) -> None:
        if isinstance(x, Mapping):
            for k, v in x.items():
                walk(v, f"{path}.{k}")
        elif isinstance(x, list | tuple):
            if len(x) == n_cells and not path.endswith(("genes", "clip_values")):
                raise PayloadViolation(f"site {site!r}: {path} has one entry per cell ({n_cells})")
            for i, v in enumerate(x[:3]):
                walk(v, f"{path}[{i}]")
        elif isinstance(x, np.ndarray):
            raise PayloadViolation(f"site {site!r}: {path} is an array; summaries are JSON values")
        elif not (x is None or isinstance(x, str | numbers.Real)):
            raise PayloadViolation(
                f"site {site!r}: {path} has a non-JSON value of type {type(x).__name__}"
            )

    walk(summary, "summary")
