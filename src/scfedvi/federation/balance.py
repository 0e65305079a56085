"""Composition-balanced site statistics: the embedding step against the site-local trap.

With site-local BatchNorm statistics, each site is centred on its own mix of cell types. A site
whose mix differs from the others' (on cortex, one site is 74% one class) then has its cell
types moved towards the federation's average cell. Balancing recomputes each site's statistics
on a resample of its own cells weighted to the *federation's* composition of latent clusters:

1. each site embeds its cells (its own statistics), runs k-means on them and sends its
   centroids with their counts; the coordinator runs weighted k-means on those to start;
2. ``rounds`` Lloyd rounds: the coordinator sends the centroids, each site sends its cells'
   per-cluster sums and counts; the last round's counts give the federation's composition;
3. each site weights its cells by the cluster's federation share over its own share,
   recomputes its statistics on a weighted resample of its cells, and embeds them again.
   Steps 1-3 repeat ``iterations`` times, each time on the balanced embedding.

The result is a list of :class:`BalanceStep` (centroids and composition), saved with the
model: any site, also one that did not train, applies them to its own cells alone
(:func:`balanced_statistics`), so every site embeds the same way.

What leaves a site: centroids and sums of clusters that hold at least
:data:`MIN_CLUSTER_CELLS` of its cells (smaller clusters send only their count), and counts;
no cell and no count matrix. The trained weights do not change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.config import RunConfig
    from scfedvi.federation.site import SiteWorker
    from scfedvi.module.vae import VAE
    from scfedvi.train.local import SiteTensors

log = logging.getLogger(__name__)

#: A site sends a cluster's centroid or sum only if that many of its cells are in it.
MIN_CLUSTER_CELLS = 10
#: The weighted resample a site computes its statistics on holds this many times its cells.
OVERSAMPLE = 4
#: Seed of each site's weighted resample.
RESAMPLE_SEED = 0
#: Lloyd iterations of a site's own k-means and of the coordinator's start (step 1).
LOCAL_KMEANS_ITERATIONS = 50
#: k-means++ starts of each of them (the best is kept: results vary less with the seed).
N_INIT = 5


@dataclass(frozen=True)
class BalanceStep:
    """One balancing pass: the federation's cluster centroids and their shares of its cells."""

    centroids: np.ndarray  # (k, n_latent), float64
    composition: np.ndarray  # (k,), sums to 1, every share > 0


def steps_to_arrays(steps: Sequence[BalanceStep]) -> dict[str, np.ndarray]:
    """Flat named arrays (for ``.npz`` files and Flower records)."""
    out = {}
    for i, s in enumerate(steps):
        out[f"balance.{i}.centroids"] = np.asarray(s.centroids, dtype=np.float64)
        out[f"balance.{i}.composition"] = np.asarray(s.composition, dtype=np.float64)
    return out


def steps_from_arrays(arrays: dict[str, np.ndarray]) -> list[BalanceStep]:
    """The inverse of :func:`steps_to_arrays` (other keys are ignored)."""
    steps: list[BalanceStep] = []
    while f"balance.{len(steps)}.centroids" in arrays:
        i = len(steps)
        c = np.asarray(arrays[f"balance.{i}.centroids"], dtype=np.float64)
        p = np.asarray(arrays[f"balance.{i}.composition"], dtype=np.float64)
        if c.ndim != 2 or p.shape != (len(c),):
            raise ValueError(f"balance step {i}: centroids {c.shape} and composition {p.shape}")
        steps.append(BalanceStep(c, p))
    return steps


