"""Local training pieces: minibatches, KL warm-up, site-local statistics."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scfedvi.config import ModelConfig
from scfedvi.module.vae import VAE
from scfedvi.train.local import SiteTensors, calibrate_norm_stats, kl_weight


def test_kl_warmup_follows_the_global_epoch():
    assert kl_weight(0, 400) == 0.0
    assert kl_weight(200, 400) == 0.5
    assert kl_weight(1000, 400) == 1.0
    assert kl_weight(3, None) == 1.0


def test_minibatches_cover_every_cell_once_and_drop_a_tiny_tail():
    X = sp.csr_matrix(np.arange(1, 11 * 3 + 1, dtype=np.float32).reshape(11, 3))
    t = SiteTensors(X, np.zeros(11))
    sizes = [len(x) for x, _ in t.iter_minibatches(5, np.random.default_rng(0))]
    assert sizes == [5, 5]  # a last minibatch of 1 cell is dropped in training
    rows = np.concatenate(
        [x[:, 0].numpy() for x, _ in t.iter_minibatches(4, None, drop_small=False)]
    )
    np.testing.assert_array_equal(rows, X[:, 0].toarray().ravel())


def test_site_statistics_do_not_depend_on_the_stored_order():
    # cells sorted by group, as a simulator or a concatenation stores them
    rng = np.random.default_rng(0)
    a = rng.poisson(2.0, size=(600, 30)) + 1
    b = rng.poisson(20.0, size=(600, 30)) + 1
    X = sp.csr_matrix(np.vstack([a, b]).astype(np.float32))
    torch.manual_seed(0)
    m = VAE(30, 1, ModelConfig(n_hidden=16, n_latent=3))
    sorted_stats = calibrate_norm_stats(m, SiteTensors(X, np.zeros(1200)), batch_size=256)
    perm = rng.permutation(1200)
    shuffled_stats = calibrate_norm_stats(m, SiteTensors(X[perm], np.zeros(1200)), batch_size=256)
    key = "z_encoder.encoder.fc_layers.Layer 0.1.running_var"
    np.testing.assert_allclose(sorted_stats[key], shuffled_stats[key], rtol=0.05)
    # and they equal the variance over all cells of the first hidden layer's activations
    with torch.no_grad():
        h = m.z_encoder.encoder.fc_layers[0][0](torch.log1p(torch.from_numpy(X.toarray())))
    np.testing.assert_allclose(sorted_stats[key], h.var(0).numpy(), rtol=0.05)


def test_training_minibatch_reads_the_nonzeros_off_the_sparse_storage():
    from scipy.special import gammaln

    rng = np.random.default_rng(0)
    dense = rng.poisson(rng.gamma(0.3, 4.0, (60, 25))).astype(np.float32)
    dense[7] = 0.0  # a cell without counts
    X = sp.csr_matrix(dense)
    X.data[:3] = 0.0  # stored zeros
    data_before = X.data.copy()
    site = SiteTensors(X, np.zeros(60))
    np.testing.assert_array_equal(X.data, data_before)  # the caller's matrix is untouched
    assert site.X.nnz == np.count_nonzero(X.toarray())
    np.testing.assert_allclose(site.log_factorial, gammaln(X.toarray() + 1).sum(1), rtol=1e-6)
    idx = np.array([7, 3, 59, 0, 12])
    x, _, nz = site.training_minibatch(idx)
    want = X.toarray()[idx]
    np.testing.assert_array_equal(x.numpy(), want)
    dense_from_nz = torch.zeros_like(x)
    dense_from_nz[nz.rows, nz.cols] = nz.vals
    np.testing.assert_array_equal(dense_from_nz.numpy(), want)
    np.testing.assert_array_equal(nz.lengths.numpy(), (want != 0).sum(1))
    assert (nz.vals != 0).all()
    np.testing.assert_allclose(nz.log_factorial.numpy(), gammaln(want + 1).sum(1), rtol=1e-6)


def test_the_held_out_cells_are_fixed_by_the_seed_and_never_trained_on(monkeypatch):
    from scfedvi.config import TrainConfig
    from scfedvi.train.local import LocalState, local_update, train_validation_split

    train, held = train_validation_split(101, 0.9, seed=4)
    assert len(train) == 91 and len(held) == 10  # ceil(0.9 * 101), as scvi-tools
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(101))
    again, _ = train_validation_split(101, 0.9, seed=4)
    other, _ = train_validation_split(101, 0.9, seed=5)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    everything, none = train_validation_split(101, 1.0, seed=4)
    assert len(everything) == 101 and len(none) == 0

    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(2.0, size=(101, 30)).astype(np.float32))
    data = SiteTensors(X, rng.integers(0, 2, 101))
    seen: list[np.ndarray] = []
    read = SiteTensors.training_minibatch

    def record(self, idx):
        seen.append(np.asarray(idx).copy())
        return read(self, idx)

    monkeypatch.setattr(SiteTensors, "training_minibatch", record)
    module = VAE(30, 2, ModelConfig(n_hidden=16, n_latent=4))
    cfg = TrainConfig(batch_size=16, local_epochs=2)
    params = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    result, state = local_update(
        module, params, data, cfg, LocalState(), norm_stats="local", seed=1, split_seed=4
    )
    n_validation_reads = 1  # one minibatch of the 10 held-out cells, for the validation loss
    trained = np.concatenate(seen[:-n_validation_reads])
    assert set(trained.tolist()) == set(train.tolist())
    assert np.array_equal(np.sort(seen[-1]), held)
    assert result.num_examples == 91
    assert state.epochs_done == 2.0 and result.metrics["steps"] == 2 * 6  # 91 cells / 16
    assert np.isfinite(result.metrics["validation_loss"]) and result.metrics["validation_loss"] > 0


def test_the_split_modules_keep_the_public_names_of_train_local():
    """``train.local`` was split into data, device, embed and the local update; every public
    name is still importable from ``scfedvi.train.local`` and is the same object."""
    from scfedvi.train import data, device, local
    from scfedvi.train import embed as embed_module

    for mod in (data, device, embed_module):
        for name in set(mod.__all__) & set(local.__all__):
            assert getattr(local, name) is getattr(mod, name), name
    assert local.SiteTensors is data.SiteTensors and local.embed is embed_module.embed


def test_training_steps_are_local_steps_or_epochs_over_the_training_cells():
    from scfedvi.config import TrainConfig
    from scfedvi.train.local import training_steps

    data = SiteTensors(sp.csr_matrix(np.ones((50, 4), np.float32)), np.zeros(50))
    cells = np.arange(0, 50, 2)  # 25 training cells: minibatches of 10, 10 and 5
    steps, per_epoch = training_steps(data, cells, TrainConfig(batch_size=10, local_epochs=2), None)
    batches = list(steps)
    assert per_epoch == 3 and len(batches) == 6
    assert sorted(np.concatenate(batches[:3]).tolist()) == cells.tolist()
    steps, _ = training_steps(data, cells, TrainConfig(batch_size=10, local_steps=4), None)
    assert [len(b) for b in steps] == [10, 10, 5, 10]
    with pytest.raises(ValueError, match="resolve the run's schedule"):
        training_steps(data, cells, TrainConfig(local_epochs=None, local_steps=None), None)


def test_write_embedding_puts_each_cell_in_its_row_and_nan_where_no_counts():
    import anndata as ad

    from scfedvi._constants import LATENT_KEY
    from scfedvi.train.embed import write_embedding

    adata = ad.AnnData(np.zeros((4, 2), np.float32))
    adata.obs_names = ["c0", "c1", "c2", "c3"]
    z = np.arange(6, dtype=np.float32).reshape(3, 2)
    stored = write_embedding(adata, z, ["c3", "c0", "c2"])  # c1 had no counts
    assert adata.obsm[LATENT_KEY] is stored
    np.testing.assert_array_equal(stored[[3, 0, 2]], z)
    assert np.isnan(stored[1]).all()
    full = np.ones((4, 2), np.float32)
    assert write_embedding(adata, full, list(adata.obs_names)) is full
