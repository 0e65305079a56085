"""k-nearest-neighbour graphs, computed once and shared by every metric.

The graph excludes each cell itself, as harmonypy's LISI does: a cell's exact duplicates (other
cells at distance 0) are neighbours like any other, and the self is removed by its index, not by
its position in the sorted list. Exact search uses :class:`scipy.spatial.cKDTree` (fast in the
low dimensions of a latent space); approximate search uses pynndescent (an optional extra) for
large, high-dimensional inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy.spatial import cKDTree

if TYPE_CHECKING:  # pragma: no cover
    from scib_metrics.nearest_neighbors import NeighborsResults

KnnMethod = Literal["auto", "exact", "approx"]

#: With ``method="auto"``, approximate search is used above this many cells ...
APPROX_MIN_CELLS = 50_000
#: ... and only for more dimensions than this: on 100,000 cells (2 cores) a kd-tree takes 5 s
#: in 10-D and 23 s in 30-D (pynndescent 17 s and 45 s), but 207 s in 50-D (pynndescent 91 s).
APPROX_MIN_DIMS = 30
#: ... or above this many cells in any dimension: a kd-tree's cost grows with how mixed the
#: cells are, and an integrated latent space is mixed. On 100,000 cells in 10-D (2 shared
#: cores, benchmarks/bench_scale.py) it took 412 s for scFedVI's well-mixed embedding against
#: 34 s for a clustered one; at 10^6 cells exact search would take hours.
APPROX_ALWAYS_CELLS = 200_000


@dataclass(frozen=True)
class Neighbors:
    """The k nearest neighbours of every cell, the cell itself excluded.

    Attributes
    ----------
    indices
        ``(n_cells, k)`` integer array: row ``i`` lists the neighbours of cell ``i`` in order of
        increasing distance; ``i`` itself never appears.
    distances
        ``(n_cells, k)`` float array of Euclidean distances matching ``indices``.
    """

    indices: np.ndarray
    distances: np.ndarray

    def __post_init__(self) -> None:
        if self.indices.ndim != 2 or self.indices.shape != self.distances.shape:
            raise ValueError(
                "Neighbors: indices and distances must be 2-D arrays of the same shape, "
                f"got {self.indices.shape} and {self.distances.shape}"
            )

    @property
    def n_cells(self) -> int:
        """Number of cells (rows)."""
        return int(self.indices.shape[0])

    @property
    def n_neighbors(self) -> int:
        """Number of neighbours per cell (columns), the cell itself excluded."""
        return int(self.indices.shape[1])

    def subset(self, k: int) -> Neighbors:
        """Keep the ``k`` nearest neighbours of each cell.

        Parameters
        ----------
        k
            Number of neighbours to keep, at most :attr:`n_neighbors`.
        """
        if not 1 <= k <= self.n_neighbors:
            raise ValueError(f"k must be in [1, {self.n_neighbors}], got {k}")
        return Neighbors(indices=self.indices[:, :k], distances=self.distances[:, :k])

    def to_scib(self) -> NeighborsResults:
        """Convert to scib-metrics' ``NeighborsResults``.

        scib-metrics expects the cell itself in the first column (distance 0) and derives the
        perplexity from the column count (``floor(columns / 3)``), so the result has ``k + 1``
        columns: with ``k = 90`` its LISI uses perplexity 30 over the same 90 neighbours as
        harmonypy.

        Returns
        -------
        scib_metrics.nearest_neighbors.NeighborsResults
            Requires the ``benchmark`` extra (``pip install scfedvi[benchmark]``).
        """
        from scfedvi.metrics._optional import import_scib_metrics

        import_scib_metrics()
        from scib_metrics.nearest_neighbors import NeighborsResults

        rows = np.arange(self.n_cells, dtype=self.indices.dtype)[:, None]
        indices = np.hstack([rows, self.indices])
        distances = np.hstack([np.zeros((self.n_cells, 1), self.distances.dtype), self.distances])
        return NeighborsResults(indices=indices, distances=distances)


def _drop_self(indices: np.ndarray, distances: np.ndarray) -> Neighbors:
    """Remove each row's own index from ``k + 1`` candidates, leaving ``k`` neighbours.

    A row that does not contain its own index (more than ``k`` exact duplicates) loses its last,
    farthest candidate instead.
    """
    n, k1 = indices.shape
    drop = indices == np.arange(n)[:, None]
    drop[~drop.any(axis=1), -1] = True
    first = np.argmax(drop, axis=1)  # one column per row: the first match
    drop = np.zeros_like(drop)
    drop[np.arange(n), first] = True
    keep = ~drop
    return Neighbors(
        indices=indices[keep].reshape(n, k1 - 1).astype(np.int64, copy=False),
        distances=distances[keep].reshape(n, k1 - 1).astype(np.float64, copy=False),
    )


def _exact(X: np.ndarray, k: int, n_jobs: int) -> Neighbors:
    tree = cKDTree(X)
    distances, indices = tree.query(X, k=k + 1, workers=n_jobs)
    return _drop_self(np.asarray(indices), np.asarray(distances))


def _approx(X: np.ndarray, k: int, seed: int, n_jobs: int) -> Neighbors:
    from pynndescent import NNDescent

    n = X.shape[0]
    # The settings scanpy and scib-metrics use (after umap).
    index: Any = NNDescent(
        X,
        n_neighbors=k + 1,
        random_state=seed,
        n_jobs=n_jobs,
        low_memory=True,
        compressed=False,
        n_trees=min(64, 5 + round(n**0.5 / 20.0)),
        n_iters=max(5, round(np.log2(n))),
        max_candidates=60,
    )
    indices, distances = index.neighbor_graph
    return _drop_self(np.asarray(indices), np.asarray(distances))


def _pynndescent_available() -> bool:
    try:
        import pynndescent  # noqa: F401
    except ImportError:
        return False
    return True


def compute_neighbors(
    X: np.ndarray,
    k: int = 90,
    *,
    method: KnnMethod = "auto",
    seed: int = 0,
    n_jobs: int = -1,
) -> Neighbors:
    """Find the ``k`` nearest neighbours (Euclidean) of every row of ``X``, itself excluded.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    k
        Number of neighbours. 90 is what LISI with perplexity 30 uses. With fewer than ``k + 1``
        cells, every other cell is a neighbour (``k = n_cells - 1``), as in harmonypy.
    method
        ``"exact"`` uses a kd-tree; ``"approx"`` uses pynndescent (falls back to exact when
        pynndescent is not installed); ``"auto"`` uses approximate search for more than
        :data:`APPROX_MIN_CELLS` cells in more than :data:`APPROX_MIN_DIMS` dimensions, and
        for more than :data:`APPROX_ALWAYS_CELLS` cells in any.
    seed
        Random seed of the approximate search.
    n_jobs
        Worker threads (``-1``: all cores).

    Returns
    -------
    Neighbors
        Indices and distances, each ``(n_cells, min(k, n_cells - 1))``, nearest first.
    """
    X = np.ascontiguousarray(np.asarray(X, dtype=np.float64))
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (cells x dimensions), got shape {X.shape}")
    n = X.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 cells to find neighbours, got {n}")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values; remove or impute those cells")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if method not in ("auto", "exact", "approx"):
        raise ValueError(f"method must be 'auto', 'exact' or 'approx', got {method!r}")
    k = min(k, n - 1)
    use_approx = method == "approx" or (
        method == "auto"
        and (n > APPROX_ALWAYS_CELLS or (n > APPROX_MIN_CELLS and X.shape[1] > APPROX_MIN_DIMS))
    )
    if use_approx and _pynndescent_available():
        return _approx(X, k, seed, n_jobs)
    return _exact(X, k, n_jobs)
