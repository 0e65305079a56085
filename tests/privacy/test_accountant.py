"""The accountant (dp-accounting) against the exact (epsilon, delta) curve of the Gaussian
mechanism composed T times, and against dp-accounting's own PLD accountant."""

from __future__ import annotations

import math

import pytest
from scipy import optimize, stats

from scfedvi.privacy.accountant import gaussian_epsilon, noise_for_epsilon

DELTA = 1e-5


def _oracle_epsilon(sigma: float, rounds: int, delta: float, sensitivity: float = 1.0) -> float:
    """T Gaussian mechanisms of noise sigma are one of noise sigma / sqrt(T); its exact curve
    is delta(eps) = Phi(-eps s + 1/(2s)) - e^eps Phi(-eps s - 1/(2s)), s = sigma/sqrt(T)/Δ."""
    s = sigma / math.sqrt(rounds) / sensitivity

    def gap(eps: float) -> float:
        return (
            stats.norm.cdf(-eps * s + 1 / (2 * s))
            - math.exp(eps) * stats.norm.cdf(-eps * s - 1 / (2 * s))
            - delta
        )

    return optimize.brentq(gap, 1e-9, 400.0, xtol=1e-12)


@pytest.mark.parametrize(
    ("sigma", "rounds"), [(0.5, 2), (1.0, 20), (2.7, 20), (6.2, 20), (16.7, 20), (3.0, 100)]
)
def test_epsilon_within_one_percent_of_the_closed_form(sigma, rounds):
    for adjacency, sens in (("add-remove", 1.0), ("replace-one", 2.0)):
        want = _oracle_epsilon(sigma, rounds, DELTA, sens)
        assert gaussian_epsilon(sigma, rounds, DELTA, adjacency) == pytest.approx(want, rel=0.01)


def test_replace_one_costs_the_factor_two_of_issue_16():
    # sigma = 1 over 20 rounds: 28.4 under add/remove, 77.3 under replace-one (the issue's 77)
    assert gaussian_epsilon(1.0, 20, DELTA) == pytest.approx(28.37, abs=0.01)
    assert gaussian_epsilon(1.0, 20, DELTA, "replace-one") == pytest.approx(77.33, abs=0.01)
    assert gaussian_epsilon(2.0, 20, DELTA, "replace-one") == pytest.approx(
        gaussian_epsilon(1.0, 20, DELTA)
    )


def test_agrees_with_dp_accountings_pld_accountant():
    import dp_accounting

    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(2.0), 10)
    assert gaussian_epsilon(2.0, 10, DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=0.01)


def test_noise_for_epsilon_calibrates_sigma():
    for eps in (8.0, 3.0, 1.0):
        for adjacency in ("add-remove", "replace-one"):
            sigma = noise_for_epsilon(eps, DELTA, 20, adjacency)
            assert gaussian_epsilon(sigma, 20, DELTA, adjacency) == pytest.approx(eps, rel=1e-6)
    assert noise_for_epsilon(3.0, DELTA, 20, "replace-one") == pytest.approx(
        2 * noise_for_epsilon(3.0, DELTA, 20)
    )
    assert noise_for_epsilon(1.0, DELTA, 20) > noise_for_epsilon(8.0, DELTA, 20)
    with pytest.raises(ValueError, match="epsilon"):
        noise_for_epsilon(0.0, DELTA, 20)


def test_edge_cases():
    assert gaussian_epsilon(0.0, 10, DELTA) == float("inf")
    assert gaussian_epsilon(1.0, 0, DELTA) == 0.0
    assert gaussian_epsilon(1.0, 40, DELTA) > gaussian_epsilon(1.0, 10, DELTA)
    with pytest.raises(ValueError, match="delta"):
        gaussian_epsilon(1.0, 1, 0.0)
    with pytest.raises(ValueError, match="adjacency"):
        gaussian_epsilon(1.0, 1, DELTA, "swap")  # type: ignore[arg-type]
