"""Faults in deployment: a site dies during a round; the coordinator stops and restarts."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flower_harness import Cluster, wait_result
from flower_sites import SITES, check_model, flower_run_config, start_sites

from scfedvi.flower.settings import write_app_dir

pytestmark = pytest.mark.flower


def wait_checkpoint(cluster: Cluster, out: Path, round_idx: int, timeout: float = 180) -> None:
    """Wait until the server's checkpoint says ``round_idx`` rounds are done."""
    path = out / "checkpoint" / "checkpoint.json"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            try:
                if json.loads(path.read_text())["round"] >= round_idx:
                    return
            except (json.JSONDecodeError, KeyError):
                pass  # being replaced
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint of round {round_idx} after {timeout} s\n{cluster.logs()}")


def test_site_killed_during_round(cluster, site_files, tmp_path):
    out = tmp_path / "server-out"
    cluster.start_superlink()
    start_sites(cluster, site_files)
    cfg = flower_run_config(out, **{"round-timeout": 60.0})
    run_id = cluster.run_app(write_app_dir(tmp_path / "app"), cfg)
    wait_checkpoint(cluster, out, 1)  # round 0 aggregated: round 1 is under way
    cluster.nodes["site-c"].stop(signal.SIGKILL)  # a crash, not a clean shutdown

    result = wait_result(cluster, out, run_id, timeout=300)
    assert result["status"] == "completed", f"{result}\n{cluster.logs()}"
    assert result["rounds"] == 2
    assert [(d["round"], d["site"]) for d in result["dropped"]] == [(1, "site-c")]
    history = pd.read_csv(out / "history.csv")
    r1 = history[history["round"] == 1].set_index("site")["status"].to_dict()
    assert r1 == {"site-a": "ok", "site-b": "ok", "site-c": "dropped"}
    assert (history[history["round"] == 0]["status"] == "ok").sum() == len(SITES)
    assert result["embedded"]["site-a"] == site_files.n_cells["site-a"]
    assert str(result["embedded"]["site-c"]).startswith("skipped")


def test_coordinator_restart_resumes(cluster, site_files, in_process, tmp_path):
    out = tmp_path / "server-out"
    database = tmp_path / "superlink.db"
    cluster.start_superlink(database=database)
    start_sites(cluster, site_files)
    app_dir = write_app_dir(tmp_path / "app")
    cfg = flower_run_config(out)
    cluster.run_app(app_dir, cfg)
    wait_checkpoint(cluster, out, 1)
    first = cluster.superlink
    assert first is not None
    first.stop()  # SuperLink and the ServerApp it runs: the coordinator is gone mid-round 1
    cluster.start_superlink(database=database)

    run_id = cluster.run_app(app_dir, cfg)
    result = wait_result(cluster, out, run_id, timeout=300)
    assert result["status"] == "completed", f"{result}\n{cluster.logs()}"
    assert result["resumed_from_round"] == 1 and result["rounds"] == 2
    history = pd.read_csv(out / "history.csv")
    assert sorted(history["round"].tolist()) == [0, 0, 0, 1, 1, 1]
    check_model(out, in_process)  # nothing learned before the stop was lost
    assert np.isfinite(history["loss"]).all()
