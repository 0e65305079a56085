"""Memory a run will need, predicted before it starts from the sites' sizes.

A site's counts are held once as float32 CSR (4 bytes per value, 4 per column index, one
row pointer per cell); training adds the model, its gradients and Adam's moments, and
a minibatch's dense temporaries; the composition balancing adds a weighted resample of the
site's cells, :data:`~scfedvi.federation.balance.OVERSAMPLE` times its cell count, which the
site walks through in minibatches (rows are never copied), so only its indices are held.
The prediction is an upper estimate from these counts (no process is started and nothing
is allocated): :func:`estimate_memory`. :func:`check_memory` compares it with the memory the
machine has free (``MemAvailable``) or a given limit, and refuses a run that would not fit
with an error naming the site or process and the fix, instead of the kernel's OOM killer
ending it half-way. ``SCFEDVI_MEMORY_CHECK=0`` turns the check off.

Numpy only: a site may run it on its own data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.config import RunConfig

#: Bytes of one Python process with torch imported (measured here: 330-420 MB RSS).
PROCESS_BYTES = 450 << 20
#: Dense ``cells x genes`` float32 temporaries alive at once in a training step (ZINB terms,
#: activations kept for the backward pass; measured: about 20).
STEP_TEMPORARIES = 24
#: Minibatch of the validation, calibration and embedding passes (no gradients).
EVAL_BATCH = 1024
#: Dense temporaries alive at once in those passes.
EVAL_TEMPORARIES = 12
#: Copies of the parameters held while training: weights, gradients, two Adam moments, the
#: round's global parameters, the update sent, the kept optimizer state (two), spare.
PARAM_COPIES = 10
#: Of those, the copies a site keeps between rounds (replica, two moments, statistics, spare).
STATE_COPIES = 5
#: Environment variable that turns the check off (``0``, ``false``, ``no``, ``off``).
ENV = "SCFEDVI_MEMORY_CHECK"


def data_bytes(n_cells: int, nnz: int) -> int:
    """A site's counts as float32 CSR with its per-cell arrays (batch index, log-factorial
    sum, split indices)."""
    index = 4 if max(nnz, n_cells) < 2**31 else 8
    return nnz * (4 + index) + (n_cells + 1) * index + n_cells * (8 + 4 + 8)


def state_bytes(n_params: int) -> int:
    """What a site keeps between rounds: its model replica, Adam's two moments (kept with
    ``optimizer_state="keep"``), local statistics and a control variate."""
    return n_params * 4 * STATE_COPIES


def work_bytes(
    n_cells: int, n_genes: int, n_params: int, batch_size: int, oversample: int = 4
) -> int:
    """A site's bytes while it works, freed after: gradients, Adam's step, the round's global
    parameters and the update sent, a training step's or an evaluation pass's dense
    temporaries, and the balancing resample's indices and embeddings (``oversample`` x
    cells)."""
    step = batch_size * n_genes * 4 * STEP_TEMPORARIES
    evaluation = EVAL_BATCH * n_genes * 4 * EVAL_TEMPORARIES
    balance = oversample * n_cells * 8 + 3 * n_cells * 10 * 8
    return n_params * 4 * (PARAM_COPIES - STATE_COPIES) + max(step, evaluation) + balance


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes of a run, per site and per process.

    Attributes
    ----------
    sites
        Site -> peak bytes of the site's own work alone (its counts, training and balancing:
        what a site's machine needs, as in the Flower runtime; a process included).
    data
        Site -> bytes of its counts in memory.
    workers
        Per worker process (in-process runtime with ``n_jobs`` > 1): the sites it trains and
        its private bytes (the counts are shared with the parent, which forked it).
    coordinator
        This process: every site's counts, one site's work at a time (training with one
        job, balancing, embedding) and the process itself.
    """

    sites: dict[str, int]
    data: dict[str, int]
    workers: list[tuple[list[str], int]] = field(default_factory=list)
    coordinator: int = 0

    @property
    def total(self) -> int:
        """The machine's bytes for the whole in-process run."""
        return self.coordinator + sum(b for _, b in self.workers)

    def describe(self) -> str:
        big = max(self.sites, key=self.sites.__getitem__)
        return (
            f"predicted memory: {_gb(self.total)} in all ({_gb(self.coordinator)} in this "
            f"process, {len(self.workers)} workers {_gb(sum(b for _, b in self.workers))}); "
            f"largest site {big!r} {_gb(self.sites[big])} alone"
        )


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB"


