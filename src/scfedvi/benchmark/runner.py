"""Run a benchmark: the missing jobs of its plan, cached, in parallel, then collect the results.

:func:`~scfedvi.benchmark.plan.plan` turns :class:`BenchmarkSettings` into jobs with cache
keys; :func:`execute` runs one job (embedding, then metrics and UMAP) in any process;
:func:`run_benchmark` runs the missing jobs (a process pool with ``jobs > 1``) and collects
every result from the cache.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scfedvi._threads import torch_threads_kept
from scfedvi.benchmark.cache import ResultCache
from scfedvi.benchmark.evaluate import evaluate
from scfedvi.benchmark.methods import METHODS
from scfedvi.benchmark.plan import BenchmarkSettings, Job, plan
from scfedvi.benchmark.task import Task, eval_adata, load_data

__all__ = ["BenchmarkRun", "BenchmarkSettings", "Job", "execute", "plan", "run_benchmark"]

_COST = {"pca": 0, "harmony": 1, "scvi-pooled": 9}
#: Seconds between checks on jobs that another process computes.
BUSY_POLL_SECONDS = 30.0


def _name(job: Job) -> str:
    return f"{job.dataset.name} {job.n_sites} sites {job.method} seed {job.seed}"


@dataclass
class BenchmarkRun:
    """What a benchmark produced: rows, curves, histories, UMAPs, and what was computed."""

    results: pd.DataFrame
    curves: pd.DataFrame
    histories: dict[tuple, pd.DataFrame]
    umaps: dict[tuple, dict[str, np.ndarray]]
    obs: dict[tuple, pd.DataFrame]
    n_jobs: int
    computed: dict[str, int]
    missing: list[tuple]
    seconds: float
    failed: list[tuple[str, str]] = field(default_factory=list)


def job_task(job: Job) -> Task:
    """The data set, site partition and settings of a planned job (what a method trains on)."""
    adata = load_data(job.dataset)
    cells = eval_adata(adata, {s: list(c) for s, c in job.partition})
    return Task(
        cells,
        [s for s, _ in job.partition],
        job.dataset.batch_key,
        job.dataset.label_key,
        list(job.genes),
        job.seed,
        job.quick,
        job.n_top_genes,
    )


def _found_eval(cache: ResultCache, job: Job) -> str | None:
    return next((k for k in job.eval_keys if cache.has_eval(job.key, k)), None)


def execute(job: Job, cache_root: str) -> dict[str, Any]:
    """Run one job in this process: the embedding (unless cached), then its evaluation.

    A job that another process sharing the cache is computing is left to it (``"busy"``).
    torch's thread count is restored when the job ends, whatever ran in it (numba, behind
    UMAP, pynndescent and parts of scanpy, resets OpenMP's; see :mod:`scfedvi._threads`).
    """
    with torch_threads_kept():
        return _execute(job, cache_root)


def _execute(job: Job, cache_root: str) -> dict[str, Any]:
    cache = ResultCache(cache_root)
    t0 = time.perf_counter()
    out = {"key": job.key, "embedding": False, "evaluation": False, "busy": False}
    if _found_eval(cache, job) is not None:
        return out | {"seconds": time.perf_counter() - t0}
    if not cache.lock(job.key):  # another process computes it now
        return out | {"busy": True, "seconds": time.perf_counter() - t0}
    try:
        if _found_eval(cache, job) is None:  # it may have finished it meanwhile
            out = _compute(job, cache, out)
    finally:
        cache.unlock(job.key)
    return out | {"seconds": time.perf_counter() - t0}


def _compute(job: Job, cache: ResultCache, out: dict[str, Any]) -> dict[str, Any]:
    from scfedvi.benchmark.baselines import pca_settings, unintegrated_pca

    task = job_task(job)
    if cache.has_embedding(job.key):
        result = cache.load_embedding(job.key)
    else:
        method = METHODS[job.method]
        result = method.run(task, method.settings(job.quick))
        cache.save_embedding(job.key, result, job.key_parts)
        out["embedding"] = True
    pre = unintegrated_pca(task, pca_settings(job.quick), seed=0) if job.scib else None
    ev = evaluate(
        result.embedding,
        task.adata.obs,
        batch_key=task.batch_key,
        label_key=task.label_key,
        pre=pre,
        scib=job.scib,
        fast=job.quick,
        curve=result.curve,
        umap_seed=0,
    )
    cache.save_eval(job.key, job.eval_keys[0], ev)
    return out | {"evaluation": True}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


#: What caps the thread pools of the libraries a job loads: OpenMP and BLAS (read when numpy
#: and torch load) and numba (UMAP, pynndescent); XLA (jax, behind scib-metrics) by a flag.
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def _xla_flags(threads: int, flags: str) -> str:
    # XLA has no flag for a thread count; it can only turn Eigen's thread pool off.
    return flags if threads > 1 else f"{flags} --xla_cpu_multi_thread_eigen=false"


@contextlib.contextmanager
def worker_thread_env(threads: int) -> Iterator[None]:
    """The environment the pool's workers start with: every library's threads capped at the
    worker's share of the cores.

    Workers are spawned, so they read these variables before importing anything; this process
    keeps the pools it already has. Without the caps, numba and jax in one worker's metrics
    could take every core while the other worker's training was being timed.
    """
    old = {v: os.environ.get(v) for v in (*_THREAD_VARS, "XLA_FLAGS")}
    os.environ.update({v: str(threads) for v in _THREAD_VARS})
    os.environ["XLA_FLAGS"] = _xla_flags(threads, old["XLA_FLAGS"] or "").strip()
    try:
        yield
    finally:
        for v, value in old.items():
            if value is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = value


def run_benchmark(
    settings: BenchmarkSettings,
    out: str | os.PathLike,
    *,
    jobs: int = 1,
    compute: bool = True,
    log: Callable[[str], None] | None = None,
) -> BenchmarkRun:
    """Run the missing jobs of ``settings`` and collect every result from ``<out>/cache``.

    Parameters
    ----------
    jobs
        Parallel worker processes (1: everything in this process).
    compute
        ``False``: collect what the cache holds and compute nothing (a report of the progress);
        results computed with another version of scfedvi's core or metrics code are then used
        too, flagged ``other_code``.
    log
        Progress messages (default: standard error).
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    root = Path(out) / "cache"
    cache = ResultCache(root)
    entries, obs = plan(settings)
    unique: dict[str, Job] = {}
    for _, job in entries:
        unique.setdefault(job.key, job)
    todo = [j for j in unique.values() if _found_eval(cache, j) is None]
    todo.sort(key=lambda j: (j.seed, _COST.get(j.method, 5), j.dataset.name, j.n_sites))
    log(f"benchmark: {len(entries)} results, {len(unique)} distinct jobs, {len(todo)} to compute")
    computed = {"embeddings": 0, "evaluations": 0}
    failed: list[tuple[Job, str]] = []
    if compute and todo:
        done = 0

        busy: list[Job] = []

        def note(job: Job, r: dict[str, Any]) -> None:
            nonlocal done
            if r["busy"]:
                busy.append(job)
                log(f"{_name(job)}: computed by another process; collected at the end")
                return
            done += 1
            computed["embeddings"] += int(r["embedding"])
            computed["evaluations"] += int(r["evaluation"])
            log(f"[{done}/{len(todo)}] {_name(job)}: {r['seconds']:.0f} s")

        def fail(job: Job, err: BaseException) -> None:
            nonlocal done
            done += 1
            failed.append((job, f"{type(err).__name__}: {err}"))
            log(f"[{done}/{len(todo)}] {_name(job)}: FAILED ({type(err).__name__}: {err})")

        if jobs <= 1:
            for job in todo:
                try:
                    note(job, execute(job, str(root)))
                except Exception as err:  # one failed job must not lose the others
                    fail(job, err)
        else:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            ctx = get_context("spawn")
            with (
                worker_thread_env(threads),
                ProcessPoolExecutor(jobs, ctx, _init_worker, (threads,)) as pool,
            ):
                futures = {pool.submit(execute, j, str(root)): j for j in todo}
                for f in as_completed(futures):
                    try:
                        note(futures[f], f.result())
                    except Exception as err:
                        fail(futures[f], err)
        while busy:  # jobs that other processes hold: wait for them (or take them over)
            time.sleep(BUSY_POLL_SECONDS)
            waiting, busy[:] = list(busy), []
            for job in waiting:
                try:
                    note(job, execute(job, str(root)))
                except Exception as err:
                    fail(job, err)
    from scfedvi.benchmark.collect import collect

    run = collect(
        entries,
        obs,
        cache,
        computed,
        len(unique),
        time.perf_counter() - t0,
        other_code=not compute,
    )
    run.failed = [(_name(j), e) for j, e in failed]
    return run
