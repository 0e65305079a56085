"""Federated scANVI: cell-type labels across sites, label transfer, and sites that join later.

:class:`ScFedANVI` is built from a trained :class:`~scfedvi.model.ScFedVI` model
(:meth:`ScFedANVI.from_scfedvi`, as scvi-tools' ``SCANVI.from_scvi_model``), trained by the
same federated rounds, and predicts each site's labels at that site
(:meth:`ScFedANVI.predict`). :func:`load_query_data` fine-tunes a new site's batch parameters
at that site alone (scArches).
"""

from __future__ import annotations

from scfedvi.annotate.model import ScFedANVI
from scfedvi.annotate.query import load_query_data
from scfedvi.annotate.site_steps import CONFIDENCE_KEY, LABEL_KEY, LATENT_KEY, NOVELTY_KEY
from scfedvi.config import AnnotateConfig

__all__ = [
    "CONFIDENCE_KEY",
    "LABEL_KEY",
    "LATENT_KEY",
    "NOVELTY_KEY",
    "AnnotateConfig",
    "ScFedANVI",
    "load_query_data",
]
