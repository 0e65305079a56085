"""Integration quality on simulated sites: what the defaults promise, and the known trap.

Sites hold one technology each (library sizes 100x apart) and different cell-type mixes.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from scfedvi import ScFedVI
from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig
from scfedvi.data import simulate
from scfedvi.metrics import compute_lisi


@functools.cache  # the mild defaults serve both tests
def _model(composition: float, plain: bool = False) -> ScFedVI:
    """The defaults (or the paper's plain FedAvg: scVI's BatchNorm decoder, averaged
    statistics, no batch-owned averaging) trained 200 epochs on simulated sites."""
    adata = simulate(1500, 1000, n_batches=3, n_cell_types=4, composition=composition, seed=1)
    fed = {"norm_stats": "averaged", "batch_owned": False} if plain else {}
    cfg = RunConfig(
        # the LayerNorm decoder needs more than 40 epochs here (cell-type LISI 1.34 at 40)
        model=ModelConfig(decoder_norm="batch") if plain else ModelConfig(),
        train=TrainConfig(local_epochs=10, n_epochs_kl_warmup=200),
        federation=FederationConfig(n_rounds=20, **fed),
    )
    model = ScFedVI.from_sites(
        adata,
        split_key="batch",
        batch_key="batch",
        label_key="cell_type",
        n_top_genes=None,
        config=cfg,
    )
    model.train(progress=False)
    return model


def _lisi_of(model: ScFedVI, z: np.ndarray) -> tuple[float, float]:
    obs = np.concatenate(
        [model.sites[s].obs[["batch", "cell_type"]].astype(str).to_numpy() for s in model.sites]
    )
    lisi = compute_lisi(z, {"b": obs[:, 0], "c": obs[:, 1]})
    return float(lisi["b"].mean()), float(lisi["c"].mean())


@functools.cache
def _lisi(composition: float, plain: bool = False) -> tuple[float, float]:
    """Batch and cell-type LISI of :func:`_model`'s embedding."""
    model = _model(composition, plain)
    z = np.concatenate([model.get_latent_representation(site=s, write=False) for s in model.sites])
    return _lisi_of(model, z)


@pytest.mark.slow
def test_defaults_mix_sites_that_plain_fedavg_leaves_apart():
    ours_b, ours_c = _lisi(0.5)
    plain_b, plain_c = _lisi(0.5, plain=True)
    assert ours_b > plain_b + 0.3, (ours_b, plain_b)
    assert ours_c < 1.15 and ours_c < plain_c + 0.05, (ours_c, plain_c)  # cell types stay apart


@pytest.mark.slow
def test_trap_site_local_statistics_merge_cell_types_when_mixes_differ_strongly():
    """Documented limitation: with very different mixes, per-site centering moves cell types
    onto each other, which plain FedAvg (averaged statistics) does not."""
    _, mild_c = _lisi(0.5)
    _, strong_c = _lisi(4.0)
    _, strong_plain_c = _lisi(4.0, plain=True)
    assert strong_c > mild_c + 0.3, (strong_c, mild_c)
    assert strong_c > strong_plain_c + 0.3, (strong_c, strong_plain_c)


@pytest.mark.slow
def test_balanced_statistics_keep_mixing_and_do_not_worsen_cell_types_in_the_trap():
    """Composition-balanced site statistics (:func:`scfedvi.balance.embed_balanced`) on the
    trap's sites, same trained model: the sites stay mixed (unlike plain FedAvg) and cell
    types are not moved further onto each other. (Measured: default 1.77 / 1.56, balanced
    1.69 / 1.53, plain FedAvg 1.00 / 1.08: this strong a trap is not undone, since the
    clusters it balances on are found in the already merged space; on cortex it is, see the
    README.) The default embedding is kept; the balanced one is written beside it."""
    from scfedvi._constants import LATENT_KEY
    from scfedvi.balance import BALANCED_KEY, embed_balanced

    model = _model(4.0)
    _, strong_c = _lisi(4.0)
    plain_b, _ = _lisi(4.0, plain=True)
    default = {s: model.get_latent_representation(site=s) for s in model.sites}
    zs = embed_balanced(model, 8)
    bal_b, bal_c = _lisi_of(model, np.concatenate([zs[s] for s in model.sites]))
    assert bal_b > plain_b + 0.3, (bal_b, plain_b)
    assert bal_c <= strong_c + 0.01, (bal_c, strong_c)
    for s in model.sites:
        np.testing.assert_array_equal(model.sites[s].obsm[BALANCED_KEY], zs[s])
        np.testing.assert_array_equal(model.sites[s].obsm[LATENT_KEY], default[s])
        assert not np.allclose(zs[s], default[s])  # the statistics did change


def test_federated_kmeans_finds_shared_clusters_from_sums_and_counts():
    """Three sites with very different mixes of three well separated groups: one set of
    centroids labels every site's cells by group (up to a renaming)."""
    from scfedvi.balance import federated_kmeans

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    mixes = [(90, 5, 5), (10, 10, 80), (30, 40, 30)]
    truth = [np.repeat(np.arange(3), m) for m in mixes]
    zs = [centres[t] + rng.normal(scale=0.5, size=(len(t), 2)) for t in truth]
    labels = federated_kmeans(zs, 3, seed=0)
    pairs = {
        (int(a), int(b))
        for t, g in zip(truth, labels, strict=True)
        for a, b in zip(t, g, strict=True)
    }
    assert len(pairs) == 3 and len({b for _, b in pairs}) == 3  # a one-to-one renaming
    with pytest.raises(ValueError, match="n_clusters=0"):
        federated_kmeans(zs, 0)


def test_balanced_embedding_needs_site_local_batchnorm_statistics():
    from scfedvi.balance import embed_balanced

    adata = simulate(120, 50, n_batches=2, n_cell_types=2, seed=0)
    cfg = RunConfig(
        train=TrainConfig(local_epochs=1, batch_size=32),
        federation=FederationConfig(n_rounds=1, norm_stats="averaged"),
    )
    model = ScFedVI.from_sites(
        adata, split_key="batch", batch_key="batch", n_top_genes=None, config=cfg
    )
    with pytest.raises(RuntimeError, match="not trained"):
        embed_balanced(model)
    model.train(progress=False)
    with pytest.raises(ValueError, match=r"norm_stats='averaged'.*get_latent_representation"):
        embed_balanced(model)
