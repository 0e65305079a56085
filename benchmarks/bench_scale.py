"""Atlas scale: scFedVI over many sites against pooled scvi-tools, both at their default schedule.

Simulates ``--n-cells`` cells x ``--genes`` genes over ``--sites`` sites in chunks
(:func:`scfedvi.data.simulate.simulate`; one technology per site with its own batch effect and
library size, cell-type mixes drawn per site; int32 CSR, never dense). Then, timed:

1. scFedVI in process at the default schedule (:mod:`scfedvi.federation.schedule`) with
   ``n_jobs`` site workers: set-up (harmonization, projection), training, balancing (part of
   the trained model), embedding every site at the site;
2. pooled scvi-tools (``scvi.model.SCVI`` with scFedVI's architecture, its own default
   schedule ``get_max_epochs_heuristic(n_obs)``, no early stopping) with as many torch threads
   as scFedVI has workers;
3. with ``--one-thread``: both again at one thread (scFedVI ``n_jobs=1``).

Reported: wall times and their ratio (scFedVI's training + balancing over scvi-tools'
training), cell passes, peak RSS of the process after each phase and each site worker's peak
private memory, bytes sent (rounds), and quality: batch and cell-type LISI over every cell
(exact or approximate kNN, :mod:`scfedvi.metrics.neighbors`, timed), scIB on a stratified
subsample (``--scib-cells``) and a UMAP of a subsample (``--umap-cells``, timed).
``--max-epochs`` overrides BOTH methods' epochs (a throughput estimate, not the default
schedule; printed as such).

On a machine where the default schedule takes hours, measure part of it and extrapolate
(every extrapolated figure is flagged ``train_extrapolated`` and printed as EXTRAPOLATED):
``--rounds N`` trains the first N rounds of scFedVI's schedule, ``--scvi-epochs N`` the first
N of scvi-tools' epochs, and ``--local-steps N`` (with ``--rounds``) makes scFedVI's rounds a
throughput probe of N minibatch steps per site, from whose cells per second the default
schedule's training time is extrapolated. The data are held once: the simulated int32 counts
are turned into float32 in their own buffer, each site's AnnData views its rows of it,
scFedVI's projection keeps those buffers (a float32 CSR already in the schema's gene order is
not copied), and scvi-tools trains on the same buffers. The simulation's peak is reported,
then the peak is reset (Linux), so each later figure is the run's own peak.

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_scale.py --n-cells 100000 --sites 10 \\
        --out benchmark-out/bench_scale_100k.json

Writes the JSON report (command, versions, seeds, every figure) to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-cells", type=int, default=100_000)
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--cell-types", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-jobs", type=int, default=None, help="scFedVI workers (default: cores)")
    p.add_argument("--one-thread", action="store_true", help="also both methods at 1 thread")
    p.add_argument("--max-epochs", type=int, default=None, help="override BOTH (estimate only)")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="train only the first N rounds of scFedVI's schedule; its training time over "
        "the schedule's rounds is extrapolated from them (labelled as such)",
    )
    p.add_argument(
        "--scvi-epochs",
        type=int,
        default=None,
        help="train only N of scvi-tools' epochs; its time over its schedule is extrapolated",
    )
    p.add_argument("--skip-eval", action="store_true", help="no LISI, scIB or UMAP")
    p.add_argument(
        "--local-steps",
        type=int,
        default=None,
        help="a throughput probe: every site trains N steps a round (with --rounds); the "
        "default schedule's training time is extrapolated from the measured cells per second",
    )
    p.add_argument("--scib-cells", type=int, default=20_000, help="0: skip scIB")
    p.add_argument("--umap-cells", type=int, default=20_000, help="0: skip the UMAP")
    p.add_argument("--skip-scvi", action="store_true")
    p.add_argument("--out", default="benchmark-out/bench_scale.json")
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    """The process's peak resident memory since it started (or since :func:`reset_peak`)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Start the peak resident memory afresh (Linux: ``/proc/self/clear_refs``), so a phase's
    peak is its own, not the simulation's; False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def progress(what: str, t0: float) -> None:
    """One line per phase, with its time and the memory so far (a run cut short by its time
    limit still leaves its phases' figures)."""
    print(
        f"  {what}: {time.perf_counter() - t0:.0f} s, peak RSS {peak_rss_mb():,.0f} MB",
        flush=True,
    )


def simulate_sites(args: argparse.Namespace) -> Any:
    from scfedvi.data.simulate import simulate

    # one technology per site: library sizes from 1,500 to 15,000 (cycled), own batch effect
    libs = np.geomspace(1_500, 15_000, num=min(args.sites, 6))
    return simulate(
        args.n_cells,
        args.genes,
        n_batches=args.sites,
        n_cell_types=args.cell_types,
        library_sizes=tuple(float(x) for x in libs),
        composition=0.5,
        batch_effect=0.4,
        seed=args.seed,
    )


