"""What each ``scfedvi`` subcommand does, given parsed arguments (thin calls into the library)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

from scfedvi.config import PrivacyConfig, RunConfig


def demo(args: argparse.Namespace) -> int:
    from scfedvi.demo import format_table, run_demo

    kw = {}
    if args.rounds:
        kw["n_rounds"] = args.rounds
    if args.local_epochs:
        kw["local_epochs"] = args.local_epochs
    print("scfedvi demo: 3 simulated sites (one technology each, library sizes 100x apart),")
    print("federated training in process; then scVI fit separately per site for comparison.")
    res = run_demo(
        args.out,
        n_cells=args.cells,
        n_genes=args.genes,
        seed=args.seed,
        composition=args.composition,
        overwrite=args.overwrite,
        figures=not args.no_figures,
        **kw,
    )
    print()
    print(format_table(res.table))
    print(f"\ntotal {res.seconds:.0f} s; outputs in {res.out_dir}/:")
    for f in res.files:
        print(f"  {f}")
    return 0


def read_input(path: str, site: str | None = None):
    """A site's .h5ad; a file that is not one is an error naming the site and the path."""
    from scfedvi.data.loaders import read_site_h5ad

    return read_site_h5ad(path, site)


def read_sites(args: argparse.Namespace) -> tuple[dict, dict[str, Path]]:
    """The sites of ``--site NAME=PATH`` (or ``--input``: ``{"__one__": adata}``) and their
    paths."""
    if args.site and args.input:
        raise ValueError(
            "give sites either as --site NAME=PATH (repeatable) or as --input with --split-key"
        )
    if args.input:
        if not args.split_key:
            raise ValueError("--input needs --split-key, the obs column naming each cell's site")
        return {"__one__": read_input(args.input)}, {"__one__": Path(args.input)}
    if not args.site:
        raise ValueError(
            "no sites: pass --site NAME=PATH for each site, or --input FILE --split-key KEY"
        )
    sites, paths = {}, {}
    for spec in args.site:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--site {spec!r}: expected NAME=PATH, e.g. --site lab-a=lab_a.h5ad")
        if name in sites:
            raise ValueError(f"--site {name!r} given twice; site names must be unique")
        sites[name], paths[name] = read_input(path, name), Path(path)
    return sites, paths


