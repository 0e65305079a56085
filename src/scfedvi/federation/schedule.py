"""The training schedule: how many epochs, split into how many rounds of how much local work.

By default the schedule follows the data as scvi-tools' does for pooled data
(``scvi.model._utils.get_max_epochs_heuristic``): ``min(400, round(20000 / n * 400))`` epochs
(at least 1), where ``n`` is the federation's number of cells, held-out ones included, as
scvi-tools counts them (``adata.n_obs``): an epoch passes over the training cells, so scFedVI
trains as many cells as pooled scvi-tools does (about 7.2 M cell passes above 20,000 cells at
``train_size=0.9``; counting only the training cells would give 8 M, 11% more). The epochs
are split into ``FederationConfig.n_rounds`` rounds; the local work per round is
``epochs / rounds``: whole local epochs when that is at least 1 (rounded to the nearest), else
a fraction ``f`` of an epoch, which each site turns into ``ceil(f * its training cells /
batch_size)`` minibatch steps (at least 1). Up to 20,000 cells this is the schedule
scFedVI always had: 20 rounds x 20 local epochs = 400 epochs.

Explicit settings win, in this order: ``TrainConfig.local_steps`` (every site that many steps
per round), ``TrainConfig.local_epochs``, ``FederationConfig.max_epochs`` (split as above).

The coordinator resolves the schedule once from the sites' training-cell counts (aggregates
every site already reports as its update's weight); both runtimes send each site its local
work for the round, and the site applies it with :func:`site_train_config` (pure and light:
no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from scfedvi.config import RunConfig, TrainConfig

#: scvi-tools' ``get_max_epochs_heuristic`` constants.
EPOCHS_CAP = 400
DECAY_AT_N_OBS = 20_000


def max_epochs_heuristic(
    n_cells: int, epochs_cap: int = EPOCHS_CAP, decay_at: int = DECAY_AT_N_OBS
) -> int:
    """scvi-tools' rule: ``min(round(decay_at / n * cap), cap)``, at least 1."""
    if n_cells < 1:
        raise ValueError(f"the federation has {n_cells} cells; it needs at least one")
    return max(1, min(round(decay_at / n_cells * epochs_cap), epochs_cap))


def n_training_cells(n_cells: int, train_size: float) -> int:
    """Training cells of a site of ``n_cells`` (as ``train.local.train_validation_split``)."""
    return min(n_cells, math.ceil(train_size * n_cells))


