"""ScFedANVI: federated scANVI over the sites of a trained scFedVI model (the user API).

As scvi-tools' ``SCANVI.from_scvi_model``: the scANVI model starts from the trained scVI
weights (new layers freshly initialised) and is trained by the same federated rounds as scFedVI
(batch-owned averaging, site-local statistics, balancing for the embedding, DP where enabled),
with the semi-supervised loss at every site. Each site predicts its own cells' labels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from scfedvi._saved import load_model_dir, save_model_dir
from scfedvi.annotate.protocol import (
    LabelCoordinator,
    Summary,
    annotate_run_config,
    label_schema,
    new_module,
    scanvi_batch_owned,
    train_annotate,
)
from scfedvi.annotate.site import AnnotateSite, LabelledSiteTensors
from scfedvi.annotate.site_steps import answer_labels, answer_summary, write_predictions
from scfedvi.config import AnnotateConfig, RunConfig
from scfedvi.data.errors import SchemaMismatchError
from scfedvi.data.schema import FederationSchema, SiteData, project
from scfedvi.federation.inprocess import InProcessRounds
from scfedvi.module.scanvi import SCANVAE
from scfedvi.train.params import Params

__all__ = [  # and, for existing imports, AnnotateConfig (scfedvi.config) and the obs keys
    "AnnotateConfig",
    "InProcessAnnotate",
    "LabelCoordinator",
    "ScFedANVI",
    "annotate_worker",
    "project_new_site",
    "scanvi_batch_owned",
]

log = logging.getLogger(__name__)
#: The metadata file of a saved scANVI model (the rest as :mod:`scfedvi._saved`).
CONFIG_FILE = "annotate.json"


class ScFedANVI:
    """Federated scANVI: build it with :meth:`from_scfedvi`, :meth:`train`, :meth:`predict`.

    Parameters
    ----------
    schema
        The federation schema with labels: the known labels, then the unlabelled category.
    config
        The scFedVI run's configuration (architecture, local training, federation).
    annotate
        The scANVI settings.
    sites
        Site name -> AnnData (in-process sites; empty for a loaded model).
    layer
        Layer with raw counts.
    """

    def __init__(
        self,
        schema: FederationSchema,
        config: RunConfig,
        annotate: AnnotateConfig | None = None,
        sites: Mapping[str, ad.AnnData] | None = None,
        *,
        layer: str | None = None,
    ) -> None:
        self.annotate = annotate or AnnotateConfig()
        if schema.labels is None or schema.labels[-1] != self.annotate.unlabeled_category:
            raise ValueError(
                "ScFedANVI: the schema's labels must end with the unlabelled category "
                f"{self.annotate.unlabeled_category!r}; build the model with "
                "ScFedANVI.from_scfedvi"
            )
        self.schema, self.config, self.layer = schema, config, layer
        self.labels: tuple[str, ...] = schema.labels[:-1]
        self.sites: dict[str, ad.AnnData] = dict(sites or {})
        self.params: Params | None = None
        self.init_params: Params | None = None
        self.history = pd.DataFrame()
        self._balance: list[Any] = []
        #: the sites' privacy policy (as :class:`~scfedvi.model.ScFedVI`'s; ``None``: default)
        self.policy: Any = None
        #: each label's latent centroid and mean squared distance to it (after training)
        self.label_centroids: tuple[np.ndarray, np.ndarray] | None = None
        #: mean and covariance of all sites' latent codes (the classifier's statistics)
        self.latent_moments: tuple[np.ndarray, np.ndarray] | None = None
        self._site_data: dict[str, SiteData] = {
            n: project(a, schema, site=n, layer=layer, batch_size=config.train.batch_size)
            for n, a in self.sites.items()
        }

    @property
    def n_labels(self) -> int:
        return len(self.labels)

    # -- set-up ------------------------------------------------------------------------------
    @classmethod
    def from_scfedvi(
        cls,
        model: Any,
        *,
        label_key: str | None = None,
        unlabeled_category: str = "Unknown",
        sites: Mapping[str, ad.AnnData] | None = None,
        annotate: AnnotateConfig | None = None,
    ) -> ScFedANVI:
        """scANVI initialised from a trained :class:`~scfedvi.model.ScFedVI` (as scvi-tools'
        ``SCANVI.from_scvi_model``); labels are harmonized from the sites' label counts.

        Parameters
        ----------
        model
            The trained scFedVI model (in memory, or ``ScFedVI.load(dir)``).
        label_key
            ``obs`` column of labels at every site (default: the model's schema's).
        unlabeled_category
            Its value for unlabelled cells.
        sites
            The sites' AnnData (default: the model's in-process sites).
        annotate
            Other settings (its ``unlabeled_category`` is replaced by the argument).
        """
        if model.params is None:
            raise RuntimeError("the scFedVI model is not trained: train or load it first")
        sites = dict(sites if sites is not None else model.sites)
        if not sites:
            raise ValueError(
                "no sites to train scANVI on: a loaded scFedVI model has none; pass sites="
                "{name: AnnData} (the command line: --site NAME=PATH)"
            )
        label_key = label_key or model.schema.label_key
        if label_key is None:
            raise ValueError("the scFedVI model has no label column: pass label_key=")
        policy = getattr(model, "policy", None)
        counts = {  # the setup of the scANVI stage: each site's label counts, in its policy
            s: answer_labels(
                a,
                site=s,
                label_key=label_key,
                unlabeled_category=unlabeled_category,
                policy=_own_policy(policy, s, model.schema.label_key),
            )
            for s, a in sites.items()
        }
        schema = label_schema(
            counts, model.schema, label_key=label_key, unlabeled_category=unlabeled_category
        )
        cfg = replace(annotate or AnnotateConfig(), unlabeled_category=unlabeled_category)
        out = cls(schema, model.config, cfg, sites, layer=model.layer)
        out.policy = policy
        out.init_params = dict(model.params)
        return out

    def new_module(self, n_batches: int | None = None) -> SCANVAE:
        """A freshly initialised scANVI module of this model's schema (``n_batches``: with
        that many batches, for a site that joins later)."""
        return new_module(self.schema, self.config, self.annotate, n_batches)

    @property
    def balance_steps(self) -> list[Any]:
        """The composition-balancing steps of the trained model (empty: none)."""
        return list(self._balance)

    def set_balance_steps(self, steps: Sequence[Any]) -> None:
        """Use ``steps`` as the model's balancing steps (a query model: the reference's)."""
        self._balance = list(steps)

    def _worker(
        self, name: str, sd: SiteData, labels: bool = True, config: RunConfig | None = None
    ) -> AnnotateSite:
        from scfedvi.privacy.policy import site_policy

        return annotate_worker(
            name,
            sd,
            self.schema,
            config or self.config,
            self.annotate,
            labels=labels,
            policy=site_policy(self.policy, name) if name in self._site_data else None,
        )

    # -- training ----------------------------------------------------------------------------
    def train_config(self) -> RunConfig:
        """The run's configuration with scANVI's rounds and local epochs."""
        return annotate_run_config(self.config, self.annotate)

    def train(self) -> pd.DataFrame:
        """Federated scANVI in process (``annotate.n_rounds`` rounds, balancing, the label
        centroids and latent moments): :func:`~scfedvi.annotate.protocol.train_annotate`, the
        orchestration the Flower app runs too; the history."""
        if not self._site_data:
            raise ValueError("this model has no sites to train on; build it with from_scfedvi")
        if self.init_params is None:
            raise RuntimeError("no initial weights: build the model with ScFedANVI.from_scfedvi")
        cfg = self.train_config()
        workers = [self._worker(n, sd, config=cfg) for n, sd in self._site_data.items()]
        n_cells = {w.name: w.data.n_cells for w in workers}
        trained = train_annotate(
            InProcessAnnotate(workers, cfg),
            self.schema,
            self.init_params,
            self.config,
            self.annotate,
            n_cells,
        )
        self.use_trained(trained)
        return self.history

    def use_trained(self, trained: Any) -> None:
        """Take the result of :func:`~scfedvi.annotate.protocol.train_annotate` (either
        runtime's) as this model's weights, balancing, centroids and moments."""
        self.params = trained.params
        self.history = pd.DataFrame(trained.history)
        self._balance = list(trained.balance)
        self.label_centroids = trained.label_centroids
        self.latent_moments = trained.latent_moments

    # -- prediction --------------------------------------------------------------------------
    def _site_worker(
        self, adata: ad.AnnData | None, site: str | None
    ) -> tuple[ad.AnnData, SiteData, AnnotateSite]:
        if self.params is None:
            raise RuntimeError("the model is not trained: call .train() or ScFedANVI.load(dir)")
        if adata is None:
            if site not in self._site_data:
                raise KeyError(f"unknown site {site!r}; sites: {sorted(self._site_data)}")
            return (
                self.sites[site],
                self._site_data[site],
                self._worker(site, self._site_data[site]),
            )
        name = site or "new-site"
        sd = project_new_site(adata, self.schema, self.config, site=name, layer=self.layer)
        return adata, sd, self._worker(name, sd, labels=False)

    def predict_site(
        self, adata: ad.AnnData | None = None, *, site: str | None = None, write: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """(latent, label probabilities) of one site's cells, computed with its data only; with
        ``write``, the site's AnnData gets ``obsm['X_scFedANVI']``, ``obs['scfedvi_label']`` and
        ``obs['scfedvi_label_confidence']`` (see :class:`AnnotateConfig`)."""
        adata, sd, worker = self._site_worker(adata, site)
        pooled = self.annotate.classifier_stats == "pooled"
        z, probs = worker.predict(
            self.params, self._balance, self.latent_moments if pooled else None
        )
        if write:
            write_predictions(
                adata,
                sd.obs_names,
                z,
                probs,
                labels=self.labels,
                annotate=self.annotate,
                centroids=self.label_centroids,
                site=sd.site,
            )
        return z, probs

    def predict(
        self,
        adata: ad.AnnData | None = None,
        *,
        site: str | None = None,
        soft: bool = False,
        write: bool = True,
    ) -> np.ndarray | pd.DataFrame:
        """As scvi-tools' ``SCANVI.predict``: each cell's most probable label, or with ``soft``
        a DataFrame of label probabilities (cells x labels)."""
        _, probs = self.predict_site(adata, site=site, write=write)
        if soft:
            _, sd, _ = self._site_worker(adata, site)
            return pd.DataFrame(probs, index=pd.Index(sd.obs_names), columns=list(self.labels))
        return np.asarray(self.labels, dtype=object)[probs.argmax(1)]

    def get_latent_representation(
        self, adata: ad.AnnData | None = None, *, site: str | None = None
    ) -> np.ndarray:
        """The scANVI latent of one site's cells (also written to ``obsm['X_scFedANVI']``)."""
        return self.predict_site(adata, site=site)[0]

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model, schema, configurations, balancing steps and history (the directory
        layout of :meth:`ScFedVI.save <scfedvi.model.ScFedVI.save>`, with ``annotate.json``)."""
        if self.params is None:
            raise RuntimeError("the model is not trained: nothing to save")
        return save_model_dir(
            directory,
            params=self.params,
            schema=self.schema,
            config=self.config,
            meta_file=CONFIG_FILE,
            meta={
                "annotate": asdict(self.annotate),
                "layer": self.layer,
                "label_centroids": None
                if self.label_centroids is None
                else [v.tolist() for v in self.label_centroids],
                "latent_moments": None
                if self.latent_moments is None
                else [v.tolist() for v in self.latent_moments],
            },
            history=self.history,
            balance=self._balance,
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ScFedANVI:
        """Load a saved model; any site can then predict its cells with it alone."""
        saved = load_model_dir(directory, meta_file=CONFIG_FILE, kind="scFedANVI")
        model = cls(
            saved.schema,
            saved.config,
            AnnotateConfig(**saved.meta["annotate"]),
            layer=saved.meta["layer"],
        )
        model.params = saved.params
        if saved.history is not None:
            model.history = saved.history
        model._balance = saved.balance
        if saved.meta.get("label_centroids") is not None:
            c, v = saved.meta["label_centroids"]
            model.label_centroids = (np.asarray(c, np.float64), np.asarray(v, np.float64))
        if saved.meta.get("latent_moments") is not None:
            m, cov = saved.meta["latent_moments"]
            model.latent_moments = (np.asarray(m, np.float64), np.asarray(cov, np.float64))
        return model

    def __repr__(self) -> str:
        state = "trained" if self.params is not None else "untrained"
        return (
            f"ScFedANVI({state}; {len(self.sites)} sites, {self.n_labels} labels of "
            f"{self.schema.label_key!r}, unlabelled {self.annotate.unlabeled_category!r})"
        )


def project_new_site(
    adata: ad.AnnData,
    schema: FederationSchema,
    config: RunConfig,
    *,
    site: str,
    layer: str | None,
    batch_size: int = 2,
) -> SiteData:
    """A site's cells on the schema's genes, labels ignored; batches the model was not trained
    on get index 0 when the encoder does not read the batch (the default architecture)."""
    key = schema.batch_key
    if key in adata.obs.columns:
        seen = set(adata.obs[key].astype(str).unique())
    else:
        seen = set()
    unseen = tuple(sorted(seen - set(schema.batches)))
    if unseen and config.model.encode_covariates:
        raise SchemaMismatchError(
            f"site {site!r}: obs[{key!r}] has batches the model was not trained on "
            f"({list(unseen)[:5]}) and its encoder reads the batch (encode_covariates=True); "
            "embed it after query fine-tuning: scfedvi.annotate.load_query_data(model, adata, "
            f"site={site!r}) (command line: scfedvi embed --predict --query-epochs N)"
        )
    plain = replace(schema, batches=schema.batches + unseen, labels=None, label_key=None)
    sd = project(adata, plain, site=site, layer=layer, batch_size=batch_size)
    if unseen:
        sd.batch_index[sd.batch_index >= schema.n_batches] = 0
    return sd


def _own_policy(policy: Any, site: str, own_label_key: str | None) -> Any:
    """The site's policy with the scFedVI run's label key as its own (``None``: the
    default policy, with the asked label key as the site's own)."""
    from scfedvi.privacy.policy import site_policy

    if policy is None:
        return None
    return site_policy(policy, site).allowing_label_key(own_label_key)


def annotate_worker(
    name: str,
    sd: SiteData,
    schema: FederationSchema,
    config: RunConfig,
    annotate: AnnotateConfig,
    *,
    labels: bool = True,
    policy: Any = None,
) -> AnnotateSite:
    """A site of federated scANVI on its projected data (``labels``: with its labels as the
    schema's indices, the unlabelled category ``-1``)."""
    assert schema.labels is not None
    known = schema.labels[:-1]
    index = None
    if labels and sd.labels is not None:
        index = pd.Index(known).get_indexer(sd.labels.astype(str)).astype(np.int64)
    return AnnotateSite(
        name,
        LabelledSiteTensors(sd.X, sd.batch_index, labels=index),
        schema.n_genes,
        schema.n_batches,
        len(known),
        config,
        linear_classifier=annotate.linear_classifier,
        classification_ratio=annotate.classification_ratio,
        policy=policy,
    )


class InProcessAnnotate(InProcessRounds):
    """The in-process transport of :func:`~scfedvi.annotate.protocol.train_annotate`: each
    site's worker called directly (rounds as :class:`InProcessRounds`)."""

    def __init__(self, workers: Sequence[AnnotateSite], config: RunConfig) -> None:
        work = {w.name: (config.train.local_epochs, None) for w in workers}
        super().__init__(None, workers, None, work, None)  # type: ignore[arg-type]
        self.workers, self.config = list(workers), config

    def start(self, coordinator: Any) -> None:
        self.coordinator = coordinator

    def balance(self, params: Params) -> list[Any]:
        from scfedvi.federation.balance import balance_in_process

        return balance_in_process(self.workers, params, self.config)

    def summaries(self, params: Params, steps: Sequence[Any]) -> list[Summary]:
        return [answer_summary(w, params, steps, w.n_labels) for w in self.workers]