def train(args: argparse.Namespace) -> int:
    from scfedvi.model import ScFedVI

    out = Path(args.out)
    sites, inputs = read_sites(args)
    cfg = RunConfig()
    fed = cfg.federation
    fed = replace(fed, seed=args.seed, n_rounds=args.rounds or fed.n_rounds)
    fed = replace(
        fed,
        max_epochs=args.max_epochs,
        early_stopping=args.early_stopping,
        early_stopping_patience=fed.early_stopping_patience
        if args.patience is None
        else args.patience,
        n_jobs=args.n_jobs,
    )
    if args.norm_stats:
        fed = replace(fed, norm_stats=args.norm_stats)
    if args.no_batch_owned:
        fed = replace(fed, batch_owned=False)
    tr = replace(
        cfg.train,
        local_epochs=args.local_epochs or cfg.train.local_epochs,
        batch_size=args.batch_size,
        accelerator=args.accelerator or cfg.train.accelerator,
        device=args.device or cfg.train.device,
    )
    cfg = replace(cfg, federation=fed, train=tr)
    if args.dp_clip is not None or getattr(args, "secure_aggregation", False):
        one = sites.get("__one__")
        n_sites = len(sites) if one is None else int(one.obs[args.split_key].nunique())
        cfg = replace(cfg, privacy=_privacy(args, n_sites))
    if "__one__" in sites:
        model = ScFedVI.from_sites(
            sites["__one__"],
            split_key=args.split_key,
            batch_key=args.batch_key,
            label_key=args.label_key,
            layer=args.layer,
            n_top_genes=args.n_top_genes or None,
            config=cfg,
        )
    else:
        model = ScFedVI.from_sites(
            sites,
            batch_key=args.batch_key,
            label_key=args.label_key,
            layer=args.layer,
            n_top_genes=args.n_top_genes or None,
            config=cfg,
        )
    targets = [out / f"{name}.h5ad" for name in model.sites]
    check_outputs(
        [*targets, out / "history.csv", out / "model" / "model.npz"],
        inputs.values(),
        args.overwrite,
    )
    print(f"{model}: {', '.join(f'{n} ({a.n_obs} cells)' for n, a in model.sites.items())}")
    model.train(checkpoint_dir=args.checkpoint_dir, progress=not args.no_progress)
    print(model.schedule.describe() + ("; stopped early" if model.early_stopped else ""))
    model.embed_sites()
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model", overwrite=args.overwrite)
    model.history.to_csv(out / "history.csv", index=False)
    summary = {
        "schedule": model.schedule.to_dict(),
        "early_stopped": model.early_stopped,
        "rounds_trained": int(model.history["round"].max()) + 1,
        "config": model.config.to_dict(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name, target in zip(model.sites, targets, strict=True):
        model.sites[name].write_h5ad(target)
    print(
        f"wrote {out}/model (global model, schema.json), {len(targets)} site embeddings and history.csv"
    )
    return 0


def _privacy(args: argparse.Namespace, n_sites: int) -> PrivacyConfig:
    """``--dp-clip``/``--dp-noise``, and ``--secure-aggregation`` with its requirements."""
    if not getattr(args, "secure_aggregation", False):
        return PrivacyConfig(
            clip_norm=args.dp_clip, noise_multiplier=args.dp_noise, expected_sites=n_sites
        )
    if args.dp_clip is None:
        raise ValueError(
            "--secure-aggregation needs --dp-clip C: each site clips its update to L2 norm C "
            "(the bound fixes the masked sum's range); add --dp-noise 0 for no DP noise"
        )
    if n_sites < 3:
        raise ValueError(
            f"--secure-aggregation needs at least 3 sites, got {n_sites}: with 2, the sum and "
            "one site's own update give the other's away"
        )
    return PrivacyConfig(
        clip_norm=args.dp_clip,
        noise_multiplier=args.dp_noise,
        expected_sites=n_sites,
        clip_at="site",
        secure_aggregation=True,
    )


def secagg_keygen(args: argparse.Namespace) -> int:
    from scfedvi.privacy.identity import keygen, write_roster

    key, pub = keygen(args.site, args.out, overwrite=args.overwrite)
    line = pub.read_text(encoding="utf-8").split()[0]
    print(f"wrote {key} (mode 0600: the site's secret, keep it at the site) and {pub}")
    if args.roster:
        write_roster(args.roster, {args.site: line})
        print(f"added {args.site!r} to the roster {args.roster}")
    else:
        print(f'roster entry (under [sites]):  "{args.site}" = "{line}"')
    print(
        "the site's node config: "
        f"secagg-identity-key='{key.resolve()}' secagg-roster='<the consortium roster>'"
    )
    return 0


def embed(args: argparse.Namespace) -> int:
    from scfedvi.model import ScFedVI

    if getattr(args, "predict", False):
        from scfedvi.annotate.cli import embed_predict

        return embed_predict(args)
    out = Path(args.out)
    check_outputs([out], [Path(args.input)], args.overwrite)
    model = ScFedVI.load(args.model)
    if args.layer is not None:
        model.layer = args.layer or None  # --layer '' : X
    site = args.site or Path(args.input).stem
    adata = read_input(args.input, site)
    z = model.get_latent_representation(adata, site=site)
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    print(f"wrote {out}: obsm['X_scFedVI'] with {z.shape[1]} dimensions for {z.shape[0]} cells")
    return 0


def annotate(args: argparse.Namespace) -> int:
    from scfedvi.annotate.cli import annotate as run

    return run(args)


def check_outputs(targets, inputs, overwrite: bool) -> None:
    """Refuse to write over an input, or over an existing output without ``--overwrite``."""
    ins = {os.path.realpath(p) for p in inputs}
    for t in targets:
        if os.path.realpath(t) in ins:
            raise FileExistsError(f"output {t} would replace an input file; choose another --out")
        if Path(t).exists() and not overwrite:
            raise FileExistsError(f"{t} exists; pass --overwrite or choose another output path")


def flower(args: argparse.Namespace) -> int:
    from scfedvi.flower.settings import write_app_dir

    check_outputs([Path(args.dir) / "pyproject.toml"], [], args.overwrite)
    d = write_app_dir(args.dir)
    print(f"wrote {Path(d) / 'pyproject.toml'}; start a run with:")
    print(
        f"  flwr run {d} <connection> --run-config \"num-server-rounds=40 batch-key='batch' out-dir='out'\""
    )
    return 0


def benchmark(args: argparse.Namespace) -> int:
    from scfedvi.benchmark.cli import run_benchmark_command

    return run_benchmark_command(args)
