"""Shared fixtures: seeded small data, the real data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
