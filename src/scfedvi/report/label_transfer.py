"""The label-transfer report (issue 17): tables, targets and a confusion matrix figure from
``benchmarks/label_transfer.py``'s ``results.jsonl``.

    python -m scfedvi.report.label_transfer benchmark-out/label_transfer

writes ``report.md``, ``report.html`` and ``confusion_<dataset>.png`` next to the results and
prints the Markdown. :func:`label_transfer_blocks` gives the same content as report blocks
(:mod:`scfedvi.report.markdown`) for another report.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from scfedvi.report.markdown import Block

#: Methods in the order of the tables; the first is the one the targets are about.
METHODS = (
    "fed-scanvi",
    "fed-scanvi (classifier_stats=site)",
    "pooled-scanvi",
    "labelled-only-scanvi",
    "knn-scfedvi",
    "new-site-frozen",
)


def variant(annotate: dict) -> str:
    """`` (field=value, ...)`` for the scANVI settings of a row that differ from
    :class:`~scfedvi.annotate.AnnotateConfig`'s defaults (those that change predictions; rows
    written before ``classifier_stats`` existed used each site's own statistics)."""
    from dataclasses import asdict

    from scfedvi.annotate import AnnotateConfig

    default = asdict(AnnotateConfig())
    given = {"classifier_stats": "site", **annotate}
    diff = [
        f"{k}={given[k]}"
        for k in default
        if k in given and given[k] != default[k] and k not in IGNORED_SETTINGS
    ]
    return f" ({', '.join(diff)})" if diff else ""


#: Settings that do not change the argmax predictions the tables score.
IGNORED_SETTINGS = ("confidence_threshold", "novelty_ratio", "unlabeled_category")


def load_results(path: str | os.PathLike) -> pd.DataFrame:
    """The rows of ``results.jsonl`` (a directory or the file), one per (data set, seed,
    hidden site, method); the last row of a repeated one wins."""
    p = Path(path)
    p = p / "results.jsonl" if p.is_dir() else p
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: run benchmarks/label_transfer.py first")
    rows = [json.loads(s) for s in p.read_text().splitlines() if s.strip()]
    for r in rows:  # federated rows with other scANVI settings than the defaults: apart
        if r["method"].startswith(("fed-", "new-site", "scib")):
            r["method"] += variant(r.get("annotate") or {})
    df = pd.DataFrame(rows)
    keys = ["dataset", "seed", "hidden", "method", "epochs"]
    return df.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)


