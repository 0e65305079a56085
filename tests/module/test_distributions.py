"""Oracle tests of the count likelihoods against scvi-tools' and torch's distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfedvi.module.distributions import (
    kl_normal_standard,
    log_nb_positive,
    log_poisson,
    log_zinb_positive,
)


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    """Seeded counts with many zeros and some large values, and positive parameters."""
    g = torch.Generator().manual_seed(0)
    shape = (64, 50)
    mu = torch.exp(torch.randn(shape, generator=g) * 2.0)  # ~0.02 .. 400
    theta = torch.exp(torch.randn(shape, generator=g) * 1.5)
    pi = torch.randn(shape, generator=g) * 3.0
    x = torch.poisson(mu, generator=g)
    x[:4] = 0.0  # all-zero cells
    x[4, :10] = torch.tensor([1e3, 5e3, 1e4, 2e4, 5e4, 1e5, 3e5, 1.0, 2.0, 7.0])  # large counts
    assert (x == 0).float().mean() > 0.2
    return {"x": x, "mu": mu, "theta": theta, "pi": pi}


@pytest.mark.scvi
def test_zinb_and_nb_match_scvi(inputs: dict[str, torch.Tensor]) -> None:
    from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial

    x, mu, theta, pi = inputs["x"], inputs["mu"], inputs["theta"], inputs["pi"]
    ref_zinb = ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=pi).log_prob(x)
    ref_nb = NegativeBinomial(mu=mu, theta=theta).log_prob(x)
    torch.testing.assert_close(log_zinb_positive(x, mu, theta, pi), ref_zinb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_nb_positive(x, mu, theta), ref_nb, rtol=1e-5, atol=1e-5)


def test_poisson_matches_torch(inputs: dict[str, torch.Tensor]) -> None:
    x, mu = inputs["x"], inputs["mu"]
    ref = torch.distributions.Poisson(mu).log_prob(x)
    torch.testing.assert_close(log_poisson(x, mu), ref, rtol=1e-5, atol=1e-5)


def test_nb_is_a_distribution_and_zinb_reduces_to_nb() -> None:
    mu, theta = torch.tensor([3.0]), torch.tensor([2.0])
    k = torch.arange(0.0, 400.0)
    total = torch.exp(log_nb_positive(k, mu, theta)).sum()
    assert total.item() == pytest.approx(1.0, abs=1e-5)
    # a very negative dropout logit turns the ZINB into the NB
    zinb = log_zinb_positive(k, mu, theta, torch.tensor([-30.0]))
    torch.testing.assert_close(zinb, log_nb_positive(k, mu, theta), rtol=1e-5, atol=1e-5)


def test_kl_matches_torch() -> None:
    g = torch.Generator().manual_seed(1)
    m, v = torch.randn(8, 5, generator=g), torch.rand(8, 5, generator=g) + 0.1
    q = torch.distributions.Normal(m, v.sqrt())
    p = torch.distributions.Normal(torch.zeros_like(m), torch.ones_like(m))
    ref = torch.distributions.kl_divergence(q, p).sum(-1)
    np.testing.assert_allclose(kl_normal_standard(m, v).numpy(), ref.numpy(), rtol=1e-5)
