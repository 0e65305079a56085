"""Count likelihoods of scVI.

``log_zinb_positive`` and ``log_nb_positive`` are written as scvi-tools writes them (oracle-tested
against ``scvi.distributions``). Training uses :func:`zinb_log_likelihood_cells`, the same
ZINB log likelihood summed per cell, with its gradient written out by hand and the
log-gamma terms evaluated on the nonzero counts only (they vanish where the count is zero):
about half the arithmetic of letting autograd differentiate the elementwise formula.
"""

from __future__ import annotations

from typing import NamedTuple

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


class NonzeroCounts(NamedTuple):
    """The nonzero entries of a dense minibatch of counts, row by row.

    ``rows``, ``cols`` and ``vals`` give each nonzero entry (grouped by row, in row order);
    ``lengths`` the number of them in each row; ``log_factorial`` each row's sum of
    ``lgamma(x + 1)`` (it does not depend on the model: a site computes it once).
    """

    rows: torch.Tensor  # int64
    cols: torch.Tensor  # int64
    vals: torch.Tensor  # same dtype as the counts
    lengths: torch.Tensor  # int64, one per row
    log_factorial: torch.Tensor  # one per row

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> NonzeroCounts:
        rows, cols = torch.nonzero(x, as_tuple=True)  # row-major order
        vals, lengths = x[rows, cols], torch.bincount(rows, minlength=x.shape[0])
        log_factorial = torch.segment_reduce(torch.lgamma(vals + 1.0), "sum", lengths=lengths)
        return cls(rows, cols, vals, lengths, log_factorial)


def _digamma_ge1(z: torch.Tensor) -> torch.Tensor:
    """Digamma for ``z >= 1``: two steps of the recurrence, then the asymptotic series at
    ``z + 2 >= 3`` to the ``z**-12`` term (truncation error below 2e-8). About four times as
    fast as ``torch.digamma`` on CPU, and as accurate in float32."""
    w = z + 2.0
    r = torch.reciprocal(w)
    r2 = r * r
    # -sum_k B_2k / (2k w^2k), k = 1..6, in Horner form
    poly = r2.mul(691.0 / 32760).sub_(1.0 / 132).mul_(r2).add_(1.0 / 240).mul_(r2)
    poly = poly.sub_(1.0 / 252).mul_(r2).add_(1.0 / 120).mul_(r2).sub_(1.0 / 12).mul_(r2)
    out = torch.log(w).sub_(r, alpha=0.5).add_(poly)
    return out.sub_(torch.reciprocal(z)).sub_(torch.reciprocal(z + 1.0))


class _ZINBCells(torch.autograd.Function):
    """Per-cell ZINB log likelihood with gene-wise ``theta``; gradients computed in forward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        mu: torch.Tensor,
        theta: torch.Tensor,
        pi: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        vals: torch.Tensor,
        lengths: torch.Tensor,
        log_factorial: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        # Dense part, with ptl = -pi + theta * (log(theta + eps) - log(theta + mu + eps)):
        #   x = 0: softplus(ptl) - softplus(-pi)
        #   x > 0: ptl - softplus(-pi) + x * (log(mu + eps) - log(theta + mu + eps))
        # written as one expression, since softplus(ptl) = ptl + softplus(-ptl).
        # Sparse part (x > 0 only): lgamma(x + theta) - lgamma(theta) - lgamma(x + 1).
        zero = (x == 0).to(x.dtype)
        theta_eps = theta + eps
        t = mu + theta_eps
        log_t = torch.log(t)
        d = torch.log(theta_eps) - log_t
        ptl = torch.addcmul(-pi, theta, d)
        neg_ptl = -ptl
        mu_eps = mu + eps
        ll = torch.addcmul(ptl, x, torch.log(mu_eps).sub_(log_t))
        ll.addcmul_(zero, F.softplus(neg_ptl)).sub_(F.softplus(-pi))
        theta_nz = theta.index_select(0, cols)
        vt = vals + theta_nz
        lg = torch.lgamma(vt).sub_(torch.lgamma(theta).index_select(0, cols))
        ll_cells = ll.sum(-1).add_(torch.segment_reduce(lg, "sum", lengths=lengths))
        ll_cells.sub_(log_factorial)
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        if needs[1] or needs[2] or needs[3]:
            # w = d ll / d ptl: 1 where x > 0, sigmoid(ptl) where x = 0
            w = torch.sigmoid(neg_ptl).mul_(zero).neg_().add_(1.0)
            inv_t = torch.reciprocal(t)
            g_pi = torch.sigmoid(-pi).sub_(w)
            w_inv_t = w * inv_t
            g_mu = torch.reciprocal(mu_eps).sub_(inv_t).mul_(x).sub_(w_inv_t * theta)
            g_theta = (w * d).addcmul_(w.div_(theta_eps).sub_(w_inv_t), theta)
            g_theta.sub_(inv_t.mul_(x))
            g_theta_nz = _digamma_ge1(vt).sub_(torch.digamma(theta).index_select(0, cols))
            ctx.save_for_backward(g_mu, g_pi, g_theta, g_theta_nz, rows, cols)
        return ll_cells

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        g_mu, g_pi, g_theta, g_theta_nz, rows, cols = ctx.saved_tensors  # type: ignore[attr-defined]
        col = grad_out[:, None]
        grad_theta = (grad_out @ g_theta).scatter_add_(
            0, cols, grad_out.index_select(0, rows).mul_(g_theta_nz)
        )
        return None, g_mu * col, grad_theta, g_pi * col, None, None, None, None, None, None


def zinb_log_likelihood_cells(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    pi: torch.Tensor,
    nonzero: NonzeroCounts | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``log_zinb_positive(x, mu, theta, pi).sum(-1)`` for integer counts, computed faster.

    Parameters
    ----------
    x
        Dense integer counts, cells x genes.
    mu, pi
        Mean and dropout logit, cells x genes.
    theta
        Inverse dispersion, one value per gene (a 1-d tensor); any other shape falls back to
        the elementwise formula.
    nonzero
        The nonzero entries of ``x`` when the caller has them (from the sparse storage);
        found from ``x`` otherwise.
    eps
        Numerical stability constant, as in ``log_zinb_positive``.
    """
    if theta.dim() != 1:
        return log_zinb_positive(x, mu, theta, pi, eps).sum(-1)
    nz = nonzero if nonzero is not None else NonzeroCounts.from_dense(x)
    out: torch.Tensor = _ZINBCells.apply(
        x, mu, theta, pi, nz.rows, nz.cols, nz.vals, nz.lengths, nz.log_factorial, eps
    )
    return out
