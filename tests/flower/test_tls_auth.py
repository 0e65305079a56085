"""Deployment with TLS and SuperNode authentication, as the deployment guide runs it.

The SuperLink serves its APIs over TLS (a test CA and a certificate for 127.0.0.1) and
accepts only the SuperNodes whose public keys were registered with ``flwr supernode
register``; a SuperNode with an unregistered key takes no part.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flower_certs import make_node_keys, make_tls
from flower_harness import Cluster, wait_result
from flower_sites import SITES, check_model, flower_run_config

from scfedvi.flower.settings import write_app_dir

pytestmark = pytest.mark.flower


@pytest.fixture
def secure_cluster(tmp_path: Path):
    c = Cluster(tmp_path, tls=make_tls(tmp_path / "certs"), auth=True)
    yield c
    c.stop_all()


def test_tls_and_supernode_auth(secure_cluster, site_files, in_process, tmp_path):
    cluster = secure_cluster
    out = tmp_path / "server-out"
    cluster.start_superlink()
    keys = tmp_path / "keys"
    for site in SITES:
        private, public = make_node_keys(keys, site)
        reg = cluster.flwr("supernode", "register", str(public), "test")
        assert reg.returncode == 0, reg.stdout + reg.stderr
        cluster.start_supernode(site, site_files.paths[site], key=private)
    intruder, _ = make_node_keys(keys, "intruder")  # never registered
    # never registered: it may be turned away (and exit) before its port is up
    cluster.start_supernode("intruder", site_files.paths["site-a"], key=intruder, wait=False)

    run_id = cluster.run_app(write_app_dir(tmp_path / "app"), flower_run_config(out))
    result = wait_result(cluster, out, run_id, timeout=300)
    assert result["status"] == "completed", f"{result}\n{cluster.logs()}"
    assert result["sites"] == list(SITES)  # the intruder was not admitted
    check_model(out, in_process)
