"""Secure aggregation on the deployment engine: SuperLink + three SuperNodes on loopback.

Each site has its identity key and the consortium's roster (``scfedvi secagg-keygen``, node
config ``secagg-identity-key`` and ``secagg-roster``). The run's final model equals the
in-process run without secure aggregation within the quantization error, and the server's
payload log shows that no reply carried an unmasked parameter array: training replies carry
signed keys, counts and metrics only, and the one array a site sends is its masked ``uint32``
vector.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from flower_harness import wait_result
from flower_sites import SITES, flower_run_config, reference

from scfedvi.flower.settings import write_app_dir
from scfedvi.model import ScFedVI
from scfedvi.privacy.identity import keygen, write_roster
from scfedvi.privacy.secagg import vector_length

pytestmark = pytest.mark.flower

#: A clip norm no update of these runs reaches (so the sum is the unclipped runs' sum); the
#: rounding of a summed value is at most 3 sites x C / 2**32 x (cells bound / training cells).
CLIP = 100.0


#: One secure round is five message exchanges (signed keys and counts, shares, masked vectors,
#: signed survivor set, unmasking); one round shows them all, and the in-process reference
#: runs as many.
ROUNDS = 1


def test_secure_aggregation_deployment(cluster, site_files, tmp_path):
    out = tmp_path / "server-out"
    payloads = tmp_path / "payloads.jsonl"
    cluster.start_superlink()
    roster = tmp_path / "roster.toml"
    keys = {}
    for site in SITES:  # each site's identity key, and the roster every site holds
        keys[site], pub = keygen(site, tmp_path / "keys" / site)
        write_roster(roster, {site: pub.read_text().split()[0]})
    for site in SITES:
        ident = {"secagg-identity-key": str(keys[site]), "secagg-roster": str(roster)}
        cluster.start_supernode(site, site_files.paths[site], **ident)
    app_dir = write_app_dir(tmp_path / "app")
    extra = {
        "payload-log": str(payloads),
        "secure-aggregation": True,
        "clip-norm": CLIP,
        "clip-at": "site",
        "expected-sites": len(SITES),
        "num-server-rounds": ROUNDS,
    }
    run_id = cluster.run_app(app_dir, flower_run_config(out, **extra))
    result = wait_result(cluster, out, run_id, timeout=900)  # 5 exchanges a round
    assert result["status"] == "completed", f"{result}\n{cluster.logs()}"
    assert result["rounds"] == ROUNDS and result["sites"] == list(SITES)
    history = pd.read_csv(out / "history.csv")
    assert set(history["status"]) == {"ok"} and len(history) == ROUNDS * len(SITES)

    # the same sites, seeds and rounds, in process, without secure aggregation
    _, params, _ = reference(site_files, n_rounds=ROUNDS)
    model = ScFedVI.load(out / "model")
    assert set(model.params) == set(params)
    for k, v in params.items():
        np.testing.assert_allclose(model.params[k], v, rtol=0, atol=1e-5, err_msg=k)

    replies = [json.loads(line) for line in payloads.read_text().splitlines()]
    assert not [r for r in replies if "error" in r]
    length = vector_length(params, model.schema.n_batches)
    train = [r for r in replies if r["type"] == "train"]
    secagg = [r for r in replies if r["type"] == "query.secagg"]
    assert len(train) == ROUNDS * len(SITES) and len(secagg) == 4 * ROUNDS * len(SITES)
    for r in train:  # signed keys, counts, metrics: no array
        assert {rec["kind"] for rec in r["records"].values()} <= {"config", "metric"}, r
    masked = 0
    for r in replies:
        for name, rec in r["records"].items():
            if rec["kind"] != "array" or r["type"] == "query.summary":
                continue
            assert r["type"] == "query.secagg" and name == "secagg-arrays", (r["type"], name)
            assert rec["items"] == {"masked": {"dtype": "uint32", "shape": [length]}}
            masked += 1
    assert masked == ROUNDS * len(SITES)
