"""Per-round overhead of Flower's deployment engine against the in-process runtime.

The same sites (:func:`scfedvi.data.simulate.simulate`, one batch per site, written as
``.h5ad``), the same run configuration and seeds, trained twice: in process
(``run_in_process``, ``--jobs`` worker processes) and over a local deployment (a SuperLink and
one SuperNode per site on 127.0.0.1, ``flwr run``; the SuperExecs poll for tasks every
``--task-poll`` seconds). Seconds per round in process are timed around each round; over
Flower they are the ServerApp's own timing of each round (send, the sites' fresh ClientApp
processes, replies, aggregation, checkpoint), read from its ``result.json``. Per round, both
report the wall time, the slowest site's local training seconds (the sites' ``seconds``
metric, from the history), their difference (over Flower: the part that is Flower's, the
ClientApp's start and the site's data loading included) and the bytes sent and received. The
balancing step (federated k-means, its own message rounds) is timed beside the in-process one.
The setup round and the final embedding are timed apart (wall time of ``flwr run`` to the
result, minus the rounds and the balancing). The final global models are compared.

Both use ``--threads`` torch threads (default 1: the ClientApps of the sites run side by side
on one machine here; in a real deployment each site has its own).

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_flower_overhead.py [--sites 3] [--rounds 3] \
        [--cells-per-site 100000 --genes 2000] [--default-schedule --jobs 3]

``--default-schedule``: each round does the local work of the default schedule for these sites
(for 3 x 100,000 cells, 1 local epoch), and ``--rounds`` of its rounds run: a bounded run at
the full schedule's per-round cost.

Writes ``benchmark-out/bench_flower_overhead.json`` (``--out``) with the command, versions,
seeds and every figure printed. Every process it starts is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BIN = Path(sys.executable).parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--cells", "--cells-per-site", type=int, default=500, help="cells per site")
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--jobs", type=int, default=1, help="in-process worker processes")
    p.add_argument(
        "--task-poll",
        type=float,
        default=0.1,
        help="FLWR_SUPEREXEC_TASK_POLL_INTERVAL, seconds (0: Flower's default, 1 s)",
    )
    p.add_argument(
        "--warm-worker",
        choices=("true", "false", "both"),
        default="both",
        help="the SuperNodes' node config warm-worker (both: the deployment runs twice, "
        "first without, then with the warm worker)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument(
        "--default-schedule",
        action="store_true",
        help="each round does the local work of the default schedule for these sites "
        "(scvi-tools' epochs for all their cells, split into the default number of rounds); "
        "only --rounds of those rounds run (max-epochs = rounds x that work); "
        "--local-epochs is ignored",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, in process and in every ClientApp (OMP_NUM_THREADS; 0: default)",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds for the Flower run")
    p.add_argument("--out", default="benchmark-out/bench_flower_overhead.json")
    return p.parse_args(argv)


def write_sites(directory: Path, n_sites: int, n_cells: int, n_genes: int, seed: int) -> dict:
    """One simulated batch per site (``simulate``'s library sizes cycle over the batches)."""
    from scfedvi.data.simulate import simulate

    adata = simulate(n_cells=n_sites * n_cells, n_genes=n_genes, n_batches=n_sites, seed=seed)
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    paths = {}
    for i, b in enumerate(sorted(adata.obs["batch"].unique())):
        site = f"site-{i:02d}"
        paths[site] = directory / f"{site}.h5ad"
        adata[adata.obs["batch"] == b].copy().write_h5ad(paths[site])
    return paths


def per_round(history: Any, seconds: list[float]) -> list[dict[str, float]]:
    """Per round: wall seconds, the slowest site's local seconds, their difference, bytes."""
    import pandas as pd

    h = pd.DataFrame(history)
    h = h[h["status"] == "ok"]
    out = []
    for r, wall in enumerate(seconds):
        rows = h[h["round"] == r]
        slowest = float(rows["seconds"].max()) if len(rows) else float("nan")
        out.append(
            {
                "round": r,
                "wall_s": wall,
                "slowest_site_s": slowest,
                "overhead_s": wall - slowest,
                "bytes": float(rows["bytes_up"].sum() + rows["bytes_down"].sum()),
            }
        )
    return out


def default_round_epochs(args: argparse.Namespace) -> int:
    """Local epochs per round of the default schedule for ``--sites`` x ``--cells`` cells."""
    from scfedvi.config import RunConfig
    from scfedvi.federation.schedule import resolve_schedule

    n_cells = {f"site-{i:02d}": args.cells for i in range(args.sites)}
    work = resolve_schedule(RunConfig(), n_cells).work("site-00")
    if work[0] is None:
        raise SystemExit(f"the default schedule trains {work[1]} steps a round, not epochs")
    return int(work[0])


def run_config(args: argparse.Namespace):
    from scfedvi.config import FederationConfig, RunConfig, TrainConfig

    fed = FederationConfig(n_rounds=args.rounds, min_sites=args.sites, seed=args.seed)
    if args.default_schedule:  # the default schedule's per-round work, for --rounds rounds
        fed = FederationConfig(
            n_rounds=args.rounds,
            min_sites=args.sites,
            seed=args.seed,
            max_epochs=args.rounds * default_round_epochs(args),
        )
        return RunConfig(federation=fed)
    return RunConfig(train=TrainConfig(local_epochs=args.local_epochs), federation=fed)


def in_process(paths: dict, args: argparse.Namespace) -> dict[str, Any]:
    import anndata as ad

    from scfedvi.data.harmonize import harmonize
    from scfedvi.data.schema import project
    from scfedvi.federation.coordinator import Coordinator
    from scfedvi.federation.inprocess import run_in_process
    from scfedvi.federation.site import SiteWorker
    from scfedvi.train.local import SiteTensors

    cfg = run_config(args)
    t0 = time.perf_counter()
    sites = {s: ad.read_h5ad(p) for s, p in paths.items()}
    schema = harmonize(sites, batch_key="batch", n_top_genes=None)
    workers = []
    for s, a in sites.items():
        sd = project(a, schema, site=s, batch_size=cfg.train.batch_size)
        workers.append(
            SiteWorker(s, SiteTensors(sd.X, sd.batch_index), schema.n_genes, schema.n_batches, cfg)
        )
    coord = Coordinator(schema.n_genes, schema.n_batches, cfg, schema_hash=schema.hash)
    setup = time.perf_counter() - t0
    rounds: list[float] = []
    run_in_process(
        coord, workers, args.rounds, on_round=lambda r, s: rounds.append(s), n_jobs=args.jobs
    )
    from scfedvi.federation.balance import balance_in_process

    t0 = time.perf_counter()
    steps = balance_in_process(workers, coord.params, cfg)
    balance = time.perf_counter() - t0
    return {
        "setup_s": setup,
        "seconds_per_round": rounds,
        "rounds": per_round(coord.history, rounds),
        "balance_s": balance,
        "balance_clusters": [len(st.composition) for st in steps],
        "params": coord.params,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out += [c]
            todo.append(c)
    return out


def _stop(p: subprocess.Popen) -> None:
    family = _descendants(p.pid)
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)
    time.sleep(1)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _workers_left(work: Path, wait: float = 15.0) -> int:
    """Warm workers of this run still alive ``wait`` s after their SuperNodes stopped (they
    exit by themselves when their SuperNode is gone); any left are killed by PID."""

    def left() -> list[int]:
        out = []
        for d in Path("/proc").iterdir():
            try:
                cmd = (d / "cmdline").read_bytes() if d.name.isdigit() else b""
            except OSError:
                continue
            if b"scfedvi.flower.site_worker" in cmd and str(work).encode() in cmd:
                out.append(int(d.name))
        return out

    end = time.monotonic() + wait
    while left() and time.monotonic() < end:
        time.sleep(0.5)
    pids = left()
    for pid in pids:
        print(f"warning: warm worker {pid} still alive after its SuperNode stopped; killed")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def deployment(
    paths: dict, args: argparse.Namespace, work: Path, warm: str = "false"
) -> dict[str, Any]:
    """One run of the deployment engine in ``work`` (created), with node config
    ``warm-worker=warm`` at every SuperNode."""
    from scfedvi.flower.settings import write_app_dir

    work.mkdir(parents=True)
    home, out = work / "flwr-home", work / "server-out"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.task_poll:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(args.task_poll)
    env.update(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PATH=f"{BIN}:{env['PATH']}")
    procs: list[subprocess.Popen] = []
    log = (work / "flower.log").open("ab")

    def start(cmd: list[str]) -> None:
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=work))

    try:
        start([str(BIN / "flower-superlink"), "--insecure", "--port", str(port)])
        for site, path in paths.items():
            cfg = f"site='{site}' data-path='{path}' state-dir='{work / 'sites'}'"
            cfg += f" warm-worker='{warm}'"
            sn = [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}"]
            start([*sn, "--port", str(_free_port()), "--node-config", cfg])
        end = time.monotonic() + 300
        while not _listening(port):
            if time.monotonic() > end:
                raise TimeoutError(
                    f"the SuperLink does not listen on {port}; see {work}/flower.log"
                )
            time.sleep(0.2)
        rc = {
            "num-server-rounds": args.rounds,
            "seed": args.seed,
            "min-sites": args.sites,
            "num-sites": args.sites,
            "n-top-genes": 0,
            "out-dir": str(out),
        }
        if args.default_schedule:
            rc["max-epochs"] = args.rounds * default_round_epochs(args)
        else:
            rc["local-epochs"] = args.local_epochs
        overrides = " ".join(
            f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in rc.items()
        )
        t0 = time.perf_counter()
        cmd = [str(BIN / "flwr"), "run", str(write_app_dir(work / "app")), "bench"]
        res = subprocess.run([*cmd, "--run-config", overrides], env=env, capture_output=True)
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed: {res.stdout!r} {res.stderr!r}")
        result: dict[str, Any] = {}
        while time.perf_counter() - t0 < args.timeout:
            if (out / "result.json").exists():
                result = json.loads((out / "result.json").read_text())
                if result["status"] != "running":
                    break
            time.sleep(0.5)
        wall = time.perf_counter() - t0
    finally:
        for p in reversed(procs):
            _stop(p)
        log.close()
        orphans = _workers_left(work)
    if result.get("status") != "completed":
        raise RuntimeError(f"the Flower run did not complete: {result}; see {work}/flower.log")
    with np.load(out / "model" / "model.npz") as z:
        params = {k: z[k] for k in z.files}
    import pandas as pd

    history = pd.read_csv(out / "history.csv")
    return {
        "wall_s": wall,
        "seconds_per_round": result["seconds_per_round"],
        "rounds": per_round(history, result["seconds_per_round"]),
        "balance_s": result["balance"]["seconds"],
        "balance_clusters": result["balance"]["clusters"],
        "setup_and_embed_s": wall - sum(result["seconds_per_round"]) - result["balance"]["seconds"],
        "params": params,
        "load_avg": os.getloadavg(),
        "workers_left": orphans,
    }


