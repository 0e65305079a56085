"""What a site of federated scANVI answers, the same in both runtimes.

The in-process runtime (:class:`~scfedvi.annotate.model.ScFedANVI`) calls these functions on
each site's data directly; over Flower the site's ``query.annotate`` handler
(:mod:`scfedvi.flower.annotate`) calls them in the site's process. Each returns only what may
leave the site: label counts (:func:`answer_labels`), per-label and overall sums of the
latent codes over at least ``min_cluster_cells`` cells (:func:`answer_summary`), and for the
predictions (:func:`write_predictions`, written into the site's own AnnData) two counts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from scfedvi.data.labels import site_label_counts

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from scfedvi.annotate.site import AnnotateSite
    from scfedvi.config import AnnotateConfig, SitePolicy

log = logging.getLogger(__name__)
#: Where a site's predictions go: its scANVI latent, label, top probability, novelty ratio.
LATENT_KEY = "X_scFedANVI"
LABEL_KEY = "scfedvi_label"
CONFIDENCE_KEY = "scfedvi_label_confidence"
NOVELTY_KEY = "scfedvi_label_novelty"


def answer_labels(
    adata: AnnData,
    *,
    site: str,
    label_key: str,
    unlabeled_category: str,
    policy: SitePolicy | None = None,
) -> dict[str, int]:
    """The site's cells per label name in ``obs[label_key]`` (the scANVI stage's setup), if
    its policy allows that column (``SitePolicy.allowed_label_keys``; ``None``: the default
    policy, with ``label_key`` as the site's own)."""
    from scfedvi.config import SitePolicy
    from scfedvi.privacy.policy import refuse

    policy = SitePolicy().allowing_label_key(label_key) if policy is None else policy
    if label_key not in policy.allowed_label_keys:
        raise refuse(
            site,
            f"the label counts of obs[{label_key!r}] were asked for, and that column is not "
            f"among its policy's allowed label keys {list(policy.allowed_label_keys)}",
            f"the site adds {label_key!r} to SitePolicy.allowed_label_keys (Flower: node config "
            f"label-key='{label_key}' or allowed-label-keys), or the run names an allowed column",
        )
    return site_label_counts(
        adata, site=site, label_key=label_key, unlabeled_category=unlabeled_category
    )


def answer_summary(
    worker: AnnotateSite, params: Any, steps: Sequence[Any], n_labels: int
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray] | None, tuple[float, np.ndarray, np.ndarray]]:
    """After training: ``(per-label sums of the labelled cells' codes or None, sums of all the
    site's codes)`` (:func:`~scfedvi.annotate.site.label_summary`,
    :func:`~scfedvi.annotate.site.latent_moments`), each over at least the site's policy's
    ``min_cluster_cells`` cells."""
    from scfedvi.annotate.site import label_summary, latent_moments

    z, min_cells = worker.embed(params, list(steps)), worker.policy.min_cluster_cells
    labels = worker.labelled_data.labels
    per_label = None
    if labels is not None and (labels >= 0).any():
        per_label = label_summary(z, labels, n_labels, min_cells)
    return per_label, latent_moments(z, min_cells)


def write_predictions(
    adata: AnnData,
    obs_names: Sequence[str] | np.ndarray,
    z: np.ndarray,
    probs: np.ndarray,
    *,
    labels: Sequence[str],
    annotate: AnnotateConfig,
    centroids: tuple[np.ndarray, np.ndarray] | None,
    site: str,
) -> dict[str, int]:
    """Write ``obsm['X_scFedANVI']``, ``obs['scfedvi_label']``, ``obs['scfedvi_label_confidence']``
    and ``obs['scfedvi_label_novelty']`` of the cells ``obs_names`` (the others NaN / the
    unlabelled category) into the site's ``adata``; returns the counts of cells predicted,
    below the confidence threshold and far from their label's centroid (see
    :class:`~scfedvi.config.AnnotateConfig`)."""
    import pandas as pd

    from scfedvi.annotate.site import novelty

    unl = annotate.unlabeled_category
    rows = adata.obs_names.get_indexer(pd.Index(obs_names))
    zf = np.full((adata.n_obs, z.shape[1]), np.nan, dtype=z.dtype)
    zf[rows] = z
    conf = np.full(adata.n_obs, np.nan)
    conf[rows] = probs.max(1)
    lab = np.full(adata.n_obs, unl, dtype=object)
    best = np.asarray(labels, dtype=object)[probs.argmax(1)]
    ok = probs.max(1) >= annotate.confidence_threshold
    lab[rows[ok]] = best[ok]
    novel = np.zeros(len(ok), dtype=bool)
    ratio = np.full(adata.n_obs, np.nan)
    if centroids is not None:
        r = novelty(z, probs.argmax(1), *centroids)
        ratio[rows] = r
        novel = r > annotate.novelty_ratio  # NaN (no centroid): not judged
        lab[rows[novel]] = unl
    adata.obs[NOVELTY_KEY] = ratio
    adata.obsm[LATENT_KEY] = zf
    adata.obs[LABEL_KEY] = pd.Categorical(lab, categories=[*labels, unl])
    adata.obs[CONFIDENCE_KEY] = conf
    n_low, n_novel = int((~ok).sum()), int((novel & ok).sum())
    if n_low or n_novel:
        log.warning(
            "site %r: of %d cells, %d have a top label probability below %.2f and %d more lie "
            "over %.1f times their label's mean squared distance from its centroid (obs[%r]): "
            "labelled %r in obs[%r]",
            site,
            len(ok),
            n_low,
            annotate.confidence_threshold,
            n_novel,
            annotate.novelty_ratio,
            NOVELTY_KEY,
            unl,
            LABEL_KEY,
        )
    return {"n-predicted": len(ok), "n-low-confidence": n_low, "n-novel": n_novel}
