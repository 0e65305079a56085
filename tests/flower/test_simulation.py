"""Flower's simulation engine (Ray): 20 simulated sites, one SuperLink in simulation mode.

Each simulated node reads ``<sim-data-dir>/<site>.h5ad`` by its ``partition-id``; the test
checks that the run completes over every site and reports the seconds per round.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from flower_harness import Cluster, wait_result
from flower_sites import flower_run_config

from scfedvi.flower.settings import write_app_dir

pytestmark = [pytest.mark.flower, pytest.mark.slow]
N_SITES = 20


def write_sim_sites(directory: Path, site_files) -> list[str]:
    """20 sites of 140 cells, cut from the three test sites (each keeps its batch)."""
    directory.mkdir()
    names = []
    parts = [ad.read_h5ad(p) for p in site_files.paths.values()]
    for i in range(N_SITES):
        src = parts[i % len(parts)]
        rows = np.random.default_rng(i).choice(src.n_obs, size=140, replace=False)
        names.append(f"sim-{i:02d}")
        src[np.sort(rows)].copy().write_h5ad(directory / f"{names[-1]}.h5ad")
    return names


def test_simulation_engine_20_sites(tmp_path, site_files):
    cluster = Cluster(tmp_path)
    try:
        cluster.start_superlink(simulation=True)
        out = tmp_path / "server-out"
        names = write_sim_sites(tmp_path / "sim-data", site_files)
        extra = {
            "num-sites": N_SITES,
            "min-sites": N_SITES,
            "sim-data-dir": str(tmp_path / "sim-data"),
            "batch-size": 64,  # 126 training cells a site: a minibatch must fit (schedule check)
        }
        run_id = cluster.run_app(
            write_app_dir(tmp_path / "app"),
            flower_run_config(out, **extra),
            "--federation-config",
            f"num-supernodes={N_SITES}",
        )
        result = wait_result(cluster, out, run_id, timeout=900)
    finally:
        cluster.stop_all()
    assert result["status"] == "completed", f"{result}\n{cluster.logs()}"
    assert result["sites"] == names
    history = pd.read_csv(out / "history.csv")
    assert (history["status"] == "ok").sum() == 2 * N_SITES
    print(f"simulation engine, {N_SITES} sites: seconds per round {result['seconds_per_round']}")
