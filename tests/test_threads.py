"""numba (UMAP, pynndescent) must not leave torch running on every core."""

from __future__ import annotations

import numpy as np
import torch

from scfedvi._threads import torch_threads_kept


def test_the_thread_count_is_restored():
    before = torch.get_num_threads()
    with torch_threads_kept():
        torch.set_num_threads(before + 1)
    assert torch.get_num_threads() == before


def test_umap_leaves_torch_threads_alone():
    from scfedvi.report.figures import umap_coords

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    xy = umap_coords(rng.normal(size=(200, 5)).astype(np.float32), n_neighbors=10)
    assert xy.shape == (200, 2)
    assert torch.get_num_threads() == 1
