"""Count likelihoods of scVI, written as scvi-tools writes them (oracle-tested against it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_zinb_positive(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Log likelihood of a zero-inflated negative binomial, elementwise.

    Parameters
    ----------
    x
        Observed counts.
    mu
        Mean of the negative binomial (positive).
    theta
        Inverse dispersion (positive).
    pi
        Logit of the dropout (zero-inflation) probability.
    eps
        Numerical stability constant.
    """
    softplus_pi = F.softplus(-pi)
    log_theta_eps = torch.log(theta + eps)
    log_theta_mu_eps = torch.log(theta + mu + eps)
    pi_theta_log = -pi + theta * (log_theta_eps - log_theta_mu_eps)

    case_zero = F.softplus(pi_theta_log) - softplus_pi
    case_non_zero = (
        -softplus_pi
        + pi_theta_log
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    is_zero = (x < eps).to(case_zero.dtype)
    is_pos = (x > eps).to(case_zero.dtype)
    return is_zero * case_zero + is_pos * case_non_zero


def log_nb_positive(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Log likelihood of a negative binomial parametrized by mean and inverse dispersion."""
    log_theta_mu_eps = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu_eps)
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def log_poisson(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Log likelihood of a Poisson distribution, elementwise (``torch.distributions`` form)."""
    return torch.xlogy(x, rate) - rate - torch.lgamma(x + 1)


def kl_normal_standard(qz_m: torch.Tensor, qz_v: torch.Tensor) -> torch.Tensor:
    """KL( N(qz_m, qz_v) || N(0, 1) ), summed over the latent dimension."""
    return 0.5 * (qz_v + qz_m.pow(2) - 1.0 - torch.log(qz_v)).sum(dim=-1)
