"""A stratified subsample of cells: what the scIB metrics and the UMAP see at 10^5-10^6 cells.

Every batch x label group keeps at least ``min(group size, min_per_group)`` cells; the rest of
the sample is drawn in proportion to the groups' sizes (seeded), so rare cell types and small
batches stay in the metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def stratified_subsample(
    batch: Any, label: Any, n: int, *, seed: int = 0, min_per_group: int = 20
) -> np.ndarray:
    """Sorted indices of about ``n`` cells, stratified by ``batch`` x ``label``.

    Parameters
    ----------
    batch, label
        One value per cell.
    n
        Cells to keep (all of them when there are fewer).
    seed
        Seed of the draw.
    min_per_group
        Fewest cells kept of each group (all of a smaller group).
    """
    if n < 1:
        raise ValueError(f"stratified_subsample: n must be >= 1, got {n}")
    b = np.asarray(batch).astype(str)
    la = np.asarray(label).astype(str)
    if b.shape != la.shape:
        raise ValueError(f"batch has {b.shape[0]} cells, label {la.shape[0]}")
    total = b.shape[0]
    if total <= n:
        return np.arange(total)
    _, group = np.unique(np.char.add(np.char.add(b, "\x00"), la), return_inverse=True)
    sizes = np.bincount(group)
    floor = np.minimum(sizes, min_per_group)
    rest = max(0, n - int(floor.sum()))
    extra = np.floor((sizes - floor) * rest / max(1, int((sizes - floor).sum()))).astype(int)
    take = floor + extra
    short = n - int(take.sum())  # rounding: the largest remainders get one more
    if short > 0:
        room = np.flatnonzero(take < sizes)
        order = room[np.argsort(-(sizes[room] - take[room]), kind="stable")]
        take[order[:short]] += 1
    rng = np.random.default_rng(seed)
    order = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    keep = [
        rng.choice(order[starts[g] : starts[g + 1]], size=int(take[g]), replace=False)
        for g in range(len(sizes))
        if take[g]
    ]
    return np.sort(np.concatenate(keep))
