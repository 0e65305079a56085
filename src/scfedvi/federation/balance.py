"""Composition-balanced site statistics: the embedding step against the site-local trap.

With site-local BatchNorm statistics, each site is centred on its own mix of cell types. A site
whose mix differs from the others' (on cortex, one site is 74% one class) then has its cell
types moved towards the federation's average cell. Balancing recomputes each site's statistics
on a resample of its own cells weighted to the *federation's* composition of latent clusters.
Each pass takes two message rounds:

1. each site embeds its cells (its own statistics) and summarises them as a few dozen local
   k-means centroids (:data:`LOCAL_PER_CLUSTER` per global cluster), each the mean of at least
   ``min_cluster_cells`` of its cells (smaller local clusters are merged into their nearest
   kept one), with their counts (:func:`local_summary`); the coordinator runs weighted k-means
   on all sites' local centroids to get the ``k`` global centroids;
2. ``rounds`` rounds (default 1): the coordinator sends the centroids, each site sends its
   cells' per-cluster sums and counts (:func:`cluster_sums`); the sums give the pass's
   centroids (a Lloyd update) and the counts the federation's composition;
3. each site weights its cells by the cluster's federation share over its own share,
   recomputes its statistics on a weighted resample of its cells, and embeds them again.
   Steps 1-3 repeat ``iterations`` times, each time on the balanced embedding.

The result is a list of :class:`BalanceStep` (centroids and composition), saved with the
model: any site, also one that did not train, applies them to its own cells alone
(:func:`balanced_statistics`), so every site embeds the same way.

What leaves a site: centroids and sums of clusters that hold at least ``min_cluster_cells``
of its cells (smaller clusters send only their count), and counts; no cell and no count
matrix. A site answers only within its own :class:`~scfedvi.config.SitePolicy` and query
budget, in one function both runtimes call (:mod:`scfedvi.federation.balance_site`). The
trained weights do not change.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.config import RunConfig
    from scfedvi.federation.site import SiteWorker
    from scfedvi.module.vae import VAE
    from scfedvi.train.local import SiteTensors

log = logging.getLogger(__name__)

#: The default fewest cells behind a centroid or sum a site sends (its policy may ask more).
MIN_CLUSTER_CELLS = 10
#: A site's summary (step 1) holds up to this many local centroids per global cluster.
LOCAL_PER_CLUSTER = 4
#: The weighted resample a site computes its statistics on holds this many times its cells.
OVERSAMPLE = 4
#: Seed of each site's weighted resample.
RESAMPLE_SEED = 0
#: Lloyd iterations of a site's own k-means and of the coordinator's (step 1).
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


# -- at a site (numpy only; the policy-checked entry point is balance_site.answer) ----------
def assign(z: np.ndarray, centroids: np.ndarray, zz: np.ndarray | None = None) -> np.ndarray:
    """Each row's nearest centroid (``zz``: the rows' squared norms, if computed already)."""
    z = np.asarray(z, dtype=np.float64)
    if zz is None:
        zz = (z * z).sum(1)
    d = zz[:, None] - 2 * z @ centroids.T + (centroids * centroids).sum(1)[None]
    return d.argmin(1)


def _cluster_sums(a: np.ndarray, xw: np.ndarray, k: int) -> np.ndarray:
    """Per-cluster sums of the rows of ``xw`` (each column in row order, as ``np.add.at``
    adds them, so the same floating-point sums, but several times faster)."""
    cols = [np.bincount(a, weights=xw[:, j], minlength=k) for j in range(xw.shape[1])]
    return np.stack(cols, axis=1) if cols else np.zeros((k, 0))


def weighted_kmeans(
    x: np.ndarray, w: np.ndarray, k: int, seed: int, iters: int, n_init: int = 1
) -> np.ndarray:
    """Weighted k-means on the rows of ``x``: the centroids of the best (lowest weighted
    inertia) of ``n_init`` k-means++ starts."""
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    best, best_inertia = None, np.inf
    xx = (x * x).sum(1)
    for _ in range(n_init):
        chosen = [x[rng.choice(len(x), p=w / w.sum())]]
        near = ((x - chosen[0]) ** 2).sum(-1)  # each row's squared distance to its nearest
        for _ in range(1, k):
            d = near * w
            chosen.append(
                x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))]
            )
            near = np.minimum(near, ((x - chosen[-1]) ** 2).sum(-1))
        c = np.asarray(chosen, dtype=np.float64)
        xw, prev = x * w[:, None], None
        for _ in range(iters):
            a = assign(x, c, xx)
            if prev is not None and np.array_equal(a, prev):
                break  # a fixed point: the centroids would not move
            prev = a
            sums, mass = _cluster_sums(a, xw, len(c)), np.bincount(a, weights=w, minlength=k)
            live = mass > 0
            c[live] = sums[live] / mass[live, None]
        inertia = float((((x - c[assign(x, c, xx)]) ** 2).sum(1) * w).sum())
        if inertia < best_inertia:
            best, best_inertia = c, inertia
    assert best is not None
    return best


def local_summary(
    z: np.ndarray, n_local: int, seed: int, min_cells: int = MIN_CLUSTER_CELLS
) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 at a site: up to ``n_local`` k-means centroids of its cells with their counts.

    Every centroid sent is the exact mean of the ``count >= min_cells`` cells it stands for;
    a smaller local cluster is dropped and its cells go to their nearest kept centroid (so the
    counts add up to the site's cells). ``(0, d)`` if the site has fewer than ``min_cells``.
    """
    z = np.asarray(z, dtype=np.float64)
    if len(z) < max(min_cells, 1):
        return np.zeros((0, z.shape[1])), np.zeros(0, dtype=np.int64)
    c = weighted_kmeans(z, np.ones(len(z)), n_local, seed, LOCAL_KMEANS_ITERATIONS, N_INIT)
    while True:  # drop the smallest cluster until every one holds min_cells cells
        a = assign(z, c)
        n = np.bincount(a, minlength=len(c))
        if n.min() >= min_cells:
            break
        c = np.delete(c, int(n.argmin()), axis=0)
    sums = np.zeros_like(c)
    np.add.at(sums, a, z)
    return sums / n[:, None], n.astype(np.int64)


