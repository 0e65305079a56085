"""``scfedvi demo``: simulated sites, federated training, a short comparison and figures."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from scfedvi._constants import LATENT_KEY
from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig

MARKER = ".scfedvi-demo"
PER_SITE_KEY = "X_scVI_per_site"


@dataclass
class DemoResult:
    """What the demo measured (printed by the command, written to ``summary.json``)."""

    table: pd.DataFrame
    seconds: float
    out_dir: Path
    files: list[str]


def demo_config(n_rounds: int = 20, local_epochs: int = 5, seed: int = 0) -> RunConfig:
    """The demo's run: the package defaults with a short schedule (KL warm-up over the run)."""
    epochs = n_rounds * local_epochs
    return RunConfig(
        model=ModelConfig(),
        train=TrainConfig(local_epochs=local_epochs, n_epochs_kl_warmup=epochs),
        federation=FederationConfig(n_rounds=n_rounds, seed=seed),
    )


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Use ``out`` if it is new, empty, an earlier demo's output, or ``overwrite`` is set."""
    d = Path(out)
    if d.exists() and any(d.iterdir()) and not (d / MARKER).exists() and not overwrite:
        raise FileExistsError(
            f"{d} exists and holds files that the demo did not write; choose another --out "
            "or pass --overwrite"
        )
    d.mkdir(parents=True, exist_ok=True)
    (d / MARKER).write_text("written by scfedvi demo\n")
    return d


def run_demo(
    out: str | Path = "scfedvi-demo",
    *,
    n_cells: int = 3000,
    n_genes: int = 1000,
    n_sites: int = 3,
    n_rounds: int = 20,
    local_epochs: int = 5,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    figures: bool = True,
    composition: float = 0.5,
) -> DemoResult:
    """Simulate ``n_sites`` sites (one technology each), train scFedVI, compare with per-site scVI.

    ``composition`` sets how much the sites' cell-type mixes differ (each site's mix is drawn
    from ``Dirichlet(1 / composition)``; 0: the same mix everywhere).

    Both methods use this project's model with the same schedule; the per-site baseline is the
    paper's comparison (scVI fit separately at each site, embeddings concatenated).
    """
    from scfedvi.data.simulate import simulate
    from scfedvi.metrics.lisi import compute_lisi, summarize_lisi
    from scfedvi.model import ScFedVI

    d = prepare_out_dir(out, overwrite)
    t0 = time.perf_counter()
    adata = simulate(
        n_cells=n_cells,
        n_genes=n_genes,
        n_batches=n_sites,
        n_cell_types=5,
        composition=composition,
        seed=seed,
    )
    adata.obs["site"] = ["site-" + str(b) for b in adata.obs["batch"].cat.codes]
    cfg = demo_config(n_rounds, local_epochs, seed)
    model = ScFedVI.from_sites(
        adata,
        split_key="site",
        batch_key="batch",
        label_key="cell_type",
        n_top_genes=None,
        config=cfg,
    )
    t_fed = time.perf_counter()
    model.train(progress=progress)
    t_fed = time.perf_counter() - t_fed
    model.embed_sites()
    per_site_seconds = 0.0
    for name, site in model.sites.items():
        alone = ScFedVI(model.schema, replace(cfg), {name: site})
        t = time.perf_counter()
        alone.train(progress=False)
        per_site_seconds += time.perf_counter() - t
        site.obsm[PER_SITE_KEY] = alone.get_latent_representation(site=name, write=False)
    import anndata as ad

    merged = ad.concat(list(model.sites.values()), merge="same")
    obs = merged.obs[["batch", "cell_type"]]
    rows = []
    for method, key, secs in (
        ("scFedVI", LATENT_KEY, t_fed),
        ("scVI per site", PER_SITE_KEY, per_site_seconds),
    ):
        lisi = compute_lisi(merged.obsm[key], obs)
        b, c = summarize_lisi(lisi["batch"]), summarize_lisi(lisi["cell_type"])
        rows.append(
            {
                "method": method,
                "batch LISI mean": b["mean"],
                "batch LISI sd": b["sd"],
                "cell-type LISI mean": c["mean"],
                "cell-type LISI sd": c["sd"],
                "training seconds": secs,
            }
        )
    table = pd.DataFrame(rows).set_index("method")
    files = []
    model.save(d / "model", overwrite=True)
    files.append(str(d / "model"))
    for name, site in model.sites.items():
        path = d / f"{name}.h5ad"
        site.write_h5ad(path)
        files.append(str(path))
    model.history.to_csv(d / "history.csv", index=False)
    files.append(str(d / "history.csv"))
    if figures:
        from scfedvi.report.figures import plot_umaps, umap_coords

        coords = {
            "scFedVI": umap_coords(merged.obsm[LATENT_KEY], seed=seed),
            "scVI per site": umap_coords(merged.obsm[PER_SITE_KEY], seed=seed),
        }
        files.append(plot_umaps(coords, obs, ["batch", "cell_type"], d / "umap.png"))
    seconds = time.perf_counter() - t0
    summary = {
        "sites": {n: int(a.n_obs) for n, a in model.sites.items()},
        "genes": model.schema.n_genes,
        "rounds": n_rounds,
        "local_epochs": local_epochs,
        "seed": seed,
        "composition": composition,
        "seconds": seconds,
        "config": cfg.to_dict(),
        "table": table.reset_index().to_dict(orient="records"),
    }
    (d / "summary.json").write_text(json.dumps(summary, indent=2))
    files.append(str(d / "summary.json"))
    return DemoResult(table=table, seconds=seconds, out_dir=d, files=files)


def format_table(table: pd.DataFrame) -> str:
    """The demo's comparison as aligned text (mean ± sd)."""
    lines = [
        f"{'method':<16}{'batch LISI (higher=better)':>30}{'cell-type LISI (lower=better)':>32}{'train s':>10}"
    ]
    for method, r in table.iterrows():
        b = f"{r['batch LISI mean']:.2f} ± {r['batch LISI sd']:.2f}"
        c = f"{r['cell-type LISI mean']:.2f} ± {r['cell-type LISI sd']:.2f}"
        lines.append(f"{method!s:<16}{b:>30}{c:>32}{r['training seconds']:>10.1f}")
    return "\n".join(lines)


__all__ = ["DemoResult", "format_table", "run_demo"]
