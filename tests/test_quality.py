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


def _unbalanced(model: ScFedVI) -> np.ndarray:
    """The same trained model's embedding with each site's own statistics (balancing off)."""
    workers = {w.name: w for w in model.site_workers()}
    return np.concatenate([workers[s].embed(model.params, []) for s in model.sites])


@pytest.mark.slow
def test_balanced_statistics_keep_mixing_and_do_not_worsen_cell_types_in_the_trap():
    """Composition-balanced site statistics (the default) against each site's own, on the
    trap's sites and the same trained model: the sites stay mixed (unlike plain FedAvg) and
    cell types are not moved further onto each other. (Measured at 4c09503: own statistics
    1.76 / 1.55, balanced 1.69 / 1.53, plain FedAvg 1.00 / 1.08: this strong a trap is only
    partly undone, since the clusters it balances on are found in the already merged space;
    on cortex it is, see the README.)"""
    model = _model(4.0)
    bal_b, bal_c = _lisi(4.0)
    own_b, own_c = _lisi_of(model, _unbalanced(model))
    plain_b, _ = _lisi(4.0, plain=True)
    assert bal_b > plain_b + 0.3, (bal_b, plain_b)
    assert bal_c <= own_c + 0.01, (bal_c, own_c)
    assert abs(bal_b - own_b) > 1e-3  # the statistics did change
    steps = model.balance_steps()
    assert len(steps) == 2 and all(abs(st.composition.sum() - 1) < 1e-12 for st in steps)


def _fixed_sites(mixes, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = [np.repeat(np.arange(3), m) for m in mixes]
    return truth, [centres[t] + rng.normal(scale=0.5, size=(len(t), 2)) for t in truth]


def test_federated_kmeans_finds_shared_clusters_and_the_federations_composition():
    """Three sites with very different mixes of three well separated groups: from centroids,
    sums and counts alone, one set of centroids labels every site's cells by group (up to a
    renaming), and the composition is the federation's, not any site's."""
    from scfedvi.federation.balance import (
        CENTROIDS,
        assign,
        cluster_sums,
        local_centroids,
        run_balance,
    )

    mixes = [(90, 5, 5), (10, 10, 80), (30, 40, 30)]
    truth, zs = _fixed_sites(mixes)
    asked = []

    def ask(phase, steps, centroids):
        asked.append(phase)
        if phase == CENTROIDS:
            return [local_centroids(z, 3, 0) for z in zs]
        return [cluster_sums(z, centroids) for z in zs]

    (step,) = run_balance(ask, 3, iterations=1, rounds=4, seed=0)
    assert asked == ["centroids", "sums", "sums", "sums", "sums"]
    pairs = {
        (int(a), int(b))
        for t, z in zip(truth, zs, strict=True)
        for a, b in zip(t, assign(z, step.centroids), strict=True)
    }
    assert len(pairs) == 3 and len({b for _, b in pairs}) == 3  # a one-to-one renaming
    share = np.sum(mixes, axis=0) / np.sum(mixes)
    np.testing.assert_allclose(np.sort(step.composition), np.sort(share), atol=1e-12)
    with pytest.raises(ValueError, match="n_clusters=0"):
        run_balance(ask, 0, iterations=1, rounds=1, seed=0)


def test_small_clusters_send_only_their_count():
    """A cluster of fewer than MIN_CLUSTER_CELLS of a site's cells sends no centroid and a zero
    sum; sites with no cluster that large leave the embedding unbalanced, with a warning."""
    from scfedvi.federation.balance import (
        MIN_CLUSTER_CELLS,
        cluster_sums,
        local_centroids,
        run_balance,
    )

    _, (z,) = _fixed_sites([(50, MIN_CLUSTER_CELLS - 1, 0)])
    c, n = local_centroids(z, 2, 0)
    assert n.tolist() == [50] and c.shape == (1, 2)
    sums, counts = cluster_sums(z, np.array([[0.0, 0.0], [10.0, 0.0]]))
    assert counts.tolist() == [50, MIN_CLUSTER_CELLS - 1]
    assert np.all(sums[1] == 0) and np.all(sums[0] != 0)
    tiny = [z[:5] for z in _fixed_sites([(3, 2, 0), (0, 4, 1)])[1]]
    steps = run_balance(lambda *a: [local_centroids(t, 2, 0) for t in tiny], 2, 1, 1, 0)
    assert steps == []


def test_balancing_is_on_with_site_local_batchnorm_statistics_and_without_dp():
    from scfedvi.config import PrivacyConfig

    assert RunConfig().balance_clusters == 8
    averaged = FederationConfig(norm_stats="averaged")
    assert RunConfig(federation=averaged).balance_clusters == 0
    assert RunConfig(model=ModelConfig(norm="layer")).balance_clusters == 0
    dp = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0)
    assert RunConfig(privacy=dp).balance_clusters == 0
    off = FederationConfig(balance_clusters=0)
    assert RunConfig(federation=off).balance_clusters == 0
    with pytest.raises(ValueError, match="balance_clusters must be >= 0"):
        FederationConfig(balance_clusters=-1)
    with pytest.raises(ValueError, match="balance_rounds must be >= 1"):
        FederationConfig(balance_rounds=0)
    adata = simulate(120, 50, n_batches=2, n_cell_types=2, seed=0)
    cfg = RunConfig(
        train=TrainConfig(local_epochs=1, batch_size=32), federation=FederationConfig(n_rounds=1)
    )
    model = ScFedVI.from_sites(
        adata, split_key="batch", batch_key="batch", n_top_genes=None, config=cfg
    )
    with pytest.raises(RuntimeError, match="not trained"):
        model.balance_steps()