@dataclass(frozen=True)
class Schedule:
    """The schedule a run uses, resolved from the sites' training cells.

    Attributes
    ----------
    epochs
        Total epochs over the federation's training cells (what the local work adds up to;
        with ``local_steps`` an average over sites).
    rounds
        Communication rounds.
    local_epochs
        Local epochs per round at every site (``None`` when sites take steps).
    local_steps
        Site -> minibatch steps per round (empty when sites take epochs).
    n_train_cells
        Site -> training cells.
    rule
        ``"heuristic"``, ``"max_epochs"``, ``"local_epochs"`` or ``"local_steps"``.
    reason
        The rule and its numbers in words (printed and stored with the model).
    """

    epochs: float
    rounds: int
    local_epochs: int | None
    local_steps: dict[str, int]
    n_train_cells: dict[str, int]
    rule: str
    reason: str

    def work(self, site: str) -> tuple[int | None, int | None]:
        """``(local_epochs, local_steps)`` of ``site`` per round (one of them ``None``)."""
        if self.local_epochs is not None:
            return self.local_epochs, None
        if site not in self.local_steps:
            raise KeyError(
                f"site {site!r} is not in the schedule (sites: {sorted(self.local_steps)}); "
                "a site that joins later needs the schedule resolved again"
            )
        return None, self.local_steps[site]

    @property
    def cell_passes(self) -> float:
        """Cells trained on over the run (all sites, all rounds)."""
        return self.epochs * sum(self.n_train_cells.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Schedule:
        return cls(**dict(d))

    def describe(self) -> str:
        """One line for the CLI and the logs."""
        if self.local_epochs is not None:
            work = f"{self.local_epochs} local epochs"
        else:
            lo, hi = min(self.local_steps.values()), max(self.local_steps.values())
            work = f"{lo}-{hi} local steps" if lo != hi else f"{lo} local steps"
        return (
            f"schedule: {self.epochs:g} epochs = {self.rounds} rounds x {work} per site "
            f"({self.rule}: {self.reason})"
        )


def check_config(config: RunConfig) -> None:
    """Settings that make no schedule, whatever the data (a clear error naming the fix)."""
    fed, tr = config.federation, config.train
    if fed.early_stopping and tr.train_size >= 1.0:
        raise ValueError(
            "FederationConfig.early_stopping monitors the validation loss on held-out cells, "
            "but TrainConfig.train_size=1.0 holds none out; set train_size < 1 (e.g. 0.9) or "
            "early_stopping=False"
        )
    if fed.early_stopping and fed.early_stopping_patience >= fed.n_rounds:
        raise ValueError(
            f"FederationConfig.early_stopping_patience={fed.early_stopping_patience} rounds is "
            f"not below n_rounds={fed.n_rounds}, so early stopping could never stop the run; "
            "lower the patience, raise n_rounds, or set early_stopping=False"
        )
    if fed.max_epochs is not None and (tr.local_epochs is not None or tr.local_steps is not None):
        which = "local_steps" if tr.local_steps is not None else "local_epochs"
        raise ValueError(
            f"FederationConfig.max_epochs={fed.max_epochs} and TrainConfig.{which} both fix "
            f"the schedule; set one of them (max_epochs is split into n_rounds rounds)"
        )


def resolve_schedule(config: RunConfig, n_cells: Mapping[str, int]) -> Schedule:
    """The run's schedule from each site's number of cells (all its cells; the training
    cells follow from ``TrainConfig.train_size``).

    Raises
    ------
    ValueError
        A setting that makes no schedule, or a site with fewer training cells than a minibatch.
    """
    check_config(config)
    if not n_cells:
        raise ValueError("no sites: the schedule needs every site's cell count")
    tr, fed = config.train, config.federation
    n_train = {s: n_training_cells(int(n), tr.train_size) for s, n in sorted(n_cells.items())}
    for s, n in n_train.items():
        if n < tr.batch_size:
            raise ValueError(
                f"site {s!r}: {n} training cells (train_size={tr.train_size:g} of "
                f"{n_cells[s]}) < batch_size={tr.batch_size}, fewer than one minibatch; lower "
                "TrainConfig.batch_size, raise train_size, or merge this site with another"
            )
    total = sum(n_train.values())
    n_all = sum(int(n) for n in n_cells.values())
    if fed.early_stopping and total == n_all:
        raise ValueError(
            f"FederationConfig.early_stopping needs held-out cells, but "
            f"TrainConfig.train_size={tr.train_size:g} holds out none of the sites' {n_all} "
            "cells (ceil(train_size x cells) = cells at every site); lower train_size "
            "(e.g. 0.9) or set early_stopping=False"
        )
    rounds = fed.n_rounds
    if tr.local_steps is not None:
        steps = dict.fromkeys(n_train, tr.local_steps)
        epochs = rounds * tr.local_steps * tr.batch_size * len(n_train) / total
        reason = f"TrainConfig.local_steps={tr.local_steps} at every site, set explicitly"
        return Schedule(epochs, rounds, None, steps, n_train, "local_steps", reason)
    if tr.local_epochs is not None:
        reason = f"TrainConfig.local_epochs={tr.local_epochs}, set explicitly"
        e = float(tr.local_epochs * rounds)
        return Schedule(e, rounds, tr.local_epochs, {}, n_train, "local_epochs", reason)
    if fed.max_epochs is not None:
        target, rule = fed.max_epochs, "max_epochs"
        why = f"FederationConfig.max_epochs={fed.max_epochs}, set explicitly"
    else:
        target, rule = max_epochs_heuristic(n_all), "heuristic"
        why = (
            f"scvi-tools' rule min({EPOCHS_CAP}, round({DECAY_AT_N_OBS} / {n_all} cells x "
            f"{EPOCHS_CAP})) = {target} epochs"
        )
    per_round = target / rounds
    if per_round >= 1:
        local = max(1, round(per_round))
        reason = f"{why}, over {rounds} rounds: {local} local epochs per round"
        return Schedule(float(local * rounds), rounds, local, {}, n_train, rule, reason)
    steps = {s: max(1, math.ceil(per_round * n / tr.batch_size - 1e-9)) for s, n in n_train.items()}
    epochs = sum(rounds * k * tr.batch_size for k in steps.values()) / total
    reason = (
        f"{why}, over {rounds} rounds: {per_round:.3g} of an epoch per round, i.e. "
        f"ceil({per_round:.3g} x training cells / batch_size {tr.batch_size}) steps at each site"
    )
    return Schedule(epochs, rounds, None, steps, n_train, rule, reason)


def site_train_config(
    train: TrainConfig, local_epochs: int | None, local_steps: int | None
) -> TrainConfig:
    """The site's training settings for a round of the schedule (its local work applied)."""
    if local_steps is not None:
        return replace(train, local_steps=int(local_steps))
    if local_epochs is not None:
        return replace(train, local_epochs=int(local_epochs), local_steps=None)
    raise ValueError("a round's local work needs local_epochs or local_steps")
