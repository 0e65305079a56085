"""Peak memory of one site: projection onto the schema, one local epoch, embedding.

A fresh child process (so that nothing else inflates its high-water mark) reads a simulated
site from an h5ad file (200,000 cells x 2,000 genes by default, written by the parent), then
runs what a site runs: ``project`` onto the federation schema, one ``local_update`` epoch,
and the embedding (BatchNorm calibration on its own cells and the posterior means). The site's
AnnData stays alive throughout, as it does in ``ScFedVI``. Peak resident memory (RSS
high-water mark) is read from ``/proc/self/status`` (``VmHWM``) after each stage, and the
mark is reset between stages (``/proc/self/clear_refs``) where the kernel allows, so each
stage's own peak is known. (``getrusage``'s ``ru_maxrss`` is not used: it carries the
parent's image over ``fork`` and ``exec``.) Target: below 2 GB.

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_memory.py [--n-cells 200000]

Writes ``benchmark-out/bench_memory.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MB = 1024**2
TARGET_MB = 2048


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-cells", type=int, default=200_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--n-batches", type=int, default=2)
    p.add_argument("--library-size", type=float, default=3000.0, help="median UMIs per cell")
    p.add_argument(
        "--dropout-mid",
        type=lambda v: None if v.lower() == "none" else float(v),
        default=1.0,
        help="simulator's zero inflation midpoint (None: 'none'); 1.0 gives ~20%% non-zeros",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the h5ad goes (default: a temp dir)")
    p.add_argument("--out", default="benchmark-out/bench_memory.json")
    p.add_argument(
        "--prototype",
        action="store_true",
        help="also run the child with a proposed fix (a fixed glibc mmap threshold) and compare",
    )
    p.add_argument(
        "--tune-malloc",
        action="store_true",
        help="the child first calls scfedvi.tune_malloc(), as the scfedvi commands and the "
        "Flower site processes do",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-prototype", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the child: one site ---------------------------------------------------------------------
def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0]) * 1024
    return out


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Stages:
    """Records each stage's seconds, RSS after it and peak RSS during it."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.can_reset = _reset_hwm()
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        st = _status()
        self.rows.append(
            {
                "stage": name,
                "seconds": time.perf_counter() - self._t,
                "rss_mb": st["VmRSS"] / MB,
                "peak_mb": st["VmHWM"] / MB,
            }
        )
        print(
            f"  {name:<28} {self.rows[-1]['seconds']:8.1f} s   RSS {st['VmRSS'] / MB:8.0f} MB   "
            f"peak {st['VmHWM'] / MB:8.0f} MB",
            flush=True,
        )
        if self.can_reset:
            _reset_hwm()
        self._t = time.perf_counter()


# -- prototype of a further proposed fix ---------------------------------------------------------
# (the earlier prototype, a chunked projection, is now scfedvi.data.projection._place_columns)
def install_prototypes() -> None:
    """Patch the prototype in (this process only): keep buffers above 1 MiB in their own
    mappings, returned to the OS when freed (glibc's default threshold rises to 32 MiB after
    the first such free, and freed 8 MiB minibatch buffers then stay in the heap)."""
    import ctypes

    from scfedvi._malloc import M_MMAP_THRESHOLD

    assert ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1


