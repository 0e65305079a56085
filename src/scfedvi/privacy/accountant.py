"""Privacy accounting for the Gaussian mechanism composed over rounds (Rényi DP).

Every site takes part in every round (no subsampling), so each round is one Gaussian
mechanism of noise multiplier ``sigma`` on the clipped mean; its Rényi DP of order ``alpha`` is
``alpha / (2 sigma^2)`` (Mironov 2017), composition adds, and the conversion to
``(epsilon, delta)`` is ``epsilon = min_alpha RDP(alpha) + log(1/delta) / (alpha - 1)``.
"""

from __future__ import annotations

import numpy as np

ORDERS = np.concatenate([np.linspace(1.01, 10, 400), np.linspace(10.5, 1024, 2000)])


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` Gaussian mechanisms with ``noise_multiplier`` at ``delta``.

    Returns ``inf`` without noise.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if noise_multiplier <= 0:
        return float("inf")
    if rounds <= 0:
        return 0.0
    rdp = rounds * ORDERS / (2.0 * noise_multiplier**2)
    eps = rdp + np.log(1.0 / delta) / (ORDERS - 1.0)
    return float(eps.min())