# -- at a site -------------------------------------------------------------------------------
def assign(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each row's nearest centroid."""
    z = np.asarray(z, dtype=np.float64)
    d = (z * z).sum(1)[:, None] - 2 * z @ centroids.T + (centroids * centroids).sum(1)[None]
    return d.argmin(1)


def _kmeans(
    x: np.ndarray, w: np.ndarray, k: int, seed: int, iters: int, n_init: int = 1
) -> np.ndarray:
    """Weighted k-means on the rows of ``x``: the centroids of the best (lowest weighted
    inertia) of ``n_init`` k-means++ starts."""
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        chosen = [x[rng.choice(len(x), p=w / w.sum())]]
        for _ in range(1, k):
            d = np.min(((x[:, None, :] - np.asarray(chosen)[None]) ** 2).sum(-1), axis=1) * w
            chosen.append(
                x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))]
            )
        c = np.asarray(chosen, dtype=np.float64)
        for _ in range(iters):
            a = assign(x, c)
            for j in range(k):
                m = a == j
                if m.any():
                    c[j] = np.average(x[m], axis=0, weights=w[m])
        inertia = float((((x - c[assign(x, c)]) ** 2).sum(1) * w).sum())
        if inertia < best_inertia:
            best, best_inertia = c, inertia
    assert best is not None
    return best


