"""Oracle tests of the count likelihoods against scvi-tools' and torch's distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfedvi.module.distributions import (
    NonzeroCounts,
    _digamma_ge1,
    kl_normal_standard,
    log_nb_positive,
    log_poisson,
    log_zinb_positive,
    zinb_log_likelihood_cells,
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


def _zinb_case(dtype: torch.dtype, seed: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.exp(torch.randn(40, 30, generator=g, dtype=dtype) * 2.0)
    x = torch.poisson(mu, generator=g)
    x[:3] = 0.0  # cells without a count
    x[3, :5] = torch.tensor([1e3, 1e4, 1e5, 1.0, 2.0], dtype=dtype)
    theta = torch.exp(torch.randn(30, generator=g, dtype=dtype) * 1.5)  # ~0.01 .. 90
    pi = torch.randn(40, 30, generator=g, dtype=dtype) * 3.0
    return x, mu, theta, pi


@pytest.mark.parametrize("with_nonzero", [False, True])
def test_fast_zinb_equals_the_elementwise_formula_and_its_gradient(with_nonzero: bool) -> None:
    """Value per cell and gradients (mu, theta, pi) equal autograd on log_zinb_positive."""
    x, mu, theta, pi = _zinb_case(torch.float64)
    nz = None
    if with_nonzero:
        nz = NonzeroCounts.from_dense(x)
        nz = nz._replace(log_factorial=torch.lgamma(x + 1).sum(-1))
    weights = torch.randn(x.shape[0], dtype=x.dtype)  # a non-uniform upstream gradient
    grads = []
    for fn in (
        lambda m, t, p: log_zinb_positive(x, m, t, p).sum(-1),
        lambda m, t, p: zinb_log_likelihood_cells(x, m, t, p, nz),
    ):
        args = [a.clone().requires_grad_() for a in (mu, theta, pi)]
        value = fn(*args)
        (value * weights).sum().backward()
        grads.append((value.detach(), *(a.grad for a in args)))
    for ref, fast, name in zip(grads[0], grads[1], ["value", "mu", "theta", "pi"], strict=True):
        # theta's gradient goes through the digamma series (truncation error below 2e-8)
        tol = 1e-7 if name == "theta" else 1e-9
        torch.testing.assert_close(fast, ref, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


def test_fast_zinb_in_float32_and_without_gradients() -> None:
    x, mu, theta, pi = _zinb_case(torch.float32, seed=4)
    ref = log_zinb_positive(x, mu, theta, pi).sum(-1)
    with torch.no_grad():
        fast = zinb_log_likelihood_cells(x, mu, theta, pi)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-3)


def test_fast_zinb_falls_back_for_gene_batch_dispersion() -> None:
    x, mu, theta, pi = _zinb_case(torch.float32, seed=5)
    theta_2d = theta.expand_as(mu).clone()
    torch.testing.assert_close(
        zinb_log_likelihood_cells(x, mu, theta_2d, pi),
        log_zinb_positive(x, mu, theta_2d, pi).sum(-1),
    )


def test_digamma_for_arguments_of_at_least_one() -> None:
    z = torch.cat([torch.linspace(1.0, 10.0, 2000), torch.logspace(1, 6, 2000)])
    exact = torch.digamma(z.double())
    for dtype in (torch.float32, torch.float64):
        err = (_digamma_ge1(z.to(dtype)).double() - exact).abs() / exact.abs().clamp_min(1.0)
        assert err.max() < (1e-6 if dtype == torch.float32 else 2e-8)
