"""The federated scANVI stage at the coordinator, the same in both runtimes.

One orchestration, two transports, as scFedVI's rounds (:mod:`scfedvi.federation.rounds`):

1. :func:`label_schema`: each site's label counts (:func:`~scfedvi.annotate.site_steps.
   answer_labels`, within the site's policy: only counts leave it) are harmonized
   (:func:`~scfedvi.data.labels.harmonize_labels`) into the schema's labels;
2. :func:`train_annotate`: the scANVI module is initialised from the trained scFedVI weights
   (as scvi-tools' ``SCANVI.from_scvi_model``), trained by
   :func:`~scfedvi.federation.rounds.run_rounds` with :class:`LabelCoordinator`, balanced
   (:func:`~scfedvi.federation.balance.run_balance`), and summarised: each label's latent
   centroid and the pooled latent moments, from each site's sums
   (:func:`~scfedvi.annotate.site_steps.answer_summary`).

The transport (:class:`AnnotateTransport`) carries a round, the balancing and the summaries:
in process :class:`scfedvi.annotate.model.InProcessAnnotate`, over Flower
:class:`scfedvi.flower.annotate_server.FlowerAnnotate`. Each site then predicts its own cells
(:func:`~scfedvi.annotate.site_steps.write_predictions`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from scfedvi.annotate.site import label_centroids, pooled_moments
from scfedvi.config import AnnotateConfig, RunConfig
from scfedvi.data.labels import harmonize_labels
from scfedvi.federation.aggregate import SiteUpdate, reject_invalid
from scfedvi.federation.coordinator import Coordinator
from scfedvi.federation.rounds import RoundTransport, run_rounds
from scfedvi.module.scanvi import SCANVAE, label_layer_keys
from scfedvi.train.params import Params, batch_owned_columns, get_state, set_state, shared_keys

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.data.schema import FederationSchema
    from scfedvi.federation.balance import BalanceStep

log = logging.getLogger(__name__)

#: A site's summary after training: (per-label sums or None, sums of all its codes).
Summary = tuple[
    tuple[np.ndarray, np.ndarray, np.ndarray] | None, tuple[float, np.ndarray, np.ndarray]
]


class AnnotateTransport(RoundTransport, Protocol):
    """How a runtime carries the scANVI stage to the sites (a round: :class:`RoundTransport`)."""

    def start(self, coordinator: Coordinator) -> None:
        """The stage's coordinator, before the first round."""
        ...

    def balance(self, params: Params) -> list[BalanceStep]:
        """Composition balancing with the trained ``params`` (its steps)."""
        ...

    def summaries(self, params: Params, steps: Sequence[BalanceStep]) -> list[Summary]:
        """Each site's :func:`~scfedvi.annotate.site_steps.answer_summary`, in site order."""
        ...


def label_schema(
    counts: Mapping[str, Mapping[str, int]],
    schema: FederationSchema,
    *,
    label_key: str,
    unlabeled_category: str,
) -> FederationSchema:
    """The scFedVI schema with the federation's labels (the sorted union of the sites' label
    names, then the unlabelled category) from each site's label counts."""
    known = harmonize_labels(counts, label_key=label_key, unlabeled_category=unlabeled_category)
    return replace(schema, labels=(*known, unlabeled_category), label_key=label_key)


def annotate_run_config(config: RunConfig, annotate: AnnotateConfig) -> RunConfig:
    """The run's configuration with scANVI's rounds and local epochs."""
    return replace(
        config,
        train=replace(config.train, local_epochs=annotate.local_epochs, local_steps=None),
        federation=replace(config.federation, n_rounds=annotate.n_rounds),
    )


def new_module(
    schema: FederationSchema,
    config: RunConfig,
    annotate: AnnotateConfig,
    n_batches: int | None = None,
) -> SCANVAE:
    """A freshly initialised scANVI module of ``schema`` (its labels, then the unlabelled one)."""
    assert schema.labels is not None
    return SCANVAE(
        schema.n_genes,
        n_batches or schema.n_batches,
        len(schema.labels) - 1,
        config.model,
        linear_classifier=annotate.linear_classifier,
        classification_ratio=annotate.classification_ratio,
    )


@dataclass
class Trained:
    """The result of :func:`train_annotate`."""

    params: Params
    history: list[dict[str, Any]]
    balance: list[BalanceStep]
    #: each label's latent centroid and mean squared distance to it (None: no labelled site)
    label_centroids: tuple[np.ndarray, np.ndarray] | None
    #: mean and covariance of all sites' latent codes (the classifier's statistics)
    latent_moments: tuple[np.ndarray, np.ndarray] | None
    schedule: dict[str, Any] = field(default_factory=dict)


