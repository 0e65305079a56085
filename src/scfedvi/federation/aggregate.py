"""Aggregation at the server: FedAvg weighted by n_i / sum(n), batch-owned columns, server optimizers.

All functions work on ``dict[str, numpy.ndarray]`` and know nothing of runtimes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from scfedvi.train.params import Params, is_finite

log = logging.getLogger(__name__)


@dataclass
class SiteUpdate:
    """One site's answer to a training round (all of it may leave the site)."""

    site: str
    params: Params
    num_examples: int
    batch_counts: dict[int, int]
    metrics: dict[str, float] = field(default_factory=dict)
    control_delta: Params | None = None


def reject_invalid(updates: Sequence[SiteUpdate]) -> tuple[list[SiteUpdate], dict[str, str]]:
    """Drop updates with NaN or infinite values or no cells; return (kept, {site: reason})."""
    kept, rejected = [], {}
    for u in updates:
        if u.num_examples <= 0:
            rejected[u.site] = "num_examples <= 0"
        elif not is_finite(u.params):
            bad = [k for k, v in u.params.items() if not np.all(np.isfinite(v))]
            rejected[u.site] = f"non-finite values in {len(bad)} arrays (e.g. {bad[0]!r})"
        else:
            kept.append(u)
            continue
        log.warning("round update from site %r rejected: %s", u.site, rejected[u.site])
    return kept, rejected


def fedavg(
    updates: Sequence[SiteUpdate],
    global_params: Mapping[str, np.ndarray],
    batch_owned: Mapping[str, tuple[int, int]] | None = None,
    *,
    pool_variances: bool = False,
) -> Params:
    """Weighted average of the sites' parameters, weights ``n_i / sum(n)``.

    Parameters
    ----------
    updates
        The sites' new parameters with their cell counts.
    global_params
        The parameters the round started from (kept where no site holds a batch).
    batch_owned
        ``name -> (axis, first)`` of columns tied to one batch each (see
        :func:`scfedvi.train.params.batch_owned_columns`). Column ``first + b`` is averaged
        only over the sites holding batch ``b``, weighted by their cells of that batch.
    pool_variances
        Combine ``*.running_var`` with the matching ``*.running_mean`` as the variance of the
        pooled cells, ``sum_i w_i (var_i + mean_i^2) - mean^2`` (the sites' statistics), instead
        of averaging them.
    """
    if not updates:
        raise ValueError("no site updates to aggregate")
    n = np.array([u.num_examples for u in updates], dtype=np.float64)
    w = n / n.sum()
    out: Params = {}
    for k, g in global_params.items():
        arrs = [np.asarray(u.params[k]) for u in updates]
        if np.issubdtype(np.asarray(g).dtype, np.integer):
            out[k] = np.max(arrs, axis=0).astype(np.asarray(g).dtype)  # e.g. num_batches_tracked
            continue
        avg = sum(wi * a.astype(np.float64) for wi, a in zip(w, arrs, strict=True))
        out[k] = np.asarray(avg, dtype=np.asarray(g).dtype)
    if pool_variances:
        for k in [k for k in out if k.endswith("running_var")]:
            mk = k[: -len("running_var")] + "running_mean"
            means = [np.asarray(u.params[mk], np.float64) for u in updates]
            second = sum(
                wi * (np.asarray(u.params[k], np.float64) + m**2)
                for wi, u, m in zip(w, updates, means, strict=True)
            )
            pooled = np.asarray(second) - np.asarray(out[mk], np.float64) ** 2
            out[k] = np.maximum(pooled, 0.0).astype(np.asarray(global_params[k]).dtype)
    for k, (axis, first) in (batch_owned or {}).items():
        if k in out:
            out[k] = _average_batch_columns(k, axis, first, updates, global_params[k])
    return out


def _average_batch_columns(
    key: str, axis: int, first: int, updates: Sequence[SiteUpdate], current: np.ndarray
) -> np.ndarray:
    g = np.asarray(current)
    res = np.moveaxis(_weighted_all(key, updates).astype(g.dtype), axis, 0).copy()
    base = np.moveaxis(g, axis, 0)
    n_cols = base.shape[0] - first
    for b in range(n_cols):
        counts = np.array([u.batch_counts.get(b, 0) for u in updates], dtype=np.float64)
        if counts.sum() == 0:
            res[first + b] = base[first + b]  # no site holds this batch: unchanged
            continue
        wb = counts / counts.sum()
        cols = [np.moveaxis(np.asarray(u.params[key]), axis, 0)[first + b] for u in updates]
        res[first + b] = sum(wi * c.astype(np.float64) for wi, c in zip(wb, cols, strict=True))
    return np.moveaxis(res, 0, axis)


def _weighted_all(key: str, updates: Sequence[SiteUpdate]) -> np.ndarray:
    n = np.array([u.num_examples for u in updates], dtype=np.float64)
    w = n / n.sum()
    return np.asarray(
        sum(wi * np.asarray(u.params[key], np.float64) for wi, u in zip(w, updates, strict=True))
    )


@dataclass
class ServerOptimizer:
    """Applies the averaged update to the global model: FedAvg, FedAvgM or FedAdam.

    ``fedavg`` sets the global model to the average. The others treat ``avg - global`` as a
    pseudo-gradient (Reddi et al. 2021): momentum (``fedavgm``) or Adam (``fedadam``, with
    ``tau`` as its epsilon). Integer buffers are always taken from the average.
    """

    kind: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    state: dict[str, Params] = field(default_factory=dict)
    t: int = 0

    def step(
        self, global_params: Mapping[str, np.ndarray], average: Mapping[str, np.ndarray]
    ) -> Params:
        if self.kind == "fedavg":
            return {k: np.asarray(v).copy() for k, v in average.items()}
        self.t += 1
        m = self.state.setdefault("m", {})
        v = self.state.setdefault("v", {})
        out: Params = {}
        for k, g in global_params.items():
            g = np.asarray(g)
            if not np.issubdtype(g.dtype, np.floating):
                out[k] = np.asarray(average[k]).copy()
                continue
            delta = np.asarray(average[k], np.float64) - g
            m[k] = self.momentum * m.get(k, 0.0) + (
                delta if self.kind == "fedavgm" else (1 - self.momentum) * delta
            )
            if self.kind == "fedavgm":
                step = m[k]
            else:
                v[k] = self.beta2 * v.get(k, 0.0) + (1 - self.beta2) * delta**2
                step = m[k] / (np.sqrt(v[k]) + self.tau)
            out[k] = (g + self.lr * step).astype(g.dtype)
        return out

    def state_arrays(self) -> Params:
        out = {f"{s}/{k}": np.asarray(a) for s, d in self.state.items() for k, a in d.items()}
        out["__t__"] = np.asarray(self.t)
        return out

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.state = {}
        for key, a in arrays.items():
            if key == "__t__":
                self.t = int(a)
                continue
            s, k = key.split("/", 1)
            self.state.setdefault(s, {})[k] = np.asarray(a)