def estimate_memory(
    sites: Mapping[str, tuple[int, int]],
    n_genes: int,
    n_params: int,
    *,
    batch_size: int = 128,
    n_jobs: int = 1,
    oversample: int = 4,
) -> MemoryEstimate:
    """Predict a run's memory from each site's ``(cells, stored values)``.

    Parameters
    ----------
    sites
        Site -> ``(n_cells, nnz)`` of its counts in the federation's genes.
    n_genes
        Genes of the schema.
    n_params
        The model's parameters (shared and local).
    batch_size
        Training minibatch size.
    n_jobs
        Worker processes that train the sites (1: in this process); sites are dealt to
        them as :class:`~scfedvi.federation.inprocess.SitePool` deals them, largest first.
    oversample
        The balancing resample's size over a site's cells.
    """
    if not sites:
        raise ValueError("no sites: a memory estimate needs every site's (cells, nnz)")
    data = {s: data_bytes(int(n), int(z)) for s, (n, z) in sites.items()}
    work = {
        s: work_bytes(int(n), n_genes, n_params, batch_size, oversample)
        for s, (n, _) in sites.items()
    }
    state = state_bytes(n_params)
    alone = {s: PROCESS_BYTES + data[s] + state + work[s] for s in sites}
    workers: list[tuple[list[str], int]] = []
    if n_jobs > 1:
        n_jobs = min(n_jobs, len(sites))
        groups: list[list[str]] = [[] for _ in range(n_jobs)]
        loads = [0] * n_jobs
        for s in sorted(sites, key=lambda s: (-sites[s][0], s)):
            i = loads.index(min(loads))
            groups[i].append(s)
            loads[i] += sites[s][0]
        # a forked worker's private pages: its sites' state and one site's work at a time,
        # not the parent's counts (shared until written, and they are only read)
        workers = [
            (g, PROCESS_BYTES // 4 + len(g) * state + max(work[s] for s in g)) for g in groups
        ]
    # this process: every site's counts and state, one site's work (training with one job,
    # balancing, embedding) at a time
    coordinator = PROCESS_BYTES + sum(data.values()) + len(sites) * state + max(work.values())
    return MemoryEstimate(alone, data, workers, coordinator)


def available_bytes() -> int | None:
    """The machine's free memory (``MemAvailable``); ``None`` where ``/proc`` does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return None
    return None  # pragma: no cover


def check_memory(estimate: MemoryEstimate, *, limit: int | None = None, held: int = 0) -> None:
    """Refuse a run whose predicted memory exceeds ``limit`` (default: what is free now plus
    ``held``, the bytes of the estimate already allocated, such as the sites' counts).

    Raises
    ------
    MemoryError
        Naming the largest site or worker, the figures and the fixes.
    """
    if os.environ.get(ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        return
    if limit is None:
        free = available_bytes()
        if free is None:
            return
        limit = free + held
    if estimate.total <= limit:
        return
    big = max(estimate.sites, key=estimate.sites.__getitem__)
    parts = [
        f"this run needs about {_gb(estimate.total)} but {_gb(limit)} is available",
        f"site {big!r} alone needs {_gb(estimate.sites[big])} (its counts "
        f"{_gb(estimate.data[big])})",
        f"this process {_gb(estimate.coordinator)}",
    ]
    if estimate.workers:
        g, b = max(estimate.workers, key=lambda w: w[1])
        parts.append(f"{len(estimate.workers)} worker processes up to {_gb(b)} each (sites {g})")
    raise MemoryError(
        "; ".join(parts)
        + ". Fixes: fewer worker processes (FederationConfig.n_jobs=1), fewer genes "
        "(n_top_genes), split the largest site or run it on its own machine (the Flower "
        f"runtime), or free memory; {ENV}=0 skips this check"
    )


def check_sites(
    sites: Sequence[Any],
    params: Mapping[str, Any],
    config: RunConfig,
    *,
    limit: int | None = None,
) -> MemoryEstimate:
    """Predict and check the in-process run of ``sites`` (site workers: ``name``,
    ``data.X``) with the global ``params``: :func:`estimate_memory` with the run's batch
    size and worker processes, then :func:`check_memory` (the sites' counts, already in
    memory, count as held). Returns the estimate."""
    from scfedvi.federation.inprocess import resolve_n_jobs

    shapes = {s.name: (int(s.data.X.shape[0]), int(s.data.X.nnz)) for s in sites}
    n_genes = int(next(iter(sites)).data.X.shape[1])
    n_params = int(sum(np.size(v) for v in params.values()))
    n_train = sum(math.ceil(config.train.train_size * n) for n, _ in shapes.values())
    jobs = resolve_n_jobs(config.federation.n_jobs, len(shapes), n_train)
    est = estimate_memory(
        shapes, n_genes, n_params, batch_size=config.train.batch_size, n_jobs=jobs
    )
    check_memory(est, limit=limit, held=sum(est.data.values()))
    return est
