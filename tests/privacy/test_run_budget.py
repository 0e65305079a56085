"""The site's budget across runs (issue 16): a coordinator that starts many runs, each within
its per-run budgets, is refused by the site's own record of runs, in process and through the
Flower handlers (called directly, as the ClientApp calls them; no processes)."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from handler_messages import handler_message
from scfedvi import ScFedVI
from scfedvi._constants import SCHEMA_HASH
from scfedvi.config import FederationConfig, PrivacyConfig, RunConfig, SitePolicy, TrainConfig
from scfedvi.federation.site import SiteWorker
from scfedvi.flower import client_app
from scfedvi.flower import messages as m
from scfedvi.flower.settings import default_run_config
from scfedvi.privacy.accountant import epsilon_closed_form, gaussian_epsilon
from scfedvi.privacy.policy import PolicyRefusal, QueryLedger, policy_from_node_config
from scfedvi.privacy.run_budget import RunLedger, run_epsilon, runs_ledger_path
from scfedvi.train.local import SiteTensors
from synthetic import make_counts

DP = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.5, expected_sites=3)
CFG = RunConfig(
    federation=FederationConfig(n_rounds=1), train=TrainConfig(local_epochs=1, batch_size=32)
)


def _sites() -> dict:
    a = make_counts(240, 30, seed=3)
    return {s: a[i * 120 : (i + 1) * 120].copy() for i, s in enumerate(("lab-a", "lab-b"))}


def test_many_runs_in_process_are_refused_by_each_sites_record(tmp_path, caplog):
    """The attack: start run after run on the same sites (each within its per-run budgets),
    to collect more summaries and more models. The fourth run is refused before any site
    answers its summaries; a new ScFedVI does not reset the record (it lives in ledger_dir)."""
    sites = _sites()
    kw = {"batch_key": "batch", "n_top_genes": None, "ledger_dir": tmp_path, "config": CFG}
    for _ in range(3):
        ScFedVI.from_sites(sites, **kw)
    with caplog.at_level(logging.WARNING, logger="scfedvi.privacy.policy"):
        with pytest.raises(PolicyRefusal, match=r"site 'lab-a' refuses: run '\w+' would be run 4 "):
            ScFedVI.from_sites(sites, **kw)
    assert "over its policy's max_runs=3" in caplog.text  # logged at the site, with its reason
    assert len(RunLedger(runs_ledger_path(tmp_path, "lab-a"), "lab-a").runs()) == 3
    # the refusal is the budget's: a site whose policy allows more runs answers the fourth
    ScFedVI.from_sites(sites, **kw, policy=SitePolicy(max_runs=10))
    # without a ledger_dir the simulated sites keep no record across models (as before)
    for _ in range(4):
        ScFedVI.from_sites(sites, batch_key="batch", n_top_genes=None, config=CFG)


def test_training_from_scratch_again_is_another_run(tmp_path):
    model = ScFedVI.from_sites(
        _sites(), batch_key="batch", n_top_genes=None, config=CFG, ledger_dir=tmp_path,
        policy=SitePolicy(max_runs=2),
    )  # fmt: skip
    model.train(progress=False)  # the model's own run
    model.train(2, progress=False)  # continues it to round 2: no new run
    first = model.run_id
    model.train(progress=False, resume=False)  # from the initialization: run 2
    assert model.run_id != first
    with pytest.raises(PolicyRefusal, match="max_runs=2"):
        model.train(progress=False, resume=False)
    ledger = RunLedger(runs_ledger_path(tmp_path, "lab-b"), "lab-b")
    assert [r["rounds"] for r in ledger.runs()] == [2, 1]  # rounds answered per run


def _worker(ledger: QueryLedger, privacy: PrivacyConfig, policy: SitePolicy) -> SiteWorker:
    a = make_counts(60, 20, seed=4)
    data = SiteTensors(a.X, np.zeros(60, dtype=np.int64))
    cfg = RunConfig(privacy=privacy, train=TrainConfig(batch_size=16))
    return SiteWorker("lab-a", data, 20, 1, cfg, policy=policy, ledger=ledger)


def test_dp_runs_are_refused_beyond_the_sites_total_epsilon(tmp_path):
    """Averaging the DP models of k runs with the same settings divides the noise by sqrt(k).
    The site sums its runs' epsilons and refuses the round that would pass its budget."""
    policy = SitePolicy(max_total_epsilon=10.0, max_runs=100)
    path = runs_ledger_path(tmp_path, "lab-a")
    eps1 = run_epsilon(policy, DP, 1)  # one round at sigma 1.5: 2.75
    answered = 0
    for run in range(10):  # the attacker: one-round runs, as many as it is allowed
        w = _worker(QueryLedger(runs=RunLedger(path, "d"), run_id=f"r{run}"), DP, policy)
        try:
            w.check_policy(0, w.config.train)  # SiteWorker.fit's check, before training
        except PolicyRefusal as e:
            assert "over its policy's max_total_epsilon=10; the coordinator must use more " in (
                str(e)
            )
            assert f"its other {answered} run(s) {answered * eps1:.4g}" in str(e)
            break
        answered += 1
    assert answered == math.floor(10.0 / eps1) == 3
    # a run's own rounds compose within the run (one Gaussian mechanism over its rounds)
    w = _worker(QueryLedger(runs=RunLedger(tmp_path / "other.json", "d")), DP, policy)
    for r in range(100):
        try:
            w.check_policy(r, w.config.train)
        except PolicyRefusal:
            break
    assert run_epsilon(policy, DP, r) <= 10.0 < run_epsilon(policy, DP, r + 1)


