"""Measure composition-balanced site statistics (:mod:`scfedvi.federation.balance`, the default)
against each site's own statistics, on the same trained models.

For each number of sites and seed: train the benchmark's default scFedVI (the same settings
and code as ``scfedvi benchmark``), embed each site with its own statistics only (balancing
off), then balanced for each ``--k`` (clusters; ``--rounds`` k-means message rounds), and, as
a bound, balanced on the true cell types (the "oracle", which uses labels). The trained
weights are the same for every row; only the statistics used to embed differ.

    python benchmarks/balanced_stats.py cortex --clients 2,3,5 --seeds 0,1,2 --k 8,16

Prints batch / cell-type LISI (mean over cells; with ``--scib`` also the scIB metrics of every
row, computed by the benchmark's own evaluation) and appends JSON lines (with the command,
versions and seeds) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import pandas as pd


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("dataset", help="pancreas or cortex (the benchmark's data sets and partitions)")
    p.add_argument("--clients", default="2,3,5")
    p.add_argument("--seeds", default="0")
    p.add_argument("--k", default="8,16", help="numbers of clusters")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10, help="k-means message rounds per pass")
    p.add_argument("--out", default="benchmark-out/balanced_stats.jsonl")
    p.add_argument(
        "--scib",
        action="store_true",
        help="also the scIB metrics (the benchmark's evaluation) of every row",
    )
    p.add_argument("--no-oracle", action="store_true", help="leave out the oracle row")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from dataclasses import replace

    from scfedvi import __version__
    from scfedvi.benchmark.cli import add_benchmark_parser, settings_from_args
    from scfedvi.benchmark.evaluate import evaluate
    from scfedvi.benchmark.methods import METHODS, scfedvi_config
    from scfedvi.benchmark.plan import plan
    from scfedvi.benchmark.runner import _task
    from scfedvi.federation.balance import resample_weights
    from scfedvi.metrics import compute_lisi
    from scfedvi.model import ScFedVI
    from scfedvi.train.local import SiteTensors, calibrate_norm_stats, embed

    bp = argparse.ArgumentParser()
    add_benchmark_parser(bp.add_subparsers(dest="command"))
    for n_sites in [int(x) for x in args.clients.split(",")]:
        for seed in [int(x) for x in args.seeds.split(",")]:
            b = bp.parse_args(
                ["benchmark", args.dataset, "--clients", str(n_sites), "--seeds", str(seed),
                 "--methods", "scfedvi", "--out", "/tmp/balanced-stats-plan"]
            )  # fmt: skip
            task = _task(plan(settings_from_args(b))[0][0][1])
            cfg = scfedvi_config(METHODS["scfedvi"].settings(False), seed)
            t0 = time.perf_counter()
            model = ScFedVI.from_sites(
                task.site_dict(),
                batch_key=task.batch_key,
                label_key=task.label_key,
                n_top_genes=task.n_top_genes,
                config=cfg,
            )
            model.train(progress=False)
            train_s = time.perf_counter() - t0
            obs = pd.DataFrame(
                {
                    "batch": task.adata.obs[task.batch_key].to_numpy(),
                    "label": task.adata.obs[task.label_key].to_numpy(),
                },
                index=task.adata.obs_names,
            )
            sites = {name: model._site_data[name] for name in model.sites}
            workers = {w.name: w for w in model._live[1]}
            off = {n: workers[n].embed(model.params, []) for n in sites}
            variants = {"site-local statistics (balancing off)": off}
            for k in [int(x) for x in args.k.split(",")]:
                fed = replace(
                    cfg.federation,
                    balance_clusters=k,
                    balance_iterations=args.iterations,
                    balance_rounds=args.rounds,
                )
                model.config, model._balance = replace(cfg, federation=fed), None
                name = f"balanced, K={k}, {args.iterations} passes, {args.rounds} rounds"
                variants[name] = {
                    n: model.get_latent_representation(site=n, write=False) for n in sites
                }
            model.config = cfg
            labels = obs["label"].to_numpy()
            pre = None
            if args.scib:  # (imported after the methods: baselines imports them)
                from scfedvi.benchmark.baselines import pca_settings, unintegrated_pca

                pre = unintegrated_pca(task, pca_settings(False), seed=0)
            if not args.no_oracle:  # one pass, weighted to the true cell types' composition
                codes, uniq = pd.factorize(labels)
                share = np.bincount(codes, minlength=len(uniq)) / len(codes)
                oracle = {}
                for n, sd in sites.items():
                    g = codes[task.adata.obs_names.get_indexer(sd.obs_names)]
                    w = resample_weights(g, share)
                    idx = np.random.default_rng(0).choice(
                        len(g), size=4 * len(g), replace=True, p=w / w.sum()
                    )
                    wk = workers[n]
                    wk.embed(model.params, [])  # global weights, the site's own statistics
                    calibrate_norm_stats(
                        wk.module, SiteTensors(wk.data.X[idx], wk.data.batch_index[idx])
                    )
                    oracle[n] = embed(wk.module, wk.data)
                variants["oracle: balanced on true labels"] = oracle
            for name, zs in variants.items():
                Z = np.full((task.adata.n_obs, model.config.model.n_latent), np.nan, np.float32)
                for n, sd in sites.items():
                    Z[task.adata.obs_names.get_indexer(sd.obs_names)] = zs[n]
                lisi = compute_lisi(Z, obs)
                rec = {
                    "dataset": args.dataset,
                    "n_sites": n_sites,
                    "seed": seed,
                    "variant": name,
                    "batch_lisi": float(lisi["batch"].mean()),
                    "celltype_lisi": float(lisi["label"].mean()),
                    "train_seconds": train_s,
                    "command": "python benchmarks/balanced_stats.py " + " ".join(argv),
                    "versions": {"scfedvi": __version__, "torch": torch.__version__},
                }
                scib = ""
                if args.scib:
                    ev = evaluate(
                        Z,
                        task.adata.obs,
                        batch_key=task.batch_key,
                        label_key=task.label_key,
                        pre=pre,
                        scib=True,
                        fast=False,
                        umap_seed=None,
                    )["metrics"]
                    for key in ("scib: Total", "scib: Bio conservation", "scib: Batch correction"):
                        rec[key] = float(ev[key])
                    scib = (
                        f", scIB total {rec['scib: Total']:.3f} (bio "
                        f"{rec['scib: Bio conservation']:.3f}, batch "
                        f"{rec['scib: Batch correction']:.3f})"
                    )
                print(
                    f"{args.dataset} {n_sites} sites seed {seed} | {name}: batch LISI "
                    f"{rec['batch_lisi']:.3f}, cell-type LISI {rec['celltype_lisi']:.3f}{scib}",
                    flush=True,
                )
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
