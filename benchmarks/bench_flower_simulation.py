"""Flower's simulation engine (Ray) at many sites: seconds per round, balancing, whole run.

``--sites`` simulated sites of ``--cells-per-site`` cells (:func:`scfedvi.data.simulate.simulate`,
one batch per site, written as ``<sim-data-dir>/sim-NN.h5ad``), one SuperLink in simulation mode
(``--federation-config num-supernodes=N``), ``flwr run``. Each round does the local work of the
default schedule for these sites' cells, and ``--rounds`` of its rounds run (``max-epochs`` =
rounds x that work). Times are the ServerApp's (``result.json``). No in-process anchor: this
measures how the simulation engine scales with the number of sites (the deployment engine's
comparison with the in-process runtime is ``bench_flower_overhead.py``).

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_flower_simulation.py --sites 20 \\
        --cells-per-site 5000 --genes 200 --rounds 1

Uses the Flower test harness (``tests/flower/flower_harness.py``: processes started and stopped
by PID, timestamped logs). Writes ``benchmark-out/bench_flower_simulation_<sites>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "flower"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=20)
    p.add_argument("--cells", "--cells-per-site", type=int, default=5000)
    p.add_argument("--genes", type=int, default=200)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=2400)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    load_start = os.getloadavg()
    import flwr
    import torch
    from flower_harness import Cluster, wait_result
    from flower_sites import flower_run_config

    from scfedvi.config import RunConfig
    from scfedvi.data.simulate import simulate
    from scfedvi.federation.schedule import resolve_schedule
    from scfedvi.flower.settings import write_app_dir

    work = resolve_schedule(RunConfig(), {f"s{i}": args.cells for i in range(args.sites)})
    epochs = work.work("s0")[0]
    if epochs is None:
        raise SystemExit("the default schedule trains steps, not epochs, at this size")
    with tempfile.TemporaryDirectory(prefix="bench-flower-sim-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        adata = simulate(
            n_cells=args.sites * args.cells,
            n_genes=args.genes,
            n_batches=args.sites,
            seed=args.seed,
        )
        adata.obs["batch"] = adata.obs["batch"].astype(str)
        data = root / "sim-data"
        data.mkdir()
        for i, b in enumerate(sorted(adata.obs["batch"].unique())):
            adata[adata.obs["batch"] == b].copy().write_h5ad(data / f"sim-{i:02d}.h5ad")
        data_s = time.perf_counter() - t0
        cluster = Cluster(root)
        try:
            cluster.start_superlink(simulation=True)
            out = root / "server-out"
            extra = {
                "num-sites": args.sites,
                "min-sites": args.sites,
                "sim-data-dir": str(data),
                "n-top-genes": 0,
                "local-epochs": 0,  # None: the schedule's
                "max-epochs": args.rounds * epochs,
                "seed": args.seed,
                "setup-timeout": args.timeout,
                "round-timeout": args.timeout,
            }
            cfg = flower_run_config(out, **extra)
            cfg["num-server-rounds"] = args.rounds
            t1 = time.perf_counter()
            run_id = cluster.run_app(
                write_app_dir(root / "app"),
                cfg,
                "--federation-config",
                f"num-supernodes={args.sites}",
            )
            res = wait_result(cluster, out, run_id, timeout=args.timeout)
            wall = time.perf_counter() - t1
        finally:
            cluster.stop_all()
    if res.get("status") != "completed":
        raise RuntimeError(f"the run did not complete: {res}")
    record = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "versions": {
            "python": platform.python_version(),
            "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "?",
            "torch": torch.__version__,
        },
        "seed": args.seed,
        "args": vars(args),
        "local_epochs_per_round": epochs,
        "data_s": data_s,
        "wall_s": wall,
        "seconds_per_round": res["seconds_per_round"],
        "balance_s": res["balance"]["seconds"],
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
    }
    print(
        f"simulation engine, {args.sites} sites x {args.cells} cells x {args.genes} genes, "
        f"{args.rounds} round(s) of {epochs} local epochs: seconds per round "
        f"{[round(s, 1) for s in res['seconds_per_round']]}, balancing {res['balance']['seconds']:.1f}"
        f" s, whole run {wall:.1f} s (load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f})"
    )
    path = Path(args.out or f"benchmark-out/bench_flower_simulation_{args.sites}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
