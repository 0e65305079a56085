"""Local training throughput: scfedvi's loop against ``scvi.model.SCVI.train``, side by side.

Both train the same architecture, scfedvi's default (scVI's defaults: n_hidden 128, n_latent
10, one layer, ZINB, gene dispersion, BatchNorm in the encoder, but LayerNorm in the decoder,
which scvi-tools builds with ``use_batch_norm="encoder", use_layer_norm="decoder"``), with the
same optimizer settings (Adam, lr 1e-3, eps 0.01,
weight decay 1e-6), minibatch size and number of epochs over the same cells (both with
``train_size=1.0``, no early stopping, no progress bar, CPU). Throughput is cells per second of
the training epochs alone; imports and set-up (registration, module and trainer construction)
are timed apart and reported. Each epoch of ours is one ``local_update`` call (one federated
round with one local epoch), so it includes the per-round cost of loading and extracting
parameters. A third row times scvi-tools with scfedvi's route for float32 products through
oneDNN (:mod:`scfedvi.train.matmul`; not scvi-tools' default, which is MKL): it tells how much
of the ratio is the matrix-product backend. The arithmetic-only floor uses the route as
``local_update`` does.

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_training.py [--epochs 10] [--threads 1]

Writes ``benchmark-out/bench_training.json`` (``--out``) with the command, versions, seeds,
thread count and every figure printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

T_START = time.perf_counter()
import torch  # noqa: E402

from scfedvi.config import ModelConfig, TrainConfig  # noqa: E402
from scfedvi.train.local import (  # noqa: E402
    LocalState,
    SiteTensors,
    build_module,
    kl_weight,
    local_update,
    make_optimizer,
)
from scfedvi.train.matmul import onednn_matmul  # noqa: E402
from scfedvi.train.params import get_state  # noqa: E402

IMPORT_OURS_S = time.perf_counter() - T_START


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("SCFEDVI_DATA_DIR", "/work/shared/data"))
    p.add_argument("--datasets", default="pancreas,simulated", help="comma-separated")
    p.add_argument("--epochs", type=int, default=6, help="epochs per method and dataset")
    p.add_argument(
        "--warmup-epochs", type=int, default=1, help="epochs of each run left out of steady state"
    )
    p.add_argument("--sim-cells", type=int, default=10_000)
    p.add_argument("--sim-genes", type=int, default=2_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both methods (0: torch's default)",
    )
    p.add_argument(
        "--repeats", type=int, default=2, help="alternating runs per method (ours, scvi, ...)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-scvi", action="store_true", help="time ours only")
    p.add_argument("--no-floor", action="store_true", help="skip the arithmetic-only anchor")
    p.add_argument(
        "--no-scvi-onednn",
        action="store_true",
        help="skip scvi-tools run with scfedvi's oneDNN route for float32 products "
        "(scfedvi.train.matmul), which tells how much of the ratio is the matmul backend",
    )
    p.add_argument(
        "--accelerator",
        choices=["cpu", "gpu"],
        default="cpu",
        help="where both methods train (gpu: scfedvi's TrainConfig.accelerator and scvi-tools' "
        "accelerator; benchmarks/gpu_check.sh)",
    )
    p.add_argument("--out", default="benchmark-out/bench_training.json")
    return p.parse_args(argv)


# -- data --------------------------------------------------------------------------------------
def load_pancreas(data_dir: str) -> Any:
    import anndata as ad

    path = Path(data_dir) / "pancreas_neuca.h5ad"
    if not path.exists():
        raise SystemExit(f"{path} not found; set SCFEDVI_DATA_DIR or pass --data-dir")
    adata = ad.read_h5ad(path)
    return adata, "batch", f"{path} ({adata.n_obs} cells x {adata.n_vars} genes)"


def make_simulated(n_cells: int, n_genes: int, seed: int) -> Any:
    try:
        from scfedvi.data.simulate import simulate
    except ImportError:  # before the simulator exists: a plain NB generator
        simulate = None
    if simulate is not None:
        adata = simulate(n_cells=n_cells, n_genes=n_genes, n_batches=2, seed=seed)
        return adata, "batch", f"scfedvi.data.simulate.simulate({n_cells}, {n_genes}, 2 batches)"
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    prof = rng.gamma(0.6, 1.0, (5, n_genes))
    prof /= prof.sum(1, keepdims=True)
    types, batch = rng.integers(0, 5, n_cells), np.arange(n_cells) % 2
    lib = rng.lognormal(np.log(3000.0), 0.3, n_cells) * (1 + 9 * batch)
    counts = rng.negative_binomial(5, 5 / (5 + lib[:, None] * prof[types])).astype(np.int32)
    counts[:, 0] += 1
    obs = pd.DataFrame({"batch": pd.Categorical(batch.astype(str))})
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs)
    return adata, "batch", f"NB generator ({n_cells}, {n_genes}, 2 batches)"


# -- ours --------------------------------------------------------------------------------------
def run_ours(adata: Any, batch_key: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    cats = list(adata.obs[batch_key].astype("category").cat.categories)
    batch_index = adata.obs[batch_key].astype(str).map({str(c): i for i, c in enumerate(cats)})
    data = SiteTensors(adata.X, batch_index.to_numpy())
    model_cfg = ModelConfig(n_hidden=args.n_hidden, n_latent=args.n_latent)
    train_cfg = TrainConfig(
        batch_size=args.batch_size,
        local_epochs=1,
        train_size=1.0,
        accelerator=getattr(args, "accelerator", "cpu"),
    )
    torch.manual_seed(args.seed)
    module = build_module(data.X.shape[1], len(cats), model_cfg)
    params = get_state(module)
    state = LocalState()
    setup_s = time.perf_counter() - t0
    epoch_s, last = [], {}
    for epoch in range(args.epochs):
        t = time.perf_counter()
        result, state = local_update(
            module, params, data, train_cfg, state, norm_stats="averaged", seed=args.seed + epoch
        )
        epoch_s.append(time.perf_counter() - t)
        params, last = result.params, result.metrics
    return {
        "setup_s": setup_s,
        "epoch_s": epoch_s,
        "elbo_last_epoch": last["reconstruction"] + last["kl"],
    }


def run_floor(adata: Any, batch_key: str, args: argparse.Namespace) -> dict[str, Any]:
    """The model's arithmetic alone: forward, backward and Adam on minibatches densified
    beforehand, no data loading, no metrics, no parameter exchange. No training loop of this
    architecture can be faster than this on the same threads; it bounds the attainable ratio."""
    cats = list(adata.obs[batch_key].astype("category").cat.categories)
    codes = adata.obs[batch_key].astype(str).map({str(c): i for i, c in enumerate(cats)})
    data = SiteTensors(adata.X, codes.to_numpy())
    torch.manual_seed(args.seed)
    module = build_module(data.X.shape[1], len(cats), ModelConfig(args.n_hidden, args.n_latent))
    opt = make_optimizer(module, TrainConfig())
    module.train()
    rng = np.random.default_rng(args.seed)
    epoch_s, elbo = [], 0.0
    for epoch in range(args.epochs):
        batches = [  # densified (with their nonzero entries) beforehand, not timed
            data.training_minibatch(idx) for idx in data.minibatch_indices(args.batch_size, rng)
        ]
        weight = kl_weight(epoch, TrainConfig().n_epochs_kl_warmup)
        elbos = []
        t = time.perf_counter()
        with onednn_matmul():  # the products local_update uses
            for x, b, nonzero in batches:
                out = module.loss(x, b, kl_weight=weight, nonzero=nonzero)
                opt.zero_grad()
                out.loss.backward()
                opt.step()
                elbos.append(out.elbo.detach())
        epoch_s.append(time.perf_counter() - t)
        elbo = float(torch.stack(elbos).mean())
    return {"setup_s": 0.0, "epoch_s": epoch_s, "elbo_last_epoch": elbo}


# -- scvi-tools --------------------------------------------------------------------------------
def run_scvi_onednn(adata: Any, batch_key: str, args: argparse.Namespace) -> dict[str, Any]:
    """scvi-tools with scfedvi's oneDNN route for float32 products (not its default)."""
    with onednn_matmul() as on:
        return {**run_scvi(adata, batch_key, args), "onednn": on}


