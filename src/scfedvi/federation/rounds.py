"""The training rounds at the coordinator, the same in every runtime.

:func:`run_rounds` is the loop of the paper's algorithm, ``broadcast -> local update at each
site -> aggregate``, with early stopping and the choice of aggregation (plain, or secure
aggregation's masked sum). A runtime only carries one round to the sites and back
(:class:`RoundTransport`): in process (:func:`scfedvi.federation.inprocess.run_in_process`)
by calling each site's :meth:`~scfedvi.federation.site.SiteWorker.fit`, over Flower
(:func:`scfedvi.flower.server_app.run_federation`) by messages. Which sites take part, the
history rows and the checkpoint are the :class:`~scfedvi.federation.coordinator.Coordinator`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.federation.aggregate import SiteUpdate
    from scfedvi.federation.coordinator import Coordinator
    from scfedvi.train.params import Params

log = logging.getLogger(__name__)


class RoundTransport(Protocol):
    """How a runtime carries one round to the sites."""

    def train(
        self, r: int, params: Params, control: Params | None
    ) -> tuple[Sequence[SiteUpdate], Mapping[str, str]]:
        """Round ``r`` at the sites from the broadcast ``params`` (and SCAFFOLD's
        ``control``): their updates, in the federation's site order, and ``{site: why}``
        for the sites that failed."""
        ...

    def train_secure(self, r: int, params: Params, control: Params | None) -> Mapping[str, str]:
        """Round ``r`` under secure aggregation: the sites train, mask their updates, and the
        coordinator aggregates the unmasked sum
        (:meth:`~scfedvi.federation.coordinator.Coordinator.aggregate_secure`); returns
        ``{site: why}`` for the sites that failed."""
        ...


#: Called after each round with the round, its failed sites and its seconds.
OnRound = Callable[[int, Mapping[str, str], float], None]


def run_rounds(
    coordinator: Coordinator,
    transport: RoundTransport,
    n_rounds: int | None = None,
    on_round: OnRound | None = None,
) -> None:
    """Rounds ``coordinator.round .. n_rounds - 1`` (default: the resolved schedule's), until
    early stopping (``FederationConfig.early_stopping``) ends the run."""
    if coordinator.schedule is None:
        raise RuntimeError("resolve the schedule first (Coordinator.resolve_schedule)")
    n_rounds = coordinator.schedule.rounds if n_rounds is None else n_rounds
    secure = coordinator.config.privacy.secure_aggregation
    for r in range(coordinator.round, n_rounds):
        if coordinator.early_stopped:
            log.info("early stopping after round %d (FederationConfig.early_stopping)", r - 1)
            return
        t0 = time.perf_counter()
        params, control = coordinator.broadcast()
        if secure:  # the sites' masked updates, summed and aggregated there
            failed = transport.train_secure(r, params, control)
        else:
            updates, failed = transport.train(r, params, control)
            coordinator.aggregate(updates, dropped=sorted(failed))
        if on_round is not None:
            on_round(r, failed, time.perf_counter() - t0)
