"""Tables of a benchmark's results (a DataFrame in, a DataFrame of formatted cells out).

The paper's format: rows = methods, columns = numbers of sites, cells ``mean ± sd`` of per-cell
LISI (with several seeds: the mean over seeds of the per-cell mean and of the per-cell sd).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

SCIB = "scib: "
#: scIB metrics left out in the fast mode, by group (scib-metrics' clean names).
SLOW_BIO = ("Leiden NMI", "Leiden ARI")
SLOW_BATCH = ("KBET",)
BIO = ("Isolated labels", "KMeans NMI", "KMeans ARI", "Silhouette label", "cLISI", *SLOW_BIO)
BATCH = ("Silhouette batch", "iLISI", "Graph connectivity", "PCR comparison", *SLOW_BATCH)


def _order(results: pd.DataFrame, methods: Sequence[str] | None) -> list[str]:
    labels = list(dict.fromkeys(results["label"]))
    if methods:
        first = [m for m in methods if m in labels]
        return first + [m for m in labels if m not in first]
    return labels


def _sites_col(n: int) -> str:
    return f"{n} sites"


def paper_table(
    results: pd.DataFrame, dataset: str, metric: str, methods: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per-cell LISI ``mean ± sd`` (``metric``: ``"batch"`` or ``"celltype"``): methods x sites."""
    r = results[results["dataset"] == dataset]
    mean, sd = f"{metric}_lisi_mean", f"{metric}_lisi_sd"
    g = r.groupby(["label", "n_sites"])[[mean, sd]].mean()
    out = pd.DataFrame(
        index=_order(r, methods), columns=[_sites_col(n) for n in sorted(r["n_sites"].unique())]
    )
    for (label, n), row in g.iterrows():
        out.loc[label, _sites_col(n)] = f"{row[mean]:.2f} ± {row[sd]:.2f}"
    out.index.name = "method"
    return out.fillna("–")


def seed_table(
    results: pd.DataFrame,
    dataset: str,
    column: str,
    methods: Sequence[str] | None = None,
    digits: int = 2,
) -> pd.DataFrame:
    """``column``'s mean ± sd over seeds (and the number of seeds): methods x sites."""
    r = results[results["dataset"] == dataset]
    g = r.groupby(["label", "n_sites"])[column].agg(["mean", "std", "count"])
    out = pd.DataFrame(
        index=_order(r, methods), columns=[_sites_col(n) for n in sorted(r["n_sites"].unique())]
    )
    for (label, n), row in g.iterrows():
        sd = "" if row["count"] < 2 else f" ± {row['std']:.{digits}f}"
        out.loc[label, _sites_col(n)] = f"{row['mean']:.{digits}f}{sd} (n={int(row['count'])})"
    out.index.name = "method"
    return out.fillna("–")


def scib_summary(
    results: pd.DataFrame, dataset: str, methods: Sequence[str] | None = None
) -> pd.DataFrame | None:
    """scIB ``Total (bio / batch)`` mean over seeds: methods x sites (``None`` without scIB)."""
    if SCIB + "Total" not in results:
        return None
    r = results[results["dataset"] == dataset]
    cols = [SCIB + c for c in ("Total", "Bio conservation", "Batch correction")]
    g = r.groupby(["label", "n_sites"])[cols].mean()
    out = pd.DataFrame(
        index=_order(r, methods), columns=[_sites_col(n) for n in sorted(r["n_sites"].unique())]
    )
    for (label, n), row in g.iterrows():
        t, b, c = (row[x] for x in cols)
        out.loc[label, _sites_col(n)] = f"{t:.3f} ({b:.3f} / {c:.3f})"
    out.index.name = "method"
    return out.fillna("–")


#: scib-metrics' aggregate scores, the last group of its results table.
AGGREGATE = ("Batch correction", "Bio conservation", "Total")