def run_scvi(adata: Any, batch_key: str, args: argparse.Namespace) -> dict[str, Any]:
    import scvi
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._t = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.times.append(time.perf_counter() - self._t)

    t0 = time.perf_counter()
    scvi.settings.seed = args.seed
    adata = adata.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    from scfedvi.export import scvi_module_kwargs

    kwargs = scvi_module_kwargs(ModelConfig(n_hidden=args.n_hidden, n_latent=args.n_latent))
    model = scvi.model.SCVI(adata, **kwargs)  # the same architecture as ours
    setup_s = time.perf_counter() - t0
    timer = EpochTimer()
    t1 = time.perf_counter()
    model.train(
        max_epochs=args.epochs,
        accelerator=getattr(args, "accelerator", "cpu"),
        devices=1,
        train_size=1.0,
        batch_size=args.batch_size,
        early_stopping=False,
        enable_progress_bar=False,
        callbacks=[timer],
    )
    train_call_s = time.perf_counter() - t1
    elbo = float(model.history["elbo_train"].iloc[-1, 0])
    return {
        "setup_s": setup_s,
        "epoch_s": timer.times,
        "train_call_overhead_s": train_call_s - sum(timer.times),
        "elbo_last_epoch": elbo,
    }


# -- report ------------------------------------------------------------------------------------
def summarize(n_cells: int, runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Steady-state epochs (each run's first ``warmup`` left out): median and best."""
    steady = [t for r in runs for t in (r["epoch_s"][warmup:] or r["epoch_s"])]
    first = [r["epoch_s"][0] for r in runs]
    med, best = float(np.median(steady)), float(np.min(steady))
    return {
        "runs": runs,
        "setup_s": float(np.median([r["setup_s"] for r in runs])),
        "first_epoch_s": first,
        "epoch_s_median": med,
        "epoch_s_best": best,
        "cells_per_s_median": n_cells / med,
        "cells_per_s_best": n_cells / best,
        "elbo_last_epoch": runs[-1]["elbo_last_epoch"],
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
    }
    for pkg in ("torch", "numpy", "scipy", "anndata", "scvi-tools", "lightning", "scfedvi"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import_scvi_s = None
    if not args.skip_scvi:
        t = time.perf_counter()
        import scvi  # noqa: F401

        import_scvi_s = time.perf_counter() - t
    results: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "args": vars(args),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "load_average_at_start": os.getloadavg(),
        "import_s": {"scfedvi.train.local (with torch)": IMPORT_OURS_S, "scvi": import_scvi_s},
        "datasets": {},
    }
    print(f"torch threads: {torch.get_num_threads()}, load average: {os.getloadavg()}")
    print(f"versions: {json.dumps(results['versions'])}")
    print(
        f"seed: {args.seed}; one-off import s: ours (with torch) {IMPORT_OURS_S:.2f}, "
        f"scvi-tools {import_scvi_s if import_scvi_s is None else round(import_scvi_s, 2)}"
    )
    for name in args.datasets.split(","):
        if name == "pancreas":
            adata, key, desc = load_pancreas(args.data_dir)
        elif name == "simulated":
            adata, key, desc = make_simulated(args.sim_cells, args.sim_genes, args.seed)
        else:
            raise SystemExit(f"unknown dataset {name!r}; use pancreas,simulated")
        print(f"\n== {name}: {desc}")
        row: dict[str, Any] = {"description": desc, "n_cells": adata.n_obs, "n_genes": adata.n_vars}
        methods = [("scfedvi", run_ours)] + ([] if args.skip_scvi else [("scvi-tools", run_scvi)])
        if not args.skip_scvi and not args.no_scvi_onednn:
            methods.append(("scvi oneDNN", run_scvi_onednn))
        if not args.no_floor:
            methods.append(("math floor", run_floor))
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in methods}
        for rep in range(args.repeats):  # alternate, so that both share the machine's load
            for label, fn in methods:
                r = fn(adata, key, args)
                runs[label].append(r)
                print(
                    f"  run {rep + 1} {label}: setup {r['setup_s']:.2f} s, epochs "
                    + ", ".join(f"{t:.2f}" for t in r["epoch_s"])
                    + f" s; load {os.getloadavg()[0]:.1f}"
                )
        print(
            f"{'method':>11} | {'setup s':>7} | {'median epoch s':>14} | {'best epoch s':>12} | "
            f"{'cells/s (median)':>16} | {'cells/s (best)':>14} | ELBO/cell, last epoch"
        )
        for label, rs in runs.items():
            r = summarize(adata.n_obs, rs, args.warmup_epochs)
            row[label] = r
            print(
                f"{label:>11} | {r['setup_s']:7.2f} | {r['epoch_s_median']:14.3f} | "
                f"{r['epoch_s_best']:12.3f} | {r['cells_per_s_median']:16.0f} | "
                f"{r['cells_per_s_best']:14.0f} | {r['elbo_last_epoch']:.1f}"
            )
        if "scvi-tools" in row:
            overhead = [r["train_call_overhead_s"] for r in runs["scvi-tools"]]
            print(
                "one-off, not in throughput: scvi-tools train() outside its epochs (Trainer, "
                "data splitter) " + ", ".join(f"{t:.2f}" for t in overhead) + " s"
            )
            for kind in ("median", "best"):
                ratio = (
                    row["scfedvi"][f"cells_per_s_{kind}"] / row["scvi-tools"][f"cells_per_s_{kind}"]
                )
                row[f"ratio_{kind}"] = ratio
                print(f"ratio scfedvi / scvi-tools ({kind} epoch): {ratio:.2f}x (target >= 2x)")
            if "scvi oneDNN" in row:
                same = (
                    row["scfedvi"]["cells_per_s_median"] / row["scvi oneDNN"]["cells_per_s_median"]
                )
                row["ratio_median_same_products"] = same
                print(
                    f"ratio scfedvi / scvi-tools with the same oneDNN products (median): {same:.2f}x"
                    " (not the target: scvi-tools' default is MKL)"
                )
            if "math floor" in row:
                ceiling = (
                    row["math floor"]["cells_per_s_median"]
                    / row["scvi-tools"]["cells_per_s_median"]
                )
                share = (
                    row["scfedvi"]["cells_per_s_median"] / row["math floor"]["cells_per_s_median"]
                )
                row["ceiling_ratio_median"] = ceiling
                row["scfedvi_share_of_floor"] = share
                print(
                    f"ceiling (math floor / scvi-tools, median): {ceiling:.2f}x; "
                    f"scfedvi runs at {share:.0%} of the floor's speed"
                )
        results["datasets"][name] = row
    results["load_average_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
