"""The Flower transport of secure aggregation without a cluster: payloads through Flower records
and the site's session through its state folder (a new process per message) give the sum."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import RecordDict

from scfedvi.config import SitePolicy
from scfedvi.flower import secagg as fs
from scfedvi.privacy.identity import keygen, write_roster
from scfedvi.privacy.policy import PolicyRefusal
from scfedvi.privacy.secagg import quantize, scale_for
from scfedvi.privacy.secagg_protocol import secure_sum
from scfedvi.privacy.secagg_site import SiteSession


@dataclass
class Node:  # what the handlers read of NodeSettings
    site: str
    state_dir: Path
    policy: SitePolicy


def _message(content: RecordDict) -> Any:
    return SimpleNamespace(content=content)  # what site_stage reads of a Message


def _nodes(tmp_path, n: int) -> dict[str, Node]:
    """``n`` sites, each with its identity key file and the shared roster file."""
    roster = tmp_path / "roster.toml"
    nodes = {}
    for i in range(n):
        s = f"s{i}"
        key, pub = keygen(s, tmp_path / "keys")
        write_roster(roster, {s: pub.read_text().split()[0]})
        policy = SitePolicy(secagg_identity_key=str(key), secagg_roster=str(roster))
        nodes[s] = Node(s, tmp_path / s, policy)
    return nodes


def test_the_sum_through_records_and_state_files(tmp_path):
    rng = np.random.default_rng(0)
    salt, r, n, d = b"salt-0123456789a", 4, 4, 500
    nodes = _nodes(tmp_path, n)
    ups = {s: rng.uniform(-0.2, 0.2, d) for s in nodes}
    keys = {}
    for s, node in nodes.items():  # stage 1, as site_keys_reply leaves it
        node.state_dir.mkdir()
        np.save(fs._vector_path(node, r), quantize(ups[s], 1.0, 1))
        session = SiteSession(s, salt, r, fs.site_identity(node))
        fs._save_session(node, session)
        keys[s] = session.keys()
    seen: list[str] = []

    def ask(phase, payloads):
        out = {}
        for s, p in payloads.items():
            if s == "s3" and phase != "shares":
                continue  # s3 drops out after sending its shares
            reply = fs.site_stage(_message(fs.to_records(p, "hash", r, phase)), nodes[s])
            seen.extend(reply.array_records)
            out[s] = fs.from_records(reply)
        return out

    res = secure_sum(ask, keys, length=d, run_id=salt, round_idx=r)
    assert res.survivors == ["s0", "s1", "s2"] and res.dropped == {"s3": "masked"}
    total = res.total.view(np.int32) / scale_for(1.0, 1)
    np.testing.assert_allclose(total, ups["s0"] + ups["s1"] + ups["s2"], atol=2e-9)
    assert seen == [fs.VECTORS] * 3  # the masked vectors, nothing else as an array
    assert not fs._vector_path(nodes["s0"], r).exists()  # the update is gone once masked
    # the session file remembers what the site revealed: "s0 dropped" is refused afterwards
    again = fs.to_records({"survivors": ["s1", "s2", "s3"]}, "hash", r, "consistency")
    with pytest.raises(PolicyRefusal, match="sign the survivors while at 'unmask'"):
        fs.site_stage(_message(again), nodes["s1"])


def test_a_flower_site_without_an_identity_key_refuses_secure_aggregation(tmp_path):
    node = Node("lab-a", tmp_path, SitePolicy())
    with pytest.raises(PolicyRefusal, match="secagg-keygen --site lab-a"):
        fs.site_identity(node)
