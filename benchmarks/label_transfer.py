"""Label transfer to a site without labels: federated scANVI against its baselines (issue 17).

For each data set split into the benchmark's 3 sites (``paper_partition``), each seed, and each
site in turn, that site's labels are hidden (set to ``Unknown``) and every method predicts them;
accuracy and macro-F1 at that site (its true labels), one JSON line per (data set, seed, hidden
site, method) in ``OUT/results.jsonl``:

- ``fed-scanvi``: scFedVI trained federated (all 3 sites), then federated scANVI
  (:mod:`scfedvi.annotate`), the hidden site's predictions computed at the site; with its
  confusion matrix (``confusion``) and the share of cells below the confidence threshold;
- ``knn-scfedvi``: a 15-nearest-neighbour classifier on the scFedVI embedding (the labelled
  sites' cells as reference: it pools embeddings, a centralized baseline);
- ``pooled-scanvi``: scvi-tools' SCVI (the same epochs as scFedVI) then
  ``SCANVI.from_scvi_model`` on the pooled cells (all 3 sites, the hidden one unlabelled),
  scANVI trained for scvi-tools' default epochs (``scanvi_epochs`` in the row);
- ``labelled-only-scanvi``: scvi-tools' SCVI + SCANVI pooled over the 2 labelled sites only,
  the hidden site mapped with ``SCANVI.load_query_data`` (the default architecture's encoder
  does not read the batch, so query training could not change its predictions: none is run);
- ``scib`` (``--parts scib``): scIB metrics (``scfedvi.metrics.scib``, fast set, true labels)
  of the scFedVI latent, the federated scANVI latent and the pooled scANVI latent;
- ``fed-scanvi-recheck`` (``--parts recheck``): federated scANVI trained again as
  ``fed-scanvi`` (the same accuracy if training is reproducible), with the recall of each label
  at the labelled sites' own cells (``labelled_recall``, in ``fed-scanvi`` rows written since);
- ``new-site-frozen`` (``--parts query``): the hidden site held out of training altogether
  (a site that joins later): scFedVI + federated scANVI on the other 2 sites, the new site
  predicted with the saved model alone; compare with ``fed-scanvi`` (the site in training);
- ``new-site-query0`` / ``new-site-queryN`` (``--parts query-encode``): the same with
  ``encode_covariates=True`` (scArches' set-up), before and after ``N`` epochs of
  :func:`scfedvi.annotate.load_query_data` fine-tuning at the site.

Trained scFedVI and pooled scVI models are cached under ``OUT/cache``; a (seed, hidden site,
method) already in ``results.jsonl`` is skipped, so an interrupted run resumes.

    nice -n 10 python benchmarks/label_transfer.py cortex --seeds 0 1 2
    nice -n 10 python benchmarks/label_transfer.py pancreas --seeds 0 --parts query
    python -m scfedvi.report.label_transfer benchmark-out/label_transfer   # table + figure
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

KEYS = {"pancreas": ("donor", "cell_type"), "cortex": ("batch", "cell_class")}
UNKNOWN = "Unknown"
PARTS = ("transfer", "fed", "labelled-only", "scib", "query", "query-encode", "recheck")
METHODS = {
    "transfer": ("fed-scanvi", "knn-scfedvi", "pooled-scanvi"),
    "labelled-only": ("labelled-only-scanvi",),
    "scib": ("scib",),
    "query": ("new-site-frozen",),
}


def scores(truth, pred) -> dict:
    """Accuracy, macro-F1 (over the true labels) and recall per true label."""
    from sklearn.metrics import accuracy_score, f1_score

    truth, pred = np.asarray(truth, dtype=str), np.asarray(pred, dtype=str)
    return {
        "accuracy": float(accuracy_score(truth, pred)),
        "macro_f1": float(f1_score(truth, pred, average="macro", labels=np.unique(truth))),
        "recall": {t: float((pred[truth == t] == t).mean()) for t in np.unique(truth)},
    }


def confusion(truth, pred) -> dict:
    """Counts of (true label, predicted label)."""
    truth, pred = np.asarray(truth, dtype=str), np.asarray(pred, dtype=str)
    rows, cols = sorted(set(truth)), sorted(set(truth) | set(pred))
    m = [[int(((truth == r) & (pred == c)).sum()) for c in cols] for r in rows]
    return {"true": rows, "predicted": cols, "counts": m}


def run_config(epochs: int, seed: int, encode_covariates: bool = False):
    from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig

    rounds = max(1, epochs // 10)
    return RunConfig(
        model=ModelConfig(encode_covariates=encode_covariates),
        train=TrainConfig(local_epochs=epochs // rounds),
        federation=FederationConfig(n_rounds=rounds, seed=seed, n_jobs=1),
    )


class Bench:
    """One data set and seed: its sites, cached models and the rows written so far."""

    def __init__(self, dataset: str, seed: int, args: argparse.Namespace, meta: dict) -> None:
        from scfedvi.data.loaders import load_dataset
        from scfedvi.data.partition import paper_partition

        self.dataset, self.seed, self.args = dataset, seed, args
        self.batch_key, self.label_key = KEYS[dataset]
        self.parts = paper_partition(dataset, load_dataset(dataset), 3, seed=seed)
        for a in self.parts.values():
            a.obs["true_label"] = a.obs[self.label_key].astype(str)
        self.out = Path(args.out_dir)
        self.cache = self.out / "cache"
        self.meta = {
            **meta,
            "dataset": dataset,
            "seed": seed,
            "sites": {n: int(a.n_obs) for n, a in self.parts.items()},
        }

    # -- bookkeeping -------------------------------------------------------------------------
    def key(self, r: dict) -> tuple:
        """A row's identity; federated rows also by the scANVI settings (a changed default is
        measured again, the baselines are not)."""
        fed = r["method"].startswith(("fed-", "new-site", "scib"))
        ann = json.dumps(r["annotate"], sort_keys=True) if fed else ""
        return (r["dataset"], r["seed"], r["hidden"], r["method"], r["epochs"], ann)

    def done(self) -> set[tuple]:
        f = self.out / "results.jsonl"
        if not f.exists():
            return set()
        return {self.key(json.loads(s)) for s in f.read_text().splitlines() if s.strip()}

    def todo(self, hidden: str, methods) -> bool:
        have = self.done()
        return any(
            self.key({"hidden": hidden, "method": m, **self.meta}) not in have for m in methods
        )

    def emit(self, hidden: str, method: str, row: dict) -> None:
        row = {"hidden": hidden, "method": method, **row, **self.meta}
        if self.key(row) in self.done():
            return  # measured before (recomputed for another method of the same run)
        txt = " ".join(
            f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float) and k != "seconds"
        )
        print(f"{self.dataset} seed={self.seed} hidden={hidden:14s} {method:22s} {txt}", flush=True)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def sites(self, hidden: str | None, drop: str | None = None) -> dict:
        """Copies of the sites with ``obs['obs_label']`` (``Unknown`` at ``hidden``)."""
        out = {}
        for n, a in self.parts.items():
            if n != drop:
                a = a.copy()
                a.obs["obs_label"] = UNKNOWN if n == hidden else a.obs["true_label"]
                out[n] = a
        return out

    # -- federated ---------------------------------------------------------------------------
    def scfedvi(self, drop: str | None = None, encode: bool = False):
        """scFedVI on every site but ``drop`` (trained once, then loaded from the cache)."""
        import torch

        from scfedvi.model import ScFedVI

        tag = f"{self.dataset}-s{self.seed}-e{self.args.epochs}-{drop or 'all'}" + (
            "-encode" if encode else ""
        )
        d = self.cache / tag
        if not (d / "model.npz").exists():
            torch.manual_seed(self.seed)
            m = ScFedVI.from_sites(
                self.sites(None, drop),
                batch_key=self.batch_key,
                n_top_genes=self.args.n_top_genes,
                config=run_config(self.args.epochs, self.seed, encode),
            )
            t0 = time.perf_counter()
            m.train(progress=False)
            m.save(d, overwrite=True)
            (d / "seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}")
        return ScFedVI.load(d), float((d / "seconds.txt").read_text())

    def fed_scanvi(self, model, sites):
        from scfedvi.annotate import AnnotateConfig, ScFedANVI

        a = self.args
        anvi = ScFedANVI.from_scfedvi(
            model,
            label_key="obs_label",
            unlabeled_category=UNKNOWN,
            sites=sites,
            annotate=AnnotateConfig(n_rounds=a.anvi_rounds, local_epochs=a.anvi_local_epochs),
        )
        t0 = time.perf_counter()
        anvi.train()
        return anvi, time.perf_counter() - t0

    # -- scvi-tools --------------------------------------------------------------------------
    def pooled_adata(self, genes, names=None):
        import anndata as ad

        names = names or list(self.parts)
        pooled = ad.concat(
            [self.parts[n][:, genes] for n in names], label="site", keys=names, index_unique="-"
        )
        for h in self.parts:
            lab = pooled.obs["true_label"].astype(str).copy()
            lab[pooled.obs["site"].astype(str) == h] = UNKNOWN
            pooled.obs[f"hide_{h}"] = lab
        return pooled

    def scvi(self, pooled, tag: str):
        import scvi

        scvi.settings.seed = self.seed
        scvi.model.SCVI.setup_anndata(pooled, batch_key=self.batch_key)
        d = self.cache / f"{self.dataset}-s{self.seed}-e{self.args.epochs}-{tag}-scvi"
        if (d / "model.pt").exists():
            return scvi.model.SCVI.load(str(d), adata=pooled, accelerator="cpu")
        ref = scvi.model.SCVI(pooled)
        ref.train(max_epochs=self.args.epochs, **self.train_kw())
        ref.save(str(d), overwrite=True, save_anndata=False)
        return ref

    def train_kw(self) -> dict:
        return {"accelerator": "cpu", "enable_progress_bar": False, "train_size": 0.9}

    def scanvi(self, ref, labels_key: str):
        import scvi

        scvi.settings.seed = self.seed
        lvae = scvi.model.SCANVI.from_scvi_model(ref, UNKNOWN, labels_key=labels_key)
        # scvi-tools' own default for a model initialised from scVI (10 epochs at these sizes,
        # what its users get), unless --scanvi-epochs
        lvae.train(max_epochs=self.args.scanvi_epochs, **self.train_kw())
        return lvae

    @staticmethod
    def trained_epochs(lvae) -> int:
        """Epochs a scvi-tools model trained (its history's length)."""
        return len(next(iter(lvae.history.values())))

    # -- the experiments ---------------------------------------------------------------------
    def transfer(
        self, hidden: str, with_scib: bool, with_pooled: bool = True, recheck: bool = False
    ) -> None:
        """fed-scanvi, knn-scfedvi, pooled-scanvi (and scib) with ``hidden``'s labels hidden;
        ``recheck``: federated scANVI trained again (``fed-scanvi-recheck``, with the recall at
        the labelled sites) even where its row exists."""
        from sklearn.neighbors import KNeighborsClassifier

        from scfedvi.annotate.site import novelty

        methods = METHODS["transfer"][: 3 if with_pooled else 2]
        methods += METHODS["scib"] if with_scib else ()
        methods += ("fed-scanvi-recheck",) if recheck else ()
        if not self.todo(hidden, methods):
            return
        sites = self.sites(hidden)
        truth = sites[hidden].obs["true_label"].to_numpy()
        model, t_vi = self.scfedvi()
        anvi, t_anvi = self.fed_scanvi(model, sites)
        z_anvi, probs = {}, {}
        for n in sites:
            z_anvi[n], probs[n] = anvi.predict_site(site=n, write=False)
        pred = np.asarray(anvi.labels, dtype=object)[probs[hidden].argmax(1)]
        low = float((probs[hidden].max(1) < anvi.annotate.confidence_threshold).mean())
        if anvi.label_centroids is not None:
            ratio = novelty(z_anvi[hidden], probs[hidden].argmax(1), *anvi.label_centroids)
            novel = float((ratio > anvi.annotate.novelty_ratio).mean())
        else:
            novel = float("nan")
        labels = np.asarray(anvi.labels, dtype=object)
        ref = [n for n in sites if n != hidden]
        fed = {
            **scores(truth, pred),
            "low_confidence": low,
            "novel": novel,
            "confusion": confusion(truth, pred),
            # the labelled sites' own (training) cells: a label the classifier did not learn
            # is missed there too; one learnt but missed at the hidden site is a shift
            "labelled_recall": scores(
                np.concatenate([sites[n].obs["true_label"].to_numpy() for n in ref]),
                np.concatenate([labels[probs[n].argmax(1)] for n in ref]),
            )["recall"],
        }
        self.emit(hidden, "fed-scanvi", {**fed, "seconds": t_vi + t_anvi})
        if recheck:  # the same configuration again, with what the row above lacked
            self.emit(hidden, "fed-scanvi-recheck", {**fed, "seconds": t_vi + t_anvi})

        emb = {n: model.get_latent_representation(a, site=n, write=False) for n, a in sites.items()}
        knn = KNeighborsClassifier(n_neighbors=15).fit(
            np.concatenate([emb[n] for n in ref]),
            np.concatenate([sites[n].obs["true_label"].to_numpy() for n in ref]),
        )
        self.emit(
            hidden, "knn-scfedvi", {**scores(truth, knn.predict(emb[hidden])), "seconds": t_vi}
        )

        t0 = time.perf_counter()
        pooled = self.pooled_adata(list(model.schema.genes))
        z_pooled = None
        # not again for a new default, but again for its latent when scIB is asked
        if with_pooled and (with_scib or self.todo(hidden, ("pooled-scanvi",))):
            lvae = self.scanvi(self.scvi(pooled, "all"), f"hide_{hidden}")
            at = np.flatnonzero((pooled.obs["site"] == hidden).to_numpy())
            pp = lvae.predict(indices=at)
            row = {**scores(truth, pp), "confusion": confusion(truth, pp)}
            row["scanvi_epochs"] = self.trained_epochs(lvae)
            self.emit(hidden, "pooled-scanvi", {**row, "seconds": time.perf_counter() - t0})
            z_pooled = lvae.get_latent_representation()
        if with_scib:
            self.scib(hidden, pooled, sites, emb, z_anvi, z_pooled, fed["accuracy"])

    def scib(self, hidden, pooled, sites, emb, z_anvi, z_pooled, fed_accuracy) -> None:
        """scIB of the three latent spaces; ``fed_accuracy``: the accuracy of the federated
        scANVI model whose latent is scored (retrained for this row: compare with its own)."""
        from scfedvi.metrics.scib import scib_scores

        names = list(pooled.obs["site"].cat.categories)
        pooled.obsm["scFedVI"] = np.concatenate([emb[n] for n in names])
        pooled.obsm["fed-scANVI"] = np.concatenate([z_anvi[n] for n in names])
        keys = ["scFedVI", "fed-scANVI"]
        if z_pooled is not None:
            pooled.obsm["pooled-scANVI"] = np.asarray(z_pooled)
            keys.append("pooled-scANVI")
        t0 = time.perf_counter()
        df = scib_scores(
            pooled, batch_key=self.batch_key, label_key="true_label", embedding_keys=keys, fast=True
        )
        table = {str(e): {str(k): float(v) for k, v in r.items()} for e, r in df.iterrows()}
        row = {"scib": table, "fed_accuracy": fed_accuracy, "seconds": time.perf_counter() - t0}
        self.emit(hidden, "scib", row)

    def labelled_only(self, hidden: str) -> None:
        """scvi-tools' scANVI on the labelled sites only; the hidden site as a query."""
        import scvi

        if not self.todo(hidden, METHODS["labelled-only"]):
            return
        genes = list(self.scfedvi()[0].schema.genes)
        t0 = time.perf_counter()
        ref_sites = [n for n in self.parts if n != hidden]
        ref = self.pooled_adata(genes, ref_sites)
        lvae = self.scanvi(self.scvi(ref, f"no-{hidden}"), "true_label")
        query = self.pooled_adata(genes, [hidden])
        query.obs["true_label"] = UNKNOWN
        truth = self.parts[hidden].obs["true_label"].to_numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = scvi.model.SCANVI.load_query_data(query, lvae)
        pred = q.predict()
        self.emit(
            hidden,
            "labelled-only-scanvi",
            {
                **scores(truth, pred),
                "scanvi_epochs": self.trained_epochs(lvae),
                "seconds": time.perf_counter() - t0,
            },
        )

    def query(self, hidden: str, encode: bool) -> None:
        """``hidden`` held out of training; predicted with the saved model (and fine-tuned)."""
        from scfedvi.annotate import load_query_data

        n_ep = self.args.query_epochs
        methods = ("new-site-query0", f"new-site-query{n_ep}") if encode else METHODS["query"]
        if not self.todo(hidden, methods):
            return
        sites = self.sites(None, drop=hidden)
        new = self.parts[hidden].copy()
        truth = new.obs["true_label"].to_numpy()
        model, t_vi = self.scfedvi(drop=hidden, encode=encode)
        anvi, t_anvi = self.fed_scanvi(model, sites)
        if not encode:
            pred = anvi.predict(new, site=hidden, write=False)
            row = {**scores(truth, pred), "seconds": t_vi + t_anvi}
            self.emit(hidden, "new-site-frozen", row)
            return
        for epochs in (0, n_ep):
            t0 = time.perf_counter()
            q = load_query_data(anvi, new, site=hidden, n_epochs=epochs, seed=self.seed)
            pred = q.predict(new, site=hidden, write=False)
            row = {**scores(truth, pred), "seconds": time.perf_counter() - t0}
            self.emit(hidden, f"new-site-query{epochs}", row)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("dataset", choices=sorted(KEYS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--hide", default="all", help="site whose labels are hidden, or 'all'")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=["transfer", "scib"])
    p.add_argument("--epochs", type=int, default=100, help="scVI epochs (default: 100)")
    p.add_argument("--anvi-rounds", type=int, default=None, help="default: AnnotateConfig's")
    p.add_argument("--anvi-local-epochs", type=int, default=None, help="default: AnnotateConfig's")
    p.add_argument(
        "--scanvi-epochs",
        type=int,
        default=None,
        help="scvi-tools' scANVI epochs (default: scvi-tools' own, 10 at these sizes)",
    )
    p.add_argument("--query-epochs", type=int, default=20)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--out-dir", default="benchmark-out/label_transfer")
    args = p.parse_args(argv)

    import logging

    import scvi
    import torch

    import scfedvi
    from scfedvi.annotate import AnnotateConfig

    torch.set_num_threads(1)
    logging.getLogger("scfedvi").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    default = AnnotateConfig()
    args.anvi_rounds = args.anvi_rounds or default.n_rounds
    args.anvi_local_epochs = args.anvi_local_epochs or default.local_epochs
    Path(args.out_dir, "cache").mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "versions": {
            "scfedvi": scfedvi.__version__,
            "torch": torch.__version__,
            "scvi-tools": scvi.__version__,
        },
        "epochs": args.epochs,
        "anvi_epochs": args.anvi_rounds * args.anvi_local_epochs,
        "annotate": asdict(
            replace(default, n_rounds=args.anvi_rounds, local_epochs=args.anvi_local_epochs)
        ),
    }
    print(json.dumps(meta), flush=True)
    for seed in args.seeds:
        b = Bench(args.dataset, seed, args, meta)
        for h in list(b.parts) if args.hide == "all" else [args.hide]:
            if {"transfer", "fed", "recheck"} & set(args.parts):  # fed: without pooled scANVI
                b.transfer(
                    h,
                    "scib" in args.parts,
                    with_pooled="transfer" in args.parts,
                    recheck="recheck" in args.parts,
                )
            if "labelled-only" in args.parts:
                b.labelled_only(h)
            if "query" in args.parts:
                b.query(h, encode=False)
            if "query-encode" in args.parts:
                b.query(h, encode=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