def scib_detail(
    results: pd.DataFrame, dataset: str, n_sites: int, methods: Sequence[str] | None = None
) -> pd.DataFrame | None:
    """Every scIB metric (mean over seeds) of one data set and number of sites: methods x metrics.

    Laid out as scib-metrics' results table: the bio-conservation metrics (``bio:``), the
    batch-correction metrics (``batch:``), then the aggregate scores; methods sorted by Total,
    best first. Every raw scIB score is better when higher; the best value of each column
    (ties at the printed precision included) is in bold. Cells have three decimals.
    """
    cols = [c for c in results.columns if c.startswith(SCIB)]
    if not cols:
        return None
    r = results[(results["dataset"] == dataset) & (results["n_sites"] == n_sites)]
    t = r.groupby("label")[cols].mean().reindex(_order(r, methods))
    t.columns = [c[len(SCIB) :] for c in cols]
    t = t.dropna(axis=1, how="all")
    bio = [c for c in BIO if c in t]
    batch = [c for c in BATCH if c in t]
    agg = [c for c in AGGREGATE if c in t]
    other = [c for c in t.columns if c not in (*bio, *batch, *agg)]
    t = t[bio + batch + other + agg]
    if "Total" in t:
        t = t.sort_values("Total", ascending=False, kind="stable", na_position="last")
    out = pd.DataFrame(index=t.index)
    for c in t.columns:
        shown = t[c].round(3)
        best = shown.max()
        name = f"bio: {c}" if c in bio else f"batch: {c}" if c in batch else c
        out[name] = [
            "–" if pd.isna(v) else f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in shown
        ]
    out.index.name = "method"
    return out


def fast_scib_total(row: pd.Series) -> float:
    """The scIB total over the metrics of the fast mode only (comparable with the curves)."""
    bio = [row.get(SCIB + m, np.nan) for m in BIO if m not in SLOW_BIO]
    batch = [row.get(SCIB + m, np.nan) for m in BATCH if m not in SLOW_BATCH]
    return float(0.6 * np.nanmean(bio) + 0.4 * np.nanmean(batch))


def cost_table(
    results: pd.DataFrame, dataset: str, methods: Sequence[str] | None = None
) -> pd.DataFrame:
    """Training seconds and megabytes communicated (mean over seeds): methods x sites."""
    r = results[results["dataset"] == dataset]
    g = r.groupby(["label", "n_sites"])[["train_seconds", "bytes"]].mean()
    out = pd.DataFrame(
        index=_order(r, methods), columns=[_sites_col(n) for n in sorted(r["n_sites"].unique())]
    )
    for (label, n), row in g.iterrows():
        mb = "" if not np.isfinite(row["bytes"]) else f", {row['bytes'] / 1e6:.1f} MB"
        out.loc[label, _sites_col(n)] = f"{row['train_seconds']:.0f} s{mb}"
    out.index.name = "method"
    return out.fillna("–")


def target_table(results: pd.DataFrame, method: str = "scFedVI") -> pd.DataFrame:
    """The issue's targets for ``method``, per data set and number of sites (mean over seeds).

    scIB total above scVI per site's; batch LISI >= pooled scVI's - 0.05; cell-type LISI <=
    pooled scVI's + 0.02.
    """
    rows = []
    g = results.groupby(["dataset", "n_sites", "label"]).mean(numeric_only=True)
    for ds, n in sorted({(d, s) for d, s, _ in g.index}):

        def get(label: str, col: str, ds=ds, n=n) -> float:
            return (
                float(g.loc[(ds, n, label), col])
                if (ds, n, label) in g.index and col in g
                else np.nan
            )

        b, pb = get(method, "batch_lisi_mean"), get("pooled scVI", "batch_lisi_mean")
        c, pc = get(method, "celltype_lisi_mean"), get("pooled scVI", "celltype_lisi_mean")
        t, pt = get(method, SCIB + "Total"), get("scVI per site", SCIB + "Total")
        rows.append(
            {
                "dataset": ds,
                "sites": n,
                "batch LISI (pooled scVI)": f"{b:.2f} ({pb:.2f})",
                "batch ≥ pooled − 0.05": _ok(b >= pb - 0.05, b, pb),
                "cell-type LISI (pooled scVI)": f"{c:.2f} ({pc:.2f})",
                "cell-type ≤ pooled + 0.02": _ok(c <= pc + 0.02, c, pc),
                "scIB total (scVI per site)": f"{t:.3f} ({pt:.3f})",
                "scIB total > per site": _ok(t > pt, t, pt),
            }
        )
    return pd.DataFrame(rows).set_index(["dataset", "sites"]) if rows else pd.DataFrame()


def _ok(cond: bool, a: float, b: float) -> str:
    if not (np.isfinite(a) and np.isfinite(b)):
        return "n/a"
    return "yes" if cond else "no"
