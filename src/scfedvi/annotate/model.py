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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scfedvi._saved import load_model_dir, save_model_dir
from scfedvi.annotate.site import (
    AnnotateSite,
    LabelledSiteTensors,
    label_centroids,
    label_summary,
    latent_moments,
    novelty,
    pooled_moments,
)
from scfedvi.config import RunConfig
from scfedvi.data.errors import SchemaMismatchError
from scfedvi.data.labels import harmonize_labels, site_label_counts
from scfedvi.data.schema import FederationSchema, SiteData, project
from scfedvi.federation.aggregate import SiteUpdate, reject_invalid
from scfedvi.federation.coordinator import Coordinator
from scfedvi.module.scanvi import SCANVAE, label_layer_keys
from scfedvi.train.params import Params, batch_owned_columns, get_state, set_state, shared_keys

log = logging.getLogger(__name__)
LATENT_KEY, LABEL_KEY, CONFIDENCE_KEY, NOVELTY_KEY = (
    "X_scFedANVI",
    "scfedvi_label",
    "scfedvi_label_confidence",
    "scfedvi_label_novelty",
)
#: The metadata file of a saved scANVI model (the rest as :mod:`scfedvi._saved`).
CONFIG_FILE = "annotate.json"


@dataclass(frozen=True)
class AnnotateConfig:
    """Settings of federated scANVI (on top of the scFedVI run's :class:`RunConfig`).

    Parameters
    ----------
    unlabeled_category
        The label value of unlabelled cells (scvi-tools' ``unlabeled_category``).
    classification_ratio
        Weight of the classifier's cross-entropy (scvi-tools: 50).
    linear_classifier
        A linear classifier instead of scvi-tools' one-hidden-layer MLP.
    n_rounds, local_epochs
        Federated rounds and local epochs per round: 10 x 2 = 20 epochs, twice scvi-tools'
        epochs for a scANVI model initialised from a trained scVI model on fewer than 20,000
        cells (``min(10, max(2, round(max_epochs_heuristic / 3)))``), in twice the rounds.
        Measured (benchmarks/label_transfer.py, 100 scVI epochs, seed 0, accuracy at the site
        whose labels were hidden, 5 rounds -> 10): cortex 0.934 -> 0.950, 0.918 -> 0.942,
        0.807 -> 0.872; pancreas 0.974 -> 0.987, 0.991 -> 0.994 (docs/annotate.md).
    confidence_threshold
        Cells whose top label probability is below this get ``unlabeled_category`` in
        ``obs['scfedvi_label']`` (their probability is still written): cells between labels.
    classifier_stats
        The classifier's BatchNorm statistics at prediction: ``"pooled"``, those of the latent
        codes of all the federation's cells (from each site's count, sum and sum of outer
        products of its codes, a 10 x 10 summary sent once after training), the same at every
        site; ``"site"``, each site's own. Measured (cortex, 100 scVI epochs, seed 0, the
        labels of the STRT-seq site hidden): accuracy at that site 0.679 with its own
        statistics, 0.807 with the pooled ones: a site's own statistics re-centre its codes
        and move them across the decision boundaries learnt on the labelled sites
        (docs/annotate.md).
    novelty_ratio
        Cells whose squared latent distance to their predicted label's centroid exceeds this
        many times that label's mean squared distance (``obs['scfedvi_label_novelty']``) also
        get ``unlabeled_category``: a population that no site labelled is not given a label it
        does not have (a softmax is confident far from its training cells, so the probability
        alone does not flag it). The centroids are pooled from each labelled site's per-label
        sums of its cells' latent codes (labels with at least its policy's
        ``min_cluster_cells`` cells), as balancing pools cluster sums.
    """

    unlabeled_category: str = "Unknown"
    classification_ratio: float = 50.0
    linear_classifier: bool = False
    n_rounds: int = 10
    local_epochs: int = 2
    confidence_threshold: float = 0.5
    novelty_ratio: float = 4.0
    classifier_stats: str = "pooled"

    def __post_init__(self) -> None:
        if self.classifier_stats not in ("pooled", "site"):
            raise ValueError(
                f"AnnotateConfig.classifier_stats must be 'pooled' or 'site', got "
                f"{self.classifier_stats!r}"
            )
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(
                "AnnotateConfig.confidence_threshold must be in [0, 1], got "
                f"{self.confidence_threshold}"
            )
        if self.novelty_ratio <= 0:
            raise ValueError(f"AnnotateConfig.novelty_ratio must be > 0, got {self.novelty_ratio}")


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
        counts = {
            s: site_label_counts(
                a, site=s, label_key=label_key, unlabeled_category=unlabeled_category
            )
            for s, a in sites.items()
        }
        known = harmonize_labels(counts, label_key=label_key, unlabeled_category=unlabeled_category)
        schema = replace(model.schema, labels=(*known, unlabeled_category), label_key=label_key)
        cfg = replace(annotate or AnnotateConfig(), unlabeled_category=unlabeled_category)
        out = cls(schema, model.config, cfg, sites, layer=model.layer)
        out.init_params = dict(model.params)
        return out

    def _label_index(self, sd: SiteData) -> np.ndarray:
        if sd.labels is None:
            return np.full(len(sd.batch_index), -1, dtype=np.int64)
        idx = pd.Index(self.labels).get_indexer(sd.labels.astype(str))
        return idx.astype(np.int64)  # the unlabelled category (and only it) maps to -1

    def _module(self, n_batches: int | None = None) -> SCANVAE:
        a = self.annotate
        return SCANVAE(
            self.schema.n_genes,
            n_batches or self.schema.n_batches,
            self.n_labels,
            self.config.model,
            linear_classifier=a.linear_classifier,
            classification_ratio=a.classification_ratio,
        )

    def _worker(
        self, name: str, sd: SiteData, labels: bool = True, config: RunConfig | None = None
    ) -> AnnotateSite:
        a = self.annotate
        data = LabelledSiteTensors(
            sd.X, sd.batch_index, labels=self._label_index(sd) if labels else None
        )
        return AnnotateSite(
            name,
            data,
            self.schema.n_genes,
            self.schema.n_batches,
            self.n_labels,
            config or self.config,
            linear_classifier=a.linear_classifier,
            classification_ratio=a.classification_ratio,
        )

    # -- training ----------------------------------------------------------------------------
    def train_config(self) -> RunConfig:
        """The run's configuration with scANVI's rounds and local epochs."""
        a, c = self.annotate, self.config
        return replace(
            c,
            train=replace(c.train, local_epochs=a.local_epochs, local_steps=None),
            federation=replace(c.federation, n_rounds=a.n_rounds),
        )

    def train(self) -> pd.DataFrame:
        """Federated scANVI rounds in process (``annotate.n_rounds``); the history."""
        from scfedvi.federation.balance import balance_in_process

        if not self._site_data:
            raise ValueError("this model has no sites to train on; build it with from_scfedvi")
        if self.init_params is None:
            raise RuntimeError("no initial weights: build the model with ScFedANVI.from_scfedvi")
        cfg = self.train_config()
        workers = [self._worker(n, sd, config=cfg) for n, sd in self._site_data.items()]
        coord = LabelCoordinator(
            self.schema.n_genes, self.schema.n_batches, cfg, schema_hash=self.schema.hash
        )
        torch.manual_seed(cfg.federation.seed)
        module = self._module()
        set_state(module, {k: v for k, v in self.init_params.items() if k in module.state_dict()})
        _use_module(coord, module, cfg)
        for r in range(cfg.federation.n_rounds):
            params, control = coord.broadcast()
            coord.aggregate([w.fit(params, r, control) for w in workers])
        self.params = coord.params
        self.history = pd.DataFrame(coord.history)
        self._balance = (
            balance_in_process(workers, self.params, cfg) if cfg.balance_clusters else []
        )
        summaries, moments = [], []
        for w in workers:  # sums of each site's codes, and per label of its labelled cells
            z, min_cells = w.embed(self.params, self._balance), w.policy.min_cluster_cells
            moments.append(latent_moments(z, min_cells))
            labels = w.labelled_data.labels
            if labels is not None and (labels >= 0).any():
                summaries.append(label_summary(z, labels, self.n_labels, min_cells))
        self.label_centroids = label_centroids(summaries) if summaries else None
        self.latent_moments = pooled_moments(moments)
        return self.history

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
            rows = adata.obs_names.get_indexer(sd.obs_names)
            zf = np.full((adata.n_obs, z.shape[1]), np.nan, dtype=z.dtype)
            zf[rows] = z
            conf = np.full(adata.n_obs, np.nan)
            conf[rows] = probs.max(1)
            lab = np.full(adata.n_obs, self.annotate.unlabeled_category, dtype=object)
            best = np.asarray(self.labels, dtype=object)[probs.argmax(1)]
            ok = probs.max(1) >= self.annotate.confidence_threshold
            lab[rows[ok]] = best[ok]
            novel = np.zeros(len(ok), dtype=bool)
            ratio = np.full(adata.n_obs, np.nan)
            if self.label_centroids is not None:
                r = novelty(z, probs.argmax(1), *self.label_centroids)
                ratio[rows] = r
                novel = r > self.annotate.novelty_ratio  # NaN (no centroid): not judged
                lab[rows[novel]] = self.annotate.unlabeled_category
            adata.obs[NOVELTY_KEY] = ratio
            adata.obsm[LATENT_KEY] = zf
            adata.obs[LABEL_KEY] = pd.Categorical(
                lab, categories=[*self.labels, self.annotate.unlabeled_category]
            )
            adata.obs[CONFIDENCE_KEY] = conf
            n_low, n_novel = int((~ok).sum()), int((novel & ok).sum())
            if n_low or n_novel:
                log.warning(
                    "site %r: of %d cells, %d have a top label probability below %.2f and %d "
                    "more lie over %.1f times their label's mean squared distance from its "
                    "centroid (obs[%r]): labelled %r in obs[%r]",
                    sd.site,
                    len(ok),
                    n_low,
                    self.annotate.confidence_threshold,
                    n_novel,
                    self.annotate.novelty_ratio,
                    NOVELTY_KEY,
                    self.annotate.unlabeled_category,
                    LABEL_KEY,
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


def _use_module(coord: Any, module: SCANVAE, cfg: RunConfig) -> None:
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
