"""Balancing from securely aggregated sums only (:mod:`scfedvi.federation.secure_balance`).

Fake site workers (fixed embeddings, no model) keep these tests fast: the secure runtime's
steps must equal the same algorithm run on plain float sums within the quantization; the
site's budget refuses a coordinator asking more; DP noise keeps the variant off.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from scfedvi.config import FederationConfig, PrivacyConfig, RunConfig, SitePolicy
from scfedvi.federation.balance import SUMS
from scfedvi.federation.secure_balance import (
    CODEBOOK,
    CODEBOOK_PER_CLUSTER,
    LATENT_BOUND,
    MOMENTS,
    decode,
    encode,
    plain_total,
    run_secure_balance,
    secure_balance_in_process,
    site_values,
    site_vector,
)
from scfedvi.privacy.policy import PolicyRefusal, QueryLedger

D = 6


def _config(k: int = 4, noise: float = 0.0, **fed) -> RunConfig:
    return RunConfig(
        federation=FederationConfig(balance_clusters=k, seed=3, **fed),
        privacy=PrivacyConfig(
            clip_norm=1.0, clip_at="site", secure_aggregation=True, noise_multiplier=noise
        ),
    )


def _sites(n_sites: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Each site a different mix of 4 well-separated clusters (the composition trap)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(4, D))
    out = []
    for s in range(n_sites):
        mix = np.roll([0.55, 0.25, 0.15, 0.05], s)
        lab = rng.choice(4, size=400 + 50 * s, p=mix)
        out.append(centres[lab] + rng.normal(scale=0.5, size=(len(lab), D)))
    return out


@dataclass
class _Data:
    n_cells: int


@dataclass
class _Worker:
    """A site worker with a fixed embedding (balancing steps ignored)."""

    name: str
    z: np.ndarray
    policy: SitePolicy = field(default_factory=SitePolicy)

    @property
    def data(self) -> _Data:
        return _Data(len(self.z))

    def embed(self, params, steps):
        return self.z


def _workers(zs, policy=None) -> list[_Worker]:
    return [_Worker(f"site{i}", z, policy or SitePolicy()) for i, z in enumerate(zs)]


def test_encode_decode_roundtrip_within_quantization():
    zs = _sites()
    n_total = sum(len(z) for z in zs)
    c = zs[0][:4]
    parts = [site_values(z, SUMS, c) for z in zs]
    enc = [encode(p, SUMS, 4, D, n_total) for p in parts]
    total = np.zeros_like(enc[0], dtype=np.uint64)
    for e in enc:
        total = (total + e) % (1 << 32)
    got = decode(total.astype(np.uint32), SUMS, 4, D, n_total)
    want = [np.sum([p[i] for p in parts], axis=0) for i in range(3)]
    step = n_total * LATENT_BOUND / (2**31 - 1)  # one quantization step of a sum
    np.testing.assert_allclose(got[0], want[0].ravel(), rtol=0, atol=len(zs) * step)
    np.testing.assert_array_equal(got[1], want[1])  # counts exact
    np.testing.assert_array_equal(got[2], want[2])


def test_secure_steps_equal_plain_sums_within_quantization():
    zs = _sites()
    cfg = _config(k=4, balance_iterations=2, balance_rounds=2)
    fc = cfg.federation
    secure = secure_balance_in_process(_workers(zs), {}, cfg)
    plain = run_secure_balance(plain_total(zs), 4, fc.balance_iterations, fc.balance_rounds, 3)
    assert len(secure) == len(plain) == 2
    for a, b in zip(secure, plain, strict=True):
        np.testing.assert_allclose(a.centroids, b.centroids, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.composition, b.composition, rtol=0, atol=1e-12)
    # and the algorithm finds the federation's composition of the 4 planted clusters
    pooled = np.concatenate(zs)
    truth = np.sort(np.bincount(_labels(pooled, zs), minlength=4) / len(pooled))
    np.testing.assert_allclose(np.sort(secure[-1].composition), truth, atol=0.02)


def _labels(pooled, zs):
    """The planted cluster of each pooled cell (k-means on well-separated clusters)."""
    from scfedvi.federation.balance import weighted_kmeans, assign

    c = weighted_kmeans(pooled, np.ones(len(pooled)), 4, 0, 50, 5)
    return assign(pooled, c)


def test_site_clips_latent_values_to_the_bound():
    z = np.full((20, D), 3 * LATENT_BOUND)
    s, ss, n, sent = site_values(z, MOMENTS, None)
    np.testing.assert_array_equal(s, 20 * LATENT_BOUND)
    np.testing.assert_array_equal(ss, 20 * LATENT_BOUND**2)
    assert n[0] == sent[0] == 20


def test_small_clusters_send_counts_only():
    z = np.concatenate([np.zeros((15, D)), np.full((3, D), 5.0)])
    sums, counts, sent = site_values(z, SUMS, np.stack([np.zeros(D), np.full(D, 5.0)]))
    np.testing.assert_array_equal(counts, [15, 3])
    np.testing.assert_array_equal(sent, [15, 0])
    np.testing.assert_array_equal(sums[1], 0.0)


def _query(ledger, cfg, phase, n_steps=0, k=4, policy=None):
    z = _sites(1)[0]
    m = {MOMENTS: 1, CODEBOOK: CODEBOOK_PER_CLUSTER * k, SUMS: k}[phase]
    c = None if phase == MOMENTS else np.zeros((m, D))
    return site_vector(
        "site0",
        z,
        cfg,
        phase=phase,
        n_clusters=k,
        n_steps=n_steps,
        centroids=c,
        n_total=10_000,
        ledger=ledger,
        policy=policy,
    )


def test_budget_refuses_a_coordinator_asking_more():
    cfg = _config(k=4, balance_iterations=1, balance_rounds=1)
    ledger = QueryLedger()
    with pytest.raises(PolicyRefusal, match="codebook query before"):
        _query(ledger, cfg, CODEBOOK)  # out of order
    _query(ledger, cfg, MOMENTS)
    with pytest.raises(PolicyRefusal, match="budget"):
        _query(ledger, cfg, MOMENTS)  # a second moments query in the pass
    _query(ledger, cfg, CODEBOOK)
    _query(ledger, cfg, SUMS)
    for phase in (SUMS, CODEBOOK):  # the declared single sums round is spent
        with pytest.raises(PolicyRefusal, match="budget"):
            _query(ledger, cfg, phase)
    with pytest.raises(PolicyRefusal, match="pass 2"):
        _query(ledger, cfg, MOMENTS, n_steps=1)  # one pass declared
    with pytest.raises(PolicyRefusal, match="clusters"):
        _query(QueryLedger(), cfg, MOMENTS, k=5)  # not the declared k
    big = _config(k=40, balance_iterations=1, balance_rounds=1)
    with pytest.raises(PolicyRefusal, match="max_balance_clusters"):
        _query(QueryLedger(), big, MOMENTS, k=40)


def test_site_policy_caps_declared_rounds():
    """A run declaring 5 sums rounds gets only the site's max_balance_rounds."""
    cfg = _config(k=4, balance_iterations=1, balance_rounds=5)
    policy = SitePolicy(max_balance_rounds=2)
    ledger = QueryLedger()
    for phase in (MOMENTS, CODEBOOK, SUMS, SUMS):
        _query(ledger, cfg, phase, policy=policy)
    with pytest.raises(PolicyRefusal, match="budget"):
        _query(ledger, cfg, SUMS, policy=policy)


def test_in_process_run_refused_beyond_site_policy():
    zs = _sites()
    cfg = _config(k=4, balance_iterations=3, balance_rounds=1)
    with pytest.raises(PolicyRefusal, match="pass 2"):
        secure_balance_in_process(_workers(zs, SitePolicy(max_balance_passes=1)), {}, cfg)


def test_dp_noise_keeps_secure_balancing_off():
    cfg = _config(noise=1.0)
    assert cfg.balance_clusters == 0  # balancing off under DP (and the secure variant refuses)
    with pytest.raises(ValueError, match="not noised"):
        secure_balance_in_process(_workers(_sites()), {}, cfg)
    plain = replace(cfg, privacy=PrivacyConfig())
    with pytest.raises(ValueError, match="secure_aggregation is off"):
        secure_balance_in_process(_workers(_sites()), {}, plain)
