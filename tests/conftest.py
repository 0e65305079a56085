"""Shared fixtures: seeded small data, the real data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from synthetic import make_counts

ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("SCFEDVI_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if not (d / "pancreas_neuca.h5ad").exists():
        pytest.skip(f"real data not found in {d}; set SCFEDVI_DATA_DIR")
    return d


@pytest.fixture
def small_adata():
    """240 cells x 60 genes, 2 batches, 3 cell types."""
    return make_counts(240, 60)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One torch thread: several test processes (and Flower sites) share 2 cores; more
    threads than cores slow small models down by orders of magnitude."""
    import torch

    torch.set_num_threads(1)
