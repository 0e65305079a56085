"""DP-FedAvg (McMahan et al. 2018): clip each site's update, average uniformly, add noise.

A site's update ``params_i - global`` is scaled to L2 norm at most ``clip_norm`` (over all its
floating-point arrays together); the server averages the clipped updates with equal weights
(so that one site's influence is bounded by ``clip_norm / m``) and adds Gaussian noise of
standard deviation ``noise_multiplier * clip_norm / m`` to every coordinate. Cell-count
weights and batch-owned averaging are not used under DP, since they would make one site's
influence depend on its size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from scfedvi.federation.aggregate import SiteUpdate
from scfedvi.train.params import Params


def clip_update(delta: Params, clip_norm: float) -> tuple[Params, float]:
    """Scale ``delta`` to L2 norm at most ``clip_norm``; return it and its original norm."""
    norm = float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))
    )
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in delta.items()}, norm


def dp_average(
    updates: Sequence[SiteUpdate],
    global_params: Mapping[str, np.ndarray],
    *,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> tuple[Params, dict[str, float]]:
    """The noisy mean of the clipped site updates, applied to ``global_params``.

    Returns the new parameters and diagnostics (mean update norm before clipping, share of
    sites clipped, noise standard deviation).
    """
    if not updates:
        raise ValueError("no site updates to aggregate")
    m = len(updates)
    floats = [
        k for k, v in global_params.items() if np.issubdtype(np.asarray(v).dtype, np.floating)
    ]
    total = {k: np.zeros(np.shape(global_params[k]), np.float64) for k in floats}
    norms = []
    for u in updates:
        delta = {
            k: np.asarray(u.params[k], np.float64) - np.asarray(global_params[k], np.float64)
            for k in floats
        }
        clipped, norm = clip_update(delta, clip_norm)
        norms.append(norm)
        for k in floats:
            total[k] += clipped[k]
    std = noise_multiplier * clip_norm / m
    out: Params = {}
    for k, g in global_params.items():
        g = np.asarray(g)
        if k in total:
            noisy = total[k] / m + rng.normal(0.0, std, size=g.shape)
            out[k] = (g + noisy).astype(g.dtype)
        else:  # integer buffers (BatchNorm's batch counter): not private data, take the max
            out[k] = np.max([np.asarray(u.params[k]) for u in updates], axis=0).astype(g.dtype)
    info = {
        "dp_update_norm": float(np.mean(norms)),
        "dp_clipped_share": float(np.mean([n > clip_norm for n in norms])),
        "dp_noise_std": float(std),
    }
    return out, info
