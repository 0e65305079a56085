"""The in-process runtime: every site on this machine, deterministic.

Sites train one after the other in this process, or at the same time in ``n_jobs`` persistent
worker processes: each worker owns a fixed subset of the sites, keeps their
:class:`~scfedvi.federation.site.SiteWorker` (data, replica, private state) in memory between
rounds and trains with one torch thread. A site's update depends only on its data, the round's
global parameters, its own state and the round's seed, so the results equal the sequential
run's with one torch thread, bit for bit (``tests/federation/test_parallel.py``). When the run
ends, the workers hand the sites' private state back to this process (a later call continues
from it) and exit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from scfedvi._constants import SITE_STATE_FILE
from scfedvi.federation import rounds
from scfedvi.federation.aggregate import SiteUpdate
from scfedvi.federation.coordinator import Coordinator
from scfedvi.federation.site import SiteWorker
from scfedvi.train.params import Params

SITES_DIR = "sites"
Work = Mapping[str, tuple[int | None, int | None]]


def _state_path(directory: Path, site: str, round_idx: int) -> Path:
    return directory / SITES_DIR / SITE_STATE_FILE.format(site=site, round=round_idx)


def free_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: Below this many training cells in the federation, ``n_jobs=None`` trains in this process:
#: starting and stopping the workers (0.1-0.3 s) outweighs what they save.
AUTO_PARALLEL_MIN_CELLS = 1_000


def resolve_n_jobs(n_jobs: int | None, n_sites: int, n_train_cells: int | None = None) -> int:
    """Worker processes for ``n_sites`` sites: ``n_jobs``, at most one per site; ``None``:
    the free cores, or 1 for a federation of fewer than :data:`AUTO_PARALLEL_MIN_CELLS`
    training cells."""
    if n_jobs is None and n_train_cells is not None and n_train_cells < AUTO_PARALLEL_MIN_CELLS:
        return 1
    return max(1, min(n_jobs or free_cores(), n_sites))


def private_bytes() -> int:
    """This process's own memory (private pages; pages shared with a forking parent are
    not counted). 0 where ``/proc`` does not say."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:  # pragma: no cover - not Linux
        return 0
    kb = sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Private_"))
    return kb * 1024


def _fit(site: SiteWorker, params, r, control, work, ckpt: Path | None) -> SiteUpdate:
    update = site.fit(params, r, control, work.get(site.name))
    if ckpt is not None:
        site.save_state(_state_path(ckpt, site.name, r))
    return update


def _serve(conn: Any, sites: list[SiteWorker]) -> None:  # pragma: no cover - in a child
    import torch

    torch.set_num_threads(1)
    peak = private_bytes()
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "fit":
                _, params, r, control, work, ckpt = msg
                out = [_fit(s, params, r, control, work, ckpt) for s in sites]
                peak = max(peak, private_bytes())
                conn.send(("ok", out, peak))
            elif msg[0] == "states":
                conn.send(("ok", {s.name: s.state for s in sites}, peak))
            else:
                conn.close()
                return
        except Exception as e:  # the parent raises it, naming the sites
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", peak))


