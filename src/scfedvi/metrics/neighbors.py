"""k-nearest-neighbour graphs, computed once and shared by every metric.

The graph excludes each cell itself, as harmonypy's LISI does: a cell's exact duplicates (other
cells at distance 0) are neighbours like any other, and the self is removed by its index, not by
its position in the sorted list. Exact search uses :class:`scipy.spatial.cKDTree` (fast in the
low dimensions of a latent space); approximate search, for large inputs, uses faiss' inverted
lists (``IndexIVFFlat``, the ``faiss-cpu`` optional extra) or, without faiss, pynndescent.
Approximate search chooses which cells are neighbours; their distances are then recomputed
exactly (float64), so LISI's kernel sees the same distances as with exact search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy.spatial import cKDTree

if TYPE_CHECKING:  # pragma: no cover
    from scib_metrics.nearest_neighbors import NeighborsResults

KnnMethod = Literal["auto", "exact", "approx"]
ApproxBackend = Literal["auto", "faiss", "pynndescent"]

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
#: faiss' inverted lists: about this many cells per list (``n_list = n_cells / 80``) ...
IVF_CELLS_PER_LIST = 80
#: ... and the lists searched per cell: with 90 neighbours, 32 lists of 80 cells (about 2,600
#: candidates) found 99% of the exact neighbours on 10^5 cells (benchmarks/bench_lisi.py data).
IVF_NPROBE = 32
#: Cells per list the list centroids are trained on (a seeded subsample).
IVF_TRAIN_PER_LIST = 40


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


def _drop_self(
    indices: np.ndarray, distances: np.ndarray, own: np.ndarray | None = None
) -> Neighbors:
    """Remove each row's own index from ``k + 1`` candidates, leaving ``k`` neighbours.

    A row that does not contain its own index (more than ``k`` exact duplicates) loses its last,
    farthest candidate instead. ``own``: each row's cell (default: the row number).
    """
    n, k1 = indices.shape
    own = np.arange(n) if own is None else np.asarray(own)
    drop = indices == own[:, None]
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


def _exact_distances(X: np.ndarray, indices: np.ndarray, block: int = 65_536) -> np.ndarray:
    """Euclidean distances (float64) from each row of ``X`` to its listed neighbours."""
    out = np.empty(indices.shape, dtype=np.float64)
    for r0 in range(0, X.shape[0], block):
        r1 = min(r0 + block, X.shape[0])
        diff = X[indices[r0:r1]] - X[r0:r1, None, :]
        out[r0:r1] = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
    return out


def _ivf(X: np.ndarray, k: int, seed: int, n_jobs: int) -> Neighbors:
    """Approximate neighbours from faiss' inverted lists, distances recomputed exactly.

    The list centroids are k-means centroids of a seeded subsample; each cell is searched in
    the :data:`IVF_NPROBE` lists nearest to it, the cells taken in the order of their list
    (consecutive searches share lists: cache-friendly). Rows are sorted by the exact
    distances; deterministic for a given seed and thread count.
    """
    import faiss

    n, d = X.shape
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    n_list = max(1, min(n // IVF_CELLS_PER_LIST, n // 2))
    threads = faiss.omp_get_max_threads()
    if n_jobs > 0:
        faiss.omp_set_num_threads(n_jobs)
    try:
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, n_list)
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # (the subsample is chosen below)
        rng = np.random.default_rng(seed)
        n_train = min(n, IVF_TRAIN_PER_LIST * n_list)
        train = X32 if n_train == n else X32[np.sort(rng.choice(n, n_train, replace=False))]
        index.train(train)
        del train
        index.add(X32)
        _, lists = quantizer.search(X32, 1)
        order = np.argsort(lists[:, 0], kind="stable")
        del lists
        index.nprobe = min(IVF_NPROBE, n_list)
        _, found = index.search(X32[order], min(k + 1, n))
    finally:
        faiss.omp_set_num_threads(threads)
    indices = np.empty_like(found)
    indices[order] = found
    del found
    # the lists searched can hold fewer than k + 1 cells (-1 in the row): those rows exactly
    short = np.flatnonzero((indices < 0).any(axis=1))
    if short.size:
        _, indices[short] = cKDTree(X).query(X[short], k=indices.shape[1])
    distances = _exact_distances(X, indices)
    srt = np.argsort(distances, axis=1, kind="stable")
    indices = np.take_along_axis(indices, srt, axis=1)
    distances = np.take_along_axis(distances, srt, axis=1)
    return _drop_self(indices, distances)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


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
    backend: ApproxBackend = "auto",
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
        ``"exact"`` uses a kd-tree; ``"approx"`` uses faiss' inverted lists, or pynndescent
        without faiss (and exact search when neither is installed); ``"auto"`` uses
        approximate search for more than
        :data:`APPROX_MIN_CELLS` cells in more than :data:`APPROX_MIN_DIMS` dimensions, and
        for more than :data:`APPROX_ALWAYS_CELLS` cells in any.
    seed
        Random seed of the approximate search.
    n_jobs
        Worker threads (``-1``: all cores).
    backend
        Approximate search's library: ``"auto"`` (faiss when installed, else pynndescent),
        ``"faiss"`` or ``"pynndescent"`` (each falls back to exact search when missing).

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
    if backend not in ("auto", "faiss", "pynndescent"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'pynndescent', got {backend!r}")
    k = min(k, n - 1)
    use_approx = method == "approx" or (
        method == "auto"
        and (n > APPROX_ALWAYS_CELLS or (n > APPROX_MIN_CELLS and X.shape[1] > APPROX_MIN_DIMS))
    )
    if use_approx and backend in ("auto", "faiss") and _faiss_available():
        return _ivf(X, k, seed, n_jobs)
    if use_approx and backend in ("auto", "pynndescent") and _pynndescent_available():
        return _approx(X, k, seed, n_jobs)
    return _exact(X, k, n_jobs)
