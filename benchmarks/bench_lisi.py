"""Benchmark: LISI speed of scfedvi against harmonypy and scib-metrics, side by side.

Each tool computes the per-cell LISI of two label sets (batch and cell type) from the embedding,
neighbour search included:

- scfedvi: ``compute_neighbors(X, k=90)`` (exact kd-tree, or faiss' inverted lists above
  200,000 cells) and ``compute_lisi`` over it (one kernel calibration shared by both label
  sets); its CPU time is reported per part, and ``--check-cells N`` compares its per-cell LISI
  with exact kNN's on N random cells (``exact_lisi_of``: their exact neighbours among all);
- harmonypy: ``compute_lisi(X, meta, ["batch", "cell_type"])`` (its own kd-tree per label);
- scib-metrics: pynndescent neighbours (its Benchmarker's default, here with all cores), then
  ``ilisi_knn`` and ``clisi_knn``.

Each tool first runs once on a small warm-up set (numba and jax compilation, not timed). Data:
seeded Gaussian clusters (cell types) with a per-batch shift, in ``--dims`` dimensions.

Usage::

    python benchmarks/bench_lisi.py --sizes 10000 100000 --out benchmark-out/bench_lisi.json
    python benchmarks/bench_lisi.py --sizes 100000 1000000 --tools scfedvi --check-cells 3000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scfedvi.metrics import compute_lisi, exact_lisi_of

N_TYPES = 10
N_BATCHES = 4
WARMUP_CELLS = 2_000


def simulate(n: int, n_dims: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Gaussian clusters (cell types) in ``n_dims`` dimensions, each batch shifted a little."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 4.0, (N_TYPES, n_dims))
    shifts = rng.normal(0.0, 1.0, (N_BATCHES, n_dims))
    cell_type = rng.integers(0, N_TYPES, n)
    batch = rng.integers(0, N_BATCHES, n)
    X = centers[cell_type] + shifts[batch] + rng.normal(size=(n, n_dims))
    meta = pd.DataFrame({"batch": batch.astype(str), "cell_type": cell_type.astype(str)})
    return X, meta


def cpu_seconds() -> float:
    """This process's CPU time (user + system, every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


#: scfedvi's neighbour search (``--method``).
METHOD: list[Any] = ["auto"]
#: CPU seconds of the last scfedvi run: neighbour search, then kernel calibration + LISI.
LAST_CPU: dict[str, float] = {}


def run_scfedvi(X: np.ndarray, meta: pd.DataFrame) -> tuple[float, np.ndarray]:
    from scfedvi.metrics import compute_neighbors

    start, cpu0 = time.perf_counter(), cpu_seconds()
    nn = compute_neighbors(X, k=90, method=METHOD[0])  # "auto": exact or approximate by size
    cpu1 = cpu_seconds()
    LAST_CPU["neighbors_wall"] = time.perf_counter() - start
    out = compute_lisi(None, {"batch": meta["batch"], "cell_type": meta["cell_type"]}, neighbors=nn)
    seconds = time.perf_counter() - start
    LAST_CPU.update(neighbors=cpu1 - cpu0, lisi=cpu_seconds() - cpu1)
    assert isinstance(out, dict)
    return seconds, np.column_stack([out["batch"], out["cell_type"]])


def run_harmonypy(X: np.ndarray, meta: pd.DataFrame) -> tuple[float, np.ndarray]:
    import harmonypy

    start = time.perf_counter()
    out = harmonypy.compute_lisi(X, meta, ["batch", "cell_type"])
    return time.perf_counter() - start, np.asarray(out)


def run_scib(X: np.ndarray, meta: pd.DataFrame) -> tuple[float, np.ndarray]:
    """Time scib-metrics' neighbours + ilisi_knn + clisi_knn; then get per-cell values untimed."""
    import scib_metrics
    from scib_metrics.nearest_neighbors import pynndescent

    batch, cell_type = meta["batch"].to_numpy(), meta["cell_type"].to_numpy()
    start = time.perf_counter()
    res = pynndescent(X, n_neighbors=91, random_state=0, n_jobs=-1)  # 90 + the cell itself
    scib_metrics.ilisi_knn(res, batch)
    scib_metrics.clisi_knn(res, cell_type)
    seconds = time.perf_counter() - start
    lisi = scib_metrics.lisi_knn
    return seconds, np.column_stack([lisi(res, batch), lisi(res, cell_type)])


