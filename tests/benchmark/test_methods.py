"""The benchmark runs each federated job with the job's seed."""

from __future__ import annotations

from dataclasses import replace

from scfedvi.benchmark.methods import METHODS, scfedvi_config
from scfedvi.config import RunConfig


def test_federated_jobs_take_the_job_seed():
    for name in ("scfedvi", "fedavg"):
        settings = METHODS[name].settings(False)
        base = RunConfig.from_dict(settings["config"])
        for seed in (0, 1, 7):
            cfg = scfedvi_config(settings, seed)
            assert cfg.federation.seed == seed
            assert cfg == replace(base, federation=replace(base.federation, seed=seed))
