"""Write a benchmark's outputs: results.csv, curves and histories, figures, report.md/.html."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scfedvi.benchmark.methods import METHODS, POOLED_REFERENCE, tool_version
from scfedvi.benchmark.runner import BenchmarkRun, BenchmarkSettings
from scfedvi.benchmark.task import SITE_KEY
from scfedvi.report import tables as T
from scfedvi.report.findings import findings
from scfedvi.report.markdown import Block

#: Distributions whose versions every report prints.
VERSIONS = (
    "scfedvi",
    "torch",
    "scvi-tools",
    "flwr",
    "scanpy",
    "anndata",
    "numpy",
    "harmonypy",
    "scib-metrics",
    "umap-learn",
)
#: The paper's published pancreas figures (DESIGN.md), for comparison.
PAPER_PANCREAS = {
    "batch": {
        "scVI per site (paper)": ["1.89 ± 0.83", "1.87 ± 0.80", "1.79 ± 0.79"],
        "scFedVI (paper)": ["2.40 ± 1.05", "2.55 ± 1.09", "2.30 ± 0.96"],
    },
    "celltype": {
        "scVI per site (paper)": ["1.10 ± 0.30", "1.13 ± 0.35", "1.22 ± 0.48"],
        "scFedVI (paper)": ["1.08 ± 0.26", "1.09 ± 0.28", "1.12 ± 0.32"],
    },
}


def versions() -> dict[str, str]:
    """Python, the versions of :data:`VERSIONS`, the hash of scfedvi's core code and its commit."""
    import subprocess

    from scfedvi.benchmark.methods import CORE_CODE, source_hash

    v = {"python": platform.python_version(), **{d: tool_version(d) for d in VERSIONS}}
    v["scfedvi core code (sha256)"] = source_hash(*CORE_CODE)
    try:
        root = Path(__file__).resolve().parents[3]
        r = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if r.returncode == 0 and r.stdout.strip():
            v["git commit"] = r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return v


def _partition_table(obs: pd.DataFrame, batch_key: str) -> pd.DataFrame:
    g = obs.groupby(SITE_KEY, observed=True)
    return pd.DataFrame(
        {
            "cells": g.size(),
            "batches": g[batch_key].agg(lambda s: ", ".join(sorted(map(str, s.unique())))),
        }
    ).rename_axis("site")


def _figures(run: BenchmarkRun, settings: BenchmarkSettings, fig_dir: Path) -> list[Block]:
    from scfedvi.report.benchmark_figures import plot_quality_vs_communication, plot_training_curves
    from scfedvi.report.figures import plot_umaps

    blocks: list[Block] = [("h2", "Figures")]
    specs = {s.name: s for s in settings.datasets}
    for (ds, n), coords in sorted(run.umaps.items()):
        spec = specs[ds]
        obs = run.obs[(ds, n)]
        first_n = min(n_ for ds_, n_ in run.umaps if ds_ == ds)
        order = [  # pooled methods do not depend on the partition: drawn once per data set
            METHODS[m].label
            for m in settings.methods
            if METHODS[m].label in coords and (METHODS[m].kind != "pooled" or n == first_n)
        ]
        if not order:  # only pooled methods, drawn in the data set's first figure
            continue
        path = fig_dir / f"umap_{ds}_{n}sites.png"
        plot_umaps(
            {k: coords[k] for k in order},
            obs,
            [spec.batch_key, spec.label_key, SITE_KEY],
            path,
            point_size=2.0,
            titles={SITE_KEY: "site"},
        )
        blocks.append(
            (
                "img",
                path,
                f"UMAPs, {ds}, {n} sites: colour = batch ({spec.batch_key}), "
                f"cell type ({spec.label_key}) and site; first seed"
                + ("" if n == first_n else "; pooled methods as in the first figure"),
            )
        )
    labelled = {(d, n, METHODS[m].label, s): h for (d, n, m, s), h in run.histories.items()}
    curve_png = plot_training_curves(labelled, fig_dir / "training_curves.png")
    if curve_png:
        blocks.append(("img", curve_png, "Training loss per round (scFedVI methods, first seed)"))
    if not run.curves.empty:
        ref = run.results[run.results["method"] == POOLED_REFERENCE].copy()
        if not ref.empty and "scib: Total" in ref:
            ref["scib_total_fast"] = ref.apply(T.fast_scib_total, axis=1)
        qc_png = plot_quality_vs_communication(
            run.curves, ref, fig_dir / "quality_vs_communication.png"
        )
        if qc_png:
            blocks.append(
                (
                    "img",
                    qc_png,
                    "Integration quality against communication: scFedVI "
                    "methods at intermediate rounds (mean over seeds); dashed line: pooled "
                    "scVI, the non-private upper bound",
                )
            )
    return blocks


