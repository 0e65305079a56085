"""Label transfer to a site without labels: federated scANVI against its baselines.

For a data set split into the benchmark's 3 sites (``paper_partition``), the labels of one site
are hidden (set to ``Unknown``) and every method predicts them; accuracy and macro-F1 at that
site:

- ``fed-scanvi``: scFedVI trained federated, then federated scANVI (:mod:`scfedvi.annotate`),
  predictions at the site with its own statistics;
- ``knn-scfedvi``: a 15-nearest-neighbour classifier on the scFedVI embedding (labelled sites'
  cells as reference; it pools embeddings, a centralized baseline);
- ``pooled-scanvi`` (``--pooled``): scvi-tools' SCVI then ``SCANVI.from_scvi_model`` on the
  pooled cells, the same epochs (the anchor of the ratios).

With ``--query``, the hidden site is instead held out of training altogether (a site that
joins later): scFedVI and federated scANVI on the other two sites, then the new site predicted
with the saved model alone (``--query-arch default``), or, with ``encode_covariates=True``
(scArches' set-up, ``--query-arch encode``), before and after
:func:`scfedvi.annotate.load_query_data` fine-tuning (its batch's parameters only, at the site).

    nice -n 10 python benchmarks/label_transfer.py pancreas --hide segerstolpe --pooled
    nice -n 10 python benchmarks/label_transfer.py pancreas --hide segerstolpe --query
    nice -n 10 python benchmarks/label_transfer.py pancreas --hide segerstolpe --query \
        --query-arch encode

Prints one line per (hidden site, method) and appends JSON lines (command, versions, seed,
epochs) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np

KEYS = {"pancreas": ("donor", "cell_type"), "cortex": ("batch", "cell_class")}
UNKNOWN = "Unknown"


def _scores(truth, pred) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    truth, pred = np.asarray(truth, dtype=str), np.asarray(pred, dtype=str)
    recall = {t: float((pred[truth == t] == t).mean()) for t in np.unique(truth)}
    return {
        "accuracy": float(accuracy_score(truth, pred)),
        "macro_f1": float(f1_score(truth, pred, average="macro", labels=np.unique(truth))),
        "recall": recall,  # per true label (the confusion matrix's diagonal)
    }


def _config(epochs: int, encode_covariates: bool, seed: int):
    from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig

    rounds = max(1, epochs // 10)
    one_job = {"n_jobs": 1} if "n_jobs" in FederationConfig.__dataclass_fields__ else {}
    return RunConfig(
        model=ModelConfig(encode_covariates=encode_covariates),
        train=TrainConfig(local_epochs=epochs // rounds),
        federation=FederationConfig(n_rounds=rounds, seed=seed, **one_job),
    )


def _federated(sites, batch_key, label_key, args, encode_covariates=False):
    import torch

    from scfedvi.annotate import AnnotateConfig, ScFedANVI
    from scfedvi.model import ScFedVI

    torch.manual_seed(args.seed)
    model = ScFedVI.from_sites(
        sites,
        batch_key=batch_key,
        n_top_genes=args.n_top_genes,
        config=_config(args.epochs, encode_covariates, args.seed),
    )
    t0 = time.perf_counter()
    model.train(progress=False)
    t_scvi = time.perf_counter() - t0
    anvi = ScFedANVI.from_scfedvi(
        model,
        label_key=label_key,
        unlabeled_category=UNKNOWN,
        annotate=AnnotateConfig(n_rounds=args.anvi_rounds, local_epochs=args.anvi_local_epochs),
    )
    t0 = time.perf_counter()
    anvi.train()
    return model, anvi, t_scvi, time.perf_counter() - t0


def run_hidden(adata, parts, hidden, batch_key, label_key, args, emit) -> None:
    """Hide ``hidden``'s labels, train every method, score it at that site."""
    from sklearn.neighbors import KNeighborsClassifier

    sites = {}
    for name, a in parts.items():
        a = a.copy()
        a.obs["obs_label"] = a.obs[label_key].astype(str)
        if name == hidden:
            a.obs["obs_label"] = UNKNOWN
        sites[name] = a
    truth = parts[hidden].obs[label_key].astype(str).to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, anvi, t1, t2 = _federated(sites, batch_key, "obs_label", args)
        pred = anvi.predict(site=hidden)
    conf = anvi.sites[hidden].obs["scfedvi_label_confidence"].to_numpy()
    low = float((conf < anvi.annotate.confidence_threshold).mean())
    emit(hidden, "fed-scanvi", _scores(truth, pred), seconds=t1 + t2, low_confidence=low)
    emb = model.embed_sites()
    ref = [n for n in sites if n != hidden]
    knn = KNeighborsClassifier(n_neighbors=15).fit(
        np.concatenate([emb[n] for n in ref]),
        np.concatenate([parts[n].obs[label_key].astype(str).to_numpy() for n in ref]),
    )
    emit(hidden, "knn-scfedvi", _scores(truth, knn.predict(emb[hidden])), seconds=t1)
    if args.pooled:
        emit(hidden, "pooled-scanvi", *_pooled(sites, hidden, truth, batch_key, model, args))


