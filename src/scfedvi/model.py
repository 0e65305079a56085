"""The user-facing API over AnnData: set up sites, train federated, embed, save, load, export."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from scfedvi.config import RunConfig, SitePolicy
from scfedvi.data.harmonize import harmonize
from scfedvi.data.schema import FederationSchema, SiteData, project

log = logging.getLogger(__name__)
MODEL_FILE, SCHEMA_FILE, CONFIG_FILE, HISTORY_FILE, BALANCE_FILE = (
    "model.npz",
    "schema.json",
    "config.json",
    "history.csv",
    "balance.npz",
)


def _admit_run(
    ledger_dir: Path | None,
    sites: list[str],
    policy: SitePolicy | Mapping[str, SitePolicy] | None,
) -> str:
    """A new run's id; with a ``ledger_dir``, every site admits the run first
    (:meth:`~scfedvi.privacy.run_budget.RunLedger.admit`), or refuses it with a
    :class:`~scfedvi.privacy.policy.PolicyRefusal`."""
    import uuid

    from scfedvi.privacy.policy import site_policy
    from scfedvi.privacy.run_budget import RunLedger, runs_ledger_path

    run_id = uuid.uuid4().hex
    if ledger_dir is not None:
        for site in sites:
            runs = RunLedger(runs_ledger_path(ledger_dir, site), data_key=site)
            runs.admit(site, run_id, site_policy(policy, site))
    return run_id


def _tensors(sd: SiteData):
    from scfedvi.train.local import SiteTensors

    return SiteTensors(sd.X, sd.batch_index)


class ScFedVI:
    """scFedVI: one scVI model trained by federated averaging across sites.

    Build it with :meth:`from_sites` (or :meth:`load` a trained one), :meth:`train` it, and
    embed any site's cells with :meth:`get_latent_representation`.

    Parameters
    ----------
    schema
        The federation schema (genes, batches, labels) fixed before training.
    config
        The run's configuration.
    sites
        Site name -> AnnData (the in-process runtime's sites; empty for a loaded model).
    """

    def __init__(
        self,
        schema: FederationSchema,
        config: RunConfig | None = None,
        sites: Mapping[str, ad.AnnData] | None = None,
        *,
        layer: str | None = None,
        policy: SitePolicy | Mapping[str, SitePolicy] | None = None,
    ) -> None:
        self.schema = schema
        #: the sites' privacy policy (:class:`~scfedvi.config.SitePolicy`; one, or per site)
        self.policy = policy
        self.config = config or RunConfig()
        self.sites: dict[str, ad.AnnData] = dict(sites or {})
        self.layer = layer
        self.params: dict[str, np.ndarray] | None = None
        self.history = pd.DataFrame()
        #: the schedule the model was trained with (:mod:`scfedvi.federation.schedule`)
        self.schedule: Any = None
        self.early_stopped = False
        #: each in-process worker's sites and peak private memory (last training call)
        self.worker_memory: list[dict[str, Any]] = []
        #: the memory predicted for the last training call (:mod:`scfedvi.federation.memory`)
        self.memory_estimate: Any = None
        self._site_data: dict[str, SiteData] = {}
        #: where the simulated sites keep their record of runs (``from_sites(ledger_dir=)``)
        self.ledger_dir: Path | None = None
        self.run_id = ""
        # the coordinator and site workers of the last training call (continued by the next)
        self._live: tuple[Any, list[Any]] | None = None
        # the composition-balancing steps of the trained model (None: not computed yet)
        self._balance: list[Any] | None = None
        for name, adata in self.sites.items():
            self._site_data[name] = project(
                adata, schema, site=name, layer=layer, batch_size=self.config.train.batch_size
            )

    # -- set-up ------------------------------------------------------------------------------
    @classmethod
    def from_sites(
        cls,
        sites: Mapping[str, ad.AnnData] | ad.AnnData,
        *,
        batch_key: str,
        split_key: str | None = None,
        label_key: str | None = None,
        layer: str | None = None,
        n_top_genes: int | None = 2000,
        min_sites_per_gene: int | None = None,
        config: RunConfig | None = None,
        policy: SitePolicy | Mapping[str, SitePolicy] | None = None,
        ledger_dir: str | os.PathLike | None = None,
    ) -> ScFedVI:
        """Harmonize the sites from their summaries alone, fix the schema, project each site.

        Parameters
        ----------
        sites
            Site name -> AnnData of raw counts, or one AnnData split into sites by ``split_key``.
        batch_key
            ``obs`` column of the batch (technology, donor, ...) the model corrects for.
        split_key
            With one AnnData: the ``obs`` column naming each cell's site.
        label_key
            Optional ``obs`` column of cell-type labels (for evaluation only).
        layer
            Layer holding raw counts (``None``: ``X``).
        n_top_genes
            Highly variable genes to keep (seurat_v3 over the sites' batches); ``None``: all.
        min_sites_per_gene
            Keep genes present at this many sites (zero-filled elsewhere); default: all sites.
        config
            The run's configuration.
        policy
            What each simulated site agrees to answer (:class:`~scfedvi.config.SitePolicy`):
            one for every site or ``{site: policy}``; default ``SitePolicy()``. ``label_key``
            is the sites' own label key and is allowed implicitly.
        ledger_dir
            A folder where each simulated site keeps its record of the runs it answered
            (``<site>.runs.json``, as in a Flower site's ``state-dir``): this model is one run
            (and every ``train(resume=False)`` another), admitted against each site's
            ``SitePolicy.max_runs`` and, under DP, ``max_total_epsilon``
            (:mod:`scfedvi.privacy.run_budget`). ``None``: no record across runs.
        """
        if isinstance(sites, ad.AnnData):
            sites = split_sites(sites, split_key)
        elif split_key is not None:
            raise ValueError("split_key is for one AnnData; with a mapping, each entry is a site")
        if not sites:
            raise ValueError("no sites given: pass at least one site's AnnData")
        # this model's run: every site admits it before it answers the setup summaries
        ledger = None if ledger_dir is None else Path(ledger_dir)
        run_id = _admit_run(ledger, list(sites), policy)
        schema = harmonize(
            sites,
            batch_key=batch_key,
            n_top_genes=n_top_genes,
            min_sites=min_sites_per_gene,
            label_key=label_key,
            layer=layer,
            policy=policy,
        )
        cfg = config or RunConfig()
        model = cls(schema, cfg, sites, layer=layer, policy=policy)
        model.ledger_dir, model.run_id = ledger, run_id
        return model

    # -- training ----------------------------------------------------------------------------
    def train(
        self,
        n_rounds: int | None = None,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = True,
        progress: bool = True,
    ) -> pd.DataFrame:
        """Federated training in process; returns the history (one row per site and round).

        Parameters
        ----------
        n_rounds
            Train up to this round (default: ``config.federation.n_rounds``). A model that was
            already trained to round ``r`` in this session continues from there (the same run,
            exactly as one uninterrupted call), unless ``resume=False``.
        checkpoint_dir
            Save the federation's state there every round (each site's private state beside
            it) and, with ``resume``, continue a run that stopped.
        resume
            Continue the run trained so far (in memory, or from ``checkpoint_dir``); ``False``
            starts again from the initialization.
        progress
            Show a progress bar.
        """
        from scfedvi.federation.coordinator import Coordinator
        from scfedvi.federation.inprocess import run_in_process
        from scfedvi.federation.memory import check_sites

        if not self._site_data:
            raise ValueError(
                "this model has no sites to train on; build it with ScFedVI.from_sites"
            )
        if resume and checkpoint_dir is None and self._live is not None:
            coord, workers = self._live
        else:
            if not resume:
                self._new_run()  # training from the initialization again: another run
            coord = Coordinator(
                self.schema.n_genes,
                self.schema.n_batches,
                self.config,
                schema_hash=self.schema.hash,
                checkpoint_dir=checkpoint_dir,
            )
            workers = self._workers()
        if coord.schedule is None:  # the schedule follows the sites' cells (federation.schedule)
            coord.resolve_schedule({w.name: w.data.n_cells for w in workers})
        self.schedule = coord.schedule
        n_rounds = n_rounds or coord.schedule.rounds
        log.info("%s", coord.schedule.describe())
        # predicted before any worker starts: refused with the site and the fix if too big
        self.memory_estimate = check_sites(workers, coord.params, self.config)
        log.info("%s", self.memory_estimate.describe())
        bar = _progress(n_rounds, progress, initial=min(coord.round, n_rounds))

        def on_round(r: int, seconds: float) -> None:
            last = [h for h in coord.history if h["round"] == r and "loss" in h]
            bar.set_postfix_str(" ".join(f"{h['site']}: loss {h['loss']:.0f}" for h in last))
            bar.update(1)

        self.worker_memory = []
        run_in_process(
            coord,
            workers,
            n_rounds,
            resume=resume,
            on_round=on_round,
            n_jobs=self.config.federation.n_jobs,
            memory=self.worker_memory,
        )
        bar.close()
        self._live = (coord, workers)
        self.params = coord.params
        self._balance = None  # computed again for these weights when first needed
        self.history = pd.DataFrame(coord.history)
        self.history.attrs["schedule"] = coord.schedule.to_dict()
        self.early_stopped = coord.early_stopped
        return self.history

    def _workers(self):
        from scfedvi.federation.site import SiteWorker
        from scfedvi.privacy.policy import site_policy

        g, b = self.schema.n_genes, self.schema.n_batches
        return [
            SiteWorker(
                n,
                _tensors(sd),
                g,
                b,
                self.config,
                policy=site_policy(self.policy, n),
                ledger=self._site_ledger(n),
            )
            for n, sd in self._site_data.items()
        ]

    def _site_ledger(self, site: str):
        """Site ``site``'s query budget for this model's run, with its record of runs."""
        from scfedvi.privacy.policy import QueryLedger, site_policy
        from scfedvi.privacy.run_budget import RunLedger, runs_ledger_path

        pol = site_policy(self.policy, site)
        if self.ledger_dir is None:
            return QueryLedger(policy=pol)
        runs = RunLedger(runs_ledger_path(self.ledger_dir, site), data_key=site)
        return QueryLedger(runs=runs, run_id=self.run_id, policy=pol)

    def _new_run(self) -> None:
        """Start a new run, admitted by every site first (with a ``ledger_dir``)."""
        self.run_id = _admit_run(self.ledger_dir, list(self._site_data), self.policy)

    # -- balancing ---------------------------------------------------------------------------
    def balance_steps(self) -> list[Any]:
        """The composition-balancing steps every site applies to its statistics when embedding.

        Computed once per trained state over the training sites, by the same federated
        k-means as the Flower app runs (:mod:`scfedvi.federation.balance`); a loaded model
        has them from its directory. Empty when the configuration turns balancing off
        (``FederationConfig.balance_clusters``).
        """
        self.require_trained()
        if self._balance is None:
            self._balance = self._balance_in_process() if self.config.balance_clusters else []
        return self._balance

    def _balance_in_process(self) -> list[Any]:
        from scfedvi.federation.balance import balance_in_process

        if not self._site_data:
            raise RuntimeError("this model has no sites to compute its balancing steps on")
        return balance_in_process(self.site_workers(), self.params, self.config)  # type: ignore[arg-type]

    def set_balance_steps(self, steps: list[Any] | None) -> None:
        """Use ``steps`` (:class:`~scfedvi.federation.balance.BalanceStep`) as the model's
        balancing steps: those the Flower app computed, or a benchmark's variant. ``None``
        computes them again in process when :meth:`balance_steps` is next called."""
        self._balance = None if steps is None else list(steps)

    # -- the in-process federation (for tools, benchmarks and tests) -------------------------
    @property
    def site_data(self) -> Mapping[str, SiteData]:
        """Each in-process site's data projected on the schema (empty for a loaded model)."""
        from types import MappingProxyType

        return MappingProxyType(self._site_data)

    @property
    def coordinator(self) -> Any:
        """The :class:`~scfedvi.federation.coordinator.Coordinator` of the last training call
        in this session (its history, schedule, validation curve); ``None`` before one."""
        return None if self._live is None else self._live[0]

    def site_workers(self) -> list[Any]:
        """The in-process sites (:class:`~scfedvi.federation.site.SiteWorker`: data, replica,
        private state) of the last training call; new ones if this session has not trained."""
        return list(self._live[1]) if self._live is not None else self._workers()

    # -- embedding ---------------------------------------------------------------------------
    def get_latent_representation(
        self, adata: ad.AnnData | None = None, *, site: str | None = None, write: bool = True
    ) -> np.ndarray:
        """The cells of one site in the global latent space, computed with that site's data only.

        Parameters
        ----------
        adata
            A site's AnnData (any site, also one that took no part in training).
        site
            Or the name of a training site.
        write
            Store the result in ``adata.obsm['X_scFedVI']``.
        """
        from scfedvi.federation.site import SiteWorker

        self.require_trained()
        if adata is None:
            if site not in self.sites:
                raise KeyError(f"unknown site {site!r}; sites: {sorted(self.sites)}")
            adata, sd = self.sites[site], self._site_data[site]
        else:
            sd = project(
                adata, self.schema, site=site or "new-site", layer=self.layer, batch_size=2
            )
        worker = SiteWorker(
            sd.site, _tensors(sd), self.schema.n_genes, self.schema.n_batches, self.config
        )
        z = worker.embed(self.params, self.balance_steps())  # type: ignore[arg-type]
        if write:  # cells without counts (dropped by the projection) get NaN rows
            from scfedvi.train.embed import write_embedding

            z = write_embedding(adata, z, sd.obs_names)
        return z

    def embed_sites(self) -> dict[str, np.ndarray]:
        """Embed every training site's cells (written to each site's ``obsm``)."""
        return {name: self.get_latent_representation(site=name) for name in self.sites}

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the global model, schema, configuration and history to ``directory``."""
        from scfedvi._saved import save_model_dir

        self.require_trained()
        assert self.params is not None
        meta = {
            "layer": self.layer,
            "schedule": None if self.schedule is None else self.schedule.to_dict(),
            "early_stopped": self.early_stopped,
        }
        return save_model_dir(
            directory,
            params=self.params,
            schema=self.schema,
            config=self.config,
            meta_file=CONFIG_FILE,
            meta=meta,
            history=self.history,
            balance=self.balance_steps(),
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ScFedVI:
        """Load a saved global model; a site can then embed its own cells with it."""
        from scfedvi._saved import load_model_dir

        saved = load_model_dir(directory, meta_file=CONFIG_FILE, kind="scFedVI")
        model = cls(saved.schema, saved.config, layer=saved.meta["layer"])
        model.params = saved.params
        if saved.meta.get("schedule"):
            from scfedvi.federation.schedule import Schedule

            model.schedule = Schedule.from_dict(saved.meta["schedule"])
            model.early_stopped = bool(saved.meta.get("early_stopped", False))
        if saved.history is not None:
            model.history = saved.history
        model._balance = saved.balance
        return model

    def to_scvi(self, adata: ad.AnnData) -> Any:
        """Export to an ``scvi.model.SCVI`` set up on ``adata`` (needs scvi-tools)."""
        from scfedvi.export import to_scvi

        self.require_trained()
        return to_scvi(self, adata)

    def require_trained(self) -> None:
        """Raise ``RuntimeError`` unless the model has parameters (trained or loaded)."""
        if self.params is None:
            raise RuntimeError("the model is not trained yet: call .train() or ScFedVI.load(dir)")

    def __repr__(self) -> str:
        s = self.schema
        state = "trained" if self.params is not None else "untrained"
        return (
            f"ScFedVI({state}; {len(self.sites)} sites, {s.n_genes} genes, {s.n_batches} batches "
            f"of {s.batch_key!r}, schema {s.hash[:12]})"
        )


def split_sites(adata: ad.AnnData, split_key: str | None) -> dict[str, ad.AnnData]:
    """One AnnData as sites: ``{value: its cells}`` for each value of ``obs[split_key]``
    (sorted), with a clear error for a missing column or missing values."""
    if split_key is None:
        raise ValueError(
            "one AnnData was given: pass split_key=<obs column naming each cell's site>"
        )
    if split_key not in adata.obs:
        raise ValueError(
            f"obs[{split_key!r}] is missing; pass split_key= one of {list(adata.obs.columns)}"
        )
    col = adata.obs[split_key]
    if col.isna().any():
        raise ValueError(
            f"obs[{split_key!r}] has {int(col.isna().sum())} missing values; fill them"
        )
    return {str(v): adata[(col == v).values].copy() for v in sorted(col.astype(str).unique())}


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc="federated rounds", unit="round", disable=not enabled
    )
