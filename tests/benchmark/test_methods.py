"""The benchmark runs each federated job with the job's seed."""

from __future__ import annotations

from dataclasses import replace

from scfedvi.benchmark.methods import METHODS, scfedvi_config
from scfedvi.config import RunConfig

from .conftest import parse


def test_federated_jobs_take_the_job_seed():
    for name in ("scfedvi", "fedavg"):
        settings = METHODS[name].settings(False)
        base = RunConfig.from_dict(settings["config"])
        for seed in (0, 1, 7):
            cfg = scfedvi_config(settings, seed)
            assert cfg.federation.seed == seed
            assert cfg == replace(base, federation=replace(base.federation, seed=seed))


def _keys(own_h5ad, tmp_path):
    from scfedvi.benchmark import plan as plan_module
    from scfedvi.benchmark.cli import settings_from_args

    argv = [str(own_h5ad), "--batch-key", "lab", "--label-key", "ctype", "--clients", "2"]
    settings = settings_from_args(
        parse([*argv, "--methods", "scfedvi,fedavg,pca", "--quick", "--out", str(tmp_path)])
    )
    return lambda: {job.method: job.key for _, job in plan_module.plan(settings)[0]}


def test_the_baseline_code_is_part_of_its_cache_key(own_h5ad, tmp_path, monkeypatch):
    """A change to ``benchmark/baselines.py`` changes the key of every baseline job and of no
    federated one."""
    from scfedvi.benchmark import methods
    from scfedvi.benchmark import plan as plan_module

    keys = _keys(own_h5ad, tmp_path)
    before = keys()
    real = plan_module.source_hash
    monkeypatch.setattr(
        plan_module,
        "source_hash",
        lambda *parts: real(*parts) + ("edited" if parts == methods.BASELINE_CODE else ""),
    )
    after = keys()
    assert after["pca"] != before["pca"]
    assert after["scfedvi"] == before["scfedvi"] and after["fedavg"] == before["fedavg"]


def test_the_federated_runner_is_part_of_the_cache_key(own_h5ad, tmp_path, monkeypatch):
    """A change to the code that runs a federated job (as the seed fix was) changes the key of
    every federated job and of no baseline."""
    from scfedvi.benchmark import methods

    keys = _keys(own_h5ad, tmp_path)
    before = keys()
    assert keys() == before  # deterministic
    real = methods.inspect.getsource
    monkeypatch.setattr(
        methods.inspect,
        "getsource",
        lambda fn: real(fn) + "# edited" if fn is methods.run_scfedvi else real(fn),
    )
    after = keys()
    assert after["pca"] == before["pca"]
    assert after["scfedvi"] != before["scfedvi"] and after["fedavg"] != before["fedavg"]