def _pooled(sites, hidden, truth, batch_key, model, args):
    import anndata as ad
    import scvi

    scvi.settings.seed = args.seed
    genes = list(model.schema.genes)
    pooled = ad.concat(
        [a[:, genes] for a in sites.values()], label="site", keys=list(sites), index_unique=None
    )
    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(pooled, batch_key=batch_key)
    ref = scvi.model.SCVI(pooled)
    kw = {"accelerator": "cpu", "enable_progress_bar": False, "train_size": 0.9}
    ref.train(max_epochs=args.epochs, **kw)
    lvae = scvi.model.SCANVI.from_scvi_model(ref, UNKNOWN, labels_key="obs_label")
    lvae.train(max_epochs=args.anvi_rounds * args.anvi_local_epochs, **kw)
    pred = lvae.predict(indices=np.flatnonzero((pooled.obs["site"] == hidden).to_numpy()))
    return _scores(truth, pred), {"seconds": time.perf_counter() - t0}


def run_query(adata, parts, hidden, batch_key, label_key, args, emit) -> None:
    """Hold ``hidden`` out of training; predict it with the saved model alone.

    ``--query-arch default``: scFedVI's default architecture (the encoder does not read the
    batch), the new site predicted with the frozen model. ``encode``: ``encode_covariates=True``
    (scArches' set-up), the new batch's columns as initialised (0 epochs: what the frozen model
    gives) and after ``--query-epochs`` of :func:`scfedvi.annotate.load_query_data` at the site.
    """
    from scfedvi.annotate import load_query_data

    sites = {}
    for name, a in parts.items():
        if name != hidden:
            a = a.copy()
            a.obs["obs_label"] = a.obs[label_key].astype(str)
            sites[name] = a
    new = parts[hidden].copy()
    truth = new.obs[label_key].astype(str).to_numpy()
    encode = args.query_arch == "encode"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, anvi, t1, t2 = _federated(sites, batch_key, "obs_label", args, encode_covariates=encode)
        if not encode:
            frozen = anvi.predict(new, site=hidden, write=False)
            emit(hidden, "new-site-frozen", _scores(truth, frozen), seconds=t1 + t2)
            return
        for epochs in (0, args.query_epochs):
            t0 = time.perf_counter()
            q = load_query_data(anvi, new, site=hidden, n_epochs=epochs, seed=args.seed)
            tuned = q.predict(new, site=hidden, write=False)
            emit(
                hidden,
                f"new-site-query{epochs}",
                _scores(truth, tuned),
                seconds=time.perf_counter() - t0,
            )


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("dataset", choices=sorted(KEYS))
    p.add_argument("--hide", default="all", help="site whose labels are hidden, or 'all'")
    p.add_argument("--epochs", type=int, default=100, help="scVI epochs (default: 100)")
    p.add_argument("--anvi-rounds", type=int, default=5)
    p.add_argument("--anvi-local-epochs", type=int, default=2)
    p.add_argument("--query-epochs", type=int, default=20)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pooled", action="store_true", help="also pooled scANVI (scvi-tools)")
    p.add_argument("--query", action="store_true", help="the new-site experiment instead")
    p.add_argument("--query-arch", choices=["default", "encode"], default="default")
    p.add_argument("--out", default="label_transfer.jsonl")
    args = p.parse_args(argv)

    import scvi
    import torch

    import scfedvi
    from scfedvi.data.loaders import load_dataset
    from scfedvi.data.partition import paper_partition

    torch.set_num_threads(1)
    adata = load_dataset(args.dataset)
    batch_key, label_key = KEYS[args.dataset]
    parts = paper_partition(args.dataset, adata, 3, seed=args.seed)
    hidden = list(parts) if args.hide == "all" else [args.hide]
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "versions": {
            "scfedvi": scfedvi.__version__,
            "torch": torch.__version__,
            "scvi-tools": scvi.__version__,
        },
        "seed": args.seed,
        "epochs": args.epochs,
        "anvi_epochs": args.anvi_rounds * args.anvi_local_epochs,
        "dataset": args.dataset,
        "sites": {n: int(a.n_obs) for n, a in parts.items()},
    }
    print(json.dumps(meta), flush=True)
    rows = []

    def emit(site, method, scores, extra=None, **kw):
        row = {"hidden": site, "method": method, **scores, **(extra or {}), **kw, **meta}
        rows.append(row)
        print(
            f"{args.dataset} hidden={site:14s} {method:16s} accuracy {scores['accuracy']:.3f} "
            f"macro-F1 {scores['macro_f1']:.3f}"
            + "".join(f" {k} {v:.3g}" for k, v in {**(extra or {}), **kw}.items())
            + "\n    recall: "
            + ", ".join(f"{t} {r:.2f}" for t, r in scores["recall"].items()),
            flush=True,
        )
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    for h in hidden:
        (run_query if args.query else run_hidden)(adata, parts, h, batch_key, label_key, args, emit)
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append((r["accuracy"], r["macro_f1"]))
    for m, v in by.items():
        a = np.mean(v, axis=0)
        print(f"mean over {len(v)} hidden sites: {m:16s} accuracy {a[0]:.3f} macro-F1 {a[1]:.3f}")
    if "pooled-scanvi" in by and "fed-scanvi" in by:
        f, pl = np.mean(by["fed-scanvi"], axis=0), np.mean(by["pooled-scanvi"], axis=0)
        print(
            f"fed-scanvi / pooled-scanvi: accuracy {f[0] / pl[0]:.3f}, macro-F1 {f[1] / pl[1]:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
