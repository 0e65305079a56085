"""The in-process runtime: every site in one process, one after the other, deterministic."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from scfedvi.federation.coordinator import Coordinator
from scfedvi.federation.site import SiteWorker

SITES_DIR = "sites"


def _state_path(directory: Path, site: str, round_idx: int) -> Path:
    return directory / SITES_DIR / f"{site}.round{round_idx:05d}.pt"


def run_in_process(
    coordinator: Coordinator,
    sites: Sequence[SiteWorker],
    n_rounds: int,
    *,
    resume: bool = True,
    on_round: Callable[[int, float], None] | None = None,
) -> Coordinator:
    """Run rounds ``coordinator.round .. n_rounds - 1``: broadcast, local updates, aggregate.

    With a checkpoint directory, each site's private state is saved beside the coordinator's
    checkpoint (standing for the site's own disk), and a run that stopped resumes where it did.
    """
    ckpt = coordinator.checkpoint_dir
    if ckpt is not None and resume and coordinator.load_checkpoint(ckpt) and coordinator.round > 0:
        for s in sites:
            s.load_state(_state_path(ckpt, s.name, coordinator.round - 1))
    for r in range(coordinator.round, n_rounds):
        t0 = time.perf_counter()
        params, control = coordinator.broadcast()
        updates = [s.fit(params, r, control) for s in sites]
        if ckpt is not None:
            for s in sites:
                s.save_state(_state_path(ckpt, s.name, r))
        coordinator.aggregate(updates)
        if ckpt is not None and r > 0:
            for s in sites:
                _state_path(ckpt, s.name, r - 1).unlink(missing_ok=True)
        if on_round is not None:
            on_round(r, time.perf_counter() - t0)
    return coordinator
