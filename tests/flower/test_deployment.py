"""The deployment engine: SuperLink + three SuperNodes on loopback, ``flwr run``, as the
deployment guide runs it: TLS, and SuperNode authentication (each site's key registered with
``flwr supernode register``; an unregistered key is refused in test_tls_auth.py).

One run gives the same global model as the in-process runtime for the same seeds, writes
each site's embedding at the site, and every reply the server received fits the list of
what may leave a site (checked from the server's payload log).
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from flower_harness import wait_result
from flower_sites import (
    SITES,
    SiteFiles,
    check_model,
    flower_run_config,
    start_registered_sites,
)

from scfedvi._constants import LATENT_KEY
from scfedvi.flower.settings import write_app_dir
from scfedvi.model import ScFedVI

pytestmark = pytest.mark.flower


def test_deployment_equals_in_process(secure_cluster, site_files, in_process, tmp_path):
    cluster = secure_cluster
    out = tmp_path / "server-out"
    payloads = tmp_path / "payloads.jsonl"
    cluster.start_superlink()
    start_registered_sites(cluster, site_files, tmp_path / "keys")
    app_dir = write_app_dir(tmp_path / "app")
    run_id = cluster.run_app(app_dir, flower_run_config(out, **{"payload-log": str(payloads)}))
    result = wait_result(cluster, out, run_id, timeout=420)
    assert result["status"] == "completed", f"{result}\n{cluster.logs()}"
    assert result["rounds"] == 2 and result["sites"] == list(SITES)
    assert result["embedded"] == site_files.n_cells
    check_model(out, in_process)

    history = pd.read_csv(out / "history.csv")
    assert set(history["status"]) == {"ok"} and len(history) == 2 * len(SITES)
    for site in SITES:  # the embedding stays at the site
        emb = ad.read_h5ad(tmp_path / "sites" / f"{site}.embedded.h5ad")
        assert emb.obsm[LATENT_KEY].shape == (site_files.n_cells[site], 10)
        assert np.isfinite(emb.obsm[LATENT_KEY]).all()
    check_payloads(payloads, site_files, ScFedVI.load(out / "model").params)


#: What a reply may carry, by record: (record kind, allowed item names or None for any).
SETUP_CONFIG = {"site", "genes", "batches", "counts", "labels", "schema-hash", "n-cells"}
#: ("data-cache": why the site rebuilt its data cache, a fixed phrase, when it did)
ROUND_CONFIG = {"site", "schema-hash", "round", "batch-counts", "n-embedded", "phase", "data-cache"}


def check_payloads(path: Path, site_files: SiteFiles, shared: dict[str, np.ndarray]) -> None:
    """Every reply fits the whitelist; nothing has a cell dimension."""
    replies = [json.loads(line) for line in path.read_text().splitlines()]
    n_cells = set(site_files.n_cells.values())
    types = {r["type"] for r in replies}
    assert types == {
        "query.genes",
        "query.summary",
        "query.schema",
        "train",
        "query.balance",
        "query.embed",
    }
    assert not [r for r in replies if "error" in r]
    for r in replies:
        for name, rec in r["records"].items():
            items = rec["items"]
            if rec["kind"] == "array":
                for key, a in items.items():
                    assert not (a["shape"] and a["shape"][0] in n_cells), (r["type"], key, a)
                    if name == "arrays":  # the model's shared parameters, as named and shaped
                        assert r["type"] == "train"
                        assert list(shared[key].shape) == a["shape"], key
                    elif name == "clusters":  # balancing: a local summary of at most 4 x 8
                        assert r["type"] == "query.balance" and key in ("values", "counts")
                        assert a["shape"][0] <= 32 and a["shape"][1:] in ([], [10]), a
                    else:  # per-batch, per-gene summaries of the setup round
                        assert (r["type"], name) == ("query.summary", "stats"), key
                        assert len(a["shape"]) == 1 and a["dtype"] == "float64"
                if name == "arrays":
                    assert set(items) == set(shared)
            elif rec["kind"] == "metric":
                assert name == "metrics" and r["type"] == "train"
                assert "num-examples" in items
                assert all(v["type"] in ("int", "float") for v in items.values())
            else:
                assert rec["kind"] == "config" and name == "config"
                allowed = SETUP_CONFIG if r["type"].startswith("query.") else ROUND_CONFIG
                assert set(items) <= allowed | ROUND_CONFIG, (r["type"], set(items))
                for key, v in items.items():
                    if v["type"].startswith("list") and key != "genes":
                        assert v["len"] not in n_cells, (r["type"], key)
