"""The Flower glue without processes: record conversions, run-config parsing, the app file."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from scfedvi.config import RunConfig
from scfedvi.data.harmonize import site_summary
from scfedvi.flower import messages as m
from scfedvi.flower.exchange import describe_content
from scfedvi.flower.node import NodeSettings
from scfedvi.flower.settings import (
    AppSettings,
    app_pyproject,
    default_run_config,
    run_config_from_flower,
)

pytestmark = pytest.mark.flower


def test_params_round_trip_keeps_names_dtypes_and_order():
    params = {
        "z_encoder.encoder.fc_layers.Layer 0.0.weight": np.arange(6, dtype=np.float32).reshape(
            2, 3
        ),
        "px_r": np.ones(4, dtype=np.float32),
        "bn.num_batches_tracked": np.asarray(7, dtype=np.int64),
    }
    back = m.record_to_params(m.params_to_record(params))
    assert list(back) == list(params)
    for k, v in params.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)


def test_metrics_and_batch_counts_round_trip():
    metrics, n = m.record_to_metrics(m.metrics_to_record({"loss": 1.5, "steps": 2.0}, 150))
    assert (metrics, n) == ({"loss": 1.5, "steps": 2.0}, 150)
    counts = {0: 10, 3: 5}
    assert m.list_to_batch_counts(m.batch_counts_to_list(counts)) == counts


def test_summary_round_trip(site_files):
    import anndata as ad

    adata = ad.read_h5ad(site_files.paths["site-a"])
    genes = tuple(adata.var_names)
    s = site_summary(adata, site="site-a", batch_key="batch", genes=genes)
    cfg, arrays = m.summary_to_records(s)
    back = m.records_to_summary(cfg, arrays, genes)
    assert back.site == s.site and back.batch_counts == s.batch_counts
    for b, fields in s.stats.items():
        for f, v in fields.items():
            np.testing.assert_array_equal(back.stats[b][f], v)


def test_run_config_maps_every_field():
    rc = default_run_config(local_epochs=3, local_steps=0, clip_norm=0.0, norm_stats="averaged")
    cfg, app = run_config_from_flower(rc | {"num-server-rounds": 7, "out-dir": "x"})
    assert cfg.train.local_epochs == 3 and cfg.train.local_steps is None
    assert cfg.federation.n_rounds == 7 and cfg.federation.norm_stats == "averaged"
    assert cfg.privacy.clip_norm is None and app.out_dir == "x"
    defaults, _ = run_config_from_flower({})
    assert defaults == RunConfig()
    with pytest.raises(KeyError, match="unknown run-config key"):
        default_run_config(no_such_key=1)


def test_app_pyproject_is_a_valid_flower_app(tmp_path):
    from flwr.common.config import validate_config

    text = app_pyproject(seed=3)
    config = tomllib.loads(text)
    ok, errors, _ = validate_config(config, check_module=True, project_dir=tmp_path)
    assert ok, errors
    assert config["tool"]["flwr"]["app"]["config"]["seed"] == 3
    assert set(config["tool"]["flwr"]["app"]["config"]) == set(default_run_config())


def test_node_settings_from_node_config_and_partition(tmp_path):
    app = AppSettings(out_dir=str(tmp_path / "out"), sim_data_dir=str(tmp_path))
    (tmp_path / "b.h5ad").touch()
    (tmp_path / "a.h5ad").touch()
    node = NodeSettings.from_configs({"data-path": str(tmp_path / "a.h5ad"), "site": "lab"}, app)
    assert node.site == "lab" and node.state_dir == tmp_path / "scfedvi-state"
    sim = NodeSettings.from_configs({"partition-id": 1, "num-partitions": 2}, app)
    assert sim.site == "b" and sim.state_dir == tmp_path / "out" / "sites"
    from scfedvi.data.errors import SiteDataError

    with pytest.raises(SiteDataError, match="data-path"):
        NodeSettings.from_configs({}, AppSettings())


def test_site_with_another_schema_gets_a_clear_error(tmp_path):
    from scfedvi.data.errors import SchemaMismatchError
    from scfedvi.data.schema import FederationSchema

    node = NodeSettings("lab-a", tmp_path / "a.h5ad", tmp_path)
    with pytest.raises(SchemaMismatchError, match="no federation schema"):
        node.load_schema("abc")
    node.save_schema(FederationSchema(genes=("g1", "g2"), batches=("b",), batch_key="batch"))
    with pytest.raises(SchemaMismatchError, match="site 'lab-a': schema hash mismatch"):
        node.load_schema("0" * 64)


def test_describe_reports_shapes_and_types_not_values():
    content = RecordDict(
        {
            "arrays": m.params_to_record({"w": np.zeros((2, 3), np.float32)}),
            "metrics": m.metrics_to_record({"loss": 0.5}, 10),
            "config": ConfigRecord({"site": "lab-a", "genes": ["g1", "g2"]}),
        }
    )
    d = describe_content(content)
    assert d["arrays"]["items"]["w"] == {"dtype": "float32", "shape": [2, 3]}
    assert d["metrics"]["items"]["num-examples"] == {"type": "int"}
    assert d["config"]["items"]["genes"] == {"type": "list[str]", "len": 2}
    assert "lab-a" not in str(d)


def test_balancing_messages_reuse_the_sites_embedding(site_files, tmp_path, monkeypatch):
    """The first balancing message of a pass embeds the site's cells and keeps the embedding
    in the site's state folder; the next ones (same parameters and steps) read it back
    without the model or the data, and reply exactly as a fresh embedding would; new
    parameters, new steps or a changed data file embed again."""
    import os
    import shutil
    from types import SimpleNamespace

    import anndata as ad
    from flower_sites import N_TOP, run_config

    from scfedvi.config import SitePolicy
    from scfedvi.data.errors import SiteDataError
    from scfedvi.data.harmonize import harmonize
    from scfedvi.federation.balance import CENTROIDS, SUMS, BalanceStep, steps_to_arrays
    from scfedvi.flower import client_app
    from scfedvi.train.local import build_module
    from scfedvi.train.params import get_state

    sites = {s: ad.read_h5ad(p) for s, p in sorted(site_files.paths.items())}
    schema = harmonize(sites, batch_key="batch", n_top_genes=N_TOP)
    data = tmp_path / "site-a.h5ad"
    shutil.copy(site_files.paths["site-a"], data)
    # room for the cache's queries: the run declares 10 sums rounds a pass, the site allows them
    node = NodeSettings(
        "site-a", data, tmp_path / "state", policy=SitePolicy(max_balance_rounds=10)
    )
    node.save_schema(schema)
    cfg = run_config(balance_clusters=3, balance_rounds=10)
    params = get_state(build_module(schema.n_genes, schema.n_batches, cfg.model))
    computed: list[str] = []
    worker = client_app._worker

    def counting_worker(*args):
        computed.append("embedded")
        return worker(*args)

    monkeypatch.setattr(client_app, "_worker", counting_worker)

    def ask(phase, params, steps=(), centroids=None, run_id=1):
        content = {
            m.ARRAYS: m.params_to_record(params),
            m.CONFIG: m.round_config(
                schema.hash, 1, **{m.PHASE: phase, m.N_CLUSTERS: 3, m.SEED: 7}
            ),
        }
        if steps:
            content[m.STEPS] = m.params_to_record(steps_to_arrays(list(steps)))
        if centroids is not None:
            content[m.CENTROIDS] = m.params_to_record({m.CENTROIDS: centroids})
        # what the handler reads of a Message
        msg = SimpleNamespace(content=RecordDict(content), metadata=SimpleNamespace(run_id=run_id))
        reply = client_app.balance.__wrapped__(msg, node, cfg, AppSettings())
        return m.record_to_params(reply.array_records[m.CLUSTERS])

    first = ask(CENTROIDS, params)
    assert computed == ["embedded"] and node.balance_cache_path.exists()
    centroids = first["values"][:3]
    sums = ask(SUMS, params, centroids=centroids)
    again = ask(SUMS, params, centroids=centroids)
    assert computed == ["embedded"]  # read back twice
    node.balance_cache_path.unlink()
    fresh = ask(SUMS, params, centroids=centroids)
    assert computed == ["embedded"] * 2
    for got in (sums, again):
        for k in ("values", "counts"):
            np.testing.assert_array_equal(got[k], fresh[k])
    step = BalanceStep(centroids.astype(np.float64), np.full(3, 1 / 3))
    ask(CENTROIDS, params, steps=[step])  # new steps (the next pass)
    ask(SUMS, params, steps=[step], centroids=centroids)
    other = {k: v + 0.01 if v.dtype.kind == "f" else v for k, v in params.items()}
    ask(SUMS, other, steps=[step], centroids=centroids)  # new parameters
    assert computed == ["embedded"] * 4
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the file changed
    ask(SUMS, other, steps=[step], centroids=centroids)
    assert computed == ["embedded"] * 5
    node.balance_cache_path.write_bytes(b"not an npz")  # unreadable: embedded again
    ask(SUMS, other, steps=[step], centroids=centroids)
    assert computed == ["embedded"] * 6
    data.unlink()  # the site's file is gone: the usual clear error, not a cache hit
    with pytest.raises(SiteDataError, match="site-a"):
        ask(SUMS, other, steps=[step], centroids=centroids)
    # the site's query budget outlives the message's process: kept per run in its state dir
    shutil.copy(site_files.paths["site-a"], data)
    ask(CENTROIDS, params, run_id=2)
    with pytest.raises(SiteDataError, match=r"site-a.*budget of 1"):
        ask(CENTROIDS, params, run_id=2)  # one local summary a pass
    assert (tmp_path / "state" / "site-a.ledger.run2.json").exists()
