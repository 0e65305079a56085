"""The findings paragraph at the top of a benchmark report, written from the results alone.

Every number in it is read from ``results`` (one row per data set, number of sites, method and
seed, as ``results.csv``); nothing is typed in. Sentences are left out when the methods they
compare were not run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: The comparison the project is judged by: scFedVI's default against the non-private upper
#: bound (pooled scVI) and the paper's baseline (scVI fit per site).
OURS, POOLED, PER_SITE = "scfedvi", "scvi-pooled", "scvi-per-site"


def _mean(r: pd.DataFrame, method: str, column: str) -> float:
    v = r.loc[r["method"] == method, column] if column in r else pd.Series(dtype=float)
    v = pd.to_numeric(v, errors="coerce").dropna()
    return float(v.mean()) if len(v) else float("nan")


def _fmt(x: float, digits: int) -> str:
    return "–" if not np.isfinite(x) else f"{x:.{digits}f}"


def _comparison(r: pd.DataFrame, others: list[str], labels: dict[str, str]) -> list[str]:
    """One clause per metric: ours vs each other method, e.g. ``batch LISI 2.40 (pooled 1.96)``."""
    clauses = []
    for column, name, digits in (
        ("batch_lisi_mean", "batch LISI", 2),
        ("celltype_lisi_mean", "cell-type LISI", 2),
        ("scib: Total", "scIB total", 3),
    ):
        ours = _mean(r, OURS, column)
        if not np.isfinite(ours):
            continue
        refs = [f"{labels[o]} {_fmt(_mean(r, o, column), digits)}" for o in others]
        clauses.append(f"{name} {_fmt(ours, digits)}" + (f" ({'; '.join(refs)})" if refs else ""))
    return clauses


def findings(results: pd.DataFrame) -> list[str]:
    """Sentences that summarise ``results``: scFedVI against pooled and per-site scVI at every
    data set and number of sites, who wins on each metric, and what DP costs and buys."""
    if results.empty or OURS not in set(results["method"]):
        return []
    labels = dict(zip(results["method"], results["label"], strict=False))
    out: list[str] = []
    wins = total = 0
    for (ds, n), r in results.groupby(["dataset", "n_sites"], sort=False):
        others = [m for m in (POOLED, PER_SITE) if m in set(r["method"])]
        clauses = _comparison(r, others, labels)
        if clauses:
            n_seeds = r.loc[r["method"] == OURS, "seed"].nunique()
            out.append(
                f"{ds}, {n} sites ({n_seeds} seed{'s' * (n_seeds > 1)}): scFedVI "
                + ", ".join(clauses)
                + "."
            )
        if POOLED in set(r["method"]):
            total += 1
            ours_b, pooled_b = (_mean(r, m, "batch_lisi_mean") for m in (OURS, POOLED))
            ours_c, pooled_c = (_mean(r, m, "celltype_lisi_mean") for m in (OURS, POOLED))
            wins += bool(ours_b >= pooled_b - 0.05 and ours_c <= pooled_c + 0.02)
    if total:
        out.insert(
            0,
            f"scFedVI reaches pooled scVI (batch LISI at least pooled − 0.05 and cell-type LISI "
            f"at most pooled + 0.02, means over seeds) in {wins} of {total} settings "
            "(data set × number of sites).",
        )
    out.extend(_dp_findings(results, labels))
    return out


def _dp_findings(results: pd.DataFrame, labels: dict[str, str]) -> list[str]:
    if "epsilon" not in results:
        return []
    eps = pd.to_numeric(results["epsilon"], errors="coerce")
    dp = results[np.isfinite(eps)]
    out = []
    for (ds, n), r in dp.groupby(["dataset", "n_sites"], sort=False):
        base = results[(results["dataset"] == ds) & (results["n_sites"] == n)]
        if OURS not in set(base["method"]):
            continue
        parts = []
        for method in dict.fromkeys(r["method"]):
            parts.append(
                f"{labels[method]}: cell-type LISI {_fmt(_mean(base, method, 'celltype_lisi_mean'), 2)}, "
                f"membership-inference AUC {_fmt(_mean(base, method, 'mia_auc'), 3)}"
            )
        out.append(
            f"{ds}, {n} sites, with client-level DP: without DP cell-type LISI "
            f"{_fmt(_mean(base, OURS, 'celltype_lisi_mean'), 2)} and membership-inference AUC "
            f"{_fmt(_mean(base, OURS, 'mia_auc'), 3)} (0.5 = no better than chance); "
            + "; ".join(parts)
            + "."
        )
    return out