TOOLS = {"scfedvi": run_scfedvi, "harmonypy": run_harmonypy, "scib-metrics": run_scib}


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dims", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tools", nargs="+", choices=list(TOOLS), default=list(TOOLS))
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; the minimum is kept")
    parser.add_argument("--method", choices=["auto", "exact", "approx"], default="auto")
    parser.add_argument(
        "--check-cells",
        type=int,
        default=0,
        help="compare scfedvi's LISI with exact kNN's on this many random cells (their exact "
        "neighbours among all cells): per-cell |difference| mean, 99th percentile, max",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmark-out/bench_lisi.json"))
    args = parser.parse_args(argv)

    METHOD[0] = args.method
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()}", flush=True)
    Xw, meta_w = simulate(WARMUP_CELLS, args.dims, args.seed + 1)
    for name in args.tools:
        TOOLS[name](Xw, meta_w)  # compile numba/jax code, import modules

    results = []
    for n in args.sizes:
        X, meta = simulate(n, args.dims, args.seed)
        row: dict[str, Any] = {"n_cells": n, "seconds": {}, "max_abs_diff_vs_harmonypy": {}}
        values: dict[str, np.ndarray] = {}
        for name in args.tools:
            runs = [TOOLS[name](X, meta) for _ in range(args.repeats)]
            seconds, values[name] = min(r[0] for r in runs), runs[-1][1]
            row["seconds"][name] = seconds
            extra = ""
            if name == "scfedvi":
                row["scfedvi_cpu_s"] = dict(LAST_CPU)
                extra = (
                    f" (CPU: neighbours {LAST_CPU['neighbors']:.1f} s, calibration + LISI "
                    f"{LAST_CPU['lisi']:.1f} s; load {os.getloadavg()[0]:.1f})"
                )
            print(f"  n={n:>7}  {name:<13} {seconds:9.2f} s{extra}", flush=True)
        if args.check_cells and "scfedvi" in values:
            rows = np.random.default_rng(args.seed + 2).choice(
                n, min(n, args.check_cells), replace=False
            )
            exact = exact_lisi_of(X, {"batch": meta["batch"], "cell_type": meta["cell_type"]}, rows)
            assert isinstance(exact, dict)
            row["vs_exact_knn"] = {"cells": len(rows), "seed": args.seed + 2}
            for j, key in enumerate(("batch", "cell_type")):
                d = np.abs(values["scfedvi"][rows, j] - exact[key])
                row["vs_exact_knn"][key] = {
                    "mean_abs": float(d.mean()),
                    "p99_abs": float(np.quantile(d, 0.99)),
                    "max_abs": float(d.max()),
                    "median_exact": float(np.median(exact[key])),
                    "median_approx": float(np.median(values["scfedvi"][rows, j])),
                }
                print(
                    f"  n={n:>7}  |LISI - exact kNN's| on {len(rows)} cells, {key}: mean "
                    f"{d.mean():.4f}, p99 {np.quantile(d, 0.99):.4f}, max {d.max():.4f}",
                    flush=True,
                )
        if "harmonypy" in values:
            for name, v in values.items():
                row["max_abs_diff_vs_harmonypy"][name] = float(
                    np.abs(v - values["harmonypy"]).max()
                )
        if "scfedvi" in values:
            row["mean_lisi_scfedvi"] = {
                "batch": float(values["scfedvi"][:, 0].mean()),
                "cell_type": float(values["scfedvi"][:, 1].mean()),
            }
        results.append(row)

    print()
    others = [t for t in args.tools if t != "scfedvi"]
    header = f"{'cells':>8} | " + " | ".join(f"{t:>12}" for t in args.tools)
    header += "".join(f" | {'ours/' + t:>18}" for t in others)
    if "harmonypy" in args.tools:
        header += "".join(f" | max|{t}-harmonypy|" for t in args.tools if t != "harmonypy")
    print(header)
    print("-" * len(header))
    for row in results:
        s = row["seconds"]
        line = f"{row['n_cells']:>8} | " + " | ".join(f"{s[t]:>10.2f} s" for t in args.tools)
        if "scfedvi" in s:
            row["ratio_ours_over"] = {t: s["scfedvi"] / s[t] for t in others}
            line += "".join(f" | {row['ratio_ours_over'][t]:>18.3f}" for t in others)
        if "harmonypy" in args.tools:
            diffs = row["max_abs_diff_vs_harmonypy"]
            line += "".join(
                f" | {diffs[t]:>{len(t) + 13}.2e}" for t in args.tools if t != "harmonypy"
            )
        print(line)

    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seeds": {"data": args.seed, "warmup_data": args.seed + 1, "pynndescent": 0},
        "data": f"{N_TYPES} Gaussian cell types x {N_BATCHES} shifted batches, {args.dims}-D",
        "versions": {
            "python": platform.python_version(),
            **{
                p: _version(p)
                for p in (
                    "scfedvi",
                    "numpy",
                    "scipy",
                    "harmonypy",
                    "scib-metrics",
                    "jax",
                    "pynndescent",
                    "faiss-cpu",
                )
            },
        },
        "machine": {"cores": os.cpu_count(), "load_average_after": os.getloadavg()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.out}")
    return record


if __name__ == "__main__":
    main()
