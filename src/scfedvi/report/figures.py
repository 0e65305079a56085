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


#: Qualitative palettes with no two similar neighbours (tab20's light/dark pairs are hard to
#: tell apart), one per column so that batch and cell type never share colours: Kelly's 20
#: colours of maximum contrast (without white and black), Okabe-Ito's 8 then tab10's, and
#: ColorBrewer's Dark2 (a third column: the site).
PALETTES: tuple[tuple[str, ...], ...] = (
    ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000",
     "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
     "#bcbd22", "#17becf"),
    ("#F3C300", "#875692", "#F38400", "#A1CAF1", "#BE0032", "#C2B280", "#848482", "#008856",
     "#E68FAC", "#0067A5", "#F99379", "#604E97", "#F6A600", "#B3446C", "#DCD300", "#882D17",
     "#8DB600", "#654522", "#E25822", "#2B3D26"),
    ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"),
)  # fmt: skip


def palette(column: int, n: int) -> list[str]:
    """``n`` colours for the ``column``-th colouring of a figure (repeats past its length)."""
    colours = PALETTES[column % len(PALETTES)]
    return [colours[k % len(colours)] for k in range(n)]


def plot_umaps(
    coords: Mapping[str, np.ndarray],
    obs: pd.DataFrame,
    color_keys: Sequence[str],
    path: str | os.PathLike,
    *,
    point_size: float = 3.0,
    titles: Mapping[str, str] | None = None,
) -> str:
    """A grid of UMAPs: rows = methods (``coords``), columns = ``obs`` columns to colour by,
    each column with its own palette (``titles`` renames columns in the panel titles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_r, n_c = len(coords), len(color_keys)
    fig, axes = plt.subplots(n_r, n_c, figsize=(4.2 * n_c + 1.5, 3.8 * n_r), squeeze=False)
    for i, (method, xy) in enumerate(coords.items()):
        for j, key in enumerate(color_keys):
            ax = axes[i, j]
            cats = pd.Categorical(obs[key].astype(str))
            order = np.random.default_rng(0).permutation(len(cats))  # no category drawn on top
            colors = np.array(palette(j, len(cats.categories)))
            ax.scatter(
                xy[order, 0], xy[order, 1], s=point_size, c=colors[cats.codes[order]], linewidths=0
            )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{method}: {(titles or {}).get(key, key)}", fontsize=10)
            if i == 0 or j == n_c - 1:
                handles = [
                    plt.Line2D([], [], marker="o", ls="", color=colors[k], label=c)
                    for k, c in enumerate(cats.categories[:24])
                ]
                ax.legend(
                    handles=handles,
                    fontsize=8,
                    markerscale=1.5,
                    loc="center left",
                    bbox_to_anchor=(1.0, 0.5),
                    frameon=False,
                )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
