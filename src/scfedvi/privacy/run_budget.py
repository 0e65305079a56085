"""A site's budget across runs: how many runs it joined, and the epsilon it spent in them.

Every query budget of :class:`~scfedvi.config.SitePolicy` is per run (a
:class:`~scfedvi.privacy.policy.QueryLedger` per Flower run id). A coordinator that may start
runs at will would multiply them: average the DP models of many runs with the same settings
(the noise shrinks as 1/sqrt(runs)), difference the models of two runs that differ in one
setting, or collect more balancing answers. The :class:`RunLedger` is the site's own record
of the runs it answered on one data file, kept in its state folder
(``<state-dir>/<site>.runs.json``, :func:`runs_ledger_path`) and never reset by the
coordinator. Before a run's first answered query the site admits the run
(:meth:`RunLedger.admit`): at most ``SitePolicy.max_runs`` runs (within
``run_window_days``, or ever); before each training round of a run, it computes the run's
epsilon from the DP settings it received and the rounds it answered, at its own delta and
adjacency (:func:`scfedvi.privacy.accountant.epsilon_closed_form`, standard library only),
and refuses a round that would bring the sum over its runs above
``SitePolicy.max_total_epsilon`` (runs compose: epsilons and deltas add). A run without DP
counts as epsilon = inf unless ``SitePolicy.allow_non_dp_runs``.

What the ledger cannot do: it trusts the coordinator to add the noise it declares (with
``clip_at="server"`` the coordinator sees the raw updates anyway; see ``docs/privacy.md``),
and a site operator who deletes the file resets it.

This module is light: the standard library only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scfedvi.config import PrivacyConfig, SitePolicy
from scfedvi.data.errors import SiteDataError
from scfedvi.privacy.accountant import epsilon_closed_form
from scfedvi.privacy.policy import refuse

__all__ = ["RunLedger", "run_epsilon", "runs_ledger_path"]

_DAY = 86_400.0


def runs_ledger_path(state_dir: str | os.PathLike, site: str) -> Path:
    """Where a site keeps its ledger of runs (one file for all its runs)."""
    return Path(state_dir) / f"{site}.runs.json"


def run_epsilon(policy: SitePolicy, privacy: PrivacyConfig, rounds: int) -> float:
    """A run's epsilon after ``rounds`` rounds, as the site accounts it: at the policy's
    ``epsilon_delta`` and ``epsilon_adjacency``, from the noise multiplier the run declared
    (``inf`` without DP)."""
    if not privacy.enabled or privacy.noise_multiplier <= 0:
        return math.inf
    return epsilon_closed_form(
        privacy.noise_multiplier, rounds, policy.epsilon_delta, policy.epsilon_adjacency
    )


@dataclasses.dataclass
class RunLedger:
    """The runs a site answered on one data file, and the epsilon each spent.

    Parameters
    ----------
    path
        The JSON file (:func:`runs_ledger_path`), shared by every process of the site and
        locked while it is updated; ``None`` keeps the record in memory (one run in one
        process: only the run's own epsilon is checked).
    data_key
        The data file the runs are counted for (the resolved ``data-path`` on Flower, the
        site's name in process). It is never sent to the coordinator.
    """

    path: Path | None = None
    data_key: str = ""
    _memory: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.path is not None:
            self.path = Path(self.path)

    @contextlib.contextmanager
    def _runs(self) -> Iterator[dict[str, dict[str, Any]]]:
        """The record of runs, locked; written back if the block ends without an error."""
        if self.path is None:
            runs = dict(self._memory)
            yield runs
            self._memory = runs
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.path.with_suffix(".lock"), "a")
        except OSError as e:
            raise SiteDataError(
                f"the site's record of runs {str(self.path)!r} cannot be written ({e}); give "
                "the site a writable state folder (Flower: --node-config state-dir; in "
                "process: ScFedVI.from_sites(ledger_dir=))"
            ) from e
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    runs = json.loads(self.path.read_text()) if self.path.exists() else {}
                except ValueError as e:
                    raise SiteDataError(
                        f"the site's record of runs {str(self.path)!r} is not valid JSON ({e}); "
                        "its operator restores it (removing it forgets every run it answered)"
                    ) from e
                yield runs
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(runs, indent=1, sort_keys=True))
                os.replace(tmp, self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def runs(self) -> list[dict[str, Any]]:
        """The runs recorded for this data file, oldest first."""
        with self._runs() as runs:
            mine = [r for r in runs.values() if r["data"] == self.data_key]
        return sorted(mine, key=lambda r: r["first"])

    def admit(
        self,
        site: str,
        run_id: str,
        policy: SitePolicy,
        privacy: PrivacyConfig | None = None,
        rounds: int = 0,
        now: float | None = None,
    ) -> None:
        """Admit one more answered query of run ``run_id``, or refuse it.

        A run the ledger does not know yet is admitted only if the site answered fewer than
        ``policy.max_runs`` runs on this data file (within ``run_window_days``). With
        ``privacy`` (a training round, the ``rounds``-th of the run), the run's epsilon after
        it (:func:`run_epsilon`) plus the other runs' must stay within
        ``policy.max_total_epsilon``, and a run without DP needs ``allow_non_dp_runs``.
        Nothing is recorded for a refused query.

        Raises
        ------
        PolicyRefusal
            Naming the run, the budget, what was spent and the fix.
        """
        now = time.time() if now is None else now
        run_id = str(run_id)
        key = f"{self.data_key}\x1f{run_id}"
        with self._runs() as runs:
            others = [r for k, r in runs.items() if r["data"] == self.data_key and k != key]
            entry = runs.get(key)
            if entry is None:
                _check_run_count(site, run_id, policy, others, now)
                entry = {"data": self.data_key, "run": run_id, "first": now, "dp": True}
                entry |= {"epsilon": 0.0, "rounds": 0}
            if privacy is not None:
                entry = _charge(site, run_id, policy, privacy, rounds, entry, others)
            runs[key] = entry


def _check_run_count(
    site: str, run_id: str, policy: SitePolicy, others: list[dict[str, Any]], now: float
) -> None:
    window = policy.run_window_days
    counted = [r for r in others if window is None or r["first"] >= now - window * _DAY]
    if len(counted) >= policy.max_runs:
        within = "" if window is None else f" in the last {window:g} days"
        raise refuse(
            site,
            f"run {run_id!r} would be run {len(counted) + 1} it answers on its data{within}, "
            f"over its policy's max_runs={policy.max_runs} (every per-run budget multiplies "
            "with the runs)",
            "the coordinator must continue a run it already started rather than start another "
            "(or the site raises SitePolicy.max_runs"
            + (")" if window is None else " or waits until older runs leave the window)"),
        )


def _charge(
    site: str,
    run_id: str,
    policy: SitePolicy,
    privacy: PrivacyConfig,
    rounds: int,
    entry: dict[str, Any],
    others: list[dict[str, Any]],
) -> dict[str, Any]:
    """The run's record after one more training round, or a refusal."""
    eps = run_epsilon(policy, privacy, rounds)
    if math.isinf(eps):
        if not policy.allow_non_dp_runs:
            raise refuse(
                site,
                f"run {run_id!r} trains without differential privacy (privacy.clip_norm="
                f"{privacy.clip_norm!r}, noise_multiplier={privacy.noise_multiplier!r}): "
                "epsilon = inf, and its policy does not allow runs without DP",
                "the coordinator must run with DP (clip_norm and noise_multiplier > 0) "
                "(or the site sets SitePolicy.allow_non_dp_runs=True)",
            )
        return {**entry, "dp": False, "rounds": rounds}
    if policy.max_total_epsilon is None:
        return {**entry, "epsilon": max(entry["epsilon"], eps), "rounds": rounds}
    non_dp = [r for r in others if not r["dp"]] + ([] if entry["dp"] else [entry])
    if non_dp and not policy.allow_non_dp_runs:
        raise refuse(
            site,
            f"it answered {len(non_dp)} run(s) without DP on its data (epsilon = inf), so "
            f"run {run_id!r} cannot stay within its policy's max_total_epsilon="
            f"{policy.max_total_epsilon:g}",
            "its data has no finite epsilon left (or the site sets "
            "SitePolicy.allow_non_dp_runs=True, which leaves runs without DP uncounted)",
        )
    spent = sum(float(r["epsilon"]) for r in others)
    if spent + eps > policy.max_total_epsilon:
        raise refuse(
            site,
            f"round {rounds} of run {run_id!r} would bring its total epsilon to "
            f"{spent + eps:.4g} (this run {eps:.4g} after {rounds} round(s) at noise "
            f"multiplier {privacy.noise_multiplier:g}; its other {len(others)} run(s) "
            f"{spent:.4g}; delta={policy.epsilon_delta:g}, {policy.epsilon_adjacency}), over "
            f"its policy's max_total_epsilon={policy.max_total_epsilon:g}",
            "the coordinator must use more noise or fewer rounds (or the site raises "
            "SitePolicy.max_total_epsilon)",
        )
    return {**entry, "epsilon": max(entry["epsilon"], eps), "rounds": rounds}
