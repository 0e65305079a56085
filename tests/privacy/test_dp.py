"""Client-level DP: clipping bounds a site's influence, the divisor is fixed, the noise comes
from the OS CSPRNG (no site can regenerate and subtract it), unnoised channels are refused."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from scfedvi.config import FederationConfig, ModelConfig, PrivacyConfig, RunConfig, TrainConfig
from scfedvi.federation.aggregate import SiteUpdate
from scfedvi.privacy import dp_average, gaussian_epsilon, secure_gaussian, site_reply
from scfedvi.privacy.dp import clip_update

SEED = 11


def _zero_noise(shape, std):
    return np.zeros(shape)


def test_clip_update_bounds_the_norm_and_keeps_small_updates():
    big = {"a": np.full(4, 3.0), "b": np.full(2, 4.0)}
    clipped, norm = clip_update(big, 1.0)
    assert norm == pytest.approx(np.sqrt(4 * 9 + 2 * 16))
    total = np.sqrt(sum(np.sum(v**2) for v in clipped.values()))
    assert total == pytest.approx(1.0)
    small = {"a": np.full(4, 0.1)}
    np.testing.assert_allclose(clip_update(small, 1.0)[0]["a"], small["a"])


def test_one_site_moves_the_model_at_most_clip_over_the_declared_divisor():
    g = {"w": np.zeros(10, np.float32), "count": np.array(3, np.int64)}
    ups = [
        SiteUpdate(s, {"w": np.full(10, v, np.float32), "count": np.array(c)}, n, {0: n})
        for s, v, n, c in [("a", 0.0, 10, 90), ("b", 0.0, 10, 80), ("evil", 1e6, 1, 10**6)]
    ]
    out, info = dp_average(
        ups, g, clip_norm=1.0, noise_multiplier=0.0, divisor=5, noise=_zero_noise
    )
    assert np.linalg.norm(out["w"]) == pytest.approx(1.0 / 5, rel=1e-5)
    # integer buffers (a site's step counter reveals its size) keep the global value
    assert int(out["count"]) == 3
    # the history gets no per-site value: no raw norm, no per-site clipping bit
    assert set(info) == {"dp_noise_std", "dp_divisor", "dp_sites"}
    # the divisor does not follow the number of sites that answered
    out2, _ = dp_average(
        ups[2:], g, clip_norm=1.0, noise_multiplier=0.0, divisor=5, noise=_zero_noise
    )
    np.testing.assert_allclose(out2["w"], out["w"], rtol=1e-6)


def test_secure_noise_is_standard_normal_with_the_stated_scale():
    z = secure_gaussian((200_001,), 1.0)
    assert z.dtype == np.float64 and z.shape == (200_001,)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    g = {"w": np.zeros(100_000, np.float32)}
    ups = [SiteUpdate(s, {"w": np.zeros(100_000, np.float32)}, 5, {0: 5}) for s in "abcd"]
    out, info = dp_average(ups, g, clip_norm=2.0, noise_multiplier=1.5, divisor=4)
    assert info["dp_noise_std"] == pytest.approx(1.5 * 2.0 / 4)
    assert out["w"].std() == pytest.approx(0.75, rel=0.02)


def _coordinator(noise_multiplier=1.0, expected_sites=2, seed=SEED):
    from scfedvi.federation.coordinator import Coordinator

    cfg = RunConfig(
        model=ModelConfig(n_hidden=8, n_latent=2),
        federation=FederationConfig(n_rounds=1, seed=seed),
        privacy=PrivacyConfig(
            clip_norm=1.0, noise_multiplier=noise_multiplier, expected_sites=expected_sites
        ),
    )
    return Coordinator(20, 2, cfg)


def _updates(g, rng):
    """Two sites' updates with deltas inside the clip norm (so clipping leaves them alone)."""
    ups = []
    for site in ("a", "b"):
        params = {}
        for k, v in g.items():
            v = np.asarray(v)
            if np.issubdtype(v.dtype, np.floating):
                v = v + (rng.normal(0, 1e-3, v.shape)).astype(v.dtype)
            params[k] = v
        ups.append(SiteUpdate(site, params, 50, {0: 50}))
    return ups


def _float_delta(params, g):
    return {
        k: np.asarray(params[k], np.float64) - np.asarray(g[k], np.float64)
        for k in g
        if np.issubdtype(np.asarray(g[k]).dtype, np.floating)
    }


def test_a_site_that_knows_the_seed_cannot_subtract_the_noise():
    """Finding 2 of issue 16: site "a" regenerates the noise from the run's seed (as the old
    coordinator drew it) and subtracts it and its own update to recover site "b"'s update."""
    coord = _coordinator()
    g = {k: np.array(v, copy=True) for k, v in coord.params.items()}
    ups = _updates(g, np.random.default_rng(0))
    coord.aggregate(ups)
    n, std = 2, 1.0 * 1.0 / 2
    new = coord.params
    rng = np.random.default_rng([SEED, 0, 7])  # the old noise: every site knows the seed
    step = _float_delta(new, g)
    mine = _float_delta(ups[0].params, g)
    truth = _float_delta(ups[1].params, g)
    guess = {k: n * (step[k] - rng.normal(0.0, std, size=g[k].shape)) - mine[k] for k in step}
    err = np.sqrt(sum(np.sum((guess[k] - truth[k]) ** 2) for k in step))
    size = np.sqrt(sum(np.sum(truth[k] ** 2) for k in step))
    # recovered to 1e-6 by the old code; now the error is the noise itself (about sqrt(2 d))
    assert err > 100 * size
    d = sum(v.size for v in step.values())
    assert err == pytest.approx(np.sqrt(2 * d) * n * std, rel=0.15)