def local_centroids(z: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 at a site: its own k-means centroids and counts, clusters of at least
    :data:`MIN_CLUSTER_CELLS` cells only (``(0, d)`` if none)."""
    z = np.asarray(z, dtype=np.float64)
    c = _kmeans(z, np.ones(len(z)), k, seed, LOCAL_KMEANS_ITERATIONS, N_INIT)
    n = np.bincount(assign(z, c), minlength=len(c))
    keep = n >= MIN_CLUSTER_CELLS
    return c[keep], n[keep].astype(np.int64)


def site_seed(seed: int, n_steps: int, index: int) -> int:
    """The seed of a site's own k-means: the run's, the pass and the site's place in the
    federation's sites sorted by name (each site starts differently)."""
    return seed + 1000 * n_steps + index


def cluster_sums(z: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 at a site: per-cluster sums of its cells (zero for clusters of fewer than
    :data:`MIN_CLUSTER_CELLS` of them) and per-cluster counts (all)."""
    z = np.asarray(z, dtype=np.float64)
    a = assign(z, centroids)
    counts = np.bincount(a, minlength=len(centroids)).astype(np.int64)
    sums = np.zeros_like(centroids, dtype=np.float64)
    np.add.at(sums, a, z)
    sums[counts < MIN_CLUSTER_CELLS] = 0.0
    return sums, counts


def resample_weights(groups: np.ndarray, composition: np.ndarray) -> np.ndarray:
    """Each cell's weight: its group's federation share over its share at the site."""
    local = np.bincount(groups, minlength=len(composition)) / len(groups)
    w = composition[groups] / local[groups]
    return w if w.sum() > 0 else np.ones(len(groups))


def balanced_statistics(
    module: VAE,
    data: SiteTensors,
    steps: Sequence[BalanceStep],
    *,
    z: np.ndarray | None = None,
) -> np.ndarray:
    """Apply balancing steps at a site: recompute its statistics, embed again; the embedding.

    ``module`` holds the global weights with the site's own statistics (and ``z`` its cells'
    embedding with them, computed here if not given); it ends with the balanced statistics.
    """
    from scfedvi.train.local import SiteTensors, calibrate_norm_stats, embed

    if z is None:
        z = embed(module, data)
    for step in steps:
        w = resample_weights(assign(z, step.centroids), step.composition)
        rng = np.random.default_rng(RESAMPLE_SEED)
        idx = rng.choice(len(w), size=OVERSAMPLE * len(w), replace=True, p=w / w.sum())
        calibrate_norm_stats(module, SiteTensors(data.X[idx], data.batch_index[idx]))
        z = embed(module, data)
    return z


# -- at the coordinator ----------------------------------------------------------------------
def start_centroids(
    replies: Sequence[tuple[np.ndarray, np.ndarray]], k: int, seed: int
) -> np.ndarray | None:
    """Weighted k-means over the sites' own centroids (step 1); ``None`` if no site has a
    cluster of :data:`MIN_CLUSTER_CELLS` cells."""
    points = np.concatenate([np.asarray(c, dtype=np.float64) for c, _ in replies])
    counts = np.concatenate([np.asarray(n, dtype=np.float64) for _, n in replies])
    if len(points) == 0:
        return None
    return _kmeans(points, counts, k, seed, LOCAL_KMEANS_ITERATIONS, N_INIT)


def _total(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The sum in the given (site) order: the same floating-point result in every runtime."""
    out = np.array(arrays[0], dtype=np.float64)
    for a in arrays[1:]:
        out += a
    return out


def lloyd_update(
    centroids: np.ndarray, replies: Sequence[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """The centroids from the sites' sums and counts (clusters without a sum keep theirs)."""
    sums = _total([np.asarray(s, dtype=np.float64) for s, _ in replies])
    summed = _total([np.where(np.asarray(n) >= MIN_CLUSTER_CELLS, n, 0) for _, n in replies])
    out = centroids.copy()
    live = summed > 0
    out[live] = sums[live] / summed[live, None]
    return out


#: ``ask(phase, steps, centroids)``: every site's reply, in a fixed site order.
Ask = Callable[[str, list[BalanceStep], np.ndarray | None], list[tuple[np.ndarray, np.ndarray]]]
CENTROIDS, SUMS = "centroids", "sums"


def run_balance(
    ask: Ask, n_clusters: int, iterations: int, rounds: int, seed: int
) -> list[BalanceStep]:
    """The coordinator's side of balancing, the same in every runtime.

    ``ask(CENTROIDS, steps, None)`` gets each site's :func:`local_centroids` of its cells
    embedded with ``steps``; ``ask(SUMS, steps, centroids)`` their :func:`cluster_sums`.
    """
    if n_clusters < 1 or iterations < 1 or rounds < 1:
        raise ValueError(
            f"balancing: n_clusters={n_clusters}, iterations={iterations}, rounds={rounds}: "
            "use 1 or more"
        )
    steps: list[BalanceStep] = []
    for it in range(iterations):
        start = start_centroids(ask(CENTROIDS, steps, None), n_clusters, seed + it)
        if start is None:
            log.warning(
                "balancing: no site has a cluster of %d cells or more; the sites are too small "
                "to balance, so each embeds with its own statistics after %d balancing passes",
                MIN_CLUSTER_CELLS,
                len(steps),
            )
            return steps
        centroids = start
        for r in range(rounds):
            replies = ask(SUMS, steps, centroids)
            if r < rounds - 1:
                centroids = lloyd_update(centroids, replies)
        counts = _total([np.asarray(n, dtype=np.float64) for _, n in replies])
        live = counts > 0
        steps.append(BalanceStep(centroids[live], counts[live] / counts.sum()))
    return steps


def balance_in_process(
    workers: Sequence[SiteWorker], params: dict[str, np.ndarray], config: RunConfig
) -> list[BalanceStep]:
    """:func:`run_balance` over site workers in one process (the Flower app's algorithm and
    site order: sorted by name); each site embeds once per pass."""
    k, fc = config.balance_clusters, config.federation
    if not k:
        return []
    workers = sorted(workers, key=lambda w: w.name)
    cache: dict[int, list[np.ndarray]] = {}

    def ask(phase: str, steps: list[BalanceStep], centroids: np.ndarray | None) -> list:
        if len(steps) not in cache:
            cache.clear()
            cache[len(steps)] = [w.embed(params, steps) for w in workers]
        zs = cache[len(steps)]
        if phase == CENTROIDS:
            return [
                local_centroids(z, k, site_seed(fc.seed, len(steps), i)) for i, z in enumerate(zs)
            ]
        return [cluster_sums(z, centroids) for z in zs]  # type: ignore[arg-type]

    return run_balance(ask, k, fc.balance_iterations, fc.balance_rounds, fc.seed)
