"""Composition-balanced site statistics: an embedding step against the site-local trap.

Site-local BatchNorm statistics (the default) centre each site on its own mix of cell types.
A site whose mix differs from the others' (on cortex, a site that is 74% one class) then has
its cell types moved towards the other sites' average cell. :func:`embed_balanced` re-embeds
the training sites of an in-process model with statistics computed on a resample of each
site's cells weighted to the *global* composition of latent clusters:

1. each site embeds its cells (site-local statistics), runs k-means on them and sends its
   centroids and their counts; the coordinator runs weighted k-means on those to start;
2. Lloyd rounds: the coordinator sends the centroids, each site sends per-cluster sums and
   counts of its cells' embeddings;
3. the global composition is the summed counts; each site weights its cells by global share /
   local share of their cluster, recomputes its statistics on a weighted resample of its cells,
   and embeds them again; steps 1-3 repeat ``iterations`` times.

What leaves a site: ``n_clusters`` centroids (means of its cells in the latent space) and
counts, per step; no cell and no count matrix. The trained weights do not change.

Experimental (in process only; the Flower app does not run it yet), measured in the README.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.model import ScFedVI

#: Where :func:`embed_balanced` writes each site's embedding (the default one is kept).
BALANCED_KEY = "X_scFedVI_balanced"


def _assign(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return ((z[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)


def _kmeans(x: np.ndarray, w: np.ndarray, k: int, seed: int, iters: int = 50) -> np.ndarray:
    """Weighted k-means (k-means++ start) on the rows of ``x``; the centroids."""
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    chosen = [x[rng.choice(len(x), p=w / w.sum())]]
    for _ in range(1, k):
        d = np.min(((x[:, None, :] - np.asarray(chosen)[None]) ** 2).sum(-1), axis=1) * w
        chosen.append(
            x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))]
        )
    c = np.asarray(chosen, dtype=np.float64)
    for _ in range(iters):
        a = _assign(x, c)
        for j in range(k):
            m = a == j
            if m.any():
                c[j] = np.average(x[m], axis=0, weights=w[m])
    return c


def federated_kmeans(
    embeddings: list[np.ndarray], n_clusters: int, *, seed: int = 0, rounds: int = 20
) -> list[np.ndarray]:
    """Cluster every site's cells with one set of centroids; each site's labels.

    The coordinator's inputs are each site's own k-means centroids with their counts, then per
    Lloyd round each site's per-cluster sums and counts (what :mod:`scfedvi.privacy`'s secure
    aggregation could sum), never a cell.
    """
    if n_clusters < 1:
        raise ValueError(f"n_clusters={n_clusters}: use 1 or more clusters")
    embeddings = [np.asarray(z, dtype=np.float64) for z in embeddings]  # float32 is exact in it
    sent = []
    for i, z in enumerate(embeddings):  # step 1, at each site
        c = _kmeans(z, np.ones(len(z)), n_clusters, seed + i)
        sent.append((c, np.bincount(_assign(z, c), minlength=len(c))))
    points = np.concatenate([c for c, _ in sent])
    counts = np.concatenate([n for _, n in sent]).astype(np.float64)
    centroids = _kmeans(points[counts > 0], counts[counts > 0], n_clusters, seed)
    for _ in range(rounds):  # step 2: sums and counts only
        sums, total = np.zeros_like(centroids), np.zeros(len(centroids))
        for z in embeddings:
            a = _assign(z, centroids)
            np.add.at(sums, a, z)
            total += np.bincount(a, minlength=len(centroids))
        live = total > 0
        centroids[live] = sums[live] / total[live, None]
    return [_assign(z, centroids) for z in embeddings]


def embed_balanced(
    model: ScFedVI,
    n_clusters: int = 8,
    *,
    iterations: int = 2,
    oversample: int = 4,
    seed: int = 0,
    resample_seed: int = 0,
    labels: Mapping[str, np.ndarray] | None = None,
    write: bool = True,
) -> dict[str, np.ndarray]:
    """Embed each training site's cells with composition-balanced site statistics.

    Parameters
    ----------
    model
        A model trained in process (:meth:`ScFedVI.train`) with site-local BatchNorm
        statistics (``FederationConfig(norm_stats="local")``, the default).
    n_clusters
        Latent clusters whose global composition each site is weighted to.
    iterations
        Times to re-cluster the balanced embeddings and balance again.
    oversample
        The weighted resample holds this many times the site's cells.
    seed
        Seed of the k-means starts (each site ``i`` starts its own with ``seed + i``).
    resample_seed
        Seed of each site's weighted resample.
    labels
        Site name -> a label per cell of that site (in the order of its cells): balance on
        these groups (one pass) instead of clusters; their counts leave the site. With true
        cell types it is an oracle, a bound for the clustered version.
    write
        Store each site's result in ``obsm['X_scFedVI_balanced']`` of its AnnData.

    Returns
    -------
    dict
        Site name -> ``(n_cells, n_latent)`` embedding.
    """
    import pandas as pd

    from scfedvi.federation.site import SiteWorker
    from scfedvi.model import _tensors
    from scfedvi.train.local import SiteTensors, calibrate_norm_stats, embed
    from scfedvi.train.params import set_state

    model._require_trained()
    cfg = model.config
    if cfg.federation.norm_stats != "local" or "batch" not in cfg.model.norms:
        raise ValueError(
            "embed_balanced: it rebalances site-local BatchNorm statistics; this model has "
            f"norm_stats={cfg.federation.norm_stats!r} and norms {cfg.model.norms}: use "
            "get_latent_representation instead"
        )
    if not model.sites:
        raise ValueError("embed_balanced: the model holds no training sites (a loaded model?)")
    if iterations < 1 or oversample < 1:
        raise ValueError(f"iterations={iterations}, oversample={oversample}: use 1 or more")
    sites = []
    for name in model.sites:
        sd = model._site_data[name]
        data = _tensors(sd)
        worker = SiteWorker(sd.site, data, model.schema.n_genes, model.schema.n_batches, cfg)
        sites.append((name, worker, data, worker.embed(model.params)))  # type: ignore[arg-type]
    zs = [z for *_, z in sites]
    for _ in range(1 if labels is not None else iterations):
        if labels is not None:
            groups = [np.asarray(labels[name]) for name, *_ in sites]
        else:
            groups = federated_kmeans(zs, n_clusters, seed=seed)
        total = pd.Series(np.concatenate(groups)).value_counts(normalize=True)  # summed counts
        zs = []
        for (_, worker, data, _), g in zip(sites, groups, strict=True):  # at each site
            local = pd.Series(g).value_counts(normalize=True)
            w = total.loc[g].to_numpy() / local.loc[g].to_numpy()
            rng = np.random.default_rng(resample_seed)
            idx = rng.choice(len(g), size=oversample * len(g), replace=True, p=w / w.sum())
            set_state(worker.module, model.params)  # type: ignore[arg-type]
            calibrate_norm_stats(worker.module, SiteTensors(data.X[idx], data.batch_index[idx]))
            zs.append(embed(worker.module, data))
    out = {}
    for (name, *_), z in zip(sites, zs, strict=True):
        adata, sd = model.sites[name], model._site_data[name]
        if write:
            full = np.full((adata.n_obs, z.shape[1]), np.nan, dtype=z.dtype)
            full[adata.obs_names.get_indexer(sd.obs_names)] = z
            adata.obsm[BALANCED_KEY] = full
        out[name] = z
    return out
