"""Invariants of the round loop: one site equals centralized, identical sites, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig
from scfedvi.data.schema import project
from scfedvi.federation.coordinator import Coordinator, RoundFailedError
from scfedvi.federation.inprocess import run_in_process
from scfedvi.federation.site import SiteWorker
from scfedvi.module.vae import VAE
from scfedvi.train.local import SiteTensors, kl_weight, round_seed, train_validation_split
from scfedvi.train.params import get_state, set_state

G = 60


def cfg(**kw) -> RunConfig:
    fed = {"n_rounds": 3, "seed": 3, **kw.pop("fed", {})}
    train = {"batch_size": 32, "n_epochs_kl_warmup": 4, "local_epochs": 1, **kw.pop("train", {})}
    return RunConfig(
        model=ModelConfig(n_hidden=32, n_latent=4),
        train=TrainConfig(**train),
        federation=FederationConfig(**fed),
    )


def tensors(adata, schema):
    sd = project(adata, schema, site="s", batch_size=32)
    return SiteTensors(sd.X, sd.batch_index)


@pytest.fixture
def data(small_adata):
    from scfedvi.data.harmonize import harmonize

    schema = harmonize({"a": small_adata}, batch_key="batch", n_top_genes=None)
    return small_adata, schema


def _run(sites, config, n_batches, rounds, ckpt=None):
    coord = Coordinator(G, n_batches, config, checkpoint_dir=ckpt)
    run_in_process(coord, sites, rounds)
    return coord


@pytest.mark.parametrize("train_size", [0.9, 1.0])
def test_one_site_one_round_equals_centralized_training(data, train_size):
    adata, schema = data
    config = cfg(train={"local_epochs": 3, "train_size": train_size})
    t = tensors(adata, schema)
    coord = _run([SiteWorker("only", t, G, 2, config)], config, 2, 1)

    # centralized reference: a plain training loop from the same initial weights and seeds
    torch.manual_seed(config.federation.seed)
    ref = VAE(G, 2, config.model)
    init = get_state(ref)
    seed = round_seed(config.federation.seed, 0)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    set_state(ref, init)
    ref.train()
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3, eps=0.01, weight_decay=1e-6)  # the reference
    train, _ = train_validation_split(t.n_cells, train_size, config.federation.seed)
    assert len(train) == int(np.ceil(train_size * t.n_cells))
    for epoch in range(3):
        for idx in t.minibatch_indices(32, rng, cells=train):
            x, b = t.minibatch(idx)
            loss = ref.loss(x, b, kl_weight=kl_weight(epoch, 4)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    want = get_state(ref)
    for k, v in coord.params.items():
        np.testing.assert_allclose(v, want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_identical_sites_give_the_model_of_one_site(data):
    adata, schema = data
    config = cfg()
    t = tensors(adata, schema)
    one = _run([SiteWorker("a", t, G, 2, config)], config, 2, 2)
    two = _run([SiteWorker("a", t, G, 2, config), SiteWorker("b", t, G, 2, config)], config, 2, 2)
    for k in one.params:
        np.testing.assert_allclose(two.params[k], one.params[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("opt_state", ["keep", "reset"])
def test_resume_equals_uninterrupted(data, tmp_path, opt_state):
    adata, schema = data
    config = cfg(train={"optimizer_state": opt_state})
    half = adata.n_obs // 2
    ta, tb = tensors(adata[:half].copy(), schema), tensors(adata[half:].copy(), schema)

    def sites():
        return [SiteWorker("a", ta, G, 2, config), SiteWorker("b", tb, G, 2, config)]

    full = _run(sites(), config, 2, 4)
    _run(sites(), config, 2, 2, ckpt=tmp_path)  # "stopped" after 2 rounds
    resumed = _run(sites(), config, 2, 4, ckpt=tmp_path)
    assert resumed.round == 4
    assert sorted({r["round"] for r in resumed.history}) == [0, 1, 2, 3]
    for k in full.params:
        np.testing.assert_array_equal(resumed.params[k], full.params[k], err_msg=k)


def test_checkpoint_of_another_configuration_is_refused(data, tmp_path):
    adata, schema = data
    t = tensors(adata, schema)
    _run([SiteWorker("a", t, G, 2, cfg())], cfg(), 2, 1, ckpt=tmp_path)
    other = cfg(fed={"seed": 99})
    with pytest.raises(ValueError, match="another configuration"):
        _run([SiteWorker("a", t, G, 2, other)], other, 2, 2, ckpt=tmp_path)


def test_round_with_too_few_valid_updates_fails_clearly(data):
    adata, schema = data
    config = cfg(fed={"min_sites": 2})
    coord = Coordinator(G, 2, config)
    site = SiteWorker("a", tensors(adata, schema), G, 2, config)
    upd = site.fit(coord.broadcast()[0], 0)
    upd.params = {k: np.full_like(v, np.nan) for k, v in upd.params.items()}
    with pytest.raises(RoundFailedError, match="min_sites=2"):
        coord.aggregate([upd])
    assert coord.history[-1]["status"] == "rejected"


def test_local_norm_statistics_never_leave_the_site(data):
    adata, schema = data
    for stats, expect_sent in (("local", False), ("averaged", True)):
        config = cfg(fed={"norm_stats": stats})
        coord = Coordinator(G, 2, config)
        upd = SiteWorker("a", tensors(adata, schema), G, 2, config).fit(coord.broadcast()[0], 0)
        sent = any(k.endswith("running_mean") for k in upd.params)
        assert sent is expect_sent, stats


@pytest.mark.parametrize(
    "train",
    [{"proximal_mu": 0.1}, {"scaffold": True}, {"local_steps": 3}, {"optimizer_state": "reset"}],
)
def test_training_options_run_and_stay_finite(data, train):
    adata, schema = data
    config = cfg(train=train)
    half = adata.n_obs // 2
    sites = [
        SiteWorker("a", tensors(adata[:half].copy(), schema), G, 2, config),
        SiteWorker("b", tensors(adata[half:].copy(), schema), G, 2, config),
    ]
    coord = _run(sites, config, 2, 2)
    assert all(np.all(np.isfinite(v)) for v in coord.params.values())
    losses = [r["loss"] for r in coord.history]
    assert all(np.isfinite(losses))
    if "local_steps" in train:
        assert {r["steps"] for r in coord.history} == {3.0}


def test_global_norm_statistics_are_pooled_and_used_for_training(data):
    adata, schema = data
    config = cfg(fed={"norm_stats": "global"})
    half = adata.n_obs // 2
    sites = [
        SiteWorker("a", tensors(adata[:half].copy(), schema), G, 2, config),
        SiteWorker("b", tensors(adata[half:].copy(), schema), G, 2, config),
    ]
    coord = _run(sites, config, 2, 2)
    key = "z_encoder.encoder.fc_layers.Layer 0.1.running_var"
    assert key in coord.params  # statistics are shared in this mode
    assert int(coord.params["z_encoder.encoder.fc_layers.Layer 0.1.num_batches_tracked"]) > 0
    # training in round 1 used the pooled statistics (frozen): a site's BatchNorm layers stay in
    # eval mode, so its module's running statistics equal the ones it received
    params, _ = coord.broadcast()
    sites[0].fit(params, 2)
    got = sites[0].module.state_dict()[key].numpy()
    np.testing.assert_allclose(got, params[key], rtol=1e-6)
