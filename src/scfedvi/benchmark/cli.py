"""``scfedvi benchmark``: parsing only, then :func:`~scfedvi.benchmark.runner.run_benchmark`
and :func:`~scfedvi.benchmark.report.write_report`.

Wire it into the ``scfedvi`` command with ``add_benchmark_parser(sub)`` in ``build_parser`` and
a ``benchmark`` entry that calls :func:`run_benchmark_command`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from scfedvi.benchmark.methods import DEFAULT_METHODS, METHODS

HELP = "compare scFedVI with scVI per site, pooled scVI, Harmony and PCA; write a report"
DESCRIPTION = """\
Run the methods over data sets x numbers of sites x seeds, compute per-cell LISI (the paper's
mean ± sd) and the scIB metrics, and write results.csv, report.md and a self-contained
report.html (the paper's tables, the scIB table, UMAPs, training curves, quality against
communication, configuration, versions, the command). Results are cached under OUT/cache: a
rerun computes only what changed (new seeds, methods, data or settings)."""
EPILOG = f"""\
methods: {", ".join(METHODS)}
  (default: {",".join(DEFAULT_METHODS)}; 'all' for every one)

examples:
  scfedvi benchmark pancreas,cortex --clients 2,3,5 --seeds 0,1,2 --out benchmark-out/paper
  scfedvi benchmark simulated --quick --out bench-smoke
  scfedvi benchmark my.h5ad --batch-key lab --label-key cell_type --clients 2,4 --out bench-mine
  scfedvi benchmark my.h5ad --layer counts --batch-key lab --label-key cell_type --out bench-mine
  scfedvi benchmark pancreas --partition sites.json --out bench-custom   # {{site: [batch values]}}