def _timing(results: pd.DataFrame, cache_root: Path, since: float) -> pd.DataFrame:
    """scFedVI's training time over pooled scVI's, seed by seed.

    A pair counts as timed in this run when both results were computed after ``since`` (a Unix
    time); a result taken from the cache was timed in an earlier run, under that run's load.
    """

    def fresh(key: object) -> bool:
        meta = cache_root / str(key) / "meta.json"
        return meta.exists() and meta.stat().st_mtime >= since

    rows = []
    for (ds, n), r in results.groupby(["dataset", "n_sites"]):
        pooled = r[r["method"] == POOLED_REFERENCE].set_index("seed")
        for m in ("scfedvi", "fedavg"):
            f = r[r["method"] == m].set_index("seed")
            seeds = sorted(set(f.index) & set(pooled.index))
            if not seeds:
                continue
            ratios, this_run = [], []
            for seed in seeds:
                ratio = f.loc[seed, "train_seconds"] / pooled.loc[seed, "train_seconds"]
                both = fresh(f.loc[seed, "cache_key"]) and fresh(pooled.loc[seed, "cache_key"])
                ratios.append(f"{ratio:.2f}" + ("" if both else "*"))
                if both:
                    this_run.append(ratio)
            rows.append(
                {
                    "dataset": ds,
                    "sites": n,
                    "method": METHODS[m].label,
                    "epochs (method / pooled)": f"{f['epochs'].mean():.0f} / "
                    f"{pooled['epochs'].mean():.0f}",
                    "ratio per seed": ", ".join(ratios),
                    "median ratio, pairs timed in this run": (
                        f"{float(np.median(this_run)):.2f} (n={len(this_run)})" if this_run else "–"
                    ),
                }
            )
    return pd.DataFrame(rows)


def _label_transfer_blocks(
    results: Path | None, settings: BenchmarkSettings, fig_dir: Path
) -> list[Block]:
    """The label-transfer section (:mod:`scfedvi.report.label_transfer`) for this report's
    data sets, read from ``benchmarks/label_transfer.py``'s results; nothing without them."""
    if results is None:
        return []
    from scfedvi.report.label_transfer import label_transfer_blocks

    names = [s.name for s in settings.datasets]
    return label_transfer_blocks(results, fig_dir, datasets=names)


def with_section(blocks: list[Block], section: list[Block]) -> list[Block]:
    """``section`` inserted before the figures (or the configuration), else at the end."""
    ends = ("Figures", "Configuration")
    at = next((i for i, x in enumerate(blocks) if x[0] == "h2" and x[1] in ends), len(blocks))
    return blocks[:at] + section + blocks[at:]


def build_blocks(
    run: BenchmarkRun,
    settings: BenchmarkSettings,
    out: Path,
    command: str,
    seconds: float,
    label_transfer: Path | None = None,
) -> list[Block]:
    """Every section of the report, as blocks; ``label_transfer``: the directory of
    ``benchmarks/label_transfer.py``'s results to add as a section (None: no section)."""
    transfer = _label_transfer_blocks(label_transfer, settings, out / "figures")
    return with_section(_blocks(run, settings, out, command, seconds), transfer)