def test_the_site_accounts_at_its_own_delta_and_refuses_non_dp_when_it_must(tmp_path):
    policy = SitePolicy(max_total_epsilon=5.0)
    loose = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.5, expected_sites=3, delta=0.4)
    assert gaussian_epsilon(1.5, 3, 0.4) < 1.0 < 5.0 < run_epsilon(policy, loose, 3)
    w = _worker(QueryLedger(), loose, policy)  # in memory: this run's own epsilon still counts
    w.check_policy(0, w.config.train)
    w.check_policy(1, w.config.train)
    with pytest.raises(PolicyRefusal, match=r"round 3 of run 'run' would bring .* delta=1e-05"):
        w.check_policy(2, w.config.train)
    strict = SitePolicy(allow_non_dp_runs=False, max_runs=10)
    path = runs_ledger_path(tmp_path, "lab-a")
    w = _worker(QueryLedger(runs=RunLedger(path, "d"), run_id="a"), PrivacyConfig(), strict)
    with pytest.raises(PolicyRefusal, match=r"trains without differential privacy .* inf"):
        w.check_policy(0, w.config.train)
    allowed = SitePolicy(max_total_epsilon=100.0, max_runs=10)  # a non-DP run, then DP runs
    w = _worker(QueryLedger(runs=RunLedger(path, "d"), run_id="b"), PrivacyConfig(), allowed)
    w.check_policy(0, w.config.train)
    w = _worker(QueryLedger(runs=RunLedger(path, "d"), run_id="c"), DP, allowed)
    w.check_policy(0, w.config.train)  # non-DP runs are not counted while they are allowed
    tightened = SitePolicy(max_total_epsilon=100.0, max_runs=10, allow_non_dp_runs=False)
    w = _worker(QueryLedger(runs=RunLedger(path, "d"), run_id="d"), DP, tightened)
    with pytest.raises(PolicyRefusal, match=r"answered 1 run\(s\) without DP"):
        w.check_policy(0, w.config.train)


def test_run_window_and_node_config_keys(tmp_path):
    policy = SitePolicy(max_runs=2, run_window_days=1.0)
    ledger = RunLedger(tmp_path / "runs.json", "d")
    now = time.time()
    ledger.admit("lab-a", "1", policy, now=now - 3 * 86_400)
    ledger.admit("lab-a", "2", policy, now=now)
    ledger.admit("lab-a", "3", policy, now=now)  # run 1 has left the window
    with pytest.raises(PolicyRefusal, match=r"in the last 1 days, over .* waits until"):
        ledger.admit("lab-a", "4", policy, now=now)
    ledger.admit("lab-a", "3", policy, now=now)  # a run already admitted answers on
    RunLedger(tmp_path / "runs.json", "other-file").admit("lab-a", "4", policy)  # per data file
    p = policy_from_node_config(
        {"max-runs": 5, "max-total-epsilon": 8, "allow-non-dp-runs": "false", "run-window-days": 0}
    )
    assert (p.max_runs, p.max_total_epsilon, p.allow_non_dp_runs) == (5, 8.0, False)
    assert p.run_window_days is None
    with pytest.raises(ValueError, match="allow-non-dp-runs"):
        policy_from_node_config({"allow-non-dp-runs": "maybe"})
    with pytest.raises(ValueError, match="epsilon_adjacency"):
        SitePolicy(epsilon_adjacency="any")  # type: ignore[arg-type]


@pytest.mark.parametrize("adjacency", ["add-remove", "replace-one"])
def test_the_sites_closed_form_epsilon_is_the_accountants(adjacency):
    """The site computes epsilon without dp-accounting (site code stays light)."""
    for sigma, rounds in [(0.3, 2), (1.0, 20), (2.68, 20), (16.68, 20), (100.0, 1), (0.05, 1)]:
        ref = gaussian_epsilon(sigma, rounds, 1e-5, adjacency)  # type: ignore[arg-type]
        got = epsilon_closed_form(sigma, rounds, 1e-5, adjacency)  # type: ignore[arg-type]
        assert got == pytest.approx(ref, rel=1e-9)
    assert epsilon_closed_form(0.0, 5, 1e-5) == math.inf and epsilon_closed_form(1, 0, 1e-5) == 0


# -- the Flower handlers: the same ledger, in the site's state-dir ----------------------------
_message = handler_message


