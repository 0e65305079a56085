"""Metrics of one embedding: per-cell LISI (the paper's mean ± sd) and the scIB metrics.

Batch and cell-type LISI share one exact neighbour graph (90 neighbours, perplexity 30); the
scIB metrics share one graph of their own (computed once inside
:func:`~scfedvi.metrics.scib.scib_scores`). Cells a method could not embed (NaN rows) are left
out and counted.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

#: Prefix of the scIB columns in results.
SCIB_PREFIX = "scib: "
LISI_COLUMNS = (
    "batch_lisi_mean",
    "batch_lisi_sd",
    "batch_lisi_median",
    "celltype_lisi_mean",
    "celltype_lisi_sd",
    "celltype_lisi_median",
)


def lisi_summary(Z: np.ndarray, batches: Sequence[Any], labels: Sequence[Any]) -> dict[str, float]:
    """Batch and cell-type LISI (mean, sd, median over cells) on one shared neighbour graph."""
    from scfedvi.metrics import compute_lisi, compute_neighbors, summarize_lisi

    nb = compute_neighbors(Z, k=90, n_jobs=1)
    lisi = compute_lisi(Z, {"batch": batches, "celltype": labels}, neighbors=nb)
    assert isinstance(lisi, dict)
    out: dict[str, float] = {}
    for name, values in lisi.items():
        s = summarize_lisi(values)
        out.update({f"{name}_lisi_{k}": s[k] for k in ("mean", "sd", "median")})
    return out


def scib_table(
    embeddings: Mapping[str, np.ndarray],
    obs: pd.DataFrame,
    pre: np.ndarray,
    *,
    batch_key: str,
    label_key: str,
    fast: bool,
) -> pd.DataFrame:
    """scIB metrics of several embeddings of the same cells (one Benchmarker run)."""
    from anndata import AnnData

    from scfedvi.metrics.scib import scib_scores

    obsm = {k: np.asarray(v, dtype=np.float32) for k, v in embeddings.items()}
    obsm["X_pca"] = pre
    a = AnnData(obs=obs[[batch_key, label_key]].astype(str).astype("category"), obsm=obsm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scib_scores(
            a,
            batch_key=batch_key,
            label_key=label_key,
            embedding_keys=list(embeddings),
            pre_integrated_key="X_pca",
            fast=fast,
        )


def evaluate(
    Z: np.ndarray,
    obs: pd.DataFrame,
    *,
    batch_key: str,
    label_key: str,
    pre: np.ndarray | None,
    scib: bool,
    fast: bool,
    curve: Sequence[Mapping[str, Any]] = (),
    umap_seed: int | None = 0,
) -> dict[str, Any]:
    """Every metric of an embedding (and of its intermediate rounds), and its UMAP.

    Parameters
    ----------
    Z
        ``(n_cells, d)``; rows with NaN are left out.
    obs
        Cells' ``obs`` (batch and label columns), in the order of ``Z``.
    pre
        Unintegrated PCA of the same cells (scIB's PCR comparison); needed with ``scib``.
    scib, fast
        Compute the scIB metrics; leave out the slow ones (kBET, Leiden).
    curve
        Intermediate embeddings (``{"round", ..., "embedding"}``): LISI each, and the scIB
        metrics (fast) when ``scib``.
    umap_seed
        Seed of the UMAP of ``Z`` (``None``: no UMAP).

    Returns
    -------
    dict
        ``{"metrics": {...}, "curve": [{...}], "umap": array or None}``.
    """
    ok = np.isfinite(Z).all(axis=1)
    sub = obs.loc[ok]
    b, lab = sub[batch_key].astype(str).to_numpy(), sub[label_key].astype(str).to_numpy()
    metrics: dict[str, Any] = {"n_cells": int(ok.sum()), "n_cells_not_embedded": int((~ok).sum())}
    metrics.update(lisi_summary(Z[ok], b, lab))
    curve_rows = []
    for point in curve:
        Zc = point["embedding"]
        okc = np.isfinite(Zc).all(axis=1)
        row = {k: v for k, v in point.items() if k != "embedding"}
        row.update(
            lisi_summary(
                Zc[okc],
                obs[batch_key].astype(str).to_numpy()[okc],
                obs[label_key].astype(str).to_numpy()[okc],
            )
        )
        curve_rows.append(row)
    if scib:
        if pre is None:
            raise ValueError("evaluate: the scIB metrics need pre= (the unintegrated PCA)")
        table = scib_table(
            {"final": Z[ok]}, sub, pre[ok], batch_key=batch_key, label_key=label_key, fast=fast
        )
        metrics.update({SCIB_PREFIX + c: float(v) for c, v in table.loc["final"].items()})
        if curve:
            oks = [np.isfinite(p["embedding"]).all(axis=1) for p in curve]
            common = np.logical_and.reduce(oks)
            embs = {f"r{i}": p["embedding"][common] for i, p in enumerate(curve)}
            t = scib_table(
                embs,
                obs.loc[common],
                pre[common],
                batch_key=batch_key,
                label_key=label_key,
                fast=True,
            )
            for i, row in enumerate(curve_rows):
                row["scib_total_fast"] = float(t.loc[f"r{i}", "Total"])
                row["scib_bio_fast"] = float(t.loc[f"r{i}", "Bio conservation"])
                row["scib_batch_fast"] = float(t.loc[f"r{i}", "Batch correction"])
    coords = None
    if umap_seed is not None:
        from scfedvi.report.figures import umap_coords

        coords = np.full((Z.shape[0], 2), np.nan, dtype=np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            coords[ok] = umap_coords(Z[ok], seed=umap_seed)
    return {"metrics": metrics, "curve": curve_rows, "umap": coords}