def _blocks(
    run: BenchmarkRun, settings: BenchmarkSettings, out: Path, command: str, seconds: float
) -> list[Block]:
    res, labels = run.results, [METHODS[m].label for m in settings.methods]
    b: list[Block] = [("h1", "scfedvi benchmark"), ("pre", command)]
    b.append(
        (
            "p",
            (
                f"Data sets: {', '.join(s.name for s in settings.datasets)}; sites: "
                f"{', '.join(map(str, settings.clients))}; seeds: {', '.join(map(str, settings.seeds))}; "
                f"{'quick mode (smoke test: short schedules, small data; not a result)' if settings.quick else 'full mode'}. "
                f"Wall time {seconds:.0f} s; this run computed {run.computed['embeddings']} embeddings and "
                f"{run.computed['evaluations']} evaluations ({run.n_jobs} distinct jobs, the rest from the cache)."
            ),
        )
    )
    prints = [
        f"{ds}, {n} sites: {obs.attrs['data_sha256'][:16]}"
        for (ds, n), obs in sorted(run.obs.items())
        if "data_sha256" in obs.attrs
    ]
    if prints:
        b.append(
            (
                "p",
                "Data fingerprints (sha256 of the counts, cell and gene names, batch and label "
                "of the evaluated cells; first 16 hex digits): " + "; ".join(prints) + ".",
            )
        )
    if run.missing or run.failed:
        lost = [" ".join(map(str, m)) for m in run.missing]
        b.append(
            (
                "p",
                f"**Missing results** ({len(lost)}): {'; '.join(lost)}. Failures: "
                + ("; ".join(f"{j}: {e}" for j, e in run.failed) or "none")
                + ".",
            )
        )
    if res.empty:
        return b
    found = findings(res)
    if found:
        b.append(("h2", "Findings"))
        b.extend(("p", sentence) for sentence in found)
    if "other_code" in res and res["other_code"].astype(bool).any():
        stale = res[res["other_code"].astype(bool)]
        b.append(
            (
                "p",
                f"**Note**: {len(stale)} of {len(res)} results were computed with another "
                "version of scfedvi's core or metrics code than the one installed now "
                "(`--report-only` reuses them; rerun without it to recompute): "
                + ", ".join(sorted(set(stale["label"])))
                + ".",
            )
        )
    b.append(("h2", "The paper's tables: per-cell LISI, mean ± sd over cells"))
    b.append(
        (
            "p",
            "Batch LISI: higher is better mixing (1 to the number of batches). Cell-type "
            "LISI: lower keeps cell types apart. With several seeds each cell is the mean over "
            "seeds of the per-cell mean and sd. Batch LISI alone cannot rank methods: per-site "
            "embeddings live in unaligned spaces that overlap by accident; read it beside "
            "cell-type LISI and the scIB bio-conservation scores.",
        )
    )
    for ds in dict.fromkeys(res["dataset"]):
        for metric, name in (("batch", "batch LISI"), ("celltype", "cell-type LISI")):
            t = T.paper_table(res, ds, metric, labels)
            b.append(
                ("table", t, f"{ds}: {name} (batch = {res[res.dataset == ds].batch_key.iloc[0]})")
            )
            if ds == "pancreas" and list(t.columns) == ["2 sites", "3 sites", "5 sites"]:
                pub = pd.DataFrame(PAPER_PANCREAS[metric], index=t.columns).T
                pub.index.name = "method"
                b.append(("table", pub, f"{ds}: {name} as published in the scFedVI paper"))
    if len(settings.seeds) > 1:
        b.append(("h2", "Across seeds"))
        for ds in dict.fromkeys(res["dataset"]):
            b.append(
                (
                    "table",
                    T.seed_table(res, ds, "batch_lisi_mean", labels),
                    f"{ds}: batch LISI mean, mean ± sd over seeds",
                )
            )
            if "scib: Total" in res:
                b.append(
                    (
                        "table",
                        T.seed_table(res, ds, "scib: Total", labels, 3),
                        f"{ds}: scIB total, mean ± sd over seeds",
                    )
                )
    if "scib: Total" in res:
        b.append(("h2", "scIB metrics"))
        b.append(
            (
                "p",
                "scib-metrics' Benchmarker, raw (not min-max scaled) scores; Total = 0.6 × "
                "bio conservation + 0.4 × batch correction. Cells: Total (bio / batch), mean "
                "over seeds." + (" Quick mode: without kBET and Leiden." if settings.quick else ""),
            )
        )
        for ds in dict.fromkeys(res["dataset"]):
            b.append(("table", T.scib_summary(res, ds, labels), f"{ds}: scIB total (bio / batch)"))
            for n in sorted(res[res.dataset == ds]["n_sites"].unique()):
                b.append(
                    (
                        "table",
                        T.scib_detail(res, ds, n, labels),
                        f"{ds}, {n} sites: every scIB metric",
                    )
                )
        tgt = T.target_table(res)
        if not tgt.empty:
            b.append(("h2", "Targets: scFedVI's default against pooled and per-site scVI"))
            b.append(("table", tgt, "scFedVI vs pooled scVI (LISI) and scVI per site (scIB total)"))
    b.append(("h2", "Cost: training time and communication"))
    for ds in dict.fromkeys(res["dataset"]):
        b.append(
            ("table", T.cost_table(res, ds, labels), f"{ds}: training seconds, MB communicated")
        )
    timing = _timing(res, out / "cache", time.time() - seconds)
    if not timing.empty:
        b.append(
            (
                "table",
                timing,
                "Federated training time (all sites, all rounds, in process) over scvi-tools' "
                "pooled training time, same seed (* = at least one of the two was timed in an "
                "earlier run and taken from the cache)",
            )
        )
    b.extend(_privacy_blocks(res, labels, out / "figures"))
    b.extend(_figures(run, settings, out / "figures"))
    b.extend(_config_blocks(run, settings))
    return b