def child(args: argparse.Namespace) -> dict[str, Any]:
    if args.child_prototype:
        install_prototypes()
    tuned = None
    if args.tune_malloc:
        from scfedvi._malloc import tune_malloc

        tuned = tune_malloc()
    stages = Stages()
    import anndata as ad
    import numpy as np
    import torch

    from scfedvi.config import ModelConfig, TrainConfig
    from scfedvi.data.schema import FederationSchema, project
    from scfedvi.train.local import (
        LocalState,
        SiteTensors,
        build_module,
        calibrate_norm_stats,
        embed,
        local_update,
    )
    from scfedvi.train.params import get_state

    torch.set_num_threads(args.threads)
    stages.mark("imports")
    adata = ad.read_h5ad(args.child)
    x = adata.X
    data_mb = (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / MB
    stages.mark("read h5ad")

    # the schema: the site's genes in reverse order, so projection really reorders columns
    schema = FederationSchema(
        genes=tuple(adata.var_names[::-1]),
        batches=tuple(adata.obs["batch"].cat.categories),
        batch_key="batch",
    )
    sd = project(adata, schema, site="site-1", batch_size=args.batch_size)
    stages.mark("project")
    data = SiteTensors(sd.X, sd.batch_index)
    stages.mark("site tensors")

    torch.manual_seed(args.seed)
    module = build_module(schema.n_genes, schema.n_batches, ModelConfig())
    result, _ = local_update(
        module,
        get_state(module),
        data,
        TrainConfig(batch_size=args.batch_size, local_epochs=1),
        LocalState(),
        norm_stats="local",
        seed=args.seed,
    )
    stages.mark("one local epoch")
    calibrate_norm_stats(module, data)
    z = embed(module, data)
    assert z.shape == (adata.n_obs, 10) and np.isfinite(z).all()
    stages.mark("embed (calibrate + latent)")
    # VmHWM, not getrusage: ru_maxrss carries the parent's image over fork and exec
    peaks = [r["peak_mb"] for r in stages.rows]
    return {
        "stages": stages.rows,
        "per_stage_peaks": stages.can_reset,
        "peak_rss_mb": max(peaks) if stages.can_reset else peaks[-1],
        "site_data_csr_mb": data_mb,
        "nnz": int(x.nnz),
        "density": float(x.nnz / (x.shape[0] * x.shape[1])),
        "steps": result.metrics["steps"],
        "loss": result.metrics["loss"],
        "torch_threads": torch.get_num_threads(),
        "malloc_tuned": tuned,
        "epoch_seconds": next(r["seconds"] for r in stages.rows if "epoch" in r["stage"]),
    }


# -- the parent ------------------------------------------------------------------------------
def simulate_site(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    from scfedvi.data.simulate import simulate

    t = time.perf_counter()
    adata = simulate(
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        n_batches=args.n_batches,
        library_sizes=(args.library_size,),
        dropout_mid=args.dropout_mid,
        seed=args.seed,
    )
    del adata.varm["de_factor"], adata.varm["batch_factor"]
    adata.uns.clear()
    adata.write_h5ad(path)
    return {"simulate_and_write_s": time.perf_counter() - t, "h5ad_mb": path.stat().st_size / MB}


def run_child(path: Path, *, prototype: bool) -> dict[str, Any]:
    """One site in a fresh process; its last line of output is its JSON result."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", str(path)]
    cmd += ["--child-prototype"] if prototype else []
    print(f"child process (one site{', prototyped fixes' if prototype else ''}):", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    lines = proc.stdout.rstrip().splitlines()
    for line in lines[:-1]:
        print(line)
    return json.loads(lines[-1])


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "numpy", "scipy", "anndata", "scfedvi"):
        out[pkg] = version(pkg)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "site.h5ad"
        print(
            f"simulating {args.n_cells} cells x {args.n_genes} genes "
            f"(library {args.library_size:g}, dropout_mid {args.dropout_mid}) ...",
            flush=True,
        )
        sim = simulate_site(args, path)
        print(f"  {sim['h5ad_mb']:.0f} MB h5ad in {sim['simulate_and_write_s']:.0f} s", flush=True)
        res = run_child(path, prototype=False)
        proto = run_child(path, prototype=True) if args.prototype else None
    peak = res["peak_rss_mb"]
    print(
        f"\nsite data: {res['nnz']:,} non-zeros (density {res['density']:.3f}), "
        f"{res['site_data_csr_mb']:.0f} MB as read (CSR)"
    )
    print(
        f"peak RSS of the site (VmHWM): {peak:.0f} MB; target < {TARGET_MB} MB: "
        f"{'met' if peak < TARGET_MB else 'MISSED'}"
    )
    if proto is not None:
        print(
            f"with the prototyped fixes: peak RSS {proto['peak_rss_mb']:.0f} MB; target "
            f"{'met' if proto['peak_rss_mb'] < TARGET_MB else 'MISSED'}"
        )
    results = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "prototype": proto,
        "args": vars(args),
        "versions": versions(),
        "simulation": sim,
        "target_mb": TARGET_MB,
        "target_met": peak < TARGET_MB,
        **res,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