def local_centroids(
    z: np.ndarray, k: int, seed: int, min_cells: int = MIN_CLUSTER_CELLS
) -> tuple[np.ndarray, np.ndarray]:
    """The protocol before 2026-12 (step 1 of 1 + 10 message rounds): a site's own ``k``
    k-means centroids and counts, clusters of at least ``min_cells`` cells only (``(0, d)``
    if none). Kept for ``benchmarks/balanced_stats.py --old``."""
    z = np.asarray(z, dtype=np.float64)
    c = weighted_kmeans(z, np.ones(len(z)), k, seed, LOCAL_KMEANS_ITERATIONS, N_INIT)
    n = np.bincount(assign(z, c), minlength=len(c))
    keep = n >= min_cells
    return c[keep], n[keep].astype(np.int64)


def site_seed(seed: int, n_steps: int, index: int) -> int:
    """The seed of a site's own k-means: the run's, the pass and the site's place in the
    federation's sites sorted by name (each site starts differently)."""
    return seed + 1000 * n_steps + index


def site_seeds(seed: int, n_steps: int, sites: Iterable[str]) -> dict[str, int]:
    """Every site's :func:`site_seed`, each placed among ``sites`` sorted by name (the rule
    both runtimes use: the seeds do not depend on the order the sites answer in)."""
    return {s: site_seed(seed, n_steps, i) for i, s in enumerate(sorted(sites))}


