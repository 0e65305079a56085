"""The site's policy: its bounds, its query budget, where it comes from, and the same refusal
through the Flower handlers (called directly, no processes) as in process."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from handler_messages import handler_message
from scfedvi._constants import SCHEMA_HASH
from scfedvi.config import FederationConfig, ModelConfig, RunConfig, SitePolicy, TrainConfig
from scfedvi.data.errors import SiteDataError
from scfedvi.data.harmonize import harmonize, pooled_moments, site_summary
from scfedvi.flower import client_app
from scfedvi.flower import messages as m
from scfedvi.flower.settings import default_run_config
from scfedvi.privacy.policy import (
    PolicyRefusal,
    PooledBatch,
    QueryLedger,
    check_training,
    ledger_path,
    policy_from_node_config,
)
from synthetic import make_counts


def test_defaults_accept_the_runs_configurations():
    p = SitePolicy()
    for cfg in (
        RunConfig(),
        RunConfig(train=TrainConfig(batch_size=16, local_epochs=1)),  # benchmark --quick
        RunConfig(model=ModelConfig(norm="layer", likelihood="nb"), train=TrainConfig(lr=1e-2)),
        RunConfig(federation=FederationConfig(n_rounds=20), train=TrainConfig(local_steps=500)),
    ):
        check_training(p, "lab-a", cfg, n_train_cells=18)  # pancreas --quick, 5 sites


@pytest.mark.parametrize(
    ("cfg", "n_train", "match"),
    [
        (RunConfig(), 15, r"train\.train_size=0\.9 leaves 15 training cells, fewer than .* 16"),
        (RunConfig(train=TrainConfig(batch_size=8)), 100, r"train\.batch_size=8 is below .* 16"),
        (
            RunConfig(train=TrainConfig(lr=10.0)),
            100,
            r"site 'lab-a' refuses: train\.lr=10\.0 is outside its policy's range \[1e-05, 0\.01\]; "
            r"the coordinator must use a learning rate in that range \(or the site widens "
            r"SitePolicy\.lr_range\)",
        ),
        (RunConfig(train=TrainConfig(weight_decay=0.5)), 100, r"train\.weight_decay=0\.5"),
        (
            RunConfig(train=TrainConfig(local_steps=10**6)),
            100,
            r"train\.local_steps=1000000 .*10000",
        ),
        (RunConfig(train=TrainConfig(local_epochs=500)), 100, r"train\.local_epochs=500"),
        (RunConfig(federation=FederationConfig(n_rounds=5000)), 100, r"federation\.n_rounds=5000"),
        (RunConfig(model=ModelConfig(norm="none")), 100, r"model\.norm='none' is not among"),
    ],
)
def test_each_bound_refuses_naming_the_setting_and_the_fix(cfg, n_train, match):
    with pytest.raises(PolicyRefusal, match=match):
        check_training(SitePolicy(), "lab-a", cfg, n_train_cells=n_train)


def test_too_many_rounds_in_a_run_are_refused():
    from scfedvi.federation.site import SiteWorker
    from scfedvi.train.local import SiteTensors

    a = make_counts(60, 20)
    data = SiteTensors(a.X.tocsr().astype(np.float32), a.obs["batch"].cat.codes.to_numpy())
    cfg = RunConfig(
        model=ModelConfig(n_hidden=8, n_latent=2),
        train=TrainConfig(batch_size=16, local_steps=1),
        federation=FederationConfig(n_rounds=2),
    )
    worker = SiteWorker("lab-a", data, 20, 2, cfg, policy=SitePolicy(max_rounds=2))
    from scfedvi.train.params import get_state

    params = get_state(worker.module)
    worker.fit(params, 0)
    worker.fit(params, 1)
    with pytest.raises(PolicyRefusal, match=r"round 2 is beyond its policy's 2 rounds"):
        worker.fit(params, 2)
    with pytest.raises(PolicyRefusal, match=r"query 3 of kind 'train' exceeds .*budget of 2"):
        worker.fit(params, 0)  # the same round again is another query


def test_policy_validation():
    with pytest.raises(ValueError, match="lr_range must be"):
        SitePolicy(lr_range=(1e-2, 1e-5))
    with pytest.raises(ValueError, match="allowed_encoder_norms"):
        SitePolicy(allowed_encoder_norms=("group",))
    with pytest.raises(ValueError, match="min_batch_cells must be >= 2"):
        SitePolicy(min_batch_cells=1)
    p = SitePolicy(allowed_label_keys=["cell_type"])  # type: ignore[arg-type]
    assert p.allowed_label_keys == ("cell_type",) and hash(p)
    assert p.allowing_label_key("tissue").allowed_label_keys == ("cell_type", "tissue")
    assert p.allowing_label_key(None) is p


def test_ledger_persists_between_processes_per_run(tmp_path):
    path = ledger_path(tmp_path, "lab-a", 7)
    QueryLedger(path).spend("lab-a", "summary", 1)
    with pytest.raises(PolicyRefusal, match="query 2 of kind 'summary'"):
        QueryLedger(path).spend("lab-a", "summary", 1)  # a new process reads the count back
    QueryLedger(ledger_path(tmp_path, "lab-a", 8)).spend("lab-a", "summary", 1)  # a new run
    ledger = QueryLedger()
    for p in range(3):  # each key is its own budget (e.g. one balancing pass)
        ledger.spend("lab-a", "balance-sums", 1, key=f"pass-{p}")
    assert ledger.used("lab-a", "balance-sums", "pass-0") == 1


def test_policy_from_node_config_file_and_keys(tmp_path):
    f = tmp_path / "policy.toml"
    f.write_text(
        "[policy]\nmin-train-cells = 100\nlr_range = [1e-5, 1e-3]\n"
        'allowed-label-keys = ["tissue"]\n'
    )
    p = policy_from_node_config(
        {"policy-file": str(f), "min-batch-size": 32, "label-key": "cell_type"}
    )
    assert (p.min_train_cells, p.min_batch_size, p.lr_range) == (100, 32, (1e-5, 1e-3))
    assert p.allowed_label_keys == ("tissue", "cell_type")  # the site's own key implicitly
    p = policy_from_node_config({"lr-range": "1e-6,1e-4", "allowed-encoder-norms": "batch"})
    assert p.lr_range == (1e-6, 1e-4) and p.allowed_encoder_norms == ("batch",)
    assert policy_from_node_config({}) == SitePolicy()
    f.write_text("min_train_cell = 3\n")
    with pytest.raises(SiteDataError, match="unknown key 'min_train_cell'"):
        policy_from_node_config({"policy-file": str(f)})
    with pytest.raises(SiteDataError, match="no such file"):
        policy_from_node_config({"policy-file": str(tmp_path / "missing.toml")})
    with pytest.raises(SiteDataError, match="policy is invalid"):
        policy_from_node_config({"min-batch-cells": 1})


def test_pooled_moments_must_contain_the_sites_share_and_match_its_clip_values():
    a = make_counts(120, 30, seed=4)
    sites = {"a": a[:60].copy(), "b": a[60:].copy()}
    first = [site_summary(x, site=s, batch_key="batch") for s, x in sites.items()]
    pooled = pooled_moments(first)
    assert set(pooled) == {"b0", "b1"}
    ok = site_summary(sites["a"], site="a", batch_key="batch", pooled=pooled)
    assert set(ok.stats) == {"b0", "b1"}
    own = first[0].stats["b0"]
    forged = {**pooled, "b0": PooledBatch(pooled["b0"].n, own["sum"] * 0.5, own["sum_sq"])}
    with pytest.raises(PolicyRefusal, match=r"pooled sums of batch 'b0' do not contain its own"):
        site_summary(sites["a"], site="a", batch_key="batch", pooled=forged)
    alone = {
        **pooled,
        "b0": PooledBatch(first[0].batch_counts["b0"] + 3, own["sum"], own["sum_sq"]),
    }
    with pytest.raises(PolicyRefusal, match=r"3 besides this site's .* fewer than min_batch_cells"):
        site_summary(sites["a"], site="a", batch_key="batch", pooled=alone)
    chosen = {b: np.full(30, 2.0).tolist() for b in pooled}
    with pytest.raises(PolicyRefusal, match=r"clip values sent for batch 'b0' are not the loess"):
        site_summary(sites["a"], site="a", batch_key="batch", pooled=pooled, clip_values=chosen)
    with pytest.raises(
        PolicyRefusal, match=r"pooled moments were sent for batch .zz., which it does"
    ):
        site_summary(sites["a"], site="a", batch_key="batch", clip_values={"zz": [1.0] * 30})


def test_in_process_policy_per_site_and_label_keys():
    a = make_counts(240, 40)
    a.obs["lab"] = np.where(np.arange(a.n_obs) < 120, "lab-a", "lab-b")
    sites = {s: a[a.obs["lab"] == s].copy() for s in ("lab-a", "lab-b")}
    # the label key given to ScFedVI/harmonize is the sites' own: allowed implicitly
    s = harmonize(sites, batch_key="batch", n_top_genes=20, label_key="cell_type")
    assert s.labels == ("t0", "t1", "t2")
    strict = {"lab-a": SitePolicy(), "lab-b": SitePolicy(min_batch_cells=200)}
    s = harmonize(sites, batch_key="batch", n_top_genes=20, policy=strict)
    assert s.batches == ("b0", "b1")  # lab-b's batches counted, not summarised
    with pytest.raises(ValueError, match="no SitePolicy for site 'lab-b'"):
        harmonize(sites, batch_key="batch", policy={"lab-a": SitePolicy()})


# -- the Flower handlers: the same checks, called as the ClientApp calls them ----------------
_message = handler_message


@pytest.fixture
def flower_site(tmp_path):
    a = make_counts(120, 30, seed=1)
    a.obs["donor_id"] = [f"d{i}" for i in range(a.n_obs)]
    path = tmp_path / "lab-a.h5ad"
    a.write_h5ad(path)
    node_config = {"site": "lab-a", "data-path": str(path), "state-dir": str(tmp_path / "state")}
    return a, node_config


def _context(node_config: dict, run_id: int = 7, **run: object) -> Context:
    rc = default_run_config(**run) | {"out-dir": "unused"}
    return Context(
        run_id=run_id, node_id=1, node_config=node_config, state=RecordDict(), run_config=rc
    )


def test_flower_summary_handler_applies_the_sites_policy(flower_site):
    a, node_config = flower_site
    genes = {m.CONFIG: ConfigRecord({"genes": [str(g) for g in a.var_names]})}
    reply = client_app.summary(
        _message(genes, m.SUMMARY), _context(node_config, label_key="donor_id")
    )
    assert reply.has_error()
    assert "site 'lab-a' refuses: label_key='donor_id' is not among" in reply.error.reason
    # the site's node config allows its own label key; one summary pass per run
    own = {**node_config, "label-key": "donor_id"}
    reply = client_app.summary(_message(genes, m.SUMMARY), _context(own, label_key="donor_id"))
    assert not reply.has_error()
    again = client_app.summary(_message(genes, m.SUMMARY), _context(own, label_key="donor_id"))
    assert again.has_error() and "query 2 of kind 'summary'" in again.error.reason
    # a new run has a new budget; clip values for a batch nobody else holds are refused
    clips = {m.STATS: m.params_to_record({"b0": np.full(a.n_vars, 3.0)}), **genes}
    reply = client_app.summary(
        _message(clips, m.SUMMARY, run_id=8), _context(node_config, run_id=8)
    )
    assert (
        reply.has_error() and "clip values were sent for batch 'b0' without" in reply.error.reason
    )


def test_flower_train_handler_refuses_the_extraction_settings(flower_site):
    from scfedvi.data.harmonize import harmonize as harmonize_sites
    from scfedvi.train.local import build_module
    from scfedvi.train.params import get_state

    a, node_config = flower_site
    schema = harmonize_sites({"lab-a": a}, batch_key="batch", n_top_genes=None)
    content = {m.CONFIG: ConfigRecord({"schema": schema.to_json(), SCHEMA_HASH: schema.hash})}
    ctx = _context(node_config, train_size=0.01, norm="none", lr=1e8, batch_size=32)
    assert not client_app.schema(_message(content, m.SCHEMA), ctx).has_error()
    cfg = RunConfig(model=ModelConfig(norm="none"))
    params = get_state(build_module(schema.n_genes, schema.n_batches, cfg.model))
    train = {m.ARRAYS: m.params_to_record(params), m.CONFIG: m.round_config(schema.hash, 0)}
    reply = client_app.train(_message(train, m.TRAIN), ctx)
    assert reply.has_error()
    assert (
        "site 'lab-a' refuses: train.train_size=0.01 leaves 2 training cells" in reply.error.reason
    )
    # the site's policy file, not the run config, can allow it
    reply = client_app.train(
        _message(train, m.TRAIN),
        _context(node_config | {"min-train-cells": 1}, lr=1e8, norm="none", batch_size=32),
    )
    assert reply.has_error() and "train.lr=100000000.0 is outside" in reply.error.reason


def test_the_guides_table_of_defaults_is_sitepolicys():
    import dataclasses
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "privacy.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
        for line in text.splitlines()
        if line.startswith("| `")
    }
    defaults = SitePolicy()
    assert set(rows) == {f.name for f in dataclasses.fields(SitePolicy)}
    for name, shown in rows.items():
        assert shown == str(getattr(defaults, name)), name


def test_a_site_can_require_clipping_its_own_update():
    """``SitePolicy.max_clip_norm``: the site trains only under DP with its update clipped at
    the site to at most that bound; any other run configuration is refused, naming the fix."""
    from scfedvi.config import PrivacyConfig

    policy = SitePolicy(max_clip_norm=0.5)
    refused = [
        RunConfig(),  # no DP
        RunConfig(privacy=PrivacyConfig(clip_norm=0.5, noise_multiplier=1.0, expected_sites=3)),
        RunConfig(
            privacy=PrivacyConfig(
                clip_norm=2.0, noise_multiplier=1.0, expected_sites=3, clip_at="site"
            )
        ),
    ]
    for cfg in refused:
        with pytest.raises(PolicyRefusal, match=r"clipped at the site to at most 0\.5"):
            check_training(policy, "lab-a", cfg, n_train_cells=100)
    ok = RunConfig(
        privacy=PrivacyConfig(clip_norm=0.5, noise_multiplier=1.0, expected_sites=3, clip_at="site")
    )
    check_training(policy, "lab-a", ok, n_train_cells=100)
    check_training(
        SitePolicy(), "lab-a", RunConfig(), n_train_cells=100
    )  # default: as the run says
    assert policy_from_node_config({"max-clip-norm": 0.5}).max_clip_norm == 0.5
    assert policy_from_node_config({"max-clip-norm": 0}).max_clip_norm is None