#: What the DP guarantee covers, in every report (docs/dp.md says it in full).
DP_SCOPE = (
    "ε is client-level (δ = 1e-5, add/remove one site, fixed divisor, noise from the OS "
    "CSPRNG, added by the coordinator) and covers the released global parameters only. It "
    "does not cover the harmonization summaries (gene names, cells per batch, per-gene "
    "statistics, label categories), the cell counts and local steps each site reports, which "
    "sites answered and when, or the embeddings, which are computed and kept at the sites; "
    "under DP a site sends no losses, and SCAFFOLD, pooled BatchNorm statistics, early "
    "stopping and balancing are refused or off. Client-level DP protects a whole site, so with "
    "few sites it buys little: the noise on the average has standard deviation σC/n on every "
    "one of the model's parameters while a site's whole update has norm at most C, so a "
    "handful of sites cannot train a model of this size under it (the DP rows below show "
    "what it cost here); it pays with many sites (the noise shrinks as 1/n). The "
    "membership-inference AUC (loss threshold on the global model; members: each site's "
    "training cells, non-members: its held-out 10%) is measured for every federated method, "
    "with or without DP."
)


def _privacy_blocks(res: pd.DataFrame, labels: list[str], fig_dir: Path) -> list[Block]:
    from scfedvi.report.benchmark_figures import plot_privacy_utility

    cols = ["epsilon", "noise_multiplier", "mia_auc", "mia_tpr_at_1fpr"]
    if "mia_auc" not in res or res["mia_auc"].isna().all():
        return []
    fed = res[res["mia_auc"].notna()]
    t = fed.groupby(["dataset", "n_sites", "label"], sort=False)[cols].mean().reset_index()
    t["label"] = pd.Categorical(t["label"], [x for x in labels if x in set(t["label"])])
    t = t.sort_values(["dataset", "n_sites", "label"]).round(
        {"epsilon": 2, "noise_multiplier": 3, "mia_auc": 3, "mia_tpr_at_1fpr": 3}
    )
    b: list[Block] = [("h2", "Privacy: ε and measured leakage"), ("p", DP_SCOPE)]
    b.append(
        (
            "table",
            t.set_index("label"),
            "ε over the run (inf: no DP), noise multiplier, "
            "membership-inference AUC and TPR at 1% FPR (mean over seeds)",
        )
    )
    png = plot_privacy_utility(res, fig_dir / "privacy_utility.png")
    if png:
        b.append(
            (
                "img",
                png,
                "Privacy against utility: ε against batch and cell-type LISI "
                "(and scIB, MIA AUC); 'no DP' at the right edge",
            )
        )
    return b