def _context(node_config: dict, run_id: int, **run: object) -> Context:
    rc = default_run_config(**run) | {"out-dir": "unused"}
    return Context(
        run_id=run_id, node_id=1, node_config=node_config, state=RecordDict(), run_config=rc
    )


@pytest.fixture
def flower_site(tmp_path):
    a = make_counts(120, 30, seed=1)
    path = tmp_path / "lab-a.h5ad"
    a.write_h5ad(path)
    node_config = {"site": "lab-a", "data-path": str(path), "state-dir": str(tmp_path / "state")}
    return a, node_config


def test_flower_site_refuses_repeated_summary_queries_across_runs(flower_site):
    """The attack through the ClientApp's own handler: one summary query per run (within the
    per-run budget), in run after run. Each run has a new per-run ledger file; the record of
    runs in the state dir refuses the fourth, and the reply's reason says why."""
    a, node_config = flower_site
    genes = {m.CONFIG: ConfigRecord({"genes": [str(g) for g in a.var_names]})}
    for run in (11, 12, 13):
        reply = client_app.summary(_message(genes, m.SUMMARY, run), _context(node_config, run))
        assert not reply.has_error(), reply.error.reason
    reply = client_app.summary(_message(genes, m.SUMMARY, 14), _context(node_config, 14))
    assert reply.has_error()
    assert "site 'lab-a' refuses: run '14' would be run 4 it answers on its data" in (
        reply.error.reason
    )
    assert str(a.n_obs) not in reply.error.reason and "h5ad" not in reply.error.reason
    # the site's node config, not the coordinator, can allow more runs
    more = {**node_config, "max-runs": 4}
    assert not client_app.summary(_message(genes, m.SUMMARY, 14), _context(more, 14)).has_error()


def test_flower_train_handler_charges_each_runs_epsilon(flower_site):
    from scfedvi.data.harmonize import harmonize
    from scfedvi.train.local import build_module
    from scfedvi.train.params import get_state, shared_keys

    a, node_config = flower_site
    node_config = {**node_config, "max-total-epsilon": 5.0}
    schema = harmonize({"lab-a": a}, batch_key="batch", n_top_genes=None)
    dp = {"clip_norm": 1.0, "noise_multiplier": 1.5, "expected_sites": 3, "batch_size": 32}
    content = {m.CONFIG: ConfigRecord({"schema": schema.to_json(), SCHEMA_HASH: schema.hash})}
    module = build_module(schema.n_genes, schema.n_batches, RunConfig().model)
    state = get_state(module)
    params = {k: state[k] for k in shared_keys(module, RunConfig().federation.norm_stats)}
    train = {m.ARRAYS: m.params_to_record(params), m.CONFIG: m.round_config(schema.hash, 0)}
    # run 21: one round, epsilon 2.75 at the site's delta; run 22's first round would pass 5
    for run in (21, 22):
        ctx = _context(node_config, run, local_epochs=1, **dp)
        assert not client_app.schema(_message(content, m.SCHEMA, run), ctx).has_error()
        reply = client_app.train(_message(train, m.TRAIN, run), ctx)
        assert reply.has_error() == (run == 22), reply.error.reason if run == 21 else ""

    eps1 = run_epsilon(SitePolicy(), DP, 1)  # the same sigma, at the site's delta 1e-5
    assert f"round 1 of run '22' would bring its total epsilon to {2 * eps1:.4g}" in (
        reply.error.reason
    )
    assert "over its policy's max_total_epsilon=5" in reply.error.reason


def test_simulated_sites_keep_no_record_across_runs(flower_site, tmp_path):
    """Flower's simulation engine: every site's data is in the runner's sim-data-dir, so the
    sites keep no record across runs (as in process without ledger_dir); the per-run budget
    still holds."""
    a, _ = flower_site
    genes = {m.CONFIG: ConfigRecord({"genes": [str(g) for g in a.var_names]})}
    sim = {"sim_data_dir": str(tmp_path), "sim_state_dir": str(tmp_path / "sim-state")}
    for run in (31, 32, 33, 34):
        ctx = _context({"partition-id": 0}, run, **sim)
        assert not client_app.summary(_message(genes, m.SUMMARY, run), ctx).has_error()
    again = client_app.summary(_message(genes, m.SUMMARY, 34), ctx)
    assert again.has_error() and "query 2 of kind 'summary'" in again.error.reason
    assert not list((tmp_path / "sim-state").glob("*.runs.json"))


def test_an_unwritable_record_is_a_clear_site_error(tmp_path):
    from scfedvi.data.errors import SiteDataError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(SiteDataError, match=r"record of runs .* cannot be written .* state-dir"):
        RunLedger(blocker / "lab-a.runs.json", "d").admit("lab-a", "1", SitePolicy())
    broken = tmp_path / "lab-a.runs.json"
    broken.write_text("{not json")
    with pytest.raises(SiteDataError, match=r"is not valid JSON"):
        RunLedger(broken, "d").admit("lab-a", "1", SitePolicy())