label transfer (federated scANVI; each site's labels hidden in turn, its own resumable script):
  python benchmarks/label_transfer.py pancreas --out-dir benchmark-out/paper/label_transfer
  scfedvi benchmark pancreas --clients 3 --out benchmark-out/paper   # reads OUT/label_transfer
"""


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_benchmark_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``benchmark`` sub-command to an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "benchmark",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "dataset",
        help="pancreas, cortex, simulated, or an .h5ad path of raw counts (comma-separated: several)",
    )
    p.add_argument("--batch-key", help="obs column of the batch (default: the data set's own)")
    p.add_argument("--label-key", help="obs column of the cell type (default: the data set's own)")
    p.add_argument("--layer", help="the layer of your .h5ad that holds the raw counts (default: X)")
    p.add_argument(
        "--clients", type=_ints, default=(2, 3, 5), help="numbers of sites (default: 2,3,5)"
    )
    p.add_argument(
        "--partition",
        default="paper",
        metavar="paper|auto|FILE.json",
        help="paper: the paper's partitions for pancreas/cortex, automatic otherwise (default); "
        "auto: whole batches grouped into balanced sites; FILE.json: {site: [batch values]} "
        'or {"2": {site: [...]}, "3": {...}}',
    )
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods")
    p.add_argument("--seeds", type=_ints, default=(0,), help="comma-separated seeds (default: 0)")
    p.add_argument("--out", required=True, help="output folder (the cache lives in OUT/cache)")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default: 1)")
    p.add_argument(
        "--n-top-genes",
        type=int,
        default=None,
        help="genes for every method: highly variable genes (0: all; default: all up to "
        "2,000 genes, else 2,000)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 3 rounds x 1 epoch, 2 scvi-tools epochs, a 300-cell subsample, fast scIB",
    )
    p.add_argument("--no-scib", action="store_true", help="skip the scIB metrics (LISI only)")
    p.add_argument(
        "--label-transfer",
        metavar="DIR",
        help="add the label-transfer section (federated scANVI, each site's labels hidden in "
        "turn) from the results benchmarks/label_transfer.py wrote in DIR (default: "
        "OUT/label_transfer when it holds results.jsonl)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="compute nothing: write the report from what OUT/cache already holds",
    )
    return p


def settings_from_args(args: argparse.Namespace):
    """The :class:`~scfedvi.benchmark.runner.BenchmarkSettings` of parsed arguments."""
    from scfedvi.benchmark.methods import parse_methods
    from scfedvi.benchmark.runner import BenchmarkSettings
    from scfedvi.benchmark.task import resolve_dataset

    names = [d.strip() for d in args.dataset.split(",") if d.strip()]
    if (args.batch_key or args.label_key) and len(names) > 1:
        raise ValueError("--batch-key/--label-key apply to one data set; run one per data set")
    specs = tuple(
        resolve_dataset(
            n,
            batch_key=args.batch_key,
            label_key=args.label_key,
            quick=args.quick,
            layer=args.layer,
        )
        for n in names
    )
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"data sets {names}: each needs a distinct name")
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: use 1 or more worker processes")
    if any(n < 1 for n in args.clients):
        raise ValueError(f"--clients {args.clients}: numbers of sites must be >= 1")
    methods = tuple(m.name for m in parse_methods(args.methods))
    return BenchmarkSettings(
        datasets=specs,
        clients=tuple(dict.fromkeys(args.clients)),
        methods=methods,
        seeds=tuple(dict.fromkeys(args.seeds)),
        partition=args.partition,
        quick=args.quick,
        scib=not args.no_scib,
        n_top_genes="auto" if args.n_top_genes is None else args.n_top_genes,
    )


def run_benchmark_command(args: argparse.Namespace) -> int:
    """Run ``scfedvi benchmark`` from parsed arguments; print the paper's tables and the files."""
    from scfedvi.benchmark.report import write_report
    from scfedvi.benchmark.runner import run_benchmark
    from scfedvi.report.markdown import table_markdown
    from scfedvi.report.tables import paper_table

    t0 = time.perf_counter()
    settings = settings_from_args(args)
    label_transfer = label_transfer_dir(args)  # a wrong --label-transfer fails before the run
    run = run_benchmark(settings, args.out, jobs=args.jobs, compute=not args.report_only)
    command = command_line(args)
    files = write_report(
        run,
        settings,
        args.out,
        command=command,
        seconds=time.perf_counter() - t0,
        label_transfer=label_transfer,
    )
    res, labels = run.results, [METHODS[m].label for m in settings.methods]
    for ds in dict.fromkeys(res["dataset"]) if not res.empty else []:
        for metric in ("batch", "celltype"):
            print(f"\n{ds}: {metric} LISI (mean ± sd per cell)")
            print(table_markdown(paper_table(res, ds, metric, labels)))
    print(
        f"\ncomputed {run.computed['embeddings']} embeddings, {run.computed['evaluations']} "
        f"evaluations in {time.perf_counter() - t0:.0f} s"
    )
    for name, path in files.items():
        print(f"{name}: {path}")
    if run.failed:
        print(
            f"{len(run.failed)} job(s) failed: " + "; ".join(f"{j}: {e}" for j, e in run.failed),
            file=sys.stderr,
        )
        return 1
    return 0


def label_transfer_dir(args: argparse.Namespace) -> Path | None:
    """The label-transfer results the report reads: ``--label-transfer DIR`` (an error when it
    holds none), else ``OUT/label_transfer`` when it holds ``results.jsonl``, else None."""
    if getattr(args, "label_transfer", None):
        d = Path(args.label_transfer)
        if not (d / "results.jsonl").is_file():
            raise ValueError(
                f"--label-transfer {d}: no results.jsonl there; write it with "
                f"'python benchmarks/label_transfer.py DATASET --out-dir {d}' or leave the "
                "option out"
            )
        return d
    d = Path(args.out) / "label_transfer"
    return d if (d / "results.jsonl").is_file() else None


def command_line(args: argparse.Namespace) -> str:
    """The exact ``scfedvi benchmark`` command of parsed arguments, every option spelled out."""
    parts = ["scfedvi", "benchmark", args.dataset]
    for key in ("batch_key", "label_key", "layer"):
        if getattr(args, key, None):
            parts += [f"--{key.replace('_', '-')}", getattr(args, key)]
    parts += ["--clients", ",".join(map(str, args.clients)), "--partition", args.partition]
    parts += ["--methods", args.methods, "--seeds", ",".join(map(str, args.seeds))]
    parts += ["--out", str(args.out), "--jobs", str(args.jobs)]
    if args.n_top_genes is not None:
        parts += ["--n-top-genes", str(args.n_top_genes)]
    if getattr(args, "label_transfer", None):
        parts += ["--label-transfer", str(args.label_transfer)]
    parts += [
        f
        for f, on in (
            ("--quick", args.quick),
            ("--no-scib", args.no_scib),
            ("--report-only", args.report_only),
        )
        if on
    ]
    return " ".join(shlex.quote(p) for p in parts)
