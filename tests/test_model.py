"""The user API: set up from sites, train, embed at a site, save, load."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from scfedvi import ScFedVI
from scfedvi._constants import LATENT_KEY
from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig
from scfedvi.data.errors import SiteDataError
from synthetic import make_counts

FAST = RunConfig(
    model=ModelConfig(n_hidden=32, n_latent=4),
    train=TrainConfig(batch_size=32, n_epochs_kl_warmup=2, local_epochs=1),
    federation=FederationConfig(n_rounds=2),
)


@pytest.fixture(scope="module")
def trained():
    adata = make_counts(240, 60)
    adata.obs["lab"] = np.where(np.arange(adata.n_obs) < 120, "lab-a", "lab-b")
    model = ScFedVI.from_sites(
        adata,
        split_key="lab",
        batch_key="batch",
        label_key="cell_type",
        n_top_genes=40,
        config=FAST,
    )
    model.train(progress=False)
    return model


def test_setup_fixes_a_schema_and_projects_each_site(trained):
    assert set(trained.sites) == {"lab-a", "lab-b"}
    assert trained.schema.n_genes == 40
    assert trained.schema.batches == ("b0", "b1")
    assert trained.schema.labels == ("t0", "t1", "t2")
    assert "2 sites" in repr(trained) and "trained" in repr(trained)


def test_history_has_a_row_per_site_and_round_with_bytes(trained):
    h = trained.history
    assert len(h) == 4 and set(h["round"]) == {0, 1}
    assert (h["bytes_up"] > 0).all() and (h["bytes_down"] > 0).all()
    assert np.isfinite(h["loss"]).all()
    assert np.isfinite(h["validation_loss"]).all()  # 10% of each site's cells held out


def test_embedding_written_to_obsm(trained):
    z = trained.get_latent_representation(site="lab-a")
    assert z.shape == (120, 4) and np.isfinite(z).all()
    assert trained.sites["lab-a"].obsm[LATENT_KEY] is z


def test_saved_model_embeds_a_site_alone(trained, tmp_path):
    trained.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained.save(tmp_path / "m")
    loaded = ScFedVI.load(tmp_path / "m")
    site = trained.sites["lab-b"].copy()
    z_loaded = loaded.get_latent_representation(site)
    np.testing.assert_allclose(
        z_loaded, trained.get_latent_representation(site="lab-b"), rtol=1e-5, atol=1e-5
    )
    assert LATENT_KEY in site.obsm
    assert len(loaded.history) == len(trained.history)
    # the balancing steps travel with the model: a site alone embeds the same way
    steps, loaded_steps = trained.balance_steps(), loaded.balance_steps()
    assert len(steps) == FAST.federation.balance_iterations == len(loaded_steps)
    for a, b in zip(steps, loaded_steps, strict=True):
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(a.composition, b.composition)


def test_a_model_saved_without_balancing_steps_embeds_unbalanced_and_says_so(
    trained, tmp_path, caplog
):
    trained.save(tmp_path / "m")
    (tmp_path / "m" / "balance.npz").unlink()
    loaded = ScFedVI.load(tmp_path / "m")
    assert "balance.npz is missing" in caplog.text
    assert loaded.balance_steps() == []
    site = trained.sites["lab-b"].copy()
    worker_z = {w.name: w for w in trained.site_workers()}["lab-b"].embed(trained.params, [])
    np.testing.assert_allclose(
        loaded.get_latent_representation(site), worker_z, rtol=1e-5, atol=1e-5
    )


def test_site_with_genes_in_another_order_gets_the_same_embedding(trained):
    site = trained.sites["lab-a"]
    shuffled = site[:, site.var_names[::-1]].copy()
    np.testing.assert_allclose(
        trained.get_latent_representation(shuffled, write=False),
        trained.get_latent_representation(site="lab-a", write=False),
        rtol=1e-5,
        atol=1e-5,
    )


def test_the_in_process_federation_is_read_through_public_accessors(trained):
    """What tools and benchmarks read of an in-process run: the sites' data, the coordinator
    and the site workers of the last training call, and the balancing steps they may set."""
    assert set(trained.site_data) == {"lab-a", "lab-b"}
    assert trained.site_data["lab-a"].X.shape[1] == trained.schema.n_genes
    with pytest.raises(TypeError):
        trained.site_data["lab-c"] = trained.site_data["lab-a"]  # read-only
    coord = trained.coordinator
    assert coord.round == trained.history["round"].max() + 1
    assert coord.params is trained.params
    workers = trained.site_workers()
    assert [w.name for w in workers] == ["lab-a", "lab-b"]
    assert workers[0] is trained.site_workers()[0]  # the live workers, not new ones
    steps = trained.balance_steps()
    assert steps  # the default balances
    trained.set_balance_steps([])
    assert trained.balance_steps() == []
    trained.set_balance_steps(steps)
    assert trained.balance_steps() == steps
    fresh = ScFedVI(trained.schema, FAST)
    assert fresh.coordinator is None and fresh.site_workers() == []


def test_untrained_model_says_so(trained):
    fresh = ScFedVI(trained.schema, FAST)
    with pytest.raises(RuntimeError, match="not trained"):
        fresh.get_latent_representation(trained.sites["lab-a"])
    with pytest.raises(ValueError, match="no sites"):
        fresh.train()


def test_bad_site_data_names_the_site(small_adata):
    bad = small_adata.copy()
    bad.X = bad.X.astype(np.float32) * 0.5
    with pytest.raises(SiteDataError, match="site 'lab-x'"):
        ScFedVI.from_sites({"lab-x": bad, "lab-y": small_adata}, batch_key="batch", config=FAST)


def test_split_key_errors_are_clear(small_adata):
    with pytest.raises(ValueError, match="split_key"):
        ScFedVI.from_sites(small_adata, batch_key="batch")
    with pytest.raises(ValueError, match=r"obs\['nope'\] is missing"):
        ScFedVI.from_sites(small_adata, split_key="nope", batch_key="batch")


def test_a_second_train_call_continues_the_same_run(small_adata, monkeypatch):
    """train(2) then train(4) equals train(4) and runs only rounds 2 and 3; resume=False
    starts again from the initialization."""
    from scfedvi.federation.site import SiteWorker

    fits: list[int] = []
    fit = SiteWorker.fit

    def counted(self, params, round_idx, *args, **kwargs):
        fits.append(round_idx)
        return fit(self, params, round_idx, *args, **kwargs)

    monkeypatch.setattr(SiteWorker, "fit", counted)

    # one process: the fits are counted here (worker processes: tests/federation/test_parallel.py)
    config = replace(FAST, federation=replace(FAST.federation, n_jobs=1))

    def model():
        return ScFedVI.from_sites(small_adata, split_key="batch", batch_key="batch", config=config)

    whole = model()
    whole.train(n_rounds=4, progress=False)
    stepped = model()
    stepped.train(n_rounds=2, progress=False)
    after_two = {k: v.copy() for k, v in stepped.params.items()}
    fits.clear()
    stepped.train(n_rounds=4, progress=False)
    assert sorted(fits) == [2, 2, 3, 3]  # two sites, only the rounds not yet done
    assert sorted(stepped.history["round"].unique()) == [0, 1, 2, 3]
    for k in whole.params:
        np.testing.assert_array_equal(stepped.params[k], whole.params[k], err_msg=k)
    stepped.train(n_rounds=2, resume=False, progress=False)
    assert sorted(stepped.history["round"].unique()) == [0, 1]
    for k in after_two:
        np.testing.assert_array_equal(stepped.params[k], after_two[k], err_msg=k)
