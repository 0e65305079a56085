"""Privacy accounting for the DP-FedAvg rounds, by Google's ``dp-accounting``.

Every site takes part in every round (no subsampling), so a run of ``T`` rounds is ``T``
Gaussian mechanisms on the sum of the clipped updates. The L2 sensitivity of that sum is ``C``
when one site is added or removed (``adjacency="add-remove"``, the notion of McMahan et al.
2018) and ``2 C`` when one site's data is replaced by anything else (``"replace-one"``); the
noise has standard deviation ``sigma C``, so each round is a Gaussian mechanism of noise
multiplier ``sigma`` (add/remove) or ``sigma / 2`` (replace-one) with sensitivity 1.

``T`` adaptively composed Gaussian mechanisms of noise multiplier ``s`` are exactly one
Gaussian mechanism of noise multiplier ``s / sqrt(T)`` (they are ``sqrt(T)/s``-GDP, Dong, Roth
& Su 2019), so the tight ``(epsilon, delta)`` is that of one Gaussian mechanism, which
``dp_accounting.get_epsilon_gaussian`` / ``get_sigma_gaussian`` compute exactly (Balle & Wang
2018's analytic Gaussian). The tests check it against the closed form
(:func:`gaussian_delta_exact`) and against ``dp-accounting``'s privacy loss distribution (PLD)
accountant, which composes the rounds numerically and is too slow (seconds) to run each round.

``dp-accounting`` is imported when a guarantee is first computed, at the coordinator only: no
site imports it.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

Adjacency = Literal["add-remove", "replace-one"]
ADJACENCIES: tuple[str, ...] = ("add-remove", "replace-one")


def _sensitivity(adjacency: str) -> float:
    if adjacency not in ADJACENCIES:
        raise ValueError(f"adjacency must be one of {ADJACENCIES}, got {adjacency!r}")
    return 2.0 if adjacency == "replace-one" else 1.0


def _dp():
    try:
        import dp_accounting
    except ImportError as e:  # pragma: no cover - the dependency is pinned in the lock file
        raise ImportError(
            "the DP accountant needs dp-accounting: pip install 'scfedvi[dp]' "
            "(or dp-accounting==0.6.0)"
        ) from e
    return dp_accounting


def _check(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@lru_cache(maxsize=4096)
def gaussian_epsilon(
    noise_multiplier: float, rounds: int, delta: float, adjacency: Adjacency = "add-remove"
) -> float:
    """Epsilon after ``rounds`` DP-FedAvg rounds of noise multiplier ``sigma`` at ``delta``.

    Returns ``inf`` without noise and ``0`` before the first round.
    """
    _check(delta)
    sens = _sensitivity(adjacency)
    if noise_multiplier <= 0:
        return float("inf")
    if rounds <= 0:
        return 0.0
    return float(_dp().get_epsilon_gaussian(noise_multiplier / sens / math.sqrt(rounds), delta))


def noise_for_epsilon(
    epsilon: float, delta: float, rounds: int, adjacency: Adjacency = "add-remove"
) -> float:
    """The noise multiplier ``sigma`` whose ``rounds`` rounds spend exactly ``epsilon`` at
    ``delta`` (the inverse of :func:`gaussian_epsilon`)."""
    _check(delta)
    sens = _sensitivity(adjacency)
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return float(_dp().get_sigma_gaussian(epsilon, delta)) * sens * math.sqrt(rounds)


def gaussian_delta_exact(
    epsilon: float, noise_multiplier: float, rounds: int, adjacency: Adjacency = "add-remove"
) -> float:
    """The exact delta(epsilon) of ``rounds`` Gaussian mechanisms (Balle & Wang 2018).

    Their composition is one Gaussian mechanism of noise ``sigma / sqrt(T)`` over the
    sensitivity; with ``s = sigma / sqrt(T) / sensitivity``,
    ``delta = Phi(-eps s + 1/(2s)) - e^eps Phi(-eps s - 1/(2s))``.
    """
    s = noise_multiplier / math.sqrt(rounds) / _sensitivity(adjacency)

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2.0))

    return phi(-epsilon * s + 1 / (2 * s)) - math.exp(epsilon) * phi(-epsilon * s - 1 / (2 * s))


def _log_phi(x: float) -> float:
    """``log Phi(x)`` of the standard normal, finite far into the lower tail."""
    if x > -35.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    x2 = x * x  # Mills' ratio series: Phi(x) ~ phi(x)/|x| (1 - 1/x^2 + 3/x^4 - 15/x^6)
    series = 1.0 - 1.0 / x2 + 3.0 / x2**2 - 15.0 / x2**3
    return -x2 / 2 - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log(series)


def epsilon_closed_form(
    noise_multiplier: float, rounds: int, delta: float, adjacency: Adjacency = "add-remove"
) -> float:
    """:func:`gaussian_epsilon` from the closed form alone (standard library only).

    Solves :func:`gaussian_delta_exact` for epsilon by bisection, with the second term in log
    space so that it stays finite for large epsilon. A site uses it to account for the runs it
    joins (:mod:`scfedvi.privacy.run_budget`) without importing ``dp-accounting``; the tests
    check it against :func:`gaussian_epsilon`. Returns ``inf`` without noise or when epsilon
    exceeds 1e6, ``0`` before the first round.
    """
    _check(delta)
    sens = _sensitivity(adjacency)
    if noise_multiplier <= 0:
        return float("inf")
    if rounds <= 0:
        return 0.0
    s = noise_multiplier / math.sqrt(rounds) / sens

    def delta_of(eps: float) -> float:
        a, b = -eps * s + 1 / (2 * s), -eps * s - 1 / (2 * s)
        return math.exp(_log_phi(a)) - math.exp(eps + _log_phi(b))

    if delta_of(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            return float("inf")
    for _ in range(200):
        mid = (lo + hi) / 2
        if delta_of(mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi
