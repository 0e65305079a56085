"""Which levers close the gap between plain FedAvg and pooled scVI: one run per call.

Each call trains scFedVI (this project's model, in process) on a paper partition with the
given settings, embeds every site at the site, and appends one JSON line with batch LISI and
cell-type LISI (mean over cells, harmonypy's definition) to ``--out``.

Examples (the study quoted in the README)::

    python benchmarks/levers.py --dataset pancreas --sites 5                    # defaults
    python benchmarks/levers.py --dataset pancreas --sites 5 --norm-stats averaged --no-batch-owned
    python benchmarks/levers.py --dataset pancreas --sites 1                    # pooled, own model
    python benchmarks/levers.py --dataset simulated --sites 3 --rounds 20 --local-epochs 5 --warmup 100
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def partition(dataset: str, n_sites: int, seed: int, composition: float):
    from scfedvi.data import load_dataset, paper_partition, simulate

    if dataset == "simulated":
        adata = simulate(3000, 1000, n_batches=3, n_cell_types=5, composition=composition, seed=0)
        bkey, lkey = "batch", "cell_type"
        if n_sites == 1:
            return {"pooled": adata}, bkey, lkey
        if n_sites != 3:
            raise SystemExit("--dataset simulated has 3 batches: use --sites 1 or 3")
        return (
            {str(b): adata[adata.obs[bkey] == b].copy() for b in adata.obs[bkey].cat.categories},
            bkey,
            lkey,
        )
    adata = load_dataset(dataset)
    bkey, lkey = ("donor", "cell_type") if dataset == "pancreas" else ("batch", "cell_class")
    if n_sites == 1:
        return {"pooled": adata}, bkey, lkey
    return paper_partition(dataset, adata, n_sites, seed=0), bkey, lkey


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["pancreas", "cortex", "simulated"], default="pancreas")
    p.add_argument(
        "--sites", type=int, default=5, help="1 = pooled training with this project's model"
    )
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--local-epochs", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=400, help="KL warm-up in global epochs")
    p.add_argument("--norm", choices=["batch", "layer", "none"], default="batch")
    p.add_argument(
        "--decoder-norm",
        choices=["batch", "layer", "none"],
        default="layer",
        help="the decoder's normalization (default: layer, the package's; scVI's: batch)",
    )
    p.add_argument("--norm-stats", choices=["local", "global", "averaged"], default="local")
    p.add_argument("--no-batch-owned", action="store_true")
    p.add_argument("--server-optimizer", choices=["fedavg", "fedavgm", "fedadam"], default="fedavg")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--optimizer-state", choices=["keep", "reset"], default="keep")
    p.add_argument("--proximal-mu", type=float, default=0.0)
    p.add_argument("--scaffold", action="store_true")
    p.add_argument("--encode-covariates", action="store_true")
    p.add_argument("--composition", type=float, default=2.0, help="simulated: cell-type mix skew")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="benchmark-out/levers.jsonl")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from scfedvi import ScFedVI
    from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig
    from scfedvi.metrics import compute_lisi, summarize_lisi

    sites, bkey, lkey = partition(a.dataset, a.sites, a.seed, a.composition)
    cfg = RunConfig(
        model=ModelConfig(
            norm=a.norm, decoder_norm=a.decoder_norm, encode_covariates=a.encode_covariates
        ),
        train=TrainConfig(
            local_epochs=a.local_epochs,
            local_steps=a.local_steps,
            n_epochs_kl_warmup=a.warmup,
            optimizer_state=a.optimizer_state,
            proximal_mu=a.proximal_mu,
            scaffold=a.scaffold,
        ),
        federation=FederationConfig(
            n_rounds=a.rounds,
            norm_stats=a.norm_stats,
            batch_owned=not a.no_batch_owned,
            server_optimizer=a.server_optimizer,
            server_lr=a.server_lr,
            seed=a.seed,
        ),
    )
    model = ScFedVI.from_sites(sites, batch_key=bkey, label_key=lkey, n_top_genes=None, config=cfg)
    t0 = time.perf_counter()
    model.train(progress=False)
    seconds = time.perf_counter() - t0
    Z = np.concatenate([model.get_latent_representation(site=s, write=False) for s in model.sites])
    obs = np.concatenate(
        [model.sites[s].obs[[bkey, lkey]].astype(str).to_numpy() for s in model.sites]
    )
    lisi = compute_lisi(Z, {"batch": obs[:, 0], "label": obs[:, 1]})
    b, c = summarize_lisi(lisi["batch"]), summarize_lisi(lisi["label"])
    row = {
        "tag": a.tag,
        "dataset": a.dataset,
        "sites": a.sites,
        "seed": a.seed,
        "batch_lisi": round(b["mean"], 3),
        "batch_lisi_sd": round(b["sd"], 3),
        "celltype_lisi": round(c["mean"], 3),
        "celltype_lisi_sd": round(c["sd"], 3),
        "train_seconds": round(seconds, 1),
        "config": cfg.to_dict(),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    print(json.dumps({k: v for k, v in row.items() if k not in ("config", "versions")}))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
