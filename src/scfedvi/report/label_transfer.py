"""The label-transfer report (issue 17): tables, targets and a confusion matrix figure from
``benchmarks/label_transfer.py``'s ``results.jsonl``.

    python -m scfedvi.report.label_transfer benchmark-out/label_transfer

writes ``report.md``, ``report.html`` and ``confusion_<dataset>.png`` next to the results and
prints the Markdown. :func:`label_transfer_blocks` gives the same content as report blocks
(:mod:`scfedvi.report.markdown`) for another report: ``scfedvi benchmark`` adds them to its
report for its data sets when ``OUT/label_transfer`` (or ``--label-transfer DIR``) holds the
results.
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
    model >= the same site in training - 0.03.

    ``sd`` is the standard deviation of the paired differences (ddof 1), ``higher / lower``
    counts the runs where the first method was above / below the second: a mean difference
    within about ``2 sd / sqrt(runs)`` of the margin is not told apart from it by these runs.
    """
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
            d = p[mine] - p[other]
            ok = a >= b + margin if margin else a > b
            rows.append(
                {
                    "data set": ds,
                    "target": f"{mine} {'>' if not margin else '>='} {other}"
                    + (f" - {-margin:.2f}" if margin else ""),
                    "mean accuracy": f"{a:.3f} vs {b:.3f}",
                    "difference": f"{a - b:+.3f}",
                    "sd": f"{d.std(ddof=1):.3f}" if len(p) > 1 else "–",
                    "higher / lower": f"{int((d > 0).sum())} / {int((d < 0).sum())}",
                    "runs": len(p),
                    "met": "yes" if ok else "no",
                }
            )
    return pd.DataFrame(rows)


def site_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy per data set and hidden site (over seeds) of the default methods, with
    the seeds each mean covers: where a difference between methods comes from."""
    acc = df[df["method"].isin(METHODS) & df["accuracy"].notna()] if "accuracy" in df else df
    if acc.empty:
        return pd.DataFrame()
    g = acc.groupby(["dataset", "hidden", "method"], sort=False)["accuracy"]
    t = g.mean().map("{:.3f}".format) + " (" + g.size().astype(str) + ")"
    out = t.unstack("method")
    out = out[[m for m in METHODS if m in out]].fillna("–").reset_index()
    return out.rename(columns={"dataset": "data set"})


def recall_table(df: pd.DataFrame) -> pd.DataFrame:
    """Recall of each true label at each hidden site, mean over seeds, per default method
    (the fraction of that label's cells predicted as it): which labels a gap comes from."""
    if "recall" not in df:
        return pd.DataFrame()
    r = df[df["method"].isin(METHODS[:-1]) & df["recall"].notna()]
    rows = [
        {"data set": x["dataset"], "hidden": x["hidden"], "label": t, "method": x["method"], "r": v}
        for _, x in r.iterrows()
        for t, v in x["recall"].items()
    ]
    if not rows:
        return pd.DataFrame()
    t = pd.DataFrame(rows).pivot_table(
        index=["data set", "hidden", "label"], columns="method", values="r", aggfunc="mean"
    )
    return t[[m for m in METHODS if m in t]].round(3).reset_index()


def flag_table(df: pd.DataFrame) -> pd.DataFrame:
    """Share of the hidden site's cells that federated scANVI (defaults) would report as the
    unlabelled category, mean over seeds: top probability under the confidence threshold
    (``low_confidence``) and far from the label's centroid (``novel``). Every cell there has a
    label some other site holds, so these are false alarms."""
    cols = [c for c in ("low_confidence", "novel") if c in df]
    r = df[df["method"] == "fed-scanvi"]
    if not cols or r.empty:
        return pd.DataFrame()
    out = r.groupby(["dataset", "hidden"], sort=False)[cols].mean().round(3)
    out["seeds"] = r.groupby(["dataset", "hidden"], sort=False).size()
    return out.reset_index().rename(columns={"dataset": "data set"})


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


def label_transfer_blocks(
    results: str | os.PathLike,
    fig_dir: str | os.PathLike,
    datasets: list[str] | None = None,
) -> list[Block]:
    """The label-transfer section as report blocks (tables, targets, confusion figures).

    ``datasets``: only these data sets' rows (another report's data sets); a paragraph says
    so when the results hold none of them.
    """
    df = load_results(results)
    b: list[Block] = [("h2", "Label transfer (federated scANVI)")]
    if datasets is not None:
        df = df[df["dataset"].isin(datasets)].reset_index(drop=True)
        if df.empty:
            msg = (
                f"{results} holds no label-transfer results for {', '.join(datasets)}: run "
                f"benchmarks/label_transfer.py DATASET --out-dir {results} first."
            )
            return [*b, ("p", msg)]
    meta = df.iloc[-1]
    pooled_epochs = (
        sorted({int(e) for e in df["scanvi_epochs"].dropna()}) if "scanvi_epochs" in df else []
    )
    pooled_note = (
        f"its default, {', '.join(map(str, pooled_epochs))} epochs here"
        if pooled_epochs
        else "its default epochs"
    )
    b.append(
        (
            "p",
            "Each site's labels hidden in turn; accuracy and macro-F1 at that site, mean (sd) "
            f"over hidden sites and seeds. scVI epochs {meta['epochs']} (scFedVI and "
            f"scvi-tools'); federated scANVI epochs {meta['anvi_epochs']} (rounds x local "
            f"epochs); scvi-tools' scANVI: {pooled_note}; versions {meta['versions']}. "
            "Methods: fed-scanvi (federated scANVI, scfedvi.annotate), pooled-scanvi "
            "(scvi-tools on the pooled cells, the hidden site unlabelled), "
            "labelled-only-scanvi (scvi-tools on the labelled sites only, the hidden site "
            "mapped as a query), knn-scfedvi (15 nearest neighbours on the scFedVI embedding, "
            "the labelled sites' cells as reference), new-site-frozen (the site held out of "
            "training, predicted with the saved model). A method with settings in brackets "
            "is a variant of the defaults (an ablation).",
        )
    )
    b.append(("table", accuracy_table(df), "Accuracy at the site whose labels were hidden"))
    t = targets(df)
    if not t.empty:
        b.append(("table", t, "Targets (paired runs: same seed and hidden site)"))
    sites = site_table(df)
    if not sites.empty:
        b.append(("table", sites, "Accuracy per hidden site, mean over seeds (seeds)"))
    recall = recall_table(df)
    if not recall.empty:
        b.append(("table", recall, "Recall per true label at the hidden site, mean over seeds"))
    flags = flag_table(df)
    if not flags.empty:
        b.append(("table", flags, "Cells reported unlabelled at the hidden site (false alarms)"))
    s = scib_table(df)
    if not s.empty:
        b.append(("table", s, "scIB (fast set, true labels) of the latent spaces"))
    if "command" in df:
        b.append(("p", "The commands that wrote these rows:"))
        b.append(("pre", "\n".join(dict.fromkeys(df["command"].dropna().astype(str)))))
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