def to_float32_in_place(X: Any, chunk: int = 1 << 24) -> Any:
    """The int32 CSR counts as float32 in the same buffer (no second copy of the values)."""
    if X.data.dtype == np.float32:
        return X
    assert X.data.dtype.itemsize == 4, X.data.dtype
    ints, floats = X.data, X.data.view(np.float32)
    for i in range(0, ints.size, chunk):
        floats[i : i + chunk] = ints[i : i + chunk]  # numpy buffers the chunk's overlap
    X.data = floats
    return X


def site_views(adata: Any) -> dict[str, Any]:
    """Each site's AnnData over the pooled matrix's buffers (sites are contiguous rows:
    ``indptr``-sliced views of ``data`` and ``indices``, not copies)."""
    import anndata as ad
    import scipy.sparse as sp

    X, codes = adata.X, adata.obs["batch"].cat.codes.to_numpy()
    out = {}
    for i, b in enumerate(adata.obs["batch"].cat.categories):
        rows = np.flatnonzero(codes == i)
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        assert r1 - r0 == len(rows), "sites must be contiguous rows"
        lo, hi = X.indptr[r0], X.indptr[r1]
        sub = sp.csr_matrix((len(rows), X.shape[1]), dtype=X.dtype)  # (the constructor copies)
        sub.data, sub.indices, sub.indptr = (
            X.data[lo:hi],
            X.indices[lo:hi],
            X.indptr[r0 : r1 + 1] - lo,
        )
        assert np.shares_memory(sub.data, X.data)
        out[str(b)] = ad.AnnData(X=sub, obs=adata.obs.iloc[r0:r1].copy(), var=adata.var[[]].copy())
    return out


def run_scfedvi(adata: Any, args: argparse.Namespace, n_jobs: int) -> dict[str, Any]:
    from scfedvi import ScFedVI
    from scfedvi.config import RunConfig
    from scfedvi.federation.schedule import resolve_schedule

    cfg = RunConfig()
    cfg = replace(
        cfg,
        federation=replace(
            cfg.federation, seed=args.seed, n_jobs=n_jobs, max_epochs=args.max_epochs
        ),
    )
    default_cfg = cfg
    if args.local_steps:
        cfg = replace(cfg, train=replace(cfg.train, local_steps=args.local_steps))
    t0 = time.perf_counter()
    sites = site_views(adata)
    model = ScFedVI.from_sites(
        sites, batch_key="batch", label_key="cell_type", n_top_genes=None, config=cfg
    )
    setup_s = time.perf_counter() - t0
    rss_setup = peak_rss_mb()
    progress("scFedVI set-up (harmonization, projection)", t0)
    t0 = time.perf_counter()
    model.train(args.rounds, progress=False)
    train_s = time.perf_counter() - t0
    progress(f"scFedVI training; workers {model.worker_memory}", t0)
    rounds_run = int(model.history["round"].max()) + 1
    per_round = model.history.groupby("round")["seconds"].sum()  # sites' compute per round
    passes_run = float(model.history["steps"].sum()) * cfg.train.batch_size  # (full batches)
    default = resolve_schedule(default_cfg, {n: len(a) for n, a in sites.items()})
    t0 = time.perf_counter()
    model.balance_steps()
    balance_s = time.perf_counter() - t0
    progress("scFedVI balancing", t0)
    t0 = time.perf_counter()
    Z = np.full((adata.n_obs, model.config.model.n_latent), np.nan, dtype=np.float32)
    for name in model.sites:
        z = model.get_latent_representation(site=name, write=False)
        Z[adata.obs_names.get_indexer(model.sites[name].obs_names)] = z
    embed_s = time.perf_counter() - t0
    progress("scFedVI embedding every site", t0)
    h = model.history
    s = model.schedule
    est = model.memory_estimate
    out = {
        "n_jobs": n_jobs,
        "schedule": s.to_dict(),
        "schedule_text": s.describe(),
        "cell_passes": s.cell_passes,
        "setup_s": setup_s,
        "peak_rss_mb_after_setup": rss_setup,
        "rounds_run": rounds_run,
        "train_s_measured": train_s,
        "cell_passes_measured": passes_run,
        "cells_per_s": passes_run / train_s,
        "default_schedule_text": default.describe(),
        "default_cell_passes": default.cell_passes,
        "train_s": train_s * default.cell_passes / passes_run
        if args.local_steps
        else train_s * s.rounds / rounds_run,
        "train_extrapolated": bool(args.local_steps) or rounds_run < s.rounds,
        "sites_compute_s_per_round": [float(x) for x in per_round],
        "memory_predicted_mb": {
            "coordinator": est.coordinator / 2**20,
            "workers": [b / 2**20 for _, b in est.workers],
            "site_alone_max": max(est.sites.values()) / 2**20,
        },
        "balance_s": balance_s,
        "embed_s": embed_s,
        "bytes_rounds": float(h["bytes_up"].fillna(0).sum() + h["bytes_down"].fillna(0).sum()),
        "workers": model.worker_memory,
        "peak_rss_mb_after": peak_rss_mb(),
    }
    del model, sites
    gc.collect()
    return {**out, "_Z": Z}


