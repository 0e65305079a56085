"""The baselines: scVI per site and pooled (scvi-tools), Harmony on PCA, uncorrected PCA.

All use the task's genes (scFedVI's schema genes). scvi-tools, scanpy and harmonypy are
imported inside the functions (the ``benchmark`` extra).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from scfedvi.benchmark.methods import QUICK_SCVI_EPOCHS, MethodResult
from scfedvi.benchmark.task import SITE_KEY, Task

#: Principal components of the PCA and Harmony baselines (scIB's unintegrated embedding).
N_PCS = 50


def scvi_settings(quick: bool) -> dict[str, Any]:
    """scvi-tools ``SCVI`` at its defaults; ``max_epochs=None`` is scvi-tools' own heuristic."""
    return {"max_epochs": QUICK_SCVI_EPOCHS if quick else None, "model": "SCVI defaults"}


def pca_settings(quick: bool) -> dict[str, Any]:
    """Log-normalized counts (total 1e4), ``N_PCS`` components; Harmony at its defaults."""
    return {"n_pcs": N_PCS, "target_sum": 1e4}


@contextlib.contextmanager
def _quiet_scvi() -> Iterator[Any]:
    """Import scvi-tools with its and Lightning's messages and warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import scvi

        old = scvi.settings.verbosity
        scvi.settings.verbosity = logging.ERROR
        loggers = [
            logging.getLogger(n)
            for n in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")
        ]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield scvi
        finally:
            scvi.settings.verbosity = old
            for lg, lv in zip(loggers, levels, strict=True):
                lg.setLevel(lv)


def _fit_scvi(scvi: Any, adata: Any, batch_key: str, seed: int, max_epochs: int | None) -> tuple:
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    model = scvi.model.SCVI(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=max_epochs, accelerator="cpu", enable_progress_bar=False)
    seconds = time.perf_counter() - t0
    epochs = len(model.history["elbo_train"]) if "elbo_train" in model.history else max_epochs
    return np.asarray(model.get_latent_representation(), dtype=np.float32), seconds, epochs


def run_scvi_per_site(task: Task, settings: dict[str, Any]) -> MethodResult:
    """scVI fit separately at each site (its own batches as covariate), embeddings concatenated.

    The paper's baseline: the sites' latent spaces are not aligned with each other.
    """
    Z = None
    seconds, epochs = 0.0, {}
    with _quiet_scvi() as scvi:
        for name in task.sites:
            site = task.site_adata(name, genes=True)
            site.obs[task.batch_key] = site.obs[task.batch_key].astype(str)
            z, secs, ep = _fit_scvi(scvi, site, task.batch_key, task.seed, settings["max_epochs"])
            if Z is None:
                Z = np.full((task.adata.n_obs, z.shape[1]), np.nan, dtype=np.float32)
            Z[(task.adata.obs[SITE_KEY] == name).to_numpy()] = z
            seconds += secs
            epochs[name] = ep
    assert Z is not None
    return MethodResult(Z, seconds, info={"epochs": epochs, "n_genes": len(task.genes)})


def run_scvi_pooled(task: Task, settings: dict[str, Any]) -> MethodResult:
    """scVI on the pooled cells (batch as covariate): the non-private upper bound."""
    pooled = task.pooled()
    pooled.obs[task.batch_key] = pooled.obs[task.batch_key].astype(str)
    with _quiet_scvi() as scvi:
        Z, seconds, epochs = _fit_scvi(
            scvi, pooled, task.batch_key, task.seed, settings["max_epochs"]
        )
    return MethodResult(Z, seconds, info={"epochs": epochs, "n_genes": len(task.genes)})


def unintegrated_pca(task: Task, settings: dict[str, Any], seed: int | None = None) -> np.ndarray:
    """PCA of the pooled, log-normalized counts of the task's genes (seed: the task's)."""
    import scanpy as sc
    from anndata import AnnData

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = AnnData(X=task.pooled().X.astype(np.float32))
        sc.pp.normalize_total(a, target_sum=settings["target_sum"])
        sc.pp.log1p(a)
        n = min(settings["n_pcs"], a.n_obs - 1, a.n_vars - 1)
        sc.pp.pca(
            a, n_comps=n, svd_solver="arpack", random_state=task.seed if seed is None else seed
        )
    return np.asarray(a.obsm["X_pca"], dtype=np.float32)


def run_pca(task: Task, settings: dict[str, Any]) -> MethodResult:
    """Uncorrected PCA of the pooled, log-normalized counts."""
    t0 = time.perf_counter()
    Z = unintegrated_pca(task, settings)
    return MethodResult(Z, time.perf_counter() - t0, info={"n_genes": len(task.genes)})


def run_harmony(task: Task, settings: dict[str, Any]) -> MethodResult:
    """Harmony (harmonypy) on the pooled PCA, correcting the batch."""
    import harmonypy

    t0 = time.perf_counter()
    pcs = unintegrated_pca(task, settings)
    meta = task.adata.obs[[task.batch_key]].astype(str)
    ho = harmonypy.run_harmony(
        pcs, meta, task.batch_key, random_state=task.seed, verbose=False, ncores=1
    )
    Z = np.asarray(ho.Z_corr, dtype=np.float32)
    if Z.shape[0] != pcs.shape[0]:  # older harmonypy returns (d, n)
        Z = Z.T
    return MethodResult(Z, time.perf_counter() - t0, info={"n_genes": len(task.genes)})
