"""Three tiny sites on disk, the in-process reference, checks shared by the Flower tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flower_harness import Cluster

from scfedvi.config import FederationConfig, RunConfig, TrainConfig

SITES = ("site-a", "site-b", "site-c")
N_CELLS, N_GENES, N_TOP = 450, 60, 40
ROUNDS = 2


#: Sums rounds per balancing pass in the Flower tests (the default: a local-summary round and
#: one sums round, each a message to every site).
BALANCE_ROUNDS = 1


def run_config(**federation) -> RunConfig:
    fed = {
        "n_rounds": ROUNDS,
        "min_sites": 2,
        "seed": 0,
        "balance_rounds": BALANCE_ROUNDS,
        **federation,
    }
    return RunConfig(train=TrainConfig(local_epochs=1), federation=FederationConfig(**fed))


def flower_run_config(out_dir: Path, **extra: object) -> dict[str, object]:
    """The Flower run config matching :func:`run_config`."""
    cfg: dict[str, object] = {
        "num-server-rounds": ROUNDS,
        "balance-rounds": BALANCE_ROUNDS,
        "local-epochs": 1,
        "seed": 0,
        "min-sites": 2,
        "num-sites": len(SITES),
        "n-top-genes": N_TOP,
        "batch-key": "batch",
        "out-dir": str(out_dir),
        "wait-timeout": 60.0,
        "setup-timeout": 120.0,
        "round-timeout": 120.0,
    }
    cfg.update(extra)
    return cfg


@dataclass
class SiteFiles:
    directory: Path
    paths: dict[str, Path]
    n_cells: dict[str, int]


def make_site_files(d: Path) -> SiteFiles:
    """Three sites of 150 cells x 60 genes, one batch each, as .h5ad files (integer counts)."""
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(0)
    base = rng.gamma(0.6, 1 / 0.3, size=N_GENES)
    types = rng.lognormal(0.0, 0.6, size=(3, N_GENES))
    genes = [f"gene-{g:02d}" for g in range(N_GENES)]
    paths, counts = {}, {}
    n = N_CELLS // len(SITES)
    for i, site in enumerate(SITES):
        batch_effect = rng.lognormal(0.0, 0.3, size=N_GENES)
        cell_type = rng.integers(0, 3, size=n)
        library = rng.lognormal(np.log(3000.0 * 3**i), 0.3, size=n)
        p = base * types[cell_type] * batch_effect
        mu = library[:, None] * p / p.sum(axis=1, keepdims=True)
        x = rng.poisson(rng.gamma(5.0, mu / 5.0)).astype(np.int32)
        obs = pd.DataFrame(
            {"batch": f"batch-{i}", "cell_type": [f"type-{t}" for t in cell_type]},
            index=[f"{site}-cell-{c:03d}" for c in range(n)],
        )
        adata = ad.AnnData(sparse.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))
        paths[site] = d / f"{site}.h5ad"
        counts[site] = n
        adata.write_h5ad(paths[site])
    return SiteFiles(d, paths, counts)


def reference(
    site_files: SiteFiles, n_rounds: int = ROUNDS
) -> tuple[str, dict[str, np.ndarray], list]:
    """(schema hash, global parameters, balancing steps) of the in-process runtime on the
    same sites."""
    import anndata as ad

    from scfedvi.data.harmonize import harmonize
    from scfedvi.data.schema import project
    from scfedvi.federation.coordinator import Coordinator
    from scfedvi.federation.inprocess import run_in_process
    from scfedvi.federation.site import SiteWorker
    from scfedvi.train.local import SiteTensors

    cfg = run_config(n_rounds=n_rounds)
    sites = {s: ad.read_h5ad(p) for s, p in sorted(site_files.paths.items())}
    schema = harmonize(sites, batch_key="batch", n_top_genes=N_TOP)
    workers = []
    for s, a in sites.items():
        sd = project(a, schema, site=s, batch_size=cfg.train.batch_size)
        tensors = SiteTensors(sd.X, sd.batch_index)
        workers.append(SiteWorker(s, tensors, schema.n_genes, schema.n_batches, cfg))
    coord = Coordinator(schema.n_genes, schema.n_batches, cfg, schema_hash=schema.hash)
    run_in_process(coord, workers, n_rounds)
    from scfedvi.federation.balance import balance_in_process

    return schema.hash, coord.params, balance_in_process(workers, coord.params, cfg)


def start_sites(cluster: Cluster, site_files: SiteFiles) -> None:
    for site in SITES:
        cluster.start_supernode(site, site_files.paths[site])


def start_registered_sites(cluster: Cluster, site_files: SiteFiles, keys: Path) -> None:
    """Register a key pair per site with the SuperLink (``flwr supernode register``) and start
    each site's SuperNode with its private key (a cluster with ``auth=True``)."""
    from flower_certs import make_node_keys

    for site in SITES:
        private, public = make_node_keys(keys, site)
        reg = cluster.flwr("supernode", "register", str(public), "test")
        assert reg.returncode == 0, reg.stdout + reg.stderr
        cluster.start_supernode(site, site_files.paths[site], key=private)


def check_model(
    out: Path, in_process: tuple[str, dict[str, np.ndarray], list], balanced: bool = True
) -> None:
    """The saved model equals the in-process one; with ``balanced``, so do the balancing
    steps (a run with ``balance-clusters=0`` has none)."""
    schema_hash, params, steps = in_process
    from scfedvi.model import ScFedVI

    model = ScFedVI.load(out / "model")
    assert model.schema.hash == schema_hash  # federated harmonization = in-process
    assert set(model.params) == set(params)
    for k, v in params.items():
        np.testing.assert_allclose(model.params[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    # the same balancing steps (federated k-means as message rounds = in process)
    got = model.balance_steps()
    if not balanced:
        assert got == [], got
        return
    assert len(got) == len(steps) == model.config.federation.balance_iterations
    for a, b in zip(got, steps, strict=True):
        np.testing.assert_allclose(a.centroids, b.centroids, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.composition, b.composition, rtol=0, atol=1e-12)
