"""Per-round overhead of Flower's deployment engine against the in-process runtime.

The same sites (simulated counts, one batch per site, written as ``.h5ad``), the same run
configuration and seeds, trained twice: in process (``run_in_process``) and over a local
deployment (a SuperLink and one SuperNode per site on 127.0.0.1, ``flwr run``). Seconds per
round in process are timed around each round; over Flower they are the ServerApp's own
timing of each round (send, the sites' fresh ClientApp processes, replies, aggregation,
checkpoint), read from its ``result.json``; so is the balancing step (federated k-means, its
own message rounds), timed beside the in-process one. The setup round and the final
embedding are timed apart (wall time of ``flwr run`` to the result, minus the rounds and the
balancing).

Both use ``--threads`` torch threads (default 1: the ClientApps of the sites run side by side
on one machine here; in a real deployment each site has its own).

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_flower_overhead.py [--sites 3] [--rounds 3]

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
    p.add_argument("--cells", type=int, default=500, help="cells per site")
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1)
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
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1 / 0.3, size=n_genes)
    genes = [f"gene-{g:05d}" for g in range(n_genes)]
    paths = {}
    for i in range(n_sites):
        mu = rng.lognormal(np.log(2000.0 * 2**i), 0.3, size=n_cells)[:, None] * base / base.sum()
        x = rng.poisson(rng.gamma(5.0, mu * rng.lognormal(0, 0.3, n_genes) / 5.0))
        obs = pd.DataFrame({"batch": f"batch-{i}"}, index=[f"s{i}-c{c}" for c in range(n_cells)])
        a = ad.AnnData(
            sparse.csr_matrix(x.astype(np.int32)), obs=obs, var=pd.DataFrame(index=genes)
        )
        paths[f"site-{i:02d}"] = directory / f"site-{i:02d}.h5ad"
        a.write_h5ad(paths[f"site-{i:02d}"])
    return paths


def run_config(args: argparse.Namespace):
    from scfedvi.config import FederationConfig, RunConfig, TrainConfig

    fed = FederationConfig(n_rounds=args.rounds, min_sites=args.sites, seed=args.seed)
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
    run_in_process(coord, workers, args.rounds, on_round=lambda r, s: rounds.append(s))
    from scfedvi.federation.balance import balance_in_process

    t0 = time.perf_counter()
    steps = balance_in_process(workers, coord.params, cfg)
    balance = time.perf_counter() - t0
    return {
        "setup_s": setup,
        "seconds_per_round": rounds,
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


def deployment(paths: dict, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from scfedvi.flower.settings import write_app_dir

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
    env.update(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PATH=f"{BIN}:{env['PATH']}")
    procs: list[subprocess.Popen] = []
    log = (work / "flower.log").open("ab")

    def start(cmd: list[str]) -> None:
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=work))

    try:
        start([str(BIN / "flower-superlink"), "--insecure", "--port", str(port)])
        for site, path in paths.items():
            cfg = f"site='{site}' data-path='{path}' state-dir='{work / 'sites'}'"
            sn = [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}"]
            start([*sn, "--port", str(_free_port()), "--node-config", cfg])
        end = time.monotonic() + 60
        while not _listening(port):
            if time.monotonic() > end:
                raise TimeoutError(
                    f"the SuperLink does not listen on {port}; see {work}/flower.log"
                )
            time.sleep(0.2)
        rc = {
            "num-server-rounds": args.rounds,
            "local-epochs": args.local_epochs,
            "seed": args.seed,
            "min-sites": args.sites,
            "num-sites": args.sites,
            "n-top-genes": 0,
            "out-dir": str(out),
        }
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
    if result.get("status") != "completed":
        raise RuntimeError(f"the Flower run did not complete: {result}; see {work}/flower.log")
    with np.load(out / "model" / "model.npz") as z:
        params = {k: z[k] for k in z.files}
    return {
        "wall_s": wall,
        "seconds_per_round": result["seconds_per_round"],
        "balance_s": result["balance"]["seconds"],
        "balance_clusters": result["balance"]["clusters"],
        "setup_and_embed_s": wall - sum(result["seconds_per_round"]) - result["balance"]["seconds"],
        "params": params,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import flwr
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        paths = write_sites(work / "data", args.sites, args.cells, args.genes, args.seed)
        ref = in_process(paths, args)
        fl = deployment(paths, args, work)
    diff = max(
        float(np.max(np.abs(fl["params"][k] - v) / (np.abs(v) + 1e-6)))
        for k, v in ref["params"].items()
    )
    ip, dep = np.mean(ref["seconds_per_round"]), np.mean(fl["seconds_per_round"])
    print(f"{args.sites} sites x {args.cells} cells x {args.genes} genes, {args.rounds} rounds")
    print(f"in process : {ip:8.3f} s/round (setup {ref['setup_s']:.2f} s)")
    print(f"Flower     : {dep:8.3f} s/round (setup + embedding {fl['setup_and_embed_s']:.1f} s)")
    print(f"ratio      : {dep / ip:8.1f}x   (max relative parameter difference {diff:.1e})")
    print(
        f"balancing  : {ref['balance_s']:.2f} s in process, {fl['balance_s']:.1f} s over Flower "
        f"(clusters per pass {ref['balance_clusters']} / {fl['balance_clusters']})"
    )
    record = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "versions": {
            "python": platform.python_version(),
            "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "?",
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "args": vars(args),
        "in_process": {k: v for k, v in ref.items() if k != "params"},
        "flower": {k: v for k, v in fl.items() if k != "params"},
        "ratio": dep / ip,
        "max_rel_param_diff": diff,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
