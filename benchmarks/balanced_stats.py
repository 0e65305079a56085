"""Measure composition-balanced site statistics (:mod:`scfedvi.federation.balance`, the default)
against each site's own statistics, on the same trained models.

For each number of sites and seed: train the benchmark's default scFedVI (the same settings
and code as ``scfedvi benchmark``), embed each site with its own statistics only (balancing
off), then balanced for each ``--k`` (clusters) and each ``--rounds`` (sums rounds per pass
of today's protocol: one local-summary round, then that many rounds of per-cluster sums),
with ``--old`` also by the protocol before it (the anchor: each site's own k centroids, then
``--old-rounds`` Lloyd message rounds; computed in this script from the same primitives),
and, as a bound, balanced on the true cell types (the "oracle", which uses labels). The
trained weights are the same for every row; only the statistics used to embed differ.
``simulated`` is the strong trap of ``tests/test_quality.py`` (composition 4, one site per
batch; ``--clients`` sets the number of batches).

    python benchmarks/balanced_stats.py cortex --clients 2,3,5 --seeds 0,1,2 --k 8,16
    python benchmarks/balanced_stats.py simulated --clients 3 --k 8 --rounds 1,2 --old
    python benchmarks/balanced_stats.py cortex --clients 3 --k 8 --rounds 1,2 --secure

``--secure`` adds, for each ``--rounds``, balancing from securely aggregated sums only
(:mod:`scfedvi.federation.secure_balance`: a moments sum, a codebook sum, then the rounds of
per-cluster sums, each one masked sum run in process; ``2 + rounds`` message rounds a pass).

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
    p.add_argument(
        "dataset",
        help="pancreas or cortex (the benchmark's data sets and partitions) or simulated",
    )
    p.add_argument("--clients", default="2,3,5")
    p.add_argument("--seeds", default="0")
    p.add_argument("--k", default="8,16", help="numbers of clusters")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--rounds", default="1", help="sums rounds per pass (comma-separated)")
    p.add_argument("--old", action="store_true", help="also the protocol before (the anchor)")
    p.add_argument("--old-rounds", type=int, default=10, help="its Lloyd rounds per pass")
    p.add_argument(
        "--secure",
        action="store_true",
        help="also balancing from securely aggregated sums only "
        "(scfedvi.federation.secure_balance, in process, masked sums; 3 sites or more)",
    )
    p.add_argument(
        "--codebook",
        default=None,
        help="--secure: codebook points per cluster (comma-separated; default: "
        "scfedvi.federation.secure_balance.CODEBOOK_PER_CLUSTER)",
    )
    p.add_argument(
        "--local",
        default=None,
        help="local centroids a site sends per global cluster (comma-separated; default: "
        "scfedvi.federation.balance.LOCAL_PER_CLUSTER)",
    )
    p.add_argument(
        "--balance-seeds",
        default=None,
        help="k-means seeds of the balancing on each trained model (the spread of the "
        "balancing step alone; default: the training seed)",
    )
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
    from scfedvi.benchmark.runner import job_task
    from scfedvi.federation.balance import resample_weights
    from scfedvi.metrics import compute_lisi
    from scfedvi.model import ScFedVI
    from scfedvi.train.local import SiteTensors, calibrate_norm_stats, embed

    bp = argparse.ArgumentParser()
    add_benchmark_parser(bp.add_subparsers(dest="command"))
    rounds_list = _ints(args.rounds)
    import scfedvi.federation.balance_site as balance_site
    from scfedvi.federation.balance import LOCAL_PER_CLUSTER

    args.local = args.local or str(LOCAL_PER_CLUSTER)
    if args.dataset == "simulated" and args.scib:
        p.error("--scib needs a benchmark data set (pancreas or cortex)")
    for n_sites in _ints(args.clients):
        for seed in _ints(args.seeds):
            t0 = time.perf_counter()
            if args.dataset == "simulated":
                task = None
                adata, batch_key, label_key = _simulated(n_sites), "batch", "cell_type"
                cfg = _trap_config(seed)
                model = ScFedVI.from_sites(
                    adata,
                    split_key="batch",
                    batch_key=batch_key,
                    label_key=label_key,
                    n_top_genes=None,
                    config=cfg,
                )
            else:
                b = bp.parse_args(
                    ["benchmark", args.dataset, "--clients", str(n_sites), "--seeds", str(seed),
                     "--methods", "scfedvi", "--out", "/tmp/balanced-stats-plan"]
                )  # fmt: skip
                task = job_task(plan(settings_from_args(b))[0][0][1])
                adata, batch_key, label_key = task.adata, task.batch_key, task.label_key
                cfg = scfedvi_config(METHODS["scfedvi"].settings(False), seed)
                model = ScFedVI.from_sites(
                    task.site_dict(),
                    batch_key=batch_key,
                    label_key=label_key,
                    n_top_genes=task.n_top_genes,
                    config=cfg,
                )
            model.train(progress=False)
            train_s = time.perf_counter() - t0
            obs = pd.DataFrame(
                {
                    "batch": adata.obs[batch_key].astype(str).to_numpy(),
                    "label": adata.obs[label_key].astype(str).to_numpy(),
                },
                index=adata.obs_names,
            )
            sites = {name: model.site_data[name] for name in model.sites}
            workers = {w.name: w for w in model.site_workers()}
            off = {n: workers[n].embed(model.params, []) for n in sites}
            variants = {"site-local statistics (balancing off)": (off, 0, 0.0)}
            per_sum: dict[str, list] = {}  # the secure rows' cost of each masked sum
            bseeds = [seed] if args.balance_seeds is None else _ints(args.balance_seeds)
            for k, bs in [(k, bs) for k in _ints(args.k) for bs in bseeds]:
                tag = "" if args.balance_seeds is None else f", balancing seed {bs}"
                if args.old:
                    t1 = time.perf_counter()
                    steps = _old_protocol(
                        model.site_workers(), model.params, k, args.iterations, args.old_rounds, bs
                    )
                    secs = time.perf_counter() - t1
                    name = (
                        f"old protocol, K={k}, {args.iterations} passes, "
                        f"1 + {args.old_rounds} rounds{tag}"
                    )
                    zs = {n: workers[n].embed(model.params, steps) for n in sites}
                    variants[name] = (zs, args.iterations * (1 + args.old_rounds), secs)
                for rounds, per in [(r, q) for r in rounds_list for q in _ints(args.local)]:
                    balance_site.LOCAL_PER_CLUSTER = per  # the sites' local summary size
                    fed = replace(
                        cfg.federation,
                        balance_clusters=k,
                        balance_iterations=args.iterations,
                        balance_rounds=rounds,
                        seed=bs,  # used only by the k-means seeds here (training is done)
                    )
                    model.config = replace(cfg, federation=fed)
                    model.set_balance_steps(None)  # computed again for these settings
                    t1 = time.perf_counter()
                    model.balance_steps()
                    secs = time.perf_counter() - t1
                    name = f"balanced, K={k}, {args.iterations} passes, 1 + {rounds} rounds{tag}"
                    if args.local != str(LOCAL_PER_CLUSTER):
                        name += f", {per} local centroids per cluster"
                    zs = {n: model.get_latent_representation(site=n, write=False) for n in sites}
                    variants[name] = (zs, args.iterations * (1 + rounds), secs)
                    for book in _ints(args.codebook) if args.secure and args.codebook else [0]:
                        if not args.secure or per != _ints(args.local)[0]:
                            break  # once per rounds
                        name, zs, secs, per_sum[name] = _secure(model, cfg, fed, rounds, tag, book)
                        variants[name] = (zs, args.iterations * (2 + rounds), secs)
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
                    g = codes[adata.obs_names.get_indexer(sd.obs_names)]
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
                variants["oracle: balanced on true labels"] = (oracle, 0, 0.0)
            for name, (zs, messages, secs) in variants.items():
                Z = np.full((adata.n_obs, model.config.model.n_latent), np.nan, np.float32)
                for n, sd in sites.items():
                    Z[adata.obs_names.get_indexer(sd.obs_names)] = zs[n]
                lisi = compute_lisi(Z, obs)
                rec = {
                    "dataset": args.dataset,
                    "n_sites": n_sites,
                    "seed": seed,
                    "variant": name,
                    "batch_lisi": float(lisi["batch"].mean()),
                    "celltype_lisi": float(lisi["label"].mean()),
                    "message_rounds": messages,
                    "balance_seconds_in_process": secs,
                    "train_seconds": train_s,
                    "command": "python benchmarks/balanced_stats.py " + " ".join(argv),
                    "versions": {"scfedvi": __version__, "torch": torch.__version__},
                }
                if name in per_sum:
                    rec["secure_sums"] = per_sum[name]
                scib = ""
                if args.scib:
                    ev = evaluate(
                        Z,
                        adata.obs,
                        batch_key=batch_key,
                        label_key=label_key,
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
                    f"{args.dataset} {n_sites} sites seed {seed} | {name} ({messages} message "
                    f"rounds, {secs:.1f} s in process): batch LISI "
                    f"{rec['batch_lisi']:.3f}, cell-type LISI {rec['celltype_lisi']:.3f}{scib}",
                    flush=True,
                )
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    return 0


def _secure(model, cfg, fed, rounds: int, tag: str, book: int = 0):
    """Balancing from securely aggregated sums only, on the model's sites in process (each
    query one masked sum with the sites' sessions): its row's name, embeddings, seconds and
    the cost of each masked sum (phase, length, seconds, bytes per site up and down)."""
    from dataclasses import replace

    import scfedvi.federation.secure_balance as sb
    from scfedvi.config import PrivacyConfig
    from scfedvi.federation.secure_balance import secure_balance_in_process

    default = sb.CODEBOOK_PER_CLUSTER
    sb.CODEBOOK_PER_CLUSTER = book or default

    private = PrivacyConfig(clip_norm=1.0, clip_at="site", secure_aggregation=True)
    scfg = replace(cfg, federation=fed, privacy=private)
    workers = model.site_workers()
    t1, stats = time.perf_counter(), []
    steps = secure_balance_in_process(workers, model.params, scfg, stats)
    secs = time.perf_counter() - t1
    sb.CODEBOOK_PER_CLUSTER = default
    zs = {w.name: w.embed(model.params, steps) for w in workers}
    k = fed.balance_clusters
    name = f"secure sums, K={k}, {fed.balance_iterations} passes, 2 + {rounds} rounds{tag}"
    if book:
        name += f", codebook {book} per cluster"
    return name, zs, secs, stats


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _simulated(n_sites: int):
    """The strong trap of ``tests/test_quality.py``: composition 4, one site per batch."""
    from scfedvi.data import simulate

    return simulate(1500, 1000, n_batches=n_sites, n_cell_types=4, composition=4.0, seed=1)


def _trap_config(seed: int):
    """``tests/test_quality.py``'s run configuration (200 epochs) with the benchmark's seed."""
    from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        model=ModelConfig(),
        train=TrainConfig(local_epochs=10, n_epochs_kl_warmup=200),
        federation=FederationConfig(n_rounds=20, seed=seed),
    )


def _old_protocol(workers, params, k: int, iterations: int, rounds: int, seed: int) -> list:
    """Balancing steps by the protocol before the two-round one (the anchor): per pass, each
    site's own ``k`` k-means centroids (clusters of at least 10 cells), the coordinator's
    weighted k-means on them, then ``rounds`` Lloyd message rounds of sums and counts, the last
    round's centroids and counts being the step. The sites' replies come from the same numpy
    functions (no policy budget: this runs in the benchmark only)."""
    from scfedvi.federation.balance import (
        BalanceStep,
        cluster_sums,
        lloyd_update,
        local_centroids,
        site_seed,
        start_centroids,
    )

    ws = sorted(workers, key=lambda w: w.name)
    steps: list = []
    for it in range(iterations):
        zs = [w.embed(params, steps) for w in ws]
        replies = [local_centroids(z, k, site_seed(seed, len(steps), i)) for i, z in enumerate(zs)]
        c = start_centroids(replies, k, seed + it)
        if c is None:
            break
        for r in range(rounds):
            sums = [cluster_sums(z, c) for z in zs]
            if r < rounds - 1:
                c = lloyd_update(c, sums)
        counts = np.sum([n for _, n in sums], axis=0).astype(np.float64)
        live = counts > 0
        steps.append(BalanceStep(c[live], counts[live] / counts.sum()))
    return steps


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
