"""A site's training data: its counts in schema gene order, batch indices, minibatches and
the held-out split. Counts stay sparse in memory; each minibatch is densified on the fly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from scfedvi.module.distributions import NonzeroCounts

__all__ = ["SiteTensors", "n_minibatches", "train_validation_split"]


@dataclass
class SiteTensors:
    """A site's training data: sparse counts in schema gene order and batch indices."""

    X: sp.csr_matrix
    batch_index: np.ndarray
    _log_factorial: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.X = sp.csr_matrix(self.X, dtype=np.float32)
        if _has_stored_zeros(self.X.data):  # dropped from a copy; the caller's matrix is kept
            self.X = self.X.copy()
            self.X.eliminate_zeros()
        self.batch_index = np.asarray(self.batch_index, dtype=np.int64)
        if self.X.shape[0] != self.batch_index.shape[0]:
            raise ValueError("X and batch_index have different numbers of cells")

    @property
    def n_cells(self) -> int:
        return int(self.X.shape[0])

    def batch_counts(self) -> dict[int, int]:
        """Cells per batch index (an aggregate that may leave the site)."""
        vals, counts = np.unique(self.batch_index, return_counts=True)
        return {int(v): int(c) for v, c in zip(vals, counts, strict=True)}

    def minibatch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self.X[idx].toarray())
        return x, torch.from_numpy(self.batch_index[idx])

    def training_minibatch(
        self, idx: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, NonzeroCounts]:
        """A minibatch with its nonzero entries, read off the sparse storage."""
        sub = self.X[idx]
        lengths = np.diff(sub.indptr).astype(np.int64)
        nonzero = NonzeroCounts(
            torch.from_numpy(np.repeat(np.arange(len(idx), dtype=np.int64), lengths)),
            torch.from_numpy(sub.indices.astype(np.int64)),
            torch.from_numpy(sub.data),
            torch.from_numpy(lengths),
            torch.from_numpy(self.log_factorial[idx]),
        )
        return torch.from_numpy(sub.toarray()), torch.from_numpy(self.batch_index[idx]), nonzero

    def set_log_factorial(self, values: np.ndarray) -> None:
        """Use precomputed per-cell sums of ``lgamma(x + 1)`` (a site's cache of the setup
        round: :mod:`scfedvi.flower.data_cache`) instead of computing them."""
        values = np.asarray(values)
        if values.shape != (self.n_cells,):
            raise ValueError(
                f"log_factorial has shape {values.shape}, expected one value per cell "
                f"({self.n_cells},); rebuild the site's data cache"
            )
        self._log_factorial = values

    @property
    def log_factorial(self) -> np.ndarray:
        """Each cell's sum over genes of ``lgamma(x + 1)`` (float64 arithmetic), computed once."""
        if self._log_factorial is None:
            from scipy.special import gammaln

            indptr, data = self.X.indptr, self.X.data
            per_cell = np.zeros(self.n_cells, dtype=np.float64)
            block = max(1, (1 << 22) // max(1, self.X.shape[1]))  # rows per block: bounded memory
            for r0 in range(0, self.n_cells, block):
                r1 = min(r0 + block, self.n_cells)
                lg = gammaln(data[indptr[r0] : indptr[r1]].astype(np.float64) + 1.0)
                csum = np.concatenate([[0.0], np.cumsum(lg)])
                starts = indptr[r0 : r1 + 1] - indptr[r0]
                per_cell[r0:r1] = csum[starts[1:]] - csum[starts[:-1]]
            self._log_factorial = per_cell.astype(np.float32)
        return self._log_factorial

    def iter_minibatches(
        self, batch_size: int, rng: np.random.Generator | None, *, drop_small: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Minibatches in a shuffled (``rng``) or the stored order.

        A last minibatch of fewer than 3 cells is dropped in training, as scvi-tools does,
        since BatchNorm cannot normalize one cell.
        """
        for idx in self.minibatch_indices(batch_size, rng, drop_small=drop_small):
            yield self.minibatch(idx)

    def minibatch_indices(
        self,
        batch_size: int,
        rng: np.random.Generator | None,
        *,
        drop_small: bool = True,
        cells: np.ndarray | None = None,
    ) -> Iterator[np.ndarray]:
        """The cell indices of each minibatch (see :meth:`iter_minibatches`), over ``cells``
        (default: all)."""
        cells = np.arange(self.n_cells) if cells is None else np.asarray(cells)
        order = cells[rng.permutation(len(cells))] if rng is not None else cells
        for start in range(0, len(cells), batch_size):
            idx = order[start : start + batch_size]
            if drop_small and len(idx) < 3 and start > 0:
                break
            yield idx


def train_validation_split(
    n_cells: int, train_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out cell indices (sorted), as scvi-tools splits: ``ceil(train_size *
    n)`` cells at random (``seed``) are trained on."""
    n_train = min(n_cells, int(np.ceil(train_size * n_cells)))
    order = np.random.default_rng(seed).permutation(n_cells)
    return np.sort(order[:n_train]), np.sort(order[n_train:])


def _has_stored_zeros(data: np.ndarray, chunk: int = 1 << 22) -> bool:
    return any(not data[i : i + chunk].all() for i in range(0, data.size, chunk))


def n_minibatches(n: int, batch_size: int) -> int:
    """Minibatches of an epoch over ``n`` cells (a last one of fewer than 3 cells is dropped,
    unless it is the only one)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 3 or full == 0 else 0)
