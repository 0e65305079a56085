"""The schedule that follows the data, its overrides, its errors, and federated early stopping."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig
from scfedvi.federation.schedule import (
    max_epochs_heuristic,
    resolve_schedule,
    site_train_config,
)


def cfg(train=None, fed=None) -> RunConfig:
    return RunConfig(train=TrainConfig(**(train or {})), federation=FederationConfig(**(fed or {})))


def test_heuristic_is_scvi_tools_rule():
    scvi_utils = pytest.importorskip("scvi.model._utils")
    for n in (1, 500, 19_999, 20_000, 20_001, 33_333, 100_000, 999_999, 10**6, 10**8):
        assert max_epochs_heuristic(n) == scvi_utils.get_max_epochs_heuristic(n), n


@pytest.mark.parametrize(
    "sizes",
    [
        [1_500, 2_000],  # pancreas-like, 2 sites
        [700, 900, 1_100, 800, 500],  # cortex-like, 5 sites
        [10_000, 10_000],  # 20,000 cells (18,000 training): still 400 epochs
    ],
)
def test_small_federations_keep_todays_schedule(sizes):
    """Up to 20,000 cells the resolved default is 20 rounds x 20 local epochs: the paper
    grid's schedule, so its results stand."""
    s = resolve_schedule(RunConfig(), {f"s{i}": n for i, n in enumerate(sizes)})
    assert sum(sizes) <= 20_000
    assert (s.rounds, s.local_epochs, s.local_steps, s.epochs) == (20, 20, {}, 400.0)
    assert s.rule == "heuristic"
    for site in s.n_train_cells:
        assert site_train_config(RunConfig().train, *s.work(site)).local_epochs == 20


def test_large_federations_follow_the_data():
    # the rule counts every cell, as scvi-tools' n_obs does: 100,000 cells at 10 sites ->
    # round(20000/100000*400) = 80 epochs over the 90,000 training cells
    s = resolve_schedule(RunConfig(), {f"s{i}": 10_000 for i in range(10)})
    assert s.local_epochs == 80 // 20 == 4 and s.epochs == 80.0
    assert s.cell_passes == 80 * 90_000  # what pooled scvi-tools trains: 80 epochs x 90%
    # 30,000 cells: scvi-tools' 267 epochs, 13.35 a round -> 13 local epochs (260 epochs)
    s = resolve_schedule(RunConfig(), {"a": 10_000, "b": 20_000})
    assert max_epochs_heuristic(30_000) == 267 and s.local_epochs == 13
    # 1,000,000 cells at 10 sites -> 8 epochs, 0.4 epoch per round
    s = resolve_schedule(RunConfig(), {f"s{i}": 100_000 for i in range(10)})
    assert s.local_epochs is None
    assert s.local_steps == {f"s{i}": math.ceil(0.4 * 90_000 / 128) for i in range(10)}
    assert s.epochs == pytest.approx(8.0, rel=0.01)
    # unequal sites: 902,000 cells -> 9 epochs, 0.45 of an epoch per round, as steps
    s = resolve_schedule(RunConfig(), {"big": 900_000, "small": 2_000})
    assert s.local_steps == {"big": math.ceil(0.45 * 810_000 / 128), "small": 7}
    assert site_train_config(RunConfig().train, *s.work("small")).local_steps == 7
    assert "scvi-tools' rule" in s.reason and "7-2848 local steps" in s.describe()


def test_explicit_settings_override_the_rule():
    big = {"a": 500_000, "b": 500_000}
    s = resolve_schedule(cfg(train={"local_epochs": 3}, fed={"n_rounds": 7}), big)
    assert (s.rule, s.rounds, s.local_epochs, s.epochs) == ("local_epochs", 7, 3, 21.0)
    s = resolve_schedule(cfg(train={"local_steps": 11}), big)
    assert s.rule == "local_steps" and s.local_steps == {"a": 11, "b": 11}
    s = resolve_schedule(cfg(fed={"max_epochs": 100, "n_rounds": 10}), big)
    assert (s.rule, s.local_epochs, s.epochs) == ("max_epochs", 10, 100.0)
    s = resolve_schedule(cfg(fed={"n_rounds": 40}), {"a": 3_000})  # 400 epochs over 40 rounds
    assert (s.local_epochs, s.epochs) == (10, 400.0)


