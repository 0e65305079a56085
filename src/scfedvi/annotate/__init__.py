"""Federated scANVI: cell-type labels across sites, label transfer, and sites that join later.

:class:`ScFedANVI` is built from a trained :class:`~scfedvi.model.ScFedVI` model
(:meth:`ScFedANVI.from_scfedvi`, as scvi-tools' ``SCANVI.from_scvi_model``), trained by the
same federated rounds, and predicts each site's labels at that site
(:meth:`ScFedANVI.predict`). :func:`load_query_data` fine-tunes a new site's batch parameters
at that site alone (scArches).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scfedvi.annotate.site_steps import CONFIDENCE_KEY, LABEL_KEY, LATENT_KEY, NOVELTY_KEY
from scfedvi.config import AnnotateConfig

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.annotate.model import ScFedANVI
    from scfedvi.annotate.query import load_query_data


def __getattr__(name: str) -> Any:
    """The model and query fine-tuning (torch) on first use: a site's label-count answer
    (:mod:`scfedvi.annotate.site_steps`) imports this package without torch."""
    if name == "ScFedANVI":
        from scfedvi.annotate.model import ScFedANVI

        return ScFedANVI
    if name == "load_query_data":
        from scfedvi.annotate.query import load_query_data

        return load_query_data
    raise AttributeError(f"module 'scfedvi.annotate' has no attribute {name!r}")


__all__ = [
    "CONFIDENCE_KEY",
    "LABEL_KEY",
    "LATENT_KEY",
    "NOVELTY_KEY",
    "AnnotateConfig",
    "ScFedANVI",
    "load_query_data",
]
