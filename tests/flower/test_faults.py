"""Faults in deployment: a site dies during a round; the coordinator stops and restarts."""

from __future__ import annotations

import json
import shutil
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


def wait_checkpoint(cluster: Cluster, out: Path, round_idx: int, timeout: float = 300) -> None:
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


def wait_file(cluster: Cluster, path: Path, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"no {path} after {timeout} s\n{cluster.logs()}")
        time.sleep(0.05)


#: Seconds the coordinator waits for a round's replies in the killed-site test.
ROUND_TIMEOUT = 40.0


def test_site_killed_during_round_and_site_data_gone(cluster, site_files, tmp_path):
    """site-c's SuperNode dies in round 1; site-b's data file disappears after the setup
    round: site-b answers each round with an error naming itself and the path, and the run
    goes on with the sites left (min-sites=1)."""
    out = tmp_path / "server-out"
    cluster.start_superlink()
    data_b = tmp_path / "data-b" / "site-b.h5ad"
    data_b.parent.mkdir()
    shutil.copy(site_files.paths["site-b"], data_b)
    for site in SITES:
        cluster.start_supernode(site, data_b if site == "site-b" else site_files.paths[site])
    # site-c's round-1 message is never answered: the round ends at round-timeout, which
    # must still let site-a answer (about 10 s on an idle 2-core machine, 20-30 s at a load
    # average of 5-10). No balancing: not what this test checks (the embedding still goes
    # to the sites left)
    cfg = flower_run_config(
        out, **{"round-timeout": ROUND_TIMEOUT, "min-sites": 1, "balance-clusters": 0}
    )
    run_id = cluster.run_app(write_app_dir(tmp_path / "app"), cfg)
    # site-b agreed to the schema (and cached its data): its file goes before round 0 starts
    wait_file(cluster, tmp_path / "sites" / "site-b.schema.json")
    data_b.unlink()
    wait_checkpoint(cluster, out, 1)  # round 0 aggregated: round 1 is under way
    cluster.nodes["site-c"].stop(signal.SIGKILL)  # a crash, not a clean shutdown

    result = wait_result(cluster, out, run_id, timeout=600)
    assert result["status"] == "completed", f"{result}\n{cluster.logs()}"
    assert result["rounds"] == 2
    dropped = [(d["round"], d["site"]) for d in result["dropped"]]
    assert sorted(dropped) == [(0, "site-b"), (1, "site-b"), (1, "site-c")], result
    for d in result["dropped"]:
        if d["site"] == "site-b":  # the site's own clear error, as the server received it
            assert "site 'site-b'" in d["reason"] and str(data_b) in d["reason"], d
    history = pd.read_csv(out / "history.csv")
    r1 = history[history["round"] == 1].set_index("site")["status"].to_dict()
    assert r1 == {"site-a": "ok", "site-b": "dropped", "site-c": "dropped"}
    r0 = history[history["round"] == 0].set_index("site")["status"].to_dict()
    assert r0 == {"site-a": "ok", "site-b": "dropped", "site-c": "ok"}
    assert result["embedded"]["site-a"] == site_files.n_cells["site-a"]
    assert str(result["embedded"]["site-c"]).startswith("skipped")
    assert str(result["embedded"]["site-b"]).startswith("skipped")
    # the coordinator's log (the ServerApp's output, which `flwr log` shows)
    log = cluster.flwr("log", str(run_id), "test", "--show").stdout
    assert "round 2/2: 1 sites answered, missing site-b: site 'site-b'" in log, log[-3000:]


def test_coordinator_restart_resumes(cluster, site_files, in_process, tmp_path):
    out = tmp_path / "server-out"
    database = tmp_path / "superlink.db"
    cluster.start_superlink(database=database)
    start_sites(cluster, site_files)
    app_dir = write_app_dir(tmp_path / "app")
    cfg = flower_run_config(out, **{"balance-clusters": 0})  # resuming is what is checked
    cluster.run_app(app_dir, cfg)
    wait_checkpoint(cluster, out, 1)
    first = cluster.superlink
    assert first is not None
    first.stop()  # SuperLink and the ServerApp it runs: the coordinator is gone mid-round 1
    cluster.start_superlink(database=database)

    run_id = cluster.run_app(app_dir, cfg)
    result = wait_result(cluster, out, run_id, timeout=600)
    assert result["status"] == "completed", f"{result}\n{cluster.logs()}"
    assert result["resumed_from_round"] == 1 and result["rounds"] == 2
    history = pd.read_csv(out / "history.csv")
    assert sorted(history["round"].tolist()) == [0, 0, 0, 1, 1, 1]
    check_model(out, in_process, balanced=False)  # nothing learned before the stop was lost
    assert np.isfinite(history["loss"]).all()