def report(ref: dict[str, Any], fl: dict[str, Any], label: str) -> dict[str, Any]:
    """Print one deployment run against the in-process run; the figures as a record."""
    diff = max(
        float(np.max(np.abs(fl["params"][k] - v) / (np.abs(v) + 1e-6)))
        for k, v in ref["params"].items()
    )
    abs_diff = max(float(np.max(np.abs(fl["params"][k] - v))) for k, v in ref["params"].items())
    close = all(  # the deployment test's tolerance
        np.allclose(fl["params"][k], v, rtol=1e-5, atol=1e-7) for k, v in ref["params"].items()
    )
    ip, dep = np.mean(ref["seconds_per_round"]), np.mean(fl["seconds_per_round"])
    print(f"--- Flower, {label}")
    print(
        "round | in process: wall  slowest site  rest | Flower: wall  slowest site  Flower's | MB"
    )
    for a, b in zip(ref["rounds"], fl["rounds"], strict=False):
        print(
            f"{a['round']:5d} | {a['wall_s']:16.2f} {a['slowest_site_s']:13.2f} "
            f"{a['overhead_s']:5.2f} | {b['wall_s']:12.2f} {b['slowest_site_s']:13.2f} "
            f"{b['overhead_s']:9.2f} | {b['bytes'] / 1e6:.1f}"
        )
    over = [b["overhead_s"] for b in fl["rounds"]]
    print(f"in process : {ip:8.3f} s/round (setup {ref['setup_s']:.2f} s)")
    print(f"Flower     : {dep:8.3f} s/round (setup + embedding {fl['setup_and_embed_s']:.1f} s)")
    print(
        f"Flower's part per round: median {np.median(over):.2f} s, max {max(over):.2f} s "
        "(wall minus the slowest site's local training)"
    )
    print(f"ratio      : {dep / ip:8.2f}x per round")
    print(
        f"models     : max abs difference {abs_diff:.1e}, max relative {diff:.1e}; "
        f"equal within rtol 1e-5, atol 1e-7: {close}"
    )
    print(
        f"balancing  : {ref['balance_s']:.2f} s in process, {fl['balance_s']:.1f} s over Flower "
        f"(clusters per pass {ref['balance_clusters']} / {fl['balance_clusters']})"
    )
    ip_total = ref["setup_s"] + sum(ref["seconds_per_round"]) + ref["balance_s"]
    print(
        f"whole run  : {fl['wall_s']:.1f} s over Flower (setup, rounds, balancing, embedding); "
        f"{ip_total:.1f} s in process (setup, rounds, balancing; no embedding)"
    )
    print(f"load       : {fl['load_avg']}")
    return {
        "flower": {k: v for k, v in fl.items() if k != "params"},
        "ratio": dep / ip,
        "flower_part_median_s": float(np.median(over)),
        "max_rel_param_diff": diff,
        "max_abs_param_diff": abs_diff,
        "params_allclose": close,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()
    import flwr
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    modes = ["false", "true"] if args.warm_worker == "both" else [args.warm_worker]
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        paths = write_sites(work / "data", args.sites, args.cells, args.genes, args.seed)
        ref = in_process(paths, args)
        for mode in modes:
            runs[mode] = deployment(paths, args, work / f"flower-warm-{mode}", warm=mode)
    print(f"{args.sites} sites x {args.cells} cells x {args.genes} genes, {args.rounds} rounds")
    record: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "versions": {
            "python": platform.python_version(),
            "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "?",
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "cpus": os.cpu_count(),
        "load_avg_start": load_start,
        "args": vars(args),
        "in_process": {k: v for k, v in ref.items() if k != "params"},
    }
    for mode, fl in runs.items():
        label = "warm worker" if mode == "true" else "every message in its own process"
        record[f"warm_worker_{mode}"] = report(ref, fl, label)
    if len(runs) == 2:
        cold, hot = (record[f"warm_worker_{k}"] for k in ("false", "true"))
        print(
            "warm / cold: Flower's part per round "
            f"{hot['flower_part_median_s'] / cold['flower_part_median_s']:.2f}x, balancing "
            f"{hot['flower']['balance_s'] / cold['flower']['balance_s']:.2f}x, whole run "
            f"{hot['flower']['wall_s'] / cold['flower']['wall_s']:.2f}x"
        )
    record["load_avg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
