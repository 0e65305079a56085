"""What the coordinator tells a person while a Flower run goes on, and after it failed.

After each training round the ServerApp logs one line (sites answered, sites missing and why,
each site's loss and local seconds, bytes sent and received, the round's seconds and the
estimated time left) and writes the same into ``result.json`` (``"status": "running"``,
``"progress"``). When a run fails, ``result.json`` keeps the error and names the sites that
failed, with their reasons (:meth:`Progress.failure`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("scfedvi.flower.server_app")

#: Key of a site's reply (train, balance, embed) saying why it rebuilt its data cache from
#: its ``.h5ad`` in that message (a phrase of :data:`scfedvi.flower.data_cache.REBUILD_REASONS`);
#: absent when the site mapped its cache as usual.
DATA_CACHE = "data-cache"


def cache_note(node: Any) -> dict[str, str]:
    """``{DATA_CACHE: why}`` for a site's reply if this message rebuilt its data cache
    (``node``: its :class:`~scfedvi.flower.node.NodeSettings`), else ``{}``."""
    why = str(getattr(node, "data_cache_note", ""))
    return {DATA_CACHE: why} if why else {}


def log_cache_rebuilds(stage: str, replies: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Log one line per site whose reply (``{site: reply config}``) says it rebuilt its data
    cache at ``stage`` (``"round 3"``, ``"balancing"``, ``"embedding"``); return the lines."""
    lines = [
        f"{stage}: site {site!r} rebuilt its data cache from its data file ({c[DATA_CACHE]})"
        for site, c in sorted(replies.items())
        if c.get(DATA_CACHE)
    ]
    for line in lines:
        log.info("%s", line)
    return lines


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _duration(s: float) -> str:
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


@dataclass
class Progress:
    """A run's progress: rounds done, their seconds, the sites that dropped and why.

    Parameters
    ----------
    n_rounds
        Rounds the run trains (``num-server-rounds``).
    run_id
        Flower's run ID (written with the progress into ``result.json``).
    """

    n_rounds: int = 0
    run_id: int = 0
    stage: str = "setup"
    started: float = field(default_factory=time.perf_counter)
    round_seconds: dict[int, float] = field(default_factory=dict)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    last_failed: dict[str, str] = field(default_factory=dict)

    def failed(self, stage: Any, failed: Mapping[str, str]) -> None:
        """Record the sites that failed at ``stage`` (a round index, ``"balance"``, ...)."""
        self.last_failed = dict(failed)
        self.dropped += [{"round": stage, "site": s, "reason": why} for s, why in failed.items()]

    def round_done(
        self,
        r: int,
        rows: Sequence[Mapping[str, Any]],
        failed: Mapping[str, str],
        seconds: float,
    ) -> dict[str, Any]:
        """Log round ``r`` from the coordinator's history ``rows`` of that round; return it."""
        self.round_seconds[r] = seconds
        answered = [row for row in rows if row.get("status") != "dropped"]
        sites = {
            str(row["site"]): {
                "loss": float(row.get("loss", float("nan"))),
                "seconds": float(row.get("seconds", float("nan"))),
            }
            for row in answered
        }
        down = sum(float(row.get("bytes_down", 0)) for row in answered)
        up = sum(float(row.get("bytes_up", 0)) for row in answered)
        left = self.eta(r)
        per_site = ", ".join(
            f"{s} loss {v['loss']:.1f} in {v['seconds']:.1f} s" for s, v in sorted(sites.items())
        )
        missing = "; ".join(f"{s}: {why}" for s, why in sorted(failed.items())) or "none"
        log.info(
            "round %d/%d: %d sites answered, missing %s; %s; %s down, %s up; %.1f s "
            "(slowest site %.1f s of local training); about %s left for the rounds",
            r + 1,
            self.n_rounds,
            len(sites),
            missing,
            per_site or "no site",
            _mb(down),
            _mb(up),
            seconds,
            max((v["seconds"] for v in sites.values()), default=float("nan")),
            _duration(left),
        )
        return {
            "round": r,
            "sites": sites,
            "missing": dict(failed),
            "bytes_down": down,
            "bytes_up": up,
            "seconds": seconds,
            "eta_s": left,
        }

    def eta(self, r: int) -> float:
        """Seconds left for rounds ``r + 1 .. n_rounds - 1``: the mean of the rounds so far
        (the first excluded once there are others: it pays for the sites' first start)."""
        done = [self.round_seconds[k] for k in sorted(self.round_seconds)]
        if len(done) > 1:
            done = done[1:]
        mean = sum(done) / len(done) if done else 0.0
        return mean * max(0, self.n_rounds - r - 1)

    def failure(self) -> dict[str, Any]:
        """What ``result.json`` adds to a failed run's error: the stage it failed in, the
        sites that failed last (``{site: reason}``) and every site dropped before."""
        return {
            "stage": self.stage,
            "failed_sites": self.last_failed,
            "dropped": self.dropped,
            "rounds_done": len(self.round_seconds),
        }
