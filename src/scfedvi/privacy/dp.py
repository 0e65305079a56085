"""DP-FedAvg (McMahan et al. 2018) with a fixed divisor and noise no participant can regenerate.

The mechanism, once per round::

    new_global = global + (sum_i clip(params_i - global, C) + N(0, (sigma C)^2 I)) / n

``C`` is ``PrivacyConfig.clip_norm`` (the L2 norm over all of a site's floating-point arrays
together), ``n`` is ``PrivacyConfig.expected_sites``: a constant declared before the run, used
whatever number of sites answers (so that the divisor itself does not depend on who took part),
and ``sigma`` is ``PrivacyConfig.noise_multiplier``. Cell-count weights and batch-owned
averaging are not used under DP: they would make one site's influence depend on its data.

Clipping happens at the server (``clip_at="server"``: the server sees every raw update) or at
the site (``clip_at="site"``: the site clips before sending, which secure aggregation needs;
the server clips again, a no-op for an honest site and a bound on a dishonest one).

**The noise** comes from the operating system's CSPRNG (:func:`os.urandom`): 64-bit words are
turned into uniform floats of 53 bits and then into standard normals by the Box-Muller
transform in float64. It never depends on the run's seed, which every site receives: a site
that knows the seed cannot regenerate the noise and subtract it, and two runs with the same
seed add independent noise. A seeded :class:`numpy.random.Generator` (even one seeded from
``os.urandom``) is not used: PCG64's state can be recovered from its outputs, and the noise
must stay secret from the sites that see its sum.

**Diagnostics** never carry a site's raw update norm or a per-site clipping bit: the history
records the noise standard deviation, the divisor, the number of sites that answered and the
spent epsilon. A site sends no losses under DP (:func:`site_reply`): they are functions of its
data that no noise covers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np

from scfedvi.federation.aggregate import SiteUpdate
from scfedvi.train.params import Params

log = logging.getLogger(__name__)

NoiseSource = Callable[[tuple[int, ...], float], np.ndarray]

# Metrics a site still sends under DP: the steps it ran (a count the server needs to check the
# schedule; it reveals no more than ``num_examples``, which is sent anyway).
DP_METRIC_KEYS = frozenset({"steps"})

_TWO_PI = 2.0 * np.pi
_INV_2_53 = 1.0 / float(1 << 53)


def _secure_uniform(n: int) -> np.ndarray:
    """``n`` uniform floats in (0, 1] with 53 random bits each, from :func:`os.urandom`."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * _INV_2_53


def secure_gaussian(shape: tuple[int, ...], std: float) -> np.ndarray:
    """Normal noise of standard deviation ``std`` from the OS CSPRNG (Box-Muller, float64)."""
    size = int(np.prod(shape, dtype=np.int64))
    if std == 0 or size == 0:
        return np.zeros(shape, np.float64)
    half = (size + 1) // 2
    u1, u2 = _secure_uniform(half), _secure_uniform(half)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(_TWO_PI * u2), r * np.sin(_TWO_PI * u2)])[:size]
    return (std * z).reshape(shape)


def _float_keys(params: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k, v in params.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def clip_update(delta: Params, clip_norm: float) -> tuple[Params, float]:
    """Scale ``delta`` to L2 norm at most ``clip_norm``; return it and its original norm.

    The norm is for the caller's own use (a site's log, the server's check); it is never
    sent or recorded.
    """
    norm = float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))
    )
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in delta.items()}, norm


def _delta(params: Mapping[str, np.ndarray], global_params: Mapping[str, np.ndarray], keys):
    return {
        k: np.asarray(params[k], np.float64) - np.asarray(global_params[k], np.float64)
        for k in keys
    }


def site_reply(update: SiteUpdate, global_params: Mapping[str, np.ndarray], privacy) -> SiteUpdate:
    """What a site sends under DP: its update clipped (with ``clip_at="site"``), no losses.

    Without DP the update is returned unchanged. ``privacy`` is a
    :class:`~scfedvi.config.PrivacyConfig`. Whether the site clipped is logged at the site,
    never sent.
    """
    if not privacy.enabled:
        return update
    metrics = {k: v for k, v in update.metrics.items() if k in DP_METRIC_KEYS}
    params = dict(update.params)
    if privacy.clip_at == "site":
        keys = _float_keys(global_params)
        clipped, norm = clip_update(_delta(update.params, global_params, keys), privacy.clip_norm)
        for k in keys:
            g = np.asarray(global_params[k])
            params[k] = (np.asarray(g, np.float64) + clipped[k]).astype(np.asarray(params[k]).dtype)
        log.info(
            "site %r: update %s at the site",
            update.site,
            "clipped" if norm > privacy.clip_norm else "within the clip norm",
        )
    return replace(update, params=params, metrics=metrics)


def dp_average(
    updates: Sequence[SiteUpdate],
    global_params: Mapping[str, np.ndarray],
    *,
    clip_norm: float,
    noise_multiplier: float,
    divisor: int,
    noise: NoiseSource = secure_gaussian,
) -> tuple[Params, dict[str, float]]:
    """The noisy sum of the clipped site updates over the fixed ``divisor``, applied to
    ``global_params``.

    Parameters
    ----------
    updates
        The sites' new parameters (only their floating-point arrays are used; integer buffers
        keep the global value, since a site's step counter would reveal its size).
    clip_norm, noise_multiplier
        ``C`` and ``sigma``: the noise has standard deviation ``sigma * C / divisor``.
    divisor
        The declared number of sites (``PrivacyConfig.expected_sites``).
    noise
        ``noise(shape, std)``: the noise source; the CSPRNG sampler unless a test injects one.

    Returns
    -------
    The new parameters and diagnostics that carry no per-site value: ``dp_noise_std``,
    ``dp_divisor``, ``dp_sites``.
    """
    if not updates:
        raise ValueError("no site updates to aggregate")
    if divisor < 1:
        raise ValueError(
            f"the DP divisor (PrivacyConfig.expected_sites) must be >= 1, got {divisor}"
        )
    floats = _float_keys(global_params)
    total = {k: np.zeros(np.shape(global_params[k]), np.float64) for k in floats}
    for u in updates:
        clipped, _ = clip_update(_delta(u.params, global_params, floats), clip_norm)
        for k in floats:
            total[k] += clipped[k]
    std = noise_multiplier * clip_norm / divisor
    out: Params = {}
    for k, g in global_params.items():
        g = np.asarray(g)
        if k in total:
            step = total[k] / divisor + noise(tuple(g.shape), std)
            out[k] = (g.astype(np.float64) + step).astype(g.dtype)
        else:
            out[k] = g.copy()
    info = {
        "dp_noise_std": float(std),
        "dp_divisor": float(divisor),
        "dp_sites": float(len(updates)),
    }
    return out, info


def require_expected_sites(privacy) -> int:
    """``PrivacyConfig.expected_sites``, or a clear error when DP is on without it."""
    n = privacy.expected_sites
    if n is None:
        raise ValueError(
            "differential privacy needs PrivacyConfig.expected_sites: the number of sites the "
            "federation expects, declared before the run (the noisy sum is divided by it "
            "whatever number of sites answers); e.g. PrivacyConfig(clip_norm=..., "
            "noise_multiplier=..., expected_sites=3), or expected-sites in the Flower run config"
        )
    return int(n)
