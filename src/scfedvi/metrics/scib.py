"""The scIB metrics (Luecken et al. 2022) through scib-metrics' ``Benchmarker``.

scib-metrics (and jax, 8 to 38 s to import) is imported inside :func:`scib_scores` only; it is
part of the ``benchmark`` extra. The neighbour graph of each embedding is computed once, exactly,
by :func:`~scfedvi.metrics.neighbors.compute_neighbors` and shared by every graph metric
(cLISI, iLISI, kBET, graph connectivity, Leiden NMI/ARI), instead of scib-metrics' default
pynndescent search (whose numba compilation alone takes about 25 s).
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from scfedvi.metrics._optional import import_scib_metrics
from scfedvi.metrics.neighbors import compute_neighbors

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from anndata import AnnData

#: Columns of the result that are aggregate scores (means of the metrics, scIB's weighting).
AGGREGATE_COLUMNS = ("Bio conservation", "Batch correction", "Total")
#: Metrics that ``fast=True`` leaves out: kBET (per-label kNN tests) and Leiden clustering over a
#: range of resolutions are the slowest.
SLOW_METRICS = ("kbet_per_label", "nmi_ari_cluster_labels_leiden")

_BATCH_ASW = {
    # scIB's silhouette batch: Euclidean, nearest other batch (scib-metrics' silhouette_batch).
    "scib": {"metric": "euclidean", "between_cluster_distances": "nearest"},
    # BRAS (Rautenstrauch 2025), scib-metrics' default since 0.5.7: cosine, mean over others.
    "bras": {"metric": "cosine", "between_cluster_distances": "mean_other"},
}


def _is_counts(X: Any) -> bool:
    data = X.data if hasattr(X, "data") and not isinstance(X, np.ndarray) else np.asarray(X)
    sample = np.asarray(data).reshape(-1)[:100_000]
    return bool(sample.size) and bool(np.all(sample >= 0) and np.all(sample == np.round(sample)))


def _pca(adata: AnnData, n_comps: int = 50) -> np.ndarray:
    """PCA of the unintegrated data, log-normalized first when ``adata.X`` holds counts."""
    import scanpy as sc
    from anndata import AnnData as _AnnData

    tmp = _AnnData(X=adata.X.copy())
    if _is_counts(tmp.X):
        sc.pp.normalize_total(tmp, target_sum=1e4)
        sc.pp.log1p(tmp)
    n_comps = min(n_comps, tmp.n_obs - 1, tmp.n_vars - 1)
    sc.pp.pca(tmp, n_comps=n_comps, svd_solver="arpack", random_state=0)
    return np.asarray(tmp.obsm["X_pca"])


def scib_scores(
    adata: AnnData,
    *,
    batch_key: str,
    label_key: str,
    embedding_keys: list[str],
    pre_integrated_key: str | None = None,
    n_jobs: int = 1,
    fast: bool = False,
    batch_asw: Literal["scib", "bras"] = "scib",
) -> pd.DataFrame:
    """Compute the scIB metrics of several embeddings of the same cells.

    Bio conservation: isolated labels, Leiden NMI/ARI (not with ``fast``), KMeans NMI/ARI,
    silhouette label, cLISI. Batch correction: silhouette batch, iLISI, kBET (not with
    ``fast``), graph connectivity, PCR comparison. Aggregates as scib-metrics computes them:
    the mean of each group's metrics, and ``Total = 0.6 * bio + 0.4 * batch``.

    Parameters
    ----------
    adata
        Cells with the embeddings in ``obsm``; it is not modified.
    batch_key, label_key
        Columns of ``adata.obs`` with the batch and the cell type of each cell.
    embedding_keys
        Keys of ``adata.obsm`` to score.
    pre_integrated_key
        Key of ``adata.obsm`` with the unintegrated embedding that PCR comparison measures
        against. When None, ``"X_pca"`` is used if present, else a 50-component PCA of
        ``adata.X`` (log-normalized first if it holds counts) is computed, not stored.
    n_jobs
        Worker threads of the neighbour search.
    fast
        Leave out the slow metrics (:data:`SLOW_METRICS`) for quick modes.
    batch_asw
        ``"scib"``: the silhouette batch of scIB (Euclidean, nearest batch); ``"bras"``: the
        batch-removal adapted silhouette that scib-metrics >= 0.5.7 uses by default.

    Returns
    -------
    pandas.DataFrame
        One row per embedding key (index name ``"embedding"``), one float column per metric with
        its raw value (not min-max scaled across embeddings) and the three
        :data:`AGGREGATE_COLUMNS`. ``df.attrs["metric_type"]`` maps each column to its group.

    Raises
    ------
    ImportError
        If scib-metrics is not installed (``pip install 'scfedvi[benchmark]'``).
    KeyError
        If a key is missing from ``adata.obs`` or ``adata.obsm``.
    """
    import_scib_metrics()
    from anndata import AnnData as _AnnData
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    for key in (batch_key, label_key):
        if key not in adata.obs:
            raise KeyError(f"adata.obs[{key!r}] is missing; pass the column that holds it")
        if adata.obs[key].isna().any():
            raise ValueError(f"adata.obs[{key!r}] has missing values; label or drop those cells")
    if not embedding_keys:
        raise ValueError("embedding_keys is empty; name at least one adata.obsm key")
    for key in embedding_keys:
        if key not in adata.obsm:
            raise KeyError(f"adata.obsm[{key!r}] is missing; available: {list(adata.obsm)}")
    if batch_asw not in _BATCH_ASW:
        raise ValueError(f"batch_asw must be 'scib' or 'bras', got {batch_asw!r}")

    if pre_integrated_key is None:
        pre = np.asarray(adata.obsm["X_pca"]) if "X_pca" in adata.obsm else _pca(adata)
    elif pre_integrated_key in adata.obsm:
        pre = np.asarray(adata.obsm[pre_integrated_key])
    else:
        raise KeyError(f"adata.obsm[{pre_integrated_key!r}] (pre_integrated_key) is missing")

    # A minimal copy: the Benchmarker writes into the AnnData it is given.
    obsm = {key: np.asarray(adata.obsm[key], dtype=np.float32) for key in embedding_keys}
    obsm["_scfedvi_pre"] = pre
    obs = adata.obs[[batch_key, label_key]].copy()
    bench_adata = _AnnData(obs=obs, obsm=obsm)

    bio = BioConservation(nmi_ari_cluster_labels_leiden=not fast)
    batch = BatchCorrection(bras=_BATCH_ASW[batch_asw], kbet_per_label=not fast)
    bm = Benchmarker(
        bench_adata,
        batch_key=batch_key,
        label_key=label_key,
        embedding_obsm_keys=list(embedding_keys),
        bio_conservation_metrics=bio,
        batch_correction_metrics=batch,
        pre_integrated_embedding_obsm_key="_scfedvi_pre",
        n_jobs=n_jobs,
        progress_bar=False,
    )

    def neighbor_computer(X: np.ndarray, n_neighbors: int) -> Any:
        # scib-metrics counts the cell itself among the n_neighbors columns.
        return compute_neighbors(X, k=n_neighbors - 1, method="auto", n_jobs=n_jobs).to_scib()

    # The Benchmarker calls gc.collect() before every metric: 0.4 s each with jax loaded, a third
    # of the run on 2,000 cells. Freezing the objects alive now makes those collections cheap;
    # objects created during the run are still collected.
    gc.freeze()
    try:
        bm.prepare(neighbor_computer=neighbor_computer)
        bm.benchmark()
    finally:
        gc.unfreeze()
    raw = bm.get_results(min_max_scale=False, clean_names=True)
    metric_type = raw.loc["Metric Type"]
    if batch_asw == "scib":
        raw = raw.rename(columns={"BRAS": "Silhouette batch"})
        metric_type = metric_type.rename({"BRAS": "Silhouette batch"})
    df = raw.drop(index="Metric Type").astype(np.float64)
    df.index.name = "embedding"
    df.columns.name = None
    df.attrs["metric_type"] = {str(k): str(v) for k, v in metric_type.items()}
    return df
