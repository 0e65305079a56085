"""Integration metrics: LISI (per cell, as harmonypy) and the scIB metrics (scib-metrics).

The import is light (numpy, scipy); :func:`scib_scores` imports scib-metrics and jax on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scfedvi.metrics.lisi import (
    clisi_score,
    compute_lisi,
    exact_lisi_of,
    factorize_labels,
    ilisi_score,
    lisi_per_cell,
    neighbor_weights,
    scaled_median_lisi,
    summarize_lisi,
)
from scfedvi.metrics.neighbors import Neighbors, compute_neighbors

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.metrics.scib import scib_scores

__all__ = [
    "Neighbors",
    "clisi_score",
    "compute_lisi",
    "compute_neighbors",
    "exact_lisi_of",
    "factorize_labels",
    "ilisi_score",
    "lisi_per_cell",
    "neighbor_weights",
    "scaled_median_lisi",
    "scib_scores",
    "summarize_lisi",
]


def __getattr__(name: str) -> Any:
    if name == "scib_scores":
        from scfedvi.metrics.scib import scib_scores

        return scib_scores
    raise AttributeError(f"module 'scfedvi.metrics' has no attribute {name!r}")
