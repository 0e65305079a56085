"""Secure-aggregation primitives: masks cancel in the sum, one masked update looks uniform."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from scfedvi.privacy.secagg import (
    SecAggSite,
    dequantize,
    masked_sum,
    quantize,
    scale_for,
)

C, N, D = 1.0, 3, 50_000


def _setup():
    rng = np.random.default_rng(0)
    sites = [SecAggSite(f"site-{i}") for i in range(N)]
    keys = {s.site_id: s.public_key for s in sites}
    updates = []
    for _ in sites:
        x = rng.normal(size=D)
        updates.append(x / np.linalg.norm(x) * C)  # a clipped update: norm C
    return sites, keys, updates


def test_the_masked_sum_is_the_plain_sum_within_quantization_error():
    sites, keys, updates = _setup()
    masked = [
        s.mask(quantize(u, C, N), keys, run_id=b"run-1", round_idx=4)
        for s, u in zip(sites, updates, strict=True)
    ]
    total = dequantize(masked_sum(masked), C, N)
    err = np.abs(total - np.sum(updates, axis=0)).max()
    assert err <= N / (2 * scale_for(C, N)) + 1e-12
    # a sum missing one site cannot be unmasked: garbage, not the partial sum
    partial = dequantize(masked_sum(masked[:2]), C, N)
    assert np.abs(partial - updates[0] - updates[1]).max() > 0.1


def test_a_single_masked_update_looks_uniform_and_unrelated_to_the_update():
    sites, keys, updates = _setup()
    q = quantize(updates[0], C, N)
    m = sites[0].mask(q, keys, run_id=b"run-1", round_idx=0)
    u = m.astype(np.float64) / 2**32
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    assert abs(np.corrcoef(u, updates[0])[0, 1]) < 0.03
    # unmasked, the quantized update is far from uniform (it sits near 0 mod 2^32)
    assert stats.kstest(q.astype(np.float64) / 2**32, "uniform").pvalue < 1e-6
    # another round gives other masks
    m2 = sites[0].mask(q, keys, run_id=b"run-1", round_idx=1)
    assert np.mean(m == m2) < 1e-3


def test_quantize_refuses_an_unclipped_update():
    with pytest.raises(ValueError, match="clip"):
        quantize(np.array([2.0]), 1.0, 3)