def accuracy_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean (sd) accuracy and macro-F1 at the hidden site per data set and method, over hidden
    sites and seeds; ``runs`` counts them."""
    rows = []
    methods = [m for m in dict.fromkeys(df["method"]) if "accuracy" in df and m != "scib"]
    order = [m for m in METHODS if m in methods] + [m for m in methods if m not in METHODS]
    for ds in dict.fromkeys(df["dataset"]):
        for m in order:
            r = df[(df["dataset"] == ds) & (df["method"] == m)]
            if r.empty:
                continue
            acc, f1 = r["accuracy"].astype(float), r["macro_f1"].astype(float)
            rows.append(
                {
                    "data set": ds,
                    "method": m,
                    "accuracy": f"{acc.mean():.3f} ({acc.std(ddof=0):.3f})",
                    "macro-F1": f"{f1.mean():.3f} ({f1.std(ddof=0):.3f})",
                    "runs": f"{len(r)} ({r['hidden'].nunique()} sites x {r['seed'].nunique()} seeds)",
                }
            )
    return pd.DataFrame(rows)


def _paired(df: pd.DataFrame, ds: str, a: str, b: str) -> pd.DataFrame:
    """Accuracy of methods ``a`` and ``b`` on the same (seed, hidden site)."""
    r = df[df["dataset"] == ds].pivot_table(
        index=["seed", "hidden"], columns="method", values="accuracy", aggfunc="last"
    )
    if a not in r or b not in r:
        return pd.DataFrame(columns=[a, b])
    return r[[a, b]].dropna()


def targets(df: pd.DataFrame) -> pd.DataFrame:
    """The issue's targets on paired runs: federated scANVI >= pooled scANVI - 0.02 and > kNN
    on the scFedVI embedding (means over hidden sites and seeds); a new site with the frozen
    model >= the same site in training - 0.03."""
    rows = []
    for ds in dict.fromkeys(df["dataset"]):
        for other, margin, mine in (
            ("pooled-scanvi", -0.02, "fed-scanvi"),
            ("knn-scfedvi", 0.0, "fed-scanvi"),
            ("fed-scanvi", -0.03, "new-site-frozen"),
        ):
            p = _paired(df, ds, mine, other)
            if p.empty:
                continue
            a, b = float(p[mine].mean()), float(p[other].mean())
            ok = a >= b + margin if margin else a > b
            rows.append(
                {
                    "data set": ds,
                    "target": f"{mine} {'>' if not margin else '>='} {other}"
                    + (f" - {-margin:.2f}" if margin else ""),
                    "mean accuracy": f"{a:.3f} vs {b:.3f}",
                    "difference": f"{a - b:+.3f}",
                    "runs": len(p),
                    "met": "yes" if ok else "no",
                }
            )
    return pd.DataFrame(rows)


def scib_table(df: pd.DataFrame) -> pd.DataFrame:
    """scIB aggregates (mean over hidden sites and seeds) per data set and latent space."""
    rows = []
    for _, r in df[df["method"] == "scib"].iterrows():
        for emb, v in r["scib"].items():
            rows.append({"data set": r["dataset"], "latent": emb, **v})
    if not rows:
        return pd.DataFrame()
    t = pd.DataFrame(rows)
    cols = ["Bio conservation", "Batch correction", "Total"]
    out = t.groupby(["data set", "latent"], sort=False)[cols].mean().round(3)
    out["runs"] = t.groupby(["data set", "latent"], sort=False).size()
    return out.reset_index()


def plot_confusion(
    df: pd.DataFrame, dataset: str, path: str | os.PathLike, method: str = "fed-scanvi"
) -> str | None:
    """One row-normalized confusion matrix per hidden site (counts summed over seeds)."""
    r = df[(df["dataset"] == dataset) & (df["method"] == method)]
    r = r[r["confusion"].notna()] if "confusion" in r else r.iloc[:0]
    if r.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = list(dict.fromkeys(r["hidden"]))
    fig, axes = plt.subplots(1, len(sites), figsize=(3.6 * len(sites), 3.4), squeeze=False)
    for ax, site in zip(axes[0], sites, strict=True):
        cm: dict[tuple[str, str], int] = {}
        for c in r[r["hidden"] == site]["confusion"]:
            for i, t in enumerate(c["true"]):
                for j, p in enumerate(c["predicted"]):
                    cm[(t, p)] = cm.get((t, p), 0) + int(c["counts"][i][j])
        true = sorted({t for t, _ in cm})
        pred = sorted({p for _, p in cm})
        m = np.array([[cm.get((t, p), 0) for p in pred] for t in true], dtype=float)
        frac = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(true)):
            for j in range(len(pred)):
                if m[i, j]:
                    ax.text(j, i, f"{frac[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(pred)), pred, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(true)), true, fontsize=7)
        n_seeds = r[r["hidden"] == site]["seed"].nunique()
        ax.set_title(f"hidden: {site} ({n_seeds} seeds)", fontsize=8)
        ax.set_xlabel("predicted", fontsize=7)
    axes[0][0].set_ylabel("true", fontsize=7)
    fig.suptitle(f"{dataset}: {method}, share of each true label", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return str(path)


def label_transfer_blocks(results: str | os.PathLike, fig_dir: str | os.PathLike) -> list[Block]:
    """The label-transfer section as report blocks (tables, targets, confusion figures)."""
    df = load_results(results)
    meta = df.iloc[-1]
    b: list[Block] = [("h2", "Label transfer (federated scANVI)")]
    b.append(
        (
            "p",
            "Each site's labels hidden in turn; accuracy and macro-F1 at that site, mean (sd) "
            f"over hidden sites and seeds. scVI epochs {meta['epochs']}, scANVI epochs "
            f"{meta['anvi_epochs']}; versions {meta['versions']}.",
        )
    )
    b.append(("table", accuracy_table(df), "Accuracy at the site whose labels were hidden"))
    t = targets(df)
    if not t.empty:
        b.append(("table", t, "Targets (paired runs: same seed and hidden site)"))
    s = scib_table(df)
    if not s.empty:
        b.append(("table", s, "scIB (fast set, true labels) of the latent spaces"))
    Path(fig_dir).mkdir(parents=True, exist_ok=True)
    for ds in dict.fromkeys(df["dataset"]):
        png = plot_confusion(df, ds, Path(fig_dir) / f"confusion_{ds}.png")
        if png:
            b.append(("img", png, f"{ds}: federated scANVI at the hidden site"))
    return b


def main(argv: list[str]) -> int:
    from scfedvi.report.html import to_html
    from scfedvi.report.markdown import to_markdown

    if len(argv) != 1:
        print("usage: python -m scfedvi.report.label_transfer OUT_DIR", file=sys.stderr)
        return 2
    d = Path(argv[0])
    blocks = [("h1", "Label transfer"), *label_transfer_blocks(d, d)]
    md = to_markdown(blocks, d)
    (d / "report.md").write_text(md)
    (d / "report.html").write_text(to_html(blocks, "Label transfer"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