def train_annotate(
    transport: AnnotateTransport,
    schema: FederationSchema,
    init_params: Params,
    config: RunConfig,
    annotate: AnnotateConfig,
    n_cells: Mapping[str, int],
) -> Trained:
    """The coordinator's side of the scANVI stage (rounds, balancing, summaries).

    Parameters
    ----------
    transport
        The runtime (:class:`AnnotateTransport`).
    schema
        The schema with the federation's labels (:func:`label_schema`).
    init_params
        The trained scFedVI model's parameters (the new layers start fresh).
    config, annotate
        The scFedVI run's configuration and the scANVI settings.
    n_cells
        Site -> its cells (the schedule's input, as scFedVI's).
    """
    if config.privacy.secure_aggregation:
        raise ValueError(
            "the scANVI stage does not run under secure aggregation yet "
            "(PrivacyConfig.secure_aggregation): annotate with a run configuration without it"
        )
    cfg = annotate_run_config(config, annotate)
    coord = LabelCoordinator(schema.n_genes, schema.n_batches, cfg, schema_hash=schema.hash)
    torch.manual_seed(cfg.federation.seed)
    module = new_module(schema, cfg, annotate)
    set_state(module, {k: v for k, v in init_params.items() if k in module.state_dict()})
    use_module(coord, module, cfg)
    coord.resolve_schedule(n_cells)
    transport.start(coord)
    run_rounds(coord, transport)
    steps = transport.balance(coord.params) if cfg.balance_clusters else []
    replies = transport.summaries(coord.params, steps)
    per_label = [s for s, _ in replies if s is not None]
    assert coord.schedule is not None
    return Trained(
        params=coord.params,
        history=list(coord.history),
        balance=list(steps),
        label_centroids=label_centroids(per_label) if per_label else None,
        latent_moments=pooled_moments([m for _, m in replies]),
        schedule=coord.schedule.to_dict(),
    )


class LabelCoordinator(Coordinator):
    """The coordinator of federated scANVI: as scFedVI's, but the classifier is label-owned.

    The classifier's parameters are averaged over the sites weighted by their labelled
    training cells (the ``labelled_cells`` count each site reports), as batch-owned columns
    are averaged over the sites holding the batch: a site without labels does not pull the
    classifier back towards the round's start. Only with plain FedAvg and without DP (whose
    noised average is kept as it is).
    """

    def aggregate(self, updates: Sequence[SiteUpdate], dropped: Sequence[str] = ()) -> None:
        super().aggregate(updates, dropped)
        if self.config.privacy.clip_norm is not None or self.server_opt.kind != "fedavg":
            return
        kept, _ = reject_invalid(updates)
        w = np.array([u.metrics.get("labelled_cells", 0.0) for u in kept], dtype=np.float64)
        if w.sum() <= 0:
            return
        w /= w.sum()
        for k in self.keys:
            if k.startswith("classifier.") and np.issubdtype(self.params[k].dtype, np.floating):
                avg = sum(
                    wi * np.asarray(u.params[k], np.float64) for wi, u in zip(w, kept, strict=True)
                )
                self.params[k] = np.asarray(avg, dtype=self.params[k].dtype)


def scanvi_batch_owned(module: SCANVAE) -> dict[str, tuple[int, int]]:
    """The batch-owned columns of scVI's layers (the label one-hot columns of the ``z2`` layers
    belong to no batch)."""
    label = set(label_layer_keys(module))
    return {k: v for k, v in batch_owned_columns(module).items() if k not in label}


def use_module(coord: Coordinator, module: SCANVAE, cfg: RunConfig) -> None:
    """Point a coordinator built for scVI at the scANVI module and its initial weights."""
    full = get_state(module)
    # the fixed prior p(y) never travels (DP noise would leave it no distribution)
    coord.keys = [k for k in shared_keys(module, cfg.federation.norm_stats) if k != "y_prior"]
    coord.params = {k: full[k] for k in coord.keys}
    coord.initial_local = {k: v for k, v in full.items() if k not in set(coord.keys)}
    coord.batch_owned = scanvi_batch_owned(module) if cfg.federation.batch_owned else {}
    if coord.control is not None:
        coord.control = {
            n: np.zeros(tuple(p.shape), np.float32) for n, p in module.named_parameters()
        }
