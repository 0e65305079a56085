"""The memory a run needs is predicted before it starts, and a run that would not fit is refused
with the site and the fix named (not ended half-way by the kernel's OOM killer)."""

from __future__ import annotations

import numpy as np
import pytest

from scfedvi import ScFedVI
from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig
from scfedvi.federation import memory
from scfedvi.federation.memory import check_memory, data_bytes, estimate_memory
from synthetic import make_counts

CFG = RunConfig(
    model=ModelConfig(n_hidden=16, n_latent=4),
    train=TrainConfig(batch_size=32, local_epochs=1),
    federation=FederationConfig(n_rounds=1, balance_clusters=0, n_jobs=1),
)


def test_data_bytes_is_float32_csr():
    # 1,000 cells, 50,000 values: 4 + 4 bytes per value, a row pointer per cell, per-cell arrays
    assert data_bytes(1_000, 50_000) == 50_000 * 8 + 1_001 * 4 + 1_000 * 20


def test_estimate_grows_with_the_data_and_deals_sites_as_the_pool():
    sites = {"big": (200_000, 40_000_000), "a": (10_000, 2_000_000), "b": (10_000, 2_000_000)}
    est = estimate_memory(sites, 2_000, 1_000_000, n_jobs=2)
    assert est.sites["big"] > est.sites["a"] == est.sites["b"]
    assert est.sites["big"] > est.data["big"] > 40_000_000 * 8
    # the largest site alone in one worker, the two small ones in the other
    assert [g for g, _ in est.workers] == [["big"], ["a", "b"]]
    # forked workers share the counts: the coordinator holds them once
    assert est.coordinator > sum(est.data.values())
    assert est.total == est.coordinator + sum(b for _, b in est.workers)
    assert "largest site 'big'" in est.describe()
    one = estimate_memory(sites, 2_000, 1_000_000, n_jobs=1)
    assert one.workers == [] and one.total < est.total


def test_check_refuses_over_the_limit_naming_site_and_fix():
    est = estimate_memory({"s1": (5_000, 1_000_000), "s2": (500, 100_000)}, 2_000, 10_000)
    check_memory(est, limit=est.total)  # exactly enough: runs
    with pytest.raises(MemoryError) as e:
        check_memory(est, limit=est.total - 1)
    msg = str(e.value)
    assert "site 's1'" in msg and "n_jobs=1" in msg and "SCFEDVI_MEMORY_CHECK=0" in msg


def test_check_can_be_turned_off(monkeypatch):
    est = estimate_memory({"s": (100, 1_000)}, 10, 10)
    monkeypatch.setenv("SCFEDVI_MEMORY_CHECK", "0")
    check_memory(est, limit=1)  # no error


def test_train_is_refused_before_it_starts(monkeypatch):
    adata = make_counts(120, 20, seed=1)
    adata.obs["lab"] = np.array(["x", "y"])[np.arange(adata.n_obs) % 2]
    model = ScFedVI.from_sites(adata, split_key="lab", batch_key="batch", config=CFG)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)  # 1 MB free
    with pytest.raises(MemoryError, match=r"site '[xy]' alone needs"):
        model.train(progress=False)
    assert model.params is None and model.history.empty  # nothing trained
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 << 30)
    model.train(progress=False)
    assert model.params is not None
    est = model.memory_estimate
    assert set(est.sites) == {"x", "y"} and est.data["x"] == data_bytes(
        60, int(model._site_data["x"].X.nnz)
    )
