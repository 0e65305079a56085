"""Client-level DP: clipping bounds a site's influence, noise has the stated scale, epsilon."""

from __future__ import annotations

import numpy as np
import pytest

from scfedvi.config import FederationConfig, ModelConfig, PrivacyConfig, RunConfig, TrainConfig
from scfedvi.federation.aggregate import SiteUpdate
from scfedvi.privacy import dp_average, gaussian_epsilon
from scfedvi.privacy.dp import clip_update


def test_clip_update_bounds_the_norm_and_keeps_small_updates():
    big = {"a": np.full(4, 3.0), "b": np.full(2, 4.0)}
    clipped, norm = clip_update(big, 1.0)
    assert norm == pytest.approx(np.sqrt(4 * 9 + 2 * 16))
    total = np.sqrt(sum(np.sum(v**2) for v in clipped.values()))
    assert total == pytest.approx(1.0)
    small = {"a": np.full(4, 0.1)}
    np.testing.assert_allclose(clip_update(small, 1.0)[0]["a"], small["a"])


def test_one_site_cannot_move_the_model_more_than_clip_over_m():
    g = {"w": np.zeros(10, np.float32)}
    ups = [
        SiteUpdate(s, {"w": np.full(10, v, np.float32)}, n, {0: n})
        for s, v, n in [("a", 0.0, 10), ("b", 0.0, 10), ("evil", 1e6, 1)]
    ]
    out, info = dp_average(
        ups, g, clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0)
    )
    assert np.linalg.norm(out["w"]) == pytest.approx(1.0 / 3, rel=1e-5)
    assert info["dp_clipped_share"] == pytest.approx(1 / 3)


def test_noise_has_the_stated_standard_deviation():
    g = {"w": np.zeros(200_000, np.float32)}
    ups = [SiteUpdate(s, {"w": np.zeros(200_000, np.float32)}, 5, {0: 5}) for s in "abcd"]
    out, info = dp_average(
        ups, g, clip_norm=2.0, noise_multiplier=1.5, rng=np.random.default_rng(1)
    )
    assert info["dp_noise_std"] == pytest.approx(1.5 * 2.0 / 4)
    assert out["w"].std() == pytest.approx(0.75, rel=0.01)


def test_epsilon_matches_the_rdp_closed_form_and_behaves():
    # one round, sigma 1: min over alpha of alpha/2 + log(1/delta)/(alpha-1); optimum near
    # alpha = 1 + sqrt(2 log(1/delta)), epsilon = 1/2 + sqrt(2 log(1/delta))
    d = 1e-5
    want = 0.5 + np.sqrt(2 * np.log(1 / d))
    assert gaussian_epsilon(1.0, 1, d) == pytest.approx(want, rel=1e-3)
    assert gaussian_epsilon(2.0, 10, d) < gaussian_epsilon(1.0, 10, d)
    assert gaussian_epsilon(1.0, 40, d) > gaussian_epsilon(1.0, 10, d)
    assert gaussian_epsilon(0.0, 10, d) == float("inf")
    with pytest.raises(ValueError, match="delta"):
        gaussian_epsilon(1.0, 1, 0.0)


def test_dp_run_reports_epsilon_and_stays_finite(small_adata):
    from scfedvi import ScFedVI

    cfg = RunConfig(
        model=ModelConfig(n_hidden=16, n_latent=3),
        train=TrainConfig(batch_size=32, local_epochs=1),
        federation=FederationConfig(n_rounds=2),
        privacy=PrivacyConfig(clip_norm=5.0, noise_multiplier=0.5),
    )
    sites = {"a": small_adata[:120].copy(), "b": small_adata[120:].copy()}
    model = ScFedVI.from_sites(sites, batch_key="batch", n_top_genes=None, config=cfg)
    h = model.train(progress=False)
    dp_rows = h[h["status"] == "dp"]
    assert len(dp_rows) == 2
    assert dp_rows["dp_epsilon"].iloc[-1] == pytest.approx(gaussian_epsilon(0.5, 2, 1e-5))
    assert all(np.isfinite(v).all() for v in model.params.values())


def test_privacy_config_validation():
    with pytest.raises(ValueError, match="clip_norm"):
        PrivacyConfig(clip_norm=0.0)
    assert not PrivacyConfig().enabled