def test_bad_schedules_get_clear_errors():
    with pytest.raises(ValueError, match="max_epochs must be >= 1"):
        FederationConfig(max_epochs=0)
    with pytest.raises(ValueError, match="local_epochs must be >= 1"):
        TrainConfig(local_epochs=0)
    with pytest.raises(ValueError, match="early_stopping_patience"):
        FederationConfig(early_stopping_patience=0)
    with pytest.raises(ValueError, match=r"train_size=1.0 holds none out; set train_size < 1"):
        resolve_schedule(cfg(train={"train_size": 1.0}, fed={"early_stopping": True}), {"a": 500})
    with pytest.raises(ValueError, match=r"site 'tiny': 117 training cells .* < batch_size=128"):
        resolve_schedule(RunConfig(), {"ok": 5_000, "tiny": 130})
    with pytest.raises(ValueError, match=r"train_size=0.999 holds out none of the sites' 800"):
        es = {"early_stopping": True}
        resolve_schedule(cfg(train={"train_size": 0.999}, fed=es), {"a": 500, "b": 300})
    with pytest.raises(ValueError, match=r"patience=5 rounds is not below n_rounds=5"):
        resolve_schedule(cfg(fed={"early_stopping": True, "n_rounds": 5}), {"a": 500})
    with pytest.raises(ValueError, match="set one of them"):
        resolve_schedule(cfg(train={"local_epochs": 2}, fed={"max_epochs": 10}), {"a": 500})
    with pytest.raises(ValueError, match="no sites"):
        resolve_schedule(RunConfig(), {})


FAST = RunConfig(
    model=ModelConfig(n_hidden=16, n_latent=4),
    train=TrainConfig(batch_size=32, n_epochs_kl_warmup=2, local_epochs=1),
    federation=FederationConfig(n_rounds=6, n_jobs=1, balance_clusters=0),
)


def _model(config, small_adata):
    from scfedvi import ScFedVI

    return ScFedVI.from_sites(small_adata, split_key="batch", batch_key="batch", config=config)


def test_early_stopping_rule_on_the_weighted_validation_loss():
    from scfedvi.federation.coordinator import Coordinator

    fed = replace(FAST.federation, early_stopping=True, early_stopping_patience=2)
    coord = Coordinator(5, 1, replace(FAST, federation=fed))
    # two sites; the weighted loss per round: 10, 9.5, 9.5, 9.6, 9.7
    losses = [(10, 10), (8, 10), (9.5, 9.5), (9.6, 9.6), (9.7, 9.7)]
    seen = []
    for r, (a, b) in enumerate(losses):
        coord.history += [
            {"round": r, "site": "a", "status": "ok", "validation_loss": a, "n_train": 100},
            {"round": r, "site": "b", "status": "ok", "validation_loss": b, "n_train": 300},
        ]
        seen.append(coord.early_stopped)
    assert coord.validation_curve()[1] == (1, pytest.approx(0.25 * 8 + 0.75 * 10))  # 9.5
    # best 9.5 at round 1 (ties do not improve): rounds 2 and 3 do not improve -> stop
    assert seen == [False, False, False, True, True]
    coord.history.append(  # a rejected update does not count
        {"round": 5, "site": "a", "status": "rejected", "validation_loss": 0.0, "n_train": 1}
    )
    assert len(coord.validation_curve()) == 5


def test_early_stopping_ends_a_run_and_the_schedule_is_stored(small_adata, tmp_path):
    """With a min_delta no round can meet, the run stops after the first round plus
    ``patience`` rounds; the schedule and the stop are stored with the model."""
    fed = replace(
        FAST.federation,
        early_stopping=True,
        early_stopping_patience=2,
        early_stopping_min_delta=1e9,
    )
    stopped = _model(replace(FAST, federation=fed), small_adata)
    h = stopped.train(progress=False)
    assert sorted(h["round"].unique()) == [0, 1, 2] and stopped.early_stopped
    curve = stopped.coordinator.validation_curve()
    rows = h[h["round"] == 0]
    assert curve[0][1] == pytest.approx(
        np.average(rows["validation_loss"], weights=rows["n_train"])
    )
    assert h.attrs["schedule"]["rounds"] == 6 and h.attrs["schedule"]["rule"] == "local_epochs"
    stopped.save(tmp_path / "m")
    from scfedvi import ScFedVI

    loaded = ScFedVI.load(tmp_path / "m")
    assert loaded.schedule == stopped.schedule and loaded.early_stopped


def test_the_model_resolves_the_default_schedule(small_adata):
    config = replace(FAST, train=replace(FAST.train, local_epochs=None))
    model = _model(replace(config, federation=replace(config.federation, n_rounds=20)), small_adata)
    model.train(n_rounds=1, progress=False)
    s = model.schedule
    assert (s.rule, s.rounds, s.local_epochs) == ("heuristic", 20, 20)
    per_epoch = {n: math.ceil(c / 32) for n, c in s.n_train_cells.items()}
    steps = model.history.set_index("site")["steps"].to_dict()
    assert steps == {n: 20 * k for n, k in per_epoch.items()}