def run_scvi(adata: Any, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    import scvi
    import torch
    from scvi.model._utils import get_max_epochs_heuristic

    from scfedvi.config import ModelConfig
    from scfedvi.export import scvi_module_kwargs

    torch.set_num_threads(threads)
    scvi.settings.seed = args.seed
    import anndata as ad

    t0 = time.perf_counter()
    a = ad.AnnData(X=adata.X, obs=adata.obs[["batch"]].copy())  # the same float32 buffers
    scvi.model.SCVI.setup_anndata(a, batch_key="batch")
    model = scvi.model.SCVI(a, **scvi_module_kwargs(ModelConfig()))
    setup_s = time.perf_counter() - t0
    epochs = args.max_epochs or get_max_epochs_heuristic(a.n_obs)
    run_epochs = min(epochs, args.scvi_epochs or epochs)
    t0 = time.perf_counter()
    model.train(
        max_epochs=run_epochs,
        accelerator="cpu",
        devices=1,
        early_stopping=False,
        enable_progress_bar=False,
    )
    train_s = time.perf_counter() - t0
    Z = model.get_latent_representation().astype(np.float32)
    torch.set_num_threads(1)
    out = {
        "threads": threads,
        "epochs": epochs,
        "epochs_run": run_epochs,
        "cell_passes": epochs * int(np.ceil(0.9 * a.n_obs)),
        "setup_s": setup_s,
        "train_s_measured": train_s,
        "cells_per_s": run_epochs * int(np.ceil(0.9 * a.n_obs)) / train_s,
        "train_s": train_s * epochs / run_epochs,
        "train_extrapolated": run_epochs < epochs,
        "peak_rss_mb_after": peak_rss_mb(),
    }
    del model, a
    gc.collect()
    return {**out, "_Z": Z}


def evaluate(adata: Any, Z: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    from scfedvi.metrics.lisi import compute_lisi
    from scfedvi.metrics.neighbors import compute_neighbors

    t0 = time.perf_counter()
    rss0 = peak_rss_mb()
    nn = compute_neighbors(Z, k=90)
    knn_s = time.perf_counter() - t0
    labels = {"batch": adata.obs["batch"].to_numpy(), "type": adata.obs["cell_type"].to_numpy()}
    lisi = compute_lisi(None, labels, neighbors=nn)
    assert isinstance(lisi, dict)
    out: dict[str, Any] = {
        "ilisi_median": float(np.median(lisi["batch"])),
        "clisi_median": float(np.median(lisi["type"])),
        "lisi_s": time.perf_counter() - t0,
        "knn_s": knn_s,
        "lisi_peak_rss_mb": max(rss0, peak_rss_mb()),
    }
    del nn
    return out


def scib_and_umap(adata: Any, embeddings: dict[str, np.ndarray], args: argparse.Namespace):
    from scfedvi.metrics.subsample import stratified_subsample

    out: dict[str, Any] = {}
    if args.scib_cells:
        from scfedvi.metrics.scib import scib_scores

        idx = stratified_subsample(
            adata.obs["batch"], adata.obs["cell_type"], args.scib_cells, seed=args.seed
        )
        sub = adata[idx].copy()
        for k, Z in embeddings.items():
            sub.obsm[k] = Z[idx]
        t0 = time.perf_counter()
        df = scib_scores(
            sub,
            batch_key="batch",
            label_key="cell_type",
            embedding_keys=list(embeddings),
            fast=True,
        )
        out["scib"] = {
            "cells": len(idx),
            "subsample": "stratified by batch x cell type, seed " + str(args.seed),
            "seconds": time.perf_counter() - t0,
            "scores": {k: {c: float(df.loc[k, c]) for c in df.columns} for k in embeddings},
        }
    if args.umap_cells:
        import umap

        idx = stratified_subsample(
            adata.obs["batch"], adata.obs["cell_type"], args.umap_cells, seed=args.seed
        )
        Z = embeddings["scFedVI"][idx]
        t0 = time.perf_counter()
        umap.UMAP(random_state=args.seed).fit_transform(Z)
        out["umap"] = {"cells": len(idx), "seconds": time.perf_counter() - t0}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from scfedvi import __version__
    from scfedvi.federation.inprocess import free_cores, resolve_n_jobs

    torch.set_num_threads(1)
    report: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "versions": {
            "scfedvi": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "seed": args.seed,
        "free_cores": free_cores(),
    }
    t0 = time.perf_counter()
    adata = simulate_sites(args)
    to_float32_in_place(adata.X)  # both methods train on these buffers: one copy of the counts
    report["data"] = {
        "cells": adata.n_obs,
        "genes": adata.n_vars,
        "sites": args.sites,
        "nnz": int(adata.X.nnz),
        "simulate_s": time.perf_counter() - t0,
        "peak_rss_mb_after": peak_rss_mb(),
    }
    print(
        f"simulated {adata.n_obs} x {adata.n_vars} ({adata.X.nnz:,} nonzero) in {report['data']['simulate_s']:.0f} s",
        flush=True,
    )
    progress("simulation", t0)
    # the run's own peak from here on (the simulation's is reported above)
    report["data"]["peak_reset_after_simulation"] = reset_peak()
    jobs = resolve_n_jobs(args.n_jobs, args.sites)
    # at one thread first (the comparison that fits a shared machine); scFedVI's results do
    # not depend on its workers (tests/federation/test_parallel.py), so the quality is measured
    # on the first configuration's embeddings
    configs = ([("one thread", 1)] if args.one_thread and jobs > 1 else []) + [("workers", jobs)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    embeddings: dict[str, np.ndarray] = {}
    runs: list[dict[str, Any]] = []
    for label, n in configs:
        ours = run_scfedvi(adata, args, n)
        Zf = ours.pop("_Z")
        print(f"[{label}] scFedVI: {ours['schedule_text']}", flush=True)
        print(
            f"[{label}] scFedVI: train {ours['train_s']:.0f} s"
            + (
                f" (EXTRAPOLATED from {ours['rounds_run']} rounds: {ours['train_s_measured']:.0f} s)"
                if ours["train_extrapolated"]
                else ""
            )
            + f" + balance {ours['balance_s']:.0f} s + embed {ours['embed_s']:.0f} s ({n} workers);"
            + f" {ours['cells_per_s']:.0f} cells/s; default: {ours['default_schedule_text']}",
            flush=True,
        )
        row: dict[str, Any] = {"config": label, "scfedvi": ours}
        if not args.skip_scvi:
            ref = run_scvi(adata, args, n)
            Zs = ref.pop("_Z")
            print(
                f"[{label}] scvi-tools: {ref['epochs']} epochs, train {ref['train_s']:.0f} s"
                + (
                    f" (EXTRAPOLATED from {ref['epochs_run']} epochs: {ref['train_s_measured']:.0f} s)"
                    if ref["train_extrapolated"]
                    else ""
                )
                + f" ({n} threads); {ref['cells_per_s']:.0f} cells/s",
                flush=True,
            )
            row["scvi"] = ref
            row["time_ratio"] = (ours["train_s"] + ours["balance_s"]) / ref["train_s"]
            print(
                f"[{label}] ratio (scFedVI train + balance) / scvi-tools train: {row['time_ratio']:.3f}",
                flush=True,
            )
            embeddings.setdefault("scVI (pooled)", Zs)
        embeddings.setdefault("scFedVI", Zf)
        runs.append(row)
        report["runs"] = runs
        out.write_text(json.dumps(report, indent=1, default=float))  # partial, after each run
    report["runs"] = runs
    if args.skip_eval:
        report["peak_rss_mb"] = peak_rss_mb()
        out.write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {out} (no evaluation: --skip-eval)")
        return report
    report["quality"] = {k: evaluate(adata, Z, args) for k, Z in embeddings.items()}
    for k, q in report["quality"].items():
        print(
            f"{k}: iLISI {q['ilisi_median']:.3f} cLISI {q['clisi_median']:.3f} (LISI {q['lisi_s']:.0f} s, kNN {q['knn_s']:.0f} s)",
            flush=True,
        )
    report.update(scib_and_umap(adata, embeddings, args))
    if "scib" in report:
        for k, sc in report["scib"]["scores"].items():
            print(
                f"{k}: scIB total {sc.get('Total', float('nan')):.3f} on {report['scib']['cells']} cells",
                flush=True,
            )
    report["peak_rss_mb"] = peak_rss_mb()
    out.write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
