"""Trusted entities (Flower 1.42's ``flower-supernode --trusted-entities``): what a site can
verify about the app bundle it is asked to run.

A SuperNode started with trusted entities runs a bundle only if its verification records
carry an Ed25519 signature, by a listed key, of the bundle's SHA-256
(``flwr/supernode/start_client_internal.py``, ``_verify_fab``). The SuperLink attaches
verification records only to apps it fetches from Flower Hub
(``flwr/superlink/servicer/control/control_handlers.py``, ``_get_remote_fab``); a bundle sent
with ``flwr run <app-dir>`` has none. So in a self-hosted deployment such a SuperNode refuses
every ``flwr run`` (the first test: scFedVI's ClientApp never starts, the site writes
nothing), and a signature by another key is refused too (the second test, on Flower's own
verification function with a bundle signed as ``flwr app review`` signs it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flower_harness import BIN, free_port, wait_port

from scfedvi.flower.settings import write_app_dir

REFUSED = "App verification is not supported by the connected SuperLink"


def _key_pair() -> tuple[ed25519.Ed25519PrivateKey, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return key, public.decode()


@pytest.mark.flower
def test_supernode_with_trusted_entities_refuses_an_unsigned_app(cluster, site_files, tmp_path):
    _, public = _key_pair()
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text(f"fpk_publisher: '{public}'\n")
    cluster.start_superlink()
    site = "site-a"
    state = tmp_path / "sites"
    node_config = f"site='{site}' data-path='{site_files.paths[site]}' state-dir='{state}'"
    port = free_port()
    cmd = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{cluster.port}", "--insecure"]
    cmd += ["--trusted-entities", str(trusted), "--node-config", node_config, "--port", str(port)]
    node = cluster._start(f"supernode-{site}", cmd)
    wait_port(port, 30, node)
    cluster.run_app(_probe_app(tmp_path / "app"), {})
    end = time.monotonic() + 90
    while REFUSED not in node.tail(200) and time.monotonic() < end:
        time.sleep(0.5)
    assert REFUSED in node.tail(200), cluster.logs()
    # scFedVI's ClientApp never ran at the site: no ledger, schema, state or cache was written
    assert not state.exists() or not any(state.iterdir()), sorted(state.iterdir())


PROBE = """
import time

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    end = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < end:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.genes") for n in nodes]
    list(grid.send_and_receive(msgs, timeout=60))
"""


def _probe_app(directory: Path) -> Path:
    """scFedVI's app bundle with a ServerApp that only sends each site the first setup query
    (scFedVI's own ServerApp takes a minute to start on a loaded machine; the bundle is
    verified, or refused, before any ClientApp runs, whatever its ServerApp)."""
    d = write_app_dir(directory)
    text = (d / "pyproject.toml").read_text()
    server = 'serverapp = "scfedvi.flower.server_app:app"'
    assert server in text
    (d / "pyproject.toml").write_text(text.replace(server, 'serverapp = "probe:app"'))
    (d / "probe.py").write_text(PROBE)
    return d


def _fab_verifications(key: ed25519.Ed25519PrivateKey, key_id: str, content: bytes) -> dict:
    """Verification records as Flower Hub returns them for a bundle signed by ``key``
    (``flwr app review`` signs timestamp || sha256(bundle))."""
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    signed_at = 1_700_000_000
    sig = key.sign(create_message_to_sign(hashlib.sha256(content).digest(), signed_at))
    record = {"signature": base64.urlsafe_b64encode(sig).rstrip(b"=").decode()}
    record["signed_at"] = signed_at  # type: ignore[assignment]
    return {key_id: json.dumps(record), "valid_license": "Valid"}


def test_flowers_fab_verification_accepts_only_a_trusted_key():
    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab

    publisher, publisher_pub = _key_pair()
    other, _ = _key_pair()
    content = b"the app bundle's bytes"
    trusted = {"fpk_publisher": publisher_pub}

    def fab(verifications: dict, body: bytes = content) -> Fab:
        return Fab(hashlib.sha256(body).hexdigest(), body, verifications)

    assert _verify_fab(fab(_fab_verifications(publisher, "fpk_publisher", content)), trusted)
    # another key, even under the trusted key's id; a trusted signature of another bundle
    assert not _verify_fab(fab(_fab_verifications(other, "fpk_publisher", content)), trusted)
    assert not _verify_fab(fab(_fab_verifications(other, "fpk_other", content)), trusted)
    signed = _fab_verifications(publisher, "fpk_publisher", content)
    assert not _verify_fab(fab(signed, b"a modified bundle"), trusted)
