"""scIB metrics of embeddings a benchmark run already cached (a run made with ``--no-scib``).

The benchmark caches every embedding under ``OUT/cache/<key>/embedding.npz`` with the parts
of its key (``meta.json``). This script plans the same benchmark again, finds each planned
job's cached embedding by its data, partition, genes, method and seed (not by scfedvi's code
hash, which changed since), and computes the scIB metrics of those embeddings exactly as
``scfedvi benchmark`` does (one scib-metrics Benchmarker run over the embeddings, with the
unintegrated PCA of the same cells as the pre-integration reference, full metrics). It prints
one row per method with the command, versions and seeds, and writes them as JSON.

Example (the pancreas DP run of docs/dp.md)::

    nice -n 10 python benchmarks/dp_scib_from_cache.py pancreas --clients 3 --seeds 0 \\
        --methods scfedvi,scfedvi-dp-eps8,scfedvi-dp-eps3,scfedvi-dp-eps1 \\
        --out benchmark-out/dp-full --json benchmark-out/dp-full-scib.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from scfedvi.benchmark import methods as _methods  # noqa: F401  (before baselines: a cycle)
    from scfedvi.benchmark.baselines import pca_settings, unintegrated_pca
    from scfedvi.benchmark.evaluate import scib_table
    from scfedvi.benchmark.plan import BenchmarkSettings, plan
    from scfedvi.benchmark.runner import job_task
    from scfedvi.benchmark.task import resolve_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--methods", required=True)
    ap.add_argument("--out", required=True, help="the benchmark's output folder (its cache)")
    ap.add_argument("--json", required=True, help="where to write the rows")
    args = ap.parse_args(argv)

    settings = BenchmarkSettings(
        datasets=(resolve_dataset(args.dataset),),
        clients=(args.clients,),
        methods=tuple(args.methods.split(",")),
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        scib=True,
    )
    jobs, _ = plan(settings)
    cached = {}
    for meta in Path(args.out, "cache").glob("*/meta.json"):
        kp = json.loads(meta.read_text())["key_parts"]
        match = (kp["data"], kp["partition"], kp["genes"], kp["method"], kp["seed"])
        cached[match] = meta.parent
    by_seed: dict[int, dict[str, np.ndarray]] = {}
    tasks = {}
    for _, job in jobs:
        kp = job.key_parts
        where = cached.get((kp["data"], kp["partition"], kp["genes"], kp["method"], kp["seed"]))
        if where is None:
            print(f"no cached embedding of {job.method} seed {job.seed}", file=sys.stderr)
            return 1
        by_seed.setdefault(job.seed, {})[job.method] = np.load(where / "embedding.npz")["embedding"]
        tasks[job.seed] = job
    rows = []
    t0 = time.perf_counter()
    for seed, embs in by_seed.items():
        task = job_task(tasks[seed])
        pre = unintegrated_pca(task, pca_settings(False), seed=0)
        ok = np.logical_and.reduce([np.isfinite(z).all(axis=1) for z in embs.values()])
        table = scib_table(
            {m: z[ok] for m, z in embs.items()},
            task.adata.obs.loc[ok],
            pre[ok],
            batch_key=task.batch_key,
            label_key=task.label_key,
            fast=False,
        )
        for method, r in table.iterrows():
            rows.append({"method": method, "seed": seed, **{k: float(v) for k, v in r.items()}})
    from importlib.metadata import version

    from scfedvi.benchmark.report import VERSIONS

    out = {
        "command": " ".join(["python", *sys.argv]),
        "versions": {d: version(d) for d in VERSIONS if _installed(d)},
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