class SitePool:
    """Persistent worker processes, each training a fixed subset of the sites.

    Sites are dealt to ``n_jobs`` workers by training cells (largest first, each to the
    least-loaded worker). Workers are forked on the CPU (the sites' data is shared, not
    copied) and spawned when a site trains on a GPU (CUDA cannot be forked).
    """

    def __init__(self, sites: Sequence[SiteWorker], n_jobs: int) -> None:
        self.sites = list(sites)
        loads = [0] * n_jobs
        self.groups: list[list[SiteWorker]] = [[] for _ in range(n_jobs)]
        for s in sorted(self.sites, key=lambda s: (-s.data.n_cells, s.name)):
            i = loads.index(min(loads))
            self.groups[i].append(s)
            loads[i] += s.data.n_cells
        gpu = any(s.config.train.accelerator != "cpu" for s in self.sites) and _cuda()
        ctx: Any = mp.get_context("spawn" if gpu else "fork")
        self.conns, self.procs = [], []
        for group in self.groups:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(child, group), daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.peak_bytes = [0] * n_jobs

    def _ask(self, msg: tuple) -> list[Any]:
        for c in self.conns:
            c.send(msg)
        out = []
        for i, c in enumerate(self.conns):
            try:
                status, value, peak = c.recv()
            except EOFError:
                names = [s.name for s in self.groups[i]]
                raise RuntimeError(
                    f"the worker process training sites {names} died (exit code "
                    f"{self.procs[i].exitcode}; out of memory?); run with n_jobs=1 to see why"
                ) from None
            self.peak_bytes[i] = peak
            if status == "error":
                names = [s.name for s in self.groups[i]]
                raise RuntimeError(f"sites {names} (worker {i}): {value}")
            out.append(value)
        return out

    def fit(
        self, params: Params, r: int, control: Params | None, work: Work, ckpt: Path | None
    ) -> list[SiteUpdate]:
        """One round at every site; the updates in the sites' order."""
        replies = self._ask(("fit", params, r, control, dict(work), ckpt))
        by_name = {u.site: u for reply in replies for u in reply}
        return [by_name[s.name] for s in self.sites]

    def close(self) -> None:
        """Hand the sites' private state back to this process's workers; stop the workers."""
        try:
            states = {k: v for reply in self._ask(("states",)) for k, v in reply.items()}
            for s in self.sites:
                s.state = states[s.name]
        finally:
            for c in self.conns:
                try:
                    c.send(("close",))
                except (BrokenPipeError, OSError):
                    pass
            for p in self.procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.terminate()

    def terminate(self) -> None:
        """Stop the workers without their state (after an error)."""
        for p in self.procs:
            p.terminate()
            p.join(timeout=30)

    def memory(self) -> list[dict[str, Any]]:
        """Each worker's sites and its peak private memory in bytes."""
        return [
            {"sites": [s.name for s in g], "peak_private_bytes": b}
            for g, b in zip(self.groups, self.peak_bytes, strict=True)
        ]


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class InProcessRounds:
    """The in-process transport of :func:`~scfedvi.federation.rounds.run_rounds`: each site's
    :meth:`~scfedvi.federation.site.SiteWorker.fit`, in this process or in ``pool``."""

    def __init__(
        self,
        coordinator: Coordinator,
        sites: Sequence[SiteWorker],
        pool: SitePool | None,
        work: Work,
        ckpt: Path | None,
    ) -> None:
        self.coordinator, self.sites, self.pool = coordinator, list(sites), pool
        self.work, self.ckpt = work, ckpt

    def train(
        self, r: int, params: Params, control: Params | None
    ) -> tuple[list[SiteUpdate], dict[str, str]]:
        """Every site's update, in the sites' order (in process, no site drops out)."""
        if self.pool is not None:
            return self.pool.fit(params, r, control, self.work, self.ckpt), {}
        return [_fit(s, params, r, control, self.work, self.ckpt) for s in self.sites], {}

    def train_secure(self, r: int, params: Params, control: Params | None) -> dict[str, str]:
        """Every site's update, then secure aggregation's masking, sum and unmasking."""
        from scfedvi.federation.secure_round import secure_round_in_process

        updates, failed = self.train(r, params, control)
        secure_round_in_process(self.coordinator, self.sites, updates)
        return failed


def run_in_process(
    coordinator: Coordinator,
    sites: Sequence[SiteWorker],
    n_rounds: int | None = None,
    *,
    resume: bool = True,
    on_round: Callable[[int, float], None] | None = None,
    n_jobs: int | None = 1,
    memory: list[dict[str, Any]] | None = None,
) -> Coordinator:
    """Run rounds ``coordinator.round .. n_rounds - 1``: broadcast, local updates, aggregate.

    The coordinator resolves the schedule from the sites' cell counts (unless it has one);
    ``n_rounds`` defaults to the schedule's. The run stops early when the coordinator's
    early stopping says so. With a checkpoint directory, each site's private state is saved
    beside the coordinator's checkpoint (standing for the site's own disk), and a run that
    stopped resumes where it did. ``n_jobs`` > 1 trains the sites in that many worker
    processes (see :class:`SitePool`); ``memory``, if given, receives each worker's peak
    private memory.
    """
    ckpt = coordinator.checkpoint_dir
    if ckpt is not None and resume and coordinator.load_checkpoint(ckpt) and coordinator.round > 0:
        for s in sites:
            s.load_state(_state_path(ckpt, s.name, coordinator.round - 1))
    if coordinator.schedule is None:
        coordinator.resolve_schedule({s.name: s.data.n_cells for s in sites})
    assert coordinator.schedule is not None
    n_rounds = coordinator.schedule.rounds if n_rounds is None else n_rounds
    work = {s.name: coordinator.work(s.name) for s in sites}
    jobs = resolve_n_jobs(n_jobs, len(sites), sum(coordinator.schedule.n_train_cells.values()))
    if coordinator.round >= n_rounds or coordinator.early_stopped:
        return coordinator
    pool = SitePool(sites, jobs) if jobs > 1 else None
    transport = InProcessRounds(coordinator, sites, pool, work, ckpt)

    def after(r: int, failed: Mapping[str, str], seconds: float) -> None:
        if ckpt is not None and r > 0:  # a restarted round r reloads the states of r - 1
            for s in sites:
                _state_path(ckpt, s.name, r - 1).unlink(missing_ok=True)
        if on_round is not None:
            on_round(r, seconds)

    failed = True
    try:
        rounds.run_rounds(coordinator, transport, n_rounds, after)
        failed = False
    finally:
        if pool is not None:
            if failed:  # the error in flight is the one to see
                pool.terminate()
            else:
                pool.close()
            if memory is not None:
                memory.extend(pool.memory())
    return coordinator
