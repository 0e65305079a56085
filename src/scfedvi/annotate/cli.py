"""``scfedvi annotate`` and ``scfedvi embed --predict``: parsing and the commands.

``annotate`` is a command of its own that continues a trained run rather than a flag of
``train``: as scvi-tools' ``SCANVI.from_scvi_model``, scANVI starts from the trained scVI
model, so a federation trained once (the long part) can be annotated later, again with another
label column or other sites' labels, without training scVI again; and ``train --label-key``
keeps its meaning (labels for evaluation only).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path


def add_annotate_parser(sub) -> None:
    """The ``annotate`` subcommand."""
    a = sub.add_parser(
        "annotate",
        help="federated scANVI on a trained run: predict cell types at every site",
        description="Continue a trained scFedVI run with federated scANVI (as scvi-tools' "
        "SCANVI.from_scvi_model): cells labelled --unlabeled-category are unlabelled; every "
        "site gets obs['scfedvi_label'] (the unlabelled category for cells below the "
        "confidence threshold or far from their label's centroid), "
        "obs['scfedvi_label_confidence'], obs['scfedvi_label_novelty'] and "
        "obsm['X_scFedANVI']. Writes OUT/model (for `scfedvi embed --predict`) and each "
        "site's .h5ad.",
    )
    a.add_argument("--model", required=True, help="the trained run's model folder (RUN/model)")
    src = a.add_argument_group("sites (one of; the run's sites)")
    src.add_argument("--site", action="append", default=[], metavar="NAME=PATH")
    src.add_argument("--input", metavar="PATH", help="one .h5ad holding every site's cells")
    src.add_argument("--split-key", help="with --input: obs column naming each cell's site")
    a.add_argument("--label-key", required=True, help="obs column of cell-type labels")
    a.add_argument(
        "--unlabeled-category",
        default="Unknown",
        help="label value of unlabelled cells (default: Unknown)",
    )
    from scfedvi.config import AnnotateConfig

    d = AnnotateConfig()
    a.add_argument(
        "--rounds", type=int, default=None, help=f"scANVI rounds (default: {d.n_rounds})"
    )
    a.add_argument(
        "--local-epochs",
        type=int,
        default=None,
        help=f"epochs per round (default: {d.local_epochs})",
    )
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--overwrite", action="store_true", help="replace outputs in --out")


def add_predict_options(e: argparse.ArgumentParser) -> None:
    """``embed --predict`` (and query fine-tuning) options."""
    e.add_argument(
        "--predict",
        action="store_true",
        help="--model is an `scfedvi annotate` model: also predict labels "
        "(obs['scfedvi_label'], obs['scfedvi_label_confidence'], obsm['X_scFedANVI'])",
    )
    e.add_argument(
        "--query-epochs",
        type=int,
        default=0,
        metavar="N",
        help="with --predict: first fine-tune the site's new batch parameters for N epochs "
        "at the site alone (scArches; default 0: the frozen model)",
    )


def annotate(args: argparse.Namespace) -> int:
    from scfedvi.annotate.model import ScFedANVI
    from scfedvi.commands import check_outputs, read_sites
    from scfedvi.config import AnnotateConfig
    from scfedvi.model import ScFedVI, split_sites

    base = ScFedVI.load(args.model)
    sites, inputs = read_sites(args)
    if "__one__" in sites:
        sites = split_sites(sites["__one__"], args.split_key)
    out = Path(args.out)
    check_outputs(
        [out / "model" / "annotate.json", *(out / f"{n}.h5ad" for n in sites)],
        inputs.values(),
        args.overwrite,
    )
    cfg = AnnotateConfig()
    cfg = replace(
        cfg,
        n_rounds=args.rounds or cfg.n_rounds,
        local_epochs=args.local_epochs or cfg.local_epochs,
    )
    model = ScFedANVI.from_scfedvi(
        base,
        label_key=args.label_key,
        unlabeled_category=args.unlabeled_category,
        sites=sites,
        annotate=cfg,
    )
    print(f"{model}: {', '.join(f'{n} ({a.n_obs} cells)' for n, a in sites.items())}")
    model.train()
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model", overwrite=args.overwrite)
    for name in sites:
        model.predict(site=name)
        model.sites[name].write_h5ad(out / f"{name}.h5ad")
        conf = model.sites[name].obs["scfedvi_label_confidence"]
        low = float((conf < cfg.confidence_threshold).mean())
        print(f"  {name}: {low:.1%} of cells below confidence {cfg.confidence_threshold}")
    print(f"wrote {out}/model and {len(sites)} site files with predicted labels")
    return 0


def embed_predict(args: argparse.Namespace) -> int:
    from scfedvi.annotate.model import ScFedANVI
    from scfedvi.annotate.query import load_query_data
    from scfedvi.commands import check_outputs, read_input

    out = Path(args.out)
    check_outputs([out], [Path(args.input)], args.overwrite)
    if not (Path(args.model) / "annotate.json").exists():
        raise FileNotFoundError(
            f"--predict: {args.model} is not an `scfedvi annotate` model (no annotate.json); "
            "pass --model ANNOTATE_OUT/model, or leave out --predict to embed only"
        )
    model = ScFedANVI.load(args.model)
    if args.layer is not None:
        model.layer = args.layer or None
    adata = read_input(args.input)
    site = args.site or Path(args.input).stem
    if args.query_epochs:
        model = load_query_data(model, adata, site=site, n_epochs=args.query_epochs)
    z, _ = model.predict_site(adata, site=site)
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    print(
        f"wrote {out}: obsm['X_scFedANVI'] ({z.shape[1]} dimensions), obs['scfedvi_label'] and "
        f"obs['scfedvi_label_confidence'] for {z.shape[0]} cells"
    )
    return 0
