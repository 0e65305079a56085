"""Aggregation: weights n_i / sum(n), batch-owned columns, rejection, server optimizers."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from scfedvi.config import ModelConfig
from scfedvi.federation.aggregate import ServerOptimizer, SiteUpdate, fedavg, reject_invalid
from scfedvi.module.vae import VAE
from scfedvi.train.params import batch_owned_columns


def upd(site, value, n, counts=None, shape=(2, 3)):
    return SiteUpdate(site, {"w": np.full(shape, value, np.float32)}, n, counts or {0: n})


def test_fedavg_weights_are_cell_shares_not_one_over_n_sites():
    g = {"w": np.zeros((2, 3), np.float32)}
    out = fedavg([upd("a", 1.0, 100), upd("b", 4.0, 300)], g)
    # n_i / sum(n): 0.25 * 1 + 0.75 * 4 = 3.25 (the paper's typo n_i / N would give 6.5)
    np.testing.assert_allclose(out["w"], 3.25)


def test_batch_owned_columns_average_only_over_holders():
    g = {"w": np.zeros((2, 3), np.float32)}
    a = SiteUpdate("a", {"w": np.array([[1, 10, 0], [1, 10, 0]], np.float32)}, 100, {0: 100})
    b = SiteUpdate("b", {"w": np.array([[3, 0, 20], [3, 0, 20]], np.float32)}, 300, {1: 300})
    # columns 1 and 2 belong to batches 0 and 1 (one-hot block starts at column 1)
    out = fedavg([a, b], g, {"w": (1, 1)})
    np.testing.assert_allclose(out["w"][:, 0], 0.25 * 1 + 0.75 * 3)
    np.testing.assert_allclose(out["w"][:, 1], 10.0)  # only site a holds batch 0
    np.testing.assert_allclose(out["w"][:, 2], 20.0)  # only site b holds batch 1
    plain = fedavg([a, b], g)
    np.testing.assert_allclose(plain["w"][:, 1], 2.5)  # plain FedAvg shrinks it by the share


def test_batch_column_of_absent_batch_keeps_global_value():
    g = {"w": np.full((1, 3), 7.0, np.float32)}
    a = SiteUpdate("a", {"w": np.array([[1, 2, 3]], np.float32)}, 10, {0: 10})
    out = fedavg([a], g, {"w": (1, 1)})
    np.testing.assert_allclose(out["w"], [[1, 2, 7]])


def test_batch_owned_columns_of_the_vae():
    m = VAE(50, 3, ModelConfig())
    cols = batch_owned_columns(m)
    assert cols == {"decoder.px_decoder.fc_layers.Layer 0.0.weight": (1, 10)}
    m2 = VAE(50, 3, ModelConfig(encode_covariates=True, dispersion="gene-batch", n_layers=2))
    cols2 = batch_owned_columns(m2)
    assert cols2["z_encoder.encoder.fc_layers.Layer 0.0.weight"] == (1, 50)
    assert cols2["z_encoder.encoder.fc_layers.Layer 1.0.weight"] == (1, 128)
    assert cols2["decoder.px_decoder.fc_layers.Layer 1.0.weight"] == (1, 128)
    assert cols2["px_r"] == (1, 0)
    assert batch_owned_columns(VAE(50, 1, ModelConfig())) == {}  # one batch: no one-hot


def test_nan_update_is_rejected_with_a_logged_reason(caplog):
    bad = upd("bad", np.nan, 50)
    with caplog.at_level(logging.WARNING):
        kept, rejected = reject_invalid([upd("ok", 1.0, 50), bad])
    assert [u.site for u in kept] == ["ok"]
    assert "non-finite" in rejected["bad"]
    assert "bad" in caplog.text


def test_integer_buffers_are_not_averaged_into_floats():
    g = {"n": np.array(0, np.int64)}
    a = SiteUpdate("a", {"n": np.array(5, np.int64)}, 1, {0: 1})
    b = SiteUpdate("b", {"n": np.array(9, np.int64)}, 1, {0: 1})
    out = fedavg([a, b], g)
    assert out["n"].dtype == np.int64 and int(out["n"]) == 9


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam"])
def test_server_optimizers_move_towards_the_average_and_roundtrip_state(kind):
    opt = ServerOptimizer(kind, lr=0.5 if kind == "fedavgm" else 0.1)
    g = {"w": np.zeros(3, np.float32)}
    avg = {"w": np.ones(3, np.float32)}
    new = opt.step(g, avg)
    assert np.all(new["w"] > 0) and np.all(new["w"] <= 1.0 + 1e-6)
    clone = ServerOptimizer(kind, lr=opt.lr)
    clone.load_state_arrays(opt.state_arrays())
    np.testing.assert_allclose(clone.step(new, avg)["w"], opt.step(new, avg)["w"])


def test_fedavg_server_optimizer_is_the_average():
    avg = {"w": np.arange(3, dtype=np.float32)}
    np.testing.assert_array_equal(
        ServerOptimizer().step({"w": np.zeros(3, np.float32)}, avg)["w"], avg["w"]
    )


def test_pooled_variances_equal_the_statistics_of_all_cells():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (300, 4)), rng.normal(3, 2, (100, 4))

    def site(name, x):
        return SiteUpdate(
            name, {"bn.running_mean": x.mean(0), "bn.running_var": x.var(0)}, len(x), {0: len(x)}
        )

    g = {"bn.running_mean": np.zeros(4), "bn.running_var": np.ones(4)}
    out = fedavg([site("a", a), site("b", b)], g, pool_variances=True)
    both = np.vstack([a, b])
    np.testing.assert_allclose(out["bn.running_mean"], both.mean(0))
    np.testing.assert_allclose(out["bn.running_var"], both.var(0))
    plain = fedavg([site("a", a), site("b", b)], g)
    assert np.all(
        plain["bn.running_var"] < out["bn.running_var"]
    )  # averaging misses the spread of means
