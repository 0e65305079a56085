"""Federated early stopping: does it keep the quality and save time? (docs/scale.md)

For each data set (pancreas, cortex; the paper's 3-site partition) and seed, scFedVI trains at
the default schedule twice, without and with ``FederationConfig.early_stopping`` (patience and
min_delta: RunConfig's defaults), in one process at one torch thread; each run is timed and its
embedding of every cell scored by batch and cell-type LISI (median over cells, one shared
k = 90 neighbour graph, :func:`scfedvi.benchmark.evaluate.lisi_summary`).

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_early_stopping.py --datasets pancreas cortex \\
        --seeds 0 --out benchmark-out/scale/early_stopping.jsonl

Appends one JSON line per run (command, versions, seed, settings, figures) to ``--out`` and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["pancreas", "cortex"])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="benchmark-out/scale/early_stopping.jsonl")
    p.add_argument(
        "--modes", nargs="+", choices=["off", "on"], default=["off", "on"], help="early stopping"
    )
    return p.parse_args(argv)


def run_one(sites, ev, spec, seed: int, early: bool) -> dict:
    from scfedvi import ScFedVI
    from scfedvi.benchmark.evaluate import lisi_summary
    from scfedvi.config import RunConfig

    cfg = RunConfig()
    cfg = replace(
        cfg, federation=replace(cfg.federation, seed=seed, n_jobs=1, early_stopping=early)
    )
    model = ScFedVI.from_sites(
        sites, batch_key=spec.batch_key, label_key=spec.label_key, config=cfg
    )
    t0 = time.perf_counter()
    model.train(progress=False)
    train_s = time.perf_counter() - t0
    Z = np.full((ev.n_obs, cfg.model.n_latent), np.nan, dtype=np.float32)
    for name in model.sites:
        z = model.get_latent_representation(site=name, write=False)
        Z[ev.obs_names.get_indexer(model._site_data[name].obs_names)] = z
    h = model.history
    val = h.dropna(subset=["validation_loss"]) if "validation_loss" in h else h.iloc[:0]
    last = val[val["round"] == val["round"].max()] if len(val) else val
    lisi = lisi_summary(Z, ev.obs[spec.batch_key].to_numpy(), ev.obs[spec.label_key].to_numpy())
    return {
        "early_stopping": early,
        "patience": cfg.federation.early_stopping_patience,
        "min_delta": cfg.federation.early_stopping_min_delta,
        "rounds_run": int(h["round"].max()) + 1,
        "rounds_planned": model.schedule.rounds,
        "early_stopped": bool(model.early_stopped),
        "epochs_run": (int(h["round"].max()) + 1) * model.schedule.epochs / model.schedule.rounds,
        "train_s": train_s,
        "final_validation_loss": float(np.average(last["validation_loss"], weights=last["n_train"]))
        if len(last) and "n_train" in last
        else None,
        "validation_curve": [v for _, v in model.coordinator.validation_curve()],
        "ilisi_median": lisi["batch_lisi_median"],
        "clisi_median": lisi["celltype_lisi_median"],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from scfedvi import __version__
    from scfedvi.benchmark.task import (
        SITE_KEY,
        eval_adata,
        load_data,
        make_partition,
        resolve_dataset,
    )

    torch.set_num_threads(1)
    head = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "versions": {
            "scfedvi": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "load_average_start": os.getloadavg(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.datasets:
        spec = resolve_dataset(name)
        adata = load_data(spec)
        ev = eval_adata(adata, make_partition(spec, adata, args.sites))
        sites = {
            s: ev[(ev.obs[SITE_KEY] == s).to_numpy()].copy()
            for s in ev.obs[SITE_KEY].cat.categories
        }
        for seed in args.seeds:
            for early in [m == "on" for m in args.modes]:
                r = run_one(sites, ev, spec, seed, early)
                row = {
                    **head,
                    "dataset": name,
                    "sites": args.sites,
                    "seed": seed,
                    **r,
                    "load_average_end": os.getloadavg(),
                }
                rows.append(row)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"{name} seed {seed} early_stopping={early}: {r['rounds_run']}/"
                    f"{r['rounds_planned']} rounds, train {r['train_s']:.0f} s, iLISI "
                    f"{r['ilisi_median']:.3f}, cLISI {r['clisi_median']:.3f}, load "
                    f"{row['load_average_end'][0]:.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
