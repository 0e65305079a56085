"""The ``scfedvi`` command: parsing only, then the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from scfedvi import __version__
from scfedvi.config import RunConfig

#: The run defaults that ``--help`` shows come from here, never from numbers written in a help
#: text (``tests/test_docs_defaults.py`` checks every default shown).
_RUN = RunConfig()

EPILOG = """examples:
  scfedvi demo                                   simulated sites, federated training, a report
  scfedvi train --site lab-a=a.h5ad --site lab-b=b.h5ad --batch-key tech --out run1
  scfedvi train --input pooled.h5ad --split-key lab --batch-key tech --label-key cell_type --out run1
  scfedvi embed --model run1/model --input lab-c.h5ad --out lab-c.embedded.h5ad
  scfedvi annotate --model run1/model --input pooled.h5ad --split-key lab --label-key cell_type --out ann1
  scfedvi embed --model ann1/model --input lab-d.h5ad --out lab-d.labelled.h5ad --predict
"""


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"communication rounds (default: {_RUN.federation.n_rounds})",
    )
    g.add_argument(
        "--local-epochs",
        type=int,
        default=None,
        help="epochs over a site's training cells per round (default: the schedule that "
        "follows the data, 20 below 20,000 training cells; demo 5)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=_RUN.federation.seed,
        help=f"seed of the whole run (default: {_RUN.federation.seed})",
    )


def _add_scale_options(p: argparse.ArgumentParser) -> None:
    """Schedule, early stopping, parallel sites and device (defaults: RunConfig's)."""
    g = p.add_argument_group("schedule and hardware (docs/scale.md)")
    g.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help="total epochs, split into --rounds (default: scvi-tools' rule, "
        "min(400, round(20000 / cells x 400)))",
    )
    g.add_argument(
        "--early-stopping",
        action="store_true",
        help="stop when the sites' validation loss stops improving (--patience rounds)",
    )
    g.add_argument(
        "--patience",
        type=int,
        default=None,
        help=f"with --early-stopping: rounds (default: {_RUN.federation.early_stopping_patience})",
    )
    g.add_argument(
        "--n-jobs",
        type=int,
        default=None,
        metavar="N",
        help="worker processes training sites at the same time (default: the free cores; "
        "1: one site after the other)",
    )
    g.add_argument(
        "--accelerator",
        choices=["cpu", "gpu", "cuda", "auto"],
        default=None,
        help=f"where sites train (default: {_RUN.train.accelerator}; auto: a CUDA GPU when torch "
        "sees one)",
    )
    g.add_argument(
        "--device", default=None, help=f"with a GPU: its index (default: {_RUN.train.device})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scfedvi",
        description=(
            "scFedVI: train one scVI model across sites that cannot share their single-cell data. "
            "Only model parameters and aggregate numbers leave a site; each site's cells are "
            "embedded at the site."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"scfedvi {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch threads (default: 1; scVI's small layers gain little from more, and more "
        "threads than free cores slow training down many times)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="federated run on simulated data (no servers; measured 136 s to 6 min on 2 cores, "
        "by the machine's load)",
        description="Simulate three sites with strong technical batch effects, train "
        "scFedVI in process, compare it with scVI fit separately per site (batch and "
        "cell-type LISI), and write embeddings, the model and a UMAP figure.",
    )
    d.add_argument("--out", default="scfedvi-demo", help="output folder (default: scfedvi-demo)")
    d.add_argument("--cells", type=int, default=3000, help="simulated cells (default: 3000)")
    d.add_argument("--genes", type=int, default=1000, help="simulated genes (default: 1000)")
    d.add_argument(
        "--composition",
        type=float,
        default=0.5,
        help="how much the sites' cell-type mixes differ (0: equal; default: 0.5)",
    )
    d.add_argument("--no-figures", action="store_true", help="skip the UMAP figure")
    d.add_argument(
        "--overwrite", action="store_true", help="write into a folder holding other files"
    )
    _add_run_options(d)

    t = sub.add_parser(
        "train",
        help="federated training in process on your .h5ad files",
        description="Train scFedVI over sites given as files (one per site) or as one "
        "file split by an obs column. Writes the global model, the schema, each "
        "site's embedding (obsm['X_scFedVI']) as .h5ad and the history as CSV.",
    )
    src = t.add_argument_group("sites (one of)")
    src.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a site's .h5ad of raw counts (repeat for each site)",
    )
    src.add_argument("--input", metavar="PATH", help="one .h5ad holding every site's cells")
    src.add_argument("--split-key", help="with --input: obs column naming each cell's site")
    t.add_argument(
        "--batch-key", required=True, help="obs column of the batch to correct (e.g. technology)"
    )
    t.add_argument("--label-key", help="obs column of cell-type labels (optional, for evaluation)")
    t.add_argument("--layer", help="layer with raw counts (default: X)")
    t.add_argument(
        "--n-top-genes", type=int, default=2000, help="highly variable genes (0: all genes)"
    )
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--checkpoint-dir", help="checkpoint every round here; a rerun resumes from it")
    t.add_argument(
        "--overwrite", action="store_true", help="replace outputs of an earlier run in --out"
    )
    a = t.add_argument_group("method")
    a.add_argument(
        "--norm-stats",
        choices=["local", "global", "averaged"],
        default=None,
        help="BatchNorm statistics: each site's own (local), pooled over all sites (global), or "
        "averaged running statistics (averaged: plain FedAvg); "
        f"default: {_RUN.federation.norm_stats}",
    )
    a.add_argument(
        "--no-batch-owned",
        action="store_true",
        help="average batch-specific weights over all sites (plain FedAvg)",
    )
    a.add_argument(
        "--dp-clip",
        type=float,
        default=None,
        metavar="C",
        help="client-level differential privacy: clip each site's update to L2 norm C",
    )
    a.add_argument(
        "--dp-noise",
        type=float,
        default=1.0,
        metavar="SIGMA",
        help="with --dp-clip: Gaussian noise multiplier (default: 1.0)",
    )
    a.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="sum the sites' updates under secure aggregation (docs/privacy.md): needs "
        "--dp-clip C (each site clips its own update; --dp-noise 0 for no noise) and at least "
        "3 sites; in process the sites' identity keys are made in memory",
    )
    a.add_argument(
        "--batch-size",
        type=int,
        default=_RUN.train.batch_size,
        help=f"minibatch size (default: {_RUN.train.batch_size})",
    )
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_run_options(t)
    _add_scale_options(t)

    e = sub.add_parser(
        "embed",
        help="embed one site's cells with a saved global model",
        description="A site embeds its own cells with a saved model alone; no other "
        "site's data is needed. Writes a new .h5ad with obsm['X_scFedVI'].",
    )
    e.add_argument("--model", required=True, help="folder of a saved model (train's OUT/model)")
    e.add_argument("--input", required=True, help="the site's .h5ad of raw counts")
    e.add_argument("--out", required=True, help="output .h5ad (must differ from --input)")
    e.add_argument("--site", help="site name used in messages (default: the input's file name)")
    e.add_argument(
        "--layer", help="layer with raw counts (default: the one the model was trained on)"
    )
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    from scfedvi.annotate.cli import add_annotate_parser, add_predict_options

    add_predict_options(e)
    add_annotate_parser(sub)
    from scfedvi.benchmark.cli import add_benchmark_parser

    add_benchmark_parser(sub)

    kg = sub.add_parser(
        "secagg-keygen",
        help="make a site's identity key for secure aggregation (NAME.key, NAME.pub)",
        description="Write DIR/NAME.key (the site's Ed25519 identity key, mode 0600: keep it at "
        "the site) and DIR/NAME.pub (its public key: the line the consortium's roster lists "
        "for the site). With --roster, add or replace the site's entry in that roster file.",
    )
    kg.add_argument("--site", required=True, help="the site's name (as in its node config)")
    kg.add_argument("--out", required=True, metavar="DIR", help="folder to write the keys to")
    kg.add_argument("--roster", metavar="FILE", help="roster file (TOML) to add the site to")
    kg.add_argument("--overwrite", action="store_true", help="replace an existing key")

    fl = sub.add_parser(
        "flower",
        help="write a Flower app directory for `flwr run` (deployment across machines)",
        description="Write DIR/pyproject.toml: the scfedvi Flower app (installed components, every "
        "run-config key with its default). See the README's deployment section.",
    )
    fl.add_argument("dir", help="folder to write (created)")
    fl.add_argument(
        "--overwrite", action="store_true", help="replace DIR/pyproject.toml if it exists"
    )
    return parser


#: Commands that train or embed in this process and tune glibc's malloc first
#: (:mod:`scfedvi._malloc`); ``benchmark`` leaves it alone, so every method it times runs under
#: the allocator its README figures were measured with.
MALLOC_TUNED = ("train", "embed", "demo", "annotate")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 0
    import torch

    from scfedvi import commands

    torch.set_num_threads(max(1, args.threads))
    if args.command in MALLOC_TUNED:
        from scfedvi._malloc import tune_malloc

        tune_malloc()

    try:
        return int(getattr(commands, args.command.replace("-", "_"))(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (
        ValueError,
        KeyError,
        FileExistsError,
        FileNotFoundError,
        RuntimeError,
        ImportError,
    ) as err:
        msg = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
        if args.command in ("train", "embed", "annotate") and "layer=" in msg:  # the API's words
            msg += "; on the command line: --layer NAME"
        print(f"scfedvi {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
