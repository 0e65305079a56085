"""Figures from results (arrays, DataFrames), never from models. matplotlib loads lazily."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd


def umap_coords(Z: np.ndarray, *, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-D UMAP of an embedding (umap-learn, seeded)."""
    try:
        import umap
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("UMAP figures need umap-learn: pip install 'scfedvi[benchmark]'") from e
    from scfedvi._threads import torch_threads_kept

    reducer = umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1)
    with torch_threads_kept():  # numba would leave torch on every core
        return np.asarray(reducer.fit_transform(Z))


def plot_umaps(
    coords: Mapping[str, np.ndarray],
    obs: pd.DataFrame,
    color_keys: Sequence[str],
    path: str | os.PathLike,
    *,
    point_size: float = 3.0,
) -> str:
    """A grid of UMAPs: rows = methods (``coords``), columns = ``obs`` columns to colour by."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_r, n_c = len(coords), len(color_keys)
    fig, axes = plt.subplots(n_r, n_c, figsize=(4.2 * n_c + 1.5, 3.8 * n_r), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for i, (method, xy) in enumerate(coords.items()):
        for j, key in enumerate(color_keys):
            ax = axes[i, j]
            cats = pd.Categorical(obs[key].astype(str))
            order = np.random.default_rng(0).permutation(len(cats))  # no category drawn on top
            colors = np.array([cmap(k % 20) for k in range(len(cats.categories))])
            ax.scatter(
                xy[order, 0], xy[order, 1], s=point_size, c=colors[cats.codes[order]], linewidths=0
            )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{method}: {key}", fontsize=10)
            if i == 0 or j == n_c - 1:
                handles = [
                    plt.Line2D([], [], marker="o", ls="", color=colors[k], label=c)
                    for k, c in enumerate(cats.categories[:20])
                ]
                ax.legend(
                    handles=handles,
                    fontsize=7,
                    loc="center left",
                    bbox_to_anchor=(1.0, 0.5),
                    frameon=False,
                )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
