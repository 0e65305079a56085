"""How long a Flower message takes to get a site's data ready: ``.h5ad`` read + projection
(what every message paid before) against mapping the site's data cache
(:mod:`scfedvi.flower.data_cache`).

One simulated site (:func:`scfedvi.data.simulate.simulate`, default 100,000 cells x 2,000
genes, 3 batches) is written as ``.h5ad``; the schema round is run once (read, project,
validate, write the cache: timed); then, ``--repeats`` times each, in a fresh Python process
per repeat (as Flower starts one per message; the interpreter's and the libraries' imports
are timed apart):

- ``h5ad``: ``NodeSettings.read`` + ``project`` + ``SiteTensors`` + the per-cell
  log-factorial sums (what a training message did before the cache);
- ``cache``: ``NodeSettings.site_data`` (key, manifest, size and CRC-32 checks, maps) +
  ``SiteTensors`` with the cached log-factorial sums (what ``client_app._worker`` does now).

The page cache is warm in both (the file was just written, as on a site between messages).

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_site_cache.py [--cells 100000] [--genes 2000]

Writes ``benchmark-out/bench_site_cache.json`` (``--out``) with the command, versions, seed and
every figure printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
import numpy as np
from scfedvi.data.schema import FederationSchema, project
from scfedvi.flower.node import NodeSettings
from scfedvi.train.local import SiteTensors
imports = time.perf_counter() - t0
mode, data, state, batch = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
node = NodeSettings("site-0", data, state)
schema = FederationSchema.load(node.schema_path)
t0 = time.perf_counter()
if mode == "h5ad":
    sd = project(node.read(schema.batch_key), schema, site=node.site, batch_size=batch)
    t = SiteTensors(sd.X, sd.batch_index)
    lf = t.log_factorial
else:
    sd, lf = node.site_data(schema, batch)
    t = SiteTensors(sd.X, sd.batch_index)
    t.set_log_factorial(lf)
ready = time.perf_counter() - t0
print(json.dumps({"imports_s": imports, "ready_s": ready, "n_cells": t.n_cells,
                  "nnz": int(t.X.nnz), "lf_sum": float(np.sum(lf, dtype=np.float64))}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmark-out/bench_site_cache.json")
    args = p.parse_args(argv)

    from scfedvi.config import TrainConfig
    from scfedvi.data.harmonize import harmonize
    from scfedvi.data.simulate import simulate
    from scfedvi.flower.node import NodeSettings

    batch = TrainConfig().batch_size
    with tempfile.TemporaryDirectory(prefix="bench-site-cache-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        adata = simulate(n_cells=args.cells, n_genes=args.genes, seed=args.seed)
        data = work / "site-0.h5ad"
        adata.write_h5ad(data)
        simulate_s = time.perf_counter() - t0
        schema = harmonize({"site-0": adata}, batch_key="batch", n_top_genes=None)
        del adata
        node = NodeSettings("site-0", data, work / "state")
        t0 = time.perf_counter()
        node.project(schema, batch)  # the schema round: read, project, validate, cache
        node.save_schema(schema)
        setup_s = time.perf_counter() - t0
        cache_mb = sum(f.stat().st_size for f in work.glob("state/*.data-*/*")) / 1e6
        runs: dict[str, list[dict]] = {"h5ad": [], "cache": []}
        for _ in range(args.repeats):
            for mode in runs:
                cmd = [sys.executable, "-c", CHILD, mode, str(data), str(work / "state")]
                res = subprocess.run([*cmd, str(batch)], capture_output=True, text=True)
                if res.returncode != 0:
                    raise RuntimeError(res.stderr)
                runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
        h5ad_mb = data.stat().st_size / 1e6
    same = {k: {r["nnz"] for r in v} | {r["lf_sum"] for r in v} for k, v in runs.items()}
    med = {k: float(np.median([r["ready_s"] for r in v])) for k, v in runs.items()}
    imports = float(np.median([r["imports_s"] for v in runs.values() for r in v]))
    print(f"site: {args.cells} cells x {args.genes} genes (simulated in {simulate_s:.1f} s)")
    print(f".h5ad {h5ad_mb:.0f} MB, cache {cache_mb:.0f} MB; schema round {setup_s:.2f} s")
    print(f"data ready, .h5ad read + project : {med['h5ad']:7.3f} s (median of {args.repeats})")
    print(
        f"data ready, cache map            : {med['cache']:7.3f} s  ({med['h5ad'] / med['cache']:.0f}x)"
    )
    print(f"imports per process (not in the above): {imports:.2f} s")
    record = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "args": vars(args),
        "h5ad_mb": h5ad_mb,
        "cache_mb": cache_mb,
        "schema_round_s": setup_s,
        "runs": runs,
        "median_ready_s": med,
        "same_data": all(len(v) == 2 for v in same.values()) and same["h5ad"] == same["cache"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"same data both ways: {record['same_data']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