def _config_blocks(run: BenchmarkRun, settings: BenchmarkSettings) -> list[Block]:
    b: list[Block] = [("h2", "Configuration")]
    cfg: dict[str, Any] = {
        "settings": {k: v for k, v in settings.__dict__.items() if k != "datasets"},
        "datasets": [s.__dict__ for s in settings.datasets],
        "methods": {m: METHODS[m].settings(settings.quick) for m in settings.methods},
    }
    b.append(("pre", json.dumps(cfg, indent=1, default=str)))
    for (ds, n), obs in sorted(run.obs.items()):
        spec = next(s for s in settings.datasets if s.name == ds)
        b.append(("table", _partition_table(obs, spec.batch_key), f"partition: {ds}, {n} sites"))
    b.append(("h2", "Versions and machine"))
    v = versions()
    v["machine"] = f"{platform.platform()}, {os.cpu_count()} CPUs"
    b.append(("table", pd.DataFrame({"version": v}).rename_axis("component"), None))
    b.append(
        (
            "p",
            f"Seeds: {', '.join(map(str, settings.seeds))} (methods' seeds; partitions and "
            "subsamples use seed 0).",
        )
    )
    return b


def write_report(
    run: BenchmarkRun,
    settings: BenchmarkSettings,
    out: str | os.PathLike,
    *,
    command: str,
    seconds: float,
    label_transfer: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write results.csv, curves.csv, histories.csv, figures/, report.md and report.html;
    with ``label_transfer`` (a directory of ``benchmarks/label_transfer.py``'s results), its
    section for this report's data sets too."""
    from scfedvi.report.html import to_html
    from scfedvi.report.markdown import to_markdown

    d = Path(out)
    (d / "figures").mkdir(parents=True, exist_ok=True)
    files = {
        "results": d / "results.csv",
        "report_md": d / "report.md",
        "report_html": d / "report.html",
    }
    run.results.to_csv(files["results"], index=False)
    if not run.curves.empty:
        files["curves"] = d / "curves.csv"
        run.curves.to_csv(files["curves"], index=False)
    if run.histories:
        files["histories"] = d / "histories.csv"
        frames = [
            h.assign(dataset=k[0], n_sites=k[1], method=k[2], seed=k[3])
            for k, h in run.histories.items()
        ]
        pd.concat(frames, ignore_index=True).to_csv(files["histories"], index=False)
    lt = None if label_transfer is None else Path(label_transfer)
    blocks = build_blocks(run, settings, d, command, seconds, label_transfer=lt)
    files["report_md"].write_text(to_markdown(blocks, d))
    files["report_html"].write_text(to_html(blocks, "scfedvi benchmark"))
    meta = {
        "command": command,
        "seconds": seconds,
        "versions": versions(),
        "computed": run.computed,
        "missing": [list(m) for m in run.missing],
    }
    (d / "run.json").write_text(json.dumps(meta, indent=1, default=str))
    return files