def test_the_attack_works_against_seeded_noise():
    """The same attack recovers the update when the noise is the seed's (the old code path):
    the test above fails without the defence."""
    coord = _coordinator()
    g = {k: np.array(v, copy=True) for k, v in coord.params.items()}
    ups = _updates(g, np.random.default_rng(0))
    server_rng = np.random.default_rng([SEED, 0, 7])
    new, _info = dp_average(
        ups,
        g,
        clip_norm=1.0,
        noise_multiplier=1.0,
        divisor=2,
        noise=lambda shape, std: server_rng.normal(0.0, std, size=shape),
    )
    rng = np.random.default_rng([SEED, 0, 7])
    step, mine, truth = (
        _float_delta(new, g),
        _float_delta(ups[0].params, g),
        _float_delta(ups[1].params, g),
    )
    guess = {k: 2 * (step[k] - rng.normal(0.0, 0.5, size=g[k].shape)) - mine[k] for k in step}
    err = np.sqrt(sum(np.sum((guess[k] - truth[k]) ** 2) for k in step))
    assert err < 1e-5


def test_two_runs_with_the_same_seed_add_different_noise():
    c1, c2 = _coordinator(), _coordinator()
    g = {k: np.array(v, copy=True) for k, v in c1.params.items()}
    for k in g:
        np.testing.assert_array_equal(c1.params[k], c2.params[k])
    ups = _updates(g, np.random.default_rng(0))
    c1.aggregate(ups)
    c2.aggregate(ups)
    diff = _float_delta(c1.params, c2.params)
    # the difference of the two releases is the difference of two noises, not zero
    d = sum(v.size for v in diff.values())
    rms = np.sqrt(sum(np.sum(v**2) for v in diff.values()) / d)
    assert rms == pytest.approx(np.sqrt(2) * 0.5, rel=0.1)


def test_the_site_clips_and_sends_no_losses_under_dp():
    g = {"w": np.zeros(6, np.float32), "n": np.array(4, np.int64)}
    upd = SiteUpdate(
        "s",
        {"w": np.full(6, 10.0, np.float32), "n": np.array(9, np.int64)},
        30,
        {0: 30},
        metrics={"loss": 123.0, "validation_loss": 130.0, "steps": 5.0, "seconds": 0.2},
    )
    priv = PrivacyConfig(clip_norm=2.0, noise_multiplier=1.0, expected_sites=3, clip_at="site")
    out = site_reply(upd, g, priv)
    assert np.linalg.norm(out.params["w"]) == pytest.approx(2.0, rel=1e-6)
    assert out.params["w"].dtype == np.float32
    assert out.metrics == {"steps": 5.0}
    server = site_reply(upd, g, PrivacyConfig(clip_norm=2.0, expected_sites=3))
    np.testing.assert_array_equal(server.params["w"], upd.params["w"])  # the server clips
    assert server.metrics == {"steps": 5.0}
    assert site_reply(upd, g, PrivacyConfig()) is upd


def test_dp_refuses_unnoised_channels_and_needs_the_divisor():
    dp = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0, expected_sites=2)
    with pytest.raises(ValueError, match="scaffold=False"):
        RunConfig(train=TrainConfig(scaffold=True), privacy=dp)
    with pytest.raises(ValueError, match='norm_stats="global"'):
        RunConfig(federation=FederationConfig(norm_stats="global"), privacy=dp)
    with pytest.raises(ValueError, match="early_stopping"):
        RunConfig(federation=FederationConfig(early_stopping=True), privacy=dp)
    RunConfig(train=TrainConfig(scaffold=True))  # fine without DP
    assert RunConfig(privacy=dp).balance_clusters == 0  # balancing's sums are not noised
    with pytest.raises(ValueError, match="expected_sites"):
        _coordinator(expected_sites=None)
    with pytest.raises(ValueError, match="clip_at"):
        PrivacyConfig(clip_norm=1.0, clip_at="client")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clip_norm"):
        PrivacyConfig(clip_norm=0.0)
    assert not PrivacyConfig().enabled


@pytest.mark.parametrize("clip_at", ["site", "server"])
def test_dp_run_reports_epsilon_and_no_per_site_values(small_adata, clip_at):
    from scfedvi import ScFedVI

    priv = PrivacyConfig(clip_norm=5.0, noise_multiplier=0.5, expected_sites=2, clip_at=clip_at)
    cfg = RunConfig(
        model=ModelConfig(n_hidden=16, n_latent=3),
        train=TrainConfig(batch_size=32, local_epochs=1),
        federation=FederationConfig(n_rounds=2),
        privacy=priv,
    )
    sites = {"a": small_adata[:120].copy(), "b": small_adata[120:].copy()}
    model = ScFedVI.from_sites(sites, batch_key="batch", n_top_genes=None, config=cfg)
    h = model.train(progress=False)
    dp_rows = h[h["status"] == "dp"]
    assert len(dp_rows) == 2
    assert dp_rows["dp_epsilon"].iloc[-1] == pytest.approx(gaussian_epsilon(0.5, 2, 1e-5))
    assert (dp_rows["dp_divisor"] == 2).all()
    site_rows = h[h["status"] == "ok"]
    for col in ("loss", "validation_loss", "reconstruction", "dp_update_norm"):
        assert col not in h.columns or site_rows[col].isna().all(), col
    assert all(np.isfinite(v).all() for v in model.params.values())