def cluster_sums(
    z: np.ndarray, centroids: np.ndarray, min_cells: int = MIN_CLUSTER_CELLS
) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 at a site: per-cluster sums of its cells (zero for clusters of fewer than
    ``min_cells`` of them) and per-cluster counts (all)."""
    z = np.asarray(z, dtype=np.float64)
    a = assign(z, centroids)
    counts = np.bincount(a, minlength=len(centroids)).astype(np.int64)
    sums = np.zeros_like(centroids, dtype=np.float64)
    np.add.at(sums, a, z)
    sums[counts < min_cells] = 0.0
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
    from scfedvi.train.local import calibrate_norm_stats, embed

    if z is None:
        z = embed(module, data)
    for step in steps:
        w = resample_weights(assign(z, step.centroids), step.composition)
        rng = np.random.default_rng(RESAMPLE_SEED)
        idx = rng.choice(len(w), size=OVERSAMPLE * len(w), replace=True, p=w / w.sum())
        calibrate_norm_stats(module, _resample(data, idx))
        z = embed(module, data)
    return z


@functools.cache
def _resample_class() -> type:
    from scfedvi.train.local import SiteTensors  # torch: imported where a site embeds

    class Resample(SiteTensors):
        """Rows ``rows`` of a site's cells (repeats allowed), read a minibatch at a time: the
        same minibatches as ``SiteTensors(data.X[rows], ...)`` without copying the rows
        (``OVERSAMPLE`` times the site's counts)."""

        def __init__(self, data: SiteTensors, rows: np.ndarray) -> None:  # no copy, no checks
            self.X, self.batch_index, self._log_factorial = data.X, data.batch_index, None
            self.rows = np.asarray(rows, dtype=np.int64)

        @property
        def n_cells(self) -> int:
            return len(self.rows)

        def minibatch_indices(self, batch_size, rng, *, drop_small=True, cells=None):
            cells = self.rows if cells is None else self.rows[np.asarray(cells)]
            return super().minibatch_indices(batch_size, rng, drop_small=drop_small, cells=cells)

    return Resample


def _resample(data: SiteTensors, rows: np.ndarray) -> SiteTensors:
    """The site's cells ``rows`` as training data that reads them from ``data`` in place."""
    return _resample_class()(data, rows)


# -- at the coordinator ----------------------------------------------------------------------
def start_centroids(
    replies: Sequence[tuple[np.ndarray, np.ndarray]], k: int, seed: int
) -> np.ndarray | None:
    """Weighted k-means over the sites' local centroids (step 1); ``None`` if no site sent
    one."""
    points = np.concatenate([np.asarray(c, dtype=np.float64) for c, _ in replies])
    counts = np.concatenate([np.asarray(n, dtype=np.float64) for _, n in replies])
    if len(points) == 0:
        return None
    return weighted_kmeans(points, counts, k, seed, LOCAL_KMEANS_ITERATIONS, N_INIT)


def _total(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The sum in the given (site) order: the same floating-point result in every runtime."""
    out = np.array(arrays[0], dtype=np.float64)
    for a in arrays[1:]:
        out += a
    return out


def lloyd_update(
    centroids: np.ndarray, replies: Sequence[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """The centroids from the sites' sums and counts. A site's count enters a cluster's mean
    only where it sent that cluster's sum (a row that is not all zero: the site's policy may
    hold back sums of more than 10 cells); clusters without a sum keep their centroid."""
    sums = _total([np.asarray(s, dtype=np.float64) for s, _ in replies])
    summed = _total([np.where(np.any(np.asarray(s) != 0, axis=1), n, 0) for s, n in replies])
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
    """The coordinator's side of balancing, the same in every runtime: ``1 + rounds``
    message rounds per pass.

    ``ask(CENTROIDS, steps, None)`` gets each site's :func:`local_summary` of its cells
    embedded with ``steps``; ``ask(SUMS, steps, centroids)`` their :func:`cluster_sums`. Each
    sums round moves the centroids to the means it reports; the last one's counts are the
    pass's composition.
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
        for _ in range(rounds):
            replies = ask(SUMS, steps, centroids)
            counts = _total([np.asarray(n, dtype=np.float64) for _, n in replies])
            centroids = lloyd_update(centroids, replies)
        live = counts > 0
        steps.append(BalanceStep(centroids[live], counts[live] / counts.sum()))
    return steps


def balance_in_process(
    workers: Sequence[SiteWorker], params: dict[str, np.ndarray], config: RunConfig
) -> list[BalanceStep]:
    """:func:`run_balance` over site workers in one process (the Flower app's algorithm and
    site order: sorted by name); each site embeds once per pass and answers through
    :func:`scfedvi.federation.balance_site.answer` under its own policy (``worker.policy``)
    and a fresh query budget. As over Flower, a site that refuses is left out of the rest of
    the balancing, with a warning."""
    from scfedvi.federation.balance_site import answer, new_ledger
    from scfedvi.privacy.policy import PolicyRefusal

    k, fc = config.balance_clusters, config.federation
    if not k:
        return []
    workers = sorted(workers, key=lambda w: w.name)
    names = [w.name for w in workers]
    ledger, failed = new_ledger(), {}
    cache: dict[int, dict[str, np.ndarray]] = {}

    def ask(phase: str, steps: list[BalanceStep], centroids: np.ndarray | None) -> list:
        live = [w for w in workers if w.name not in failed]
        if len(steps) not in cache:
            cache.clear()
            cache[len(steps)] = {w.name: w.embed(params, steps) for w in live}
        replies = []
        for w in live:
            try:
                replies.append(
                    answer(
                        w.name,
                        cache[len(steps)][w.name],
                        config,
                        phase=phase,
                        n_clusters=k,
                        seed=site_seeds(fc.seed, len(steps), names)[w.name],
                        n_steps=len(steps),
                        centroids=centroids,
                        ledger=ledger,
                        policy=w.policy,
                    )
                )
            except PolicyRefusal as e:
                failed[w.name] = str(e)
                log.warning("balancing: site %r dropped: %s", w.name, e)
        if not replies:
            raise RuntimeError(f"balancing: no site answered ({failed})")
        return replies

    return run_balance(ask, k, fc.balance_iterations, fc.balance_rounds, fc.seed)
