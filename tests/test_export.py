"""Export of a trained global model to scvi-tools' ``SCVI``."""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig
from scfedvi.export import site_anndata, to_scvi
from scfedvi.model import ScFedVI

N_GENES = 80


def _site(n_cells: int, batches: list[str], seed: int) -> ad.AnnData:
    """Integer NB counts with a batch effect; the genes in a site-specific order."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(99).gamma(0.6, 1.0, size=(2, N_GENES)) + 0.05
    types = rng.integers(0, 2, n_cells)
    batch = np.array(batches)[np.arange(n_cells) % len(batches)]
    bfac = {b: np.random.default_rng(int(b[1:])).lognormal(0, 0.4, N_GENES) for b in batches}
    mu = base[types] * np.stack([bfac[b] for b in batch])
    mu = mu / mu.sum(1, keepdims=True) * rng.lognormal(np.log(800.0), 0.3, n_cells)[:, None]
    counts = rng.negative_binomial(5, 5 / (5 + mu)).astype(np.float32)
    counts[:, 0] += 1
    genes = np.array([f"g{j}" for j in range(N_GENES)])
    order = rng.permutation(N_GENES)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(batch), "cell_type": [f"t{t}" for t in types]},
        index=[f"s{seed}-c{i}" for i in range(n_cells)],
    )
    return ad.AnnData(
        sp.csr_matrix(counts[:, order]), obs=obs, var=pd.DataFrame(index=genes[order])
    )


@pytest.fixture(scope="module")
def trained() -> tuple[ScFedVI, dict[str, ad.AnnData]]:
    """Two sites of 200 cells; site 'b' holds only batches b1 and b2 of b0, b1, b2."""
    sites = {"a": _site(200, ["b0", "b1"], seed=1), "b": _site(200, ["b1", "b2"], seed=2)}
    config = RunConfig(
        # the encoder sees the batch too, so the latent depends on the one-hot columns' order
        model=ModelConfig(n_hidden=32, n_latent=5, encode_covariates=True),
        train=TrainConfig(batch_size=64, local_epochs=20),
        federation=FederationConfig(n_rounds=2, seed=3),
    )
    model = ScFedVI.from_sites(sites, batch_key="batch", n_top_genes=None, config=config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only add synchronization
    try:
        model.train(progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, sites


def test_site_anndata_uses_schema_genes_and_batches(trained) -> None:
    model, sites = trained
    out = site_anndata(model, sites["b"])
    assert list(out.var_names) == list(model.schema.genes)
    assert list(out.obs["batch"].cat.categories) == list(model.schema.batches)
    assert set(out.obs["batch"]) == {"b1", "b2"}
    reordered = sites["b"][:, list(model.schema.genes)].X.toarray()
    np.testing.assert_array_equal(out.X.toarray(), reordered)


def test_missing_scvi_names_the_extra(trained, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "scvi", None)
    with pytest.raises(ImportError, match=r"scfedvi\[benchmark\]"):
        to_scvi(trained[0], trained[1]["a"])


@pytest.mark.scvi
def test_export_gives_the_same_latent_and_round_trips(trained, tmp_path: Path) -> None:
    import scvi

    model, sites = trained
    site = sites["b"]  # holds only some of the schema's batches
    ours = model.get_latent_representation(site, write=False)
    exported = model.to_scvi(site)
    assert isinstance(exported, scvi.model.SCVI)
    assert exported.is_trained_
    assert exported.module.n_batch == model.schema.n_batches
    np.testing.assert_allclose(exported.get_latent_representation(), ours, atol=1e-4)

    exported.save(tmp_path / "scvi", overwrite=True)
    reloaded = scvi.model.SCVI.load(str(tmp_path / "scvi"), adata=site_anndata(model, site))
    np.testing.assert_allclose(reloaded.get_latent_representation(), ours, atol=1e-4)


def test_load_into_refuses_what_scvi_cannot_represent() -> None:
    from scfedvi.export import load_into
    from scfedvi.module.vae import VAE

    target = VAE(N_GENES, 2, ModelConfig(n_hidden=32))
    state = VAE(N_GENES, 2, ModelConfig(n_hidden=16)).state_dict()
    with pytest.raises(ValueError, match=r"no scvi-tools equivalent.*shapes that differ"):
        load_into(target, state)
    extra = {**target.state_dict(), "adapter.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"scvi-tools lacks \[.adapter.weight.\]"):
        load_into(target, extra)
