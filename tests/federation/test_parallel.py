"""Sites trained in worker processes give the sequential run's results, bit for bit.

Each site's update is computed by the same code from the same inputs (global parameters, the
site's data and private state, the round's seed) with one torch thread in both cases, and the
server aggregates the updates in the sites' order, so the floating-point operations are the
same ones in the same order: the results are equal exactly, not only to rounding.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from scfedvi import ScFedVI
from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig
from scfedvi.federation.inprocess import resolve_n_jobs
from synthetic import make_counts

BASE = RunConfig(
    model=ModelConfig(n_hidden=16, n_latent=4),
    train=TrainConfig(batch_size=32, n_epochs_kl_warmup=3, local_epochs=1, optimizer_state="keep"),
    federation=FederationConfig(n_rounds=3, balance_clusters=0),
)


@pytest.fixture(scope="module")
def three_sites():
    adata = make_counts(330, 40, seed=3)
    adata.obs["lab"] = np.array(["a", "b", "c"])[np.arange(adata.n_obs) % 3]
    return adata


def _model(adata, n_jobs: int, **fed):
    cfg = replace(BASE, federation=replace(BASE.federation, n_jobs=n_jobs, **fed))
    return ScFedVI.from_sites(adata, split_key="lab", batch_key="batch", config=cfg)


def _assert_same(a: ScFedVI, b: ScFedVI) -> None:
    assert a.params is not None and b.params is not None
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    cols = ["round", "site", "loss", "validation_loss", "steps"]
    np.testing.assert_array_equal(a.history[cols].to_numpy(), b.history[cols].to_numpy())


def test_workers_equal_sequential_bitwise(three_sites):
    assert torch.get_num_threads() == 1  # the sequential run's thread count (conftest)
    seq = _model(three_sites, 1)
    seq.train(progress=False)
    par = _model(three_sites, 2)  # 2 workers: one owns two sites, one owns one
    par.train(progress=False)
    _assert_same(seq, par)
    # equal sites are dealt in name order to the least-loaded worker
    assert [w["sites"] for w in par.worker_memory] == [["a", "c"], ["b"]]
    assert all(w["peak_private_bytes"] > 0 for w in par.worker_memory)
    assert seq.worker_memory == []  # no workers in a sequential run
    # embeddings (computed in this process after training) agree as well
    for site in ("a", "b", "c"):
        np.testing.assert_array_equal(
            seq.get_latent_representation(site=site, write=False),
            par.get_latent_representation(site=site, write=False),
        )


def test_workers_hand_back_the_sites_state(three_sites):
    """train(2) then train(3) in workers equals one sequential train(3): the sites' private
    state (optimizer moments, statistics) returns from the workers between calls."""
    seq = _model(three_sites, 1)
    seq.train(progress=False)
    par = _model(three_sites, 3)
    par.train(n_rounds=2, progress=False)
    par.train(n_rounds=3, progress=False)
    _assert_same(seq, par)


def test_a_failing_site_is_named(three_sites, monkeypatch):
    from scfedvi.federation.site import SiteWorker

    real = SiteWorker.fit

    def failing(self, *a, **k):
        if self.name == "b":
            raise ValueError("broken site data")
        return real(self, *a, **k)

    monkeypatch.setattr(SiteWorker, "fit", failing)  # inherited by the forked workers
    with pytest.raises(RuntimeError, match=r"sites \['b'\].*ValueError: broken site data"):
        _model(three_sites, 3).train(progress=False)


def test_n_jobs_resolution():
    assert resolve_n_jobs(1, 10) == 1
    assert resolve_n_jobs(4, 2) == 2  # at most one per site
    assert resolve_n_jobs(None, 50, 500) == 1  # tiny federation: no workers
    assert 1 <= resolve_n_jobs(None, 50, 10**6) <= 50
    with pytest.raises(ValueError, match="n_jobs must be >= 1"):
        FederationConfig(n_jobs=0)
