"""SuperNode authentication over TLS, as the deployment guide runs it: the refusals.

The whole run over TLS with registered SuperNodes (and an unregistered one started beside
them) is :func:`test_deployment.test_deployment_equals_in_process`; here, without a run, a
SuperLink that requires registered keys turns away a SuperNode whose key was never
registered, and lists only the registered one.
"""

from __future__ import annotations

import json
import time

import pytest
from flower_certs import make_node_keys
from flower_harness import Cluster

pytestmark = pytest.mark.flower


def registered_nodes(cluster: Cluster) -> list[dict]:
    res = cluster.flwr("supernode", "list", "test", "--format", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    return list(json.loads(res.stdout[res.stdout.index("{") :])["nodes"])


def test_unregistered_supernode_refused(secure_cluster, site_files, tmp_path):
    cluster = secure_cluster
    cluster.start_superlink()
    keys = tmp_path / "keys"
    private, public = make_node_keys(keys, "site-a")
    reg = cluster.flwr("supernode", "register", str(public), "test")
    assert reg.returncode == 0, reg.stdout + reg.stderr
    # the control: the registered key connects over the same TLS channel
    cluster.start_supernode("site-a", site_files.paths["site-a"], key=private)
    intruder, _ = make_node_keys(keys, "intruder")  # never registered
    proc = cluster.start_supernode("intruder", site_files.paths["site-a"], key=intruder, wait=False)
    end = time.monotonic() + 60
    while proc.popen.poll() is None and time.monotonic() < end:
        time.sleep(0.2)
    log = proc.tail(80)
    assert proc.popen.poll() is not None, f"the unregistered SuperNode still runs\n{log}"
    assert proc.popen.returncode != 0 and "Failed to activate SuperNode" in log, log
    assert cluster.superlink is not None
    link = cluster.superlink.tail(200)
    assert "No SuperNode found with the given public key" in link, link
    assert cluster.nodes["site-a"].popen.poll() is None, cluster.logs()
    nodes = registered_nodes(cluster)
    assert len(nodes) == 1, nodes  # the registered key only; nothing of the intruder
