"""The benchmark's figures: training curves, and integration quality against communication.

Plots take results (DataFrames), never models; matplotlib loads lazily (Agg backend).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(
    histories: Mapping[tuple, pd.DataFrame], path: str | os.PathLike, *, seed: int | None = None
) -> str | None:
    """Training loss per round (mean over sites, weighted by cells where known).

    Parameters
    ----------
    histories
        ``{(dataset, n_sites, label, seed): history}``; one panel per (dataset, n_sites), one
        line per method (``seed``: only that seed; default the smallest).
    """
    if not histories:
        return None
    seed = min(k[3] for k in histories) if seed is None else seed
    panels = sorted({(k[0], k[1]) for k in histories if k[3] == seed})
    plt = _plt()
    n_c = min(3, len(panels))
    n_r = int(np.ceil(len(panels) / n_c))
    fig, axes = plt.subplots(n_r, n_c, figsize=(4.6 * n_c, 3.4 * n_r), squeeze=False)
    for ax, (ds, n) in zip(axes.flat, panels, strict=False):
        for (d, s, label, sd), h in histories.items():
            if (d, s, sd) != (ds, n, seed) or "loss" not in h:
                continue
            h = h[h.get("status", "ok") == "ok"] if "status" in h else h
            w = h["num_examples"] if "num_examples" in h else pd.Series(1.0, index=h.index)
            curve = (h["loss"] * w).groupby(h["round"]).sum() / w.groupby(h["round"]).sum()
            ax.plot(curve.index + 1, curve.to_numpy(), marker=".", label=label)
        ax.set_title(f"{ds}, {n} sites (seed {seed})", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("training loss (mean over sites)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_quality_vs_communication(
    curves: pd.DataFrame,
    reference: pd.DataFrame,
    path: str | os.PathLike,
    *,
    reference_label: str = "pooled scVI",
) -> str | None:
    """Batch LISI and scIB total of scFedVI runs against rounds x local steps and bytes.

    Parameters
    ----------
    curves
        One row per evaluated round: ``dataset, label, n_sites, seed, steps, bytes,
        batch_lisi_mean`` and optionally ``scib_total_fast``.
    reference
        ``dataset, n_sites, batch_lisi_mean`` and optionally ``scib_total_fast`` of the
        reference method (drawn as horizontal lines).
    """
    if curves.empty:
        return None
    plt = _plt()
    from matplotlib.ticker import NullFormatter

    ys = [("batch_lisi_mean", "batch LISI (mean per cell)")]
    if "scib_total_fast" in curves and curves["scib_total_fast"].notna().any():
        ys.append(("scib_total_fast", "scIB total (fast metrics)"))
    xs = [("steps", "rounds × local steps (per site)"), ("mb", "MB communicated (all sites)")]
    datasets = list(dict.fromkeys(curves["dataset"]))
    curves = curves.assign(mb=curves["bytes"] / 1e6)
    n_r, n_c = len(datasets) * len(ys), len(xs)
    fig, axes = plt.subplots(n_r, n_c, figsize=(5.2 * n_c, 3.3 * n_r), squeeze=False)
    colors = plt.get_cmap("tab10")
    for i, ds in enumerate(datasets):
        c = curves[curves["dataset"] == ds]
        labels = list(dict.fromkeys(c["label"]))  # the methods' order: the first drawn solid
        keys = sorted(
            {(lab, n) for lab, n in zip(c["label"], c["n_sites"], strict=True)},
            key=lambda ln: (labels.index(ln[0]), ln[1]),
        )
        sites = sorted({n for _, n in keys})
        for j, (ycol, ylabel) in enumerate(ys):
            for k, (xcol, xlabel) in enumerate(xs):
                ax = axes[i * len(ys) + j, k]
                for lab, n in keys:
                    pts = c[(c["label"] == lab) & (c["n_sites"] == n)]
                    g = pts.groupby("round")[[xcol, ycol]].mean()
                    style = ["-", "--", ":", "-."][labels.index(lab) % 4]
                    ax.plot(
                        g[xcol],
                        g[ycol],
                        style,
                        marker="o",
                        ms=3,
                        color=colors(sites.index(n)),
                        label=f"{lab}, {n} sites",
                    )
                ref = reference[reference["dataset"] == ds] if not reference.empty else reference
                if not ref.empty and ycol in ref and ref[ycol].notna().any():
                    ax.axhline(
                        float(ref[ycol].mean()),
                        color="black",
                        lw=1.2,
                        ls="--",
                        label=f"{reference_label} (line to reach)",
                    )
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_xlabel(xlabel + " (log scale)")
                ax.set_ylabel(ylabel)
                ax.set_title(ds, fontsize=10)
                if k == n_c - 1:
                    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_privacy_utility(results: pd.DataFrame, path: str | os.PathLike) -> str | None:
    """The privacy-utility curve: epsilon against batch and cell-type LISI (and the scIB total
    and the membership-inference AUC where present), one row of panels per (data set, sites).

    Runs without DP (``epsilon`` inf) are drawn at the right edge, marked "no DP".
    Returns ``None`` when no row has a finite epsilon.
    """
    if "epsilon" not in results:
        return None
    eps = pd.to_numeric(results["epsilon"], errors="coerce")
    if not np.isfinite(eps).any():
        return None
    res = results.assign(epsilon=eps)[eps.notna()]
    ys = [("batch_lisi_mean", "batch LISI (higher: mixed)")]
    ys.append(("celltype_lisi_mean", "cell-type LISI (lower: kept apart)"))
    if "scib: Total" in res and res["scib: Total"].notna().any():
        ys.append(("scib: Total", "scIB total"))
    if "mia_auc" in res and res["mia_auc"].notna().any():
        ys.append(("mia_auc", "membership-inference AUC"))
    panels = sorted({(d, n) for d, n in zip(res["dataset"], res["n_sites"], strict=True)})
    finite = res["epsilon"][np.isfinite(res["epsilon"])]
    no_dp_x = float(finite.max()) * 4 if len(finite) else 10.0
    plt = _plt()
    fig, axes = plt.subplots(
        len(panels), len(ys), figsize=(3.6 * len(ys), 3.0 * len(panels)), squeeze=False
    )
    for i, (ds, n) in enumerate(panels):
        p = res[(res["dataset"] == ds) & (res["n_sites"] == n)]
        x = p["epsilon"].where(np.isfinite(p["epsilon"]), no_dp_x)
        for j, (col, ylabel) in enumerate(ys):
            ax = axes[i, j]
            g = p.assign(x=x).groupby("x")[col].mean().sort_index()
            ax.plot(g.index, g.to_numpy(), "o-", ms=4)
            ax.set_xscale("log")
            ticks = [*sorted({float(f"{t:.3g}") for t in finite}), no_dp_x]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["no DP"], fontsize=7)
            ax.minorticks_off()
            ax.set_xlabel("ε (δ = 1e-5, client-level)")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{ds}, {n} sites", fontsize=9)
            if col == "mia_auc":
                ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
