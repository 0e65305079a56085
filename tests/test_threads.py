"""numba (UMAP, pynndescent) must not leave torch running on every core."""

from __future__ import annotations

import numpy as np
import torch

from scfedvi._threads import torch_threads_kept


def test_the_thread_count_is_restored():
    before = torch.get_num_threads()
    with torch_threads_kept():
        torch.set_num_threads(before + 1)
    assert torch.get_num_threads() == before


def test_umap_leaves_torch_threads_alone():
    from scfedvi.report.figures import umap_coords

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    xy = umap_coords(rng.normal(size=(200, 5)).astype(np.float32), n_neighbors=10)
    assert xy.shape == (200, 2)
    assert torch.get_num_threads() == 1


def test_a_benchmark_job_leaves_torch_threads_as_it_found_them(monkeypatch, tmp_path):
    """Whatever a job runs (here a method that changes the count, as numba does), the next
    job of the same worker starts with the worker's thread count."""
    from scfedvi.benchmark import runner

    def job_that_changes_threads(job, cache_root):
        torch.set_num_threads(torch.get_num_threads() + 1)
        return {"key": "k"}

    monkeypatch.setattr(runner, "_execute", job_that_changes_threads)
    before = torch.get_num_threads()
    out = runner.execute(None, str(tmp_path))  # type: ignore[arg-type]
    assert out == {"key": "k"}
    assert torch.get_num_threads() == before


def test_pool_workers_start_with_their_share_of_threads(monkeypatch):
    """The variables a spawned worker reads before importing numba, jax, numpy or torch cap
    each library at the worker's threads; the user's own XLA flags are kept; everything is
    restored after the pool."""
    import os

    from scfedvi.benchmark.runner import worker_thread_env

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    with worker_thread_env(1):
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
            assert os.environ[var] == "1"
        flags = os.environ["XLA_FLAGS"].split()
        assert flags[0] == "--xla_dump_to=/tmp/x"
        assert "--xla_cpu_multi_thread_eigen=false" in flags
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
    assert "NUMBA_NUM_THREADS" not in os.environ
    with worker_thread_env(2):  # XLA can only be made single-threaded
        assert os.environ["NUMBA_NUM_THREADS"] == "2"
        assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
