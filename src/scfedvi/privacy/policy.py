"""The site's privacy policy at work: checks of every query against :class:`SitePolicy`.

A site answers the coordinator only within the policy it owns (:class:`SitePolicy`, set in
its node config, a policy file, or the ``ScFedVI`` argument; never by the coordinator). The
checks here run at the site, in the one code path both runtimes use
(:meth:`scfedvi.federation.site.SiteWorker.fit`, :func:`scfedvi.data.summary.site_summary`,
the balancing replies), and refuse with a :class:`PolicyRefusal` that names the site, the
setting, the bound and the fix. A :class:`QueryLedger` counts the queries a site answered in
one run (in memory, or in a JSON file in the site's state folder, since Flower starts a new
process per message).

This module is light: numpy and the standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from scfedvi.config import PrivacyConfig, RunConfig, SitePolicy
from scfedvi.data.errors import SiteDataError

if TYPE_CHECKING:
    from scfedvi.privacy.run_budget import RunLedger

log = logging.getLogger(__name__)

__all__ = [
    "PolicyRefusal",
    "PooledBatch",
    "QueryLedger",
    "SitePolicy",
    "check_pooled_batch",
    "check_summary",
    "check_training",
    "ledger_path",
    "n_train_cells",
    "policy_from_node_config",
    "refuse",
    "site_policy",
]


class PolicyRefusal(SiteDataError):
    """A site refuses a query that its :class:`SitePolicy` does not allow.

    A :class:`~scfedvi.data.errors.SiteDataError`, so the Flower site handler turns it into an
    error reply carrying the reason, and the in-process runtime raises it.
    """


def refuse(site: str, what: str, fix: str) -> PolicyRefusal:
    """The refusal, logged at the site with its reason."""
    e = PolicyRefusal(f"site {site!r} refuses: {what}; {fix}")
    log.warning("%s", e)
    return e


def n_train_cells(n_cells: int, train_size: float) -> int:
    """Training cells of a site of ``n_cells`` (as :func:`scfedvi.train.local.train_validation_split`)."""
    return min(n_cells, math.ceil(train_size * n_cells))


def _in_range(
    policy: SitePolicy, site: str, setting: str, value: float, field: str, what: str
) -> None:
    lo, hi = getattr(policy, field)
    if not lo <= float(value) <= hi:
        raise refuse(
            site,
            f"{setting}={value!r} is outside its policy's range [{lo:g}, {hi:g}]",
            f"the coordinator must use {what} in that range (or the site widens "
            f"SitePolicy.{field})",
        )


def _at_most(policy: SitePolicy, site: str, setting: str, value: int, field: str) -> None:
    bound = getattr(policy, field)
    if value > bound:
        raise refuse(
            site,
            f"{setting}={value} is above its policy's maximum {bound}",
            f"the coordinator must ask for at most {bound} (or the site raises SitePolicy.{field})",
        )


def check_training(
    policy: SitePolicy, site: str, config: RunConfig, n_train_cells: int, round_idx: int = 0
) -> None:
    """Refuse a training query whose settings the site's policy does not allow.

    Parameters
    ----------
    policy
        The site's policy.
    site
        Site name (for the message).
    config
        The run configuration the coordinator sent.
    n_train_cells
        The site's training cells under ``config.train.train_size`` (:func:`n_train_cells`).
    round_idx
        The round asked for (must be below ``policy.max_rounds``).

    Raises
    ------
    PolicyRefusal
        Naming the first setting outside the policy, its bound and the fix.
    """
    t, mdl = config.train, config.model
    if n_train_cells < policy.min_train_cells:
        raise refuse(
            site,
            f"train.train_size={t.train_size!r} leaves {n_train_cells} training cells, fewer "
            f"than its policy's minimum {policy.min_train_cells}",
            "the coordinator must use a larger train_size (or the site lowers "
            "SitePolicy.min_train_cells)",
        )
    if t.batch_size < policy.min_batch_size:
        raise refuse(
            site,
            f"train.batch_size={t.batch_size} is below its policy's minimum "
            f"{policy.min_batch_size}",
            f"the coordinator must use minibatches of at least {policy.min_batch_size} cells "
            "(or the site lowers SitePolicy.min_batch_size)",
        )
    _in_range(policy, site, "train.lr", t.lr, "lr_range", "a learning rate")
    _in_range(policy, site, "train.eps", t.eps, "eps_range", "an Adam eps")
    _in_range(
        policy, site, "train.weight_decay", t.weight_decay, "weight_decay_range", "a weight decay"
    )
    if t.local_steps is not None:
        _at_most(policy, site, "train.local_steps", t.local_steps, "max_local_steps")
    elif t.local_epochs is not None:
        _at_most(policy, site, "train.local_epochs", t.local_epochs, "max_local_epochs")
    _at_most(policy, site, "federation.n_rounds", config.federation.n_rounds, "max_rounds")
    if round_idx >= policy.max_rounds:
        raise refuse(
            site,
            f"round {round_idx} is beyond its policy's {policy.max_rounds} rounds per run",
            "start a new run (or the site raises SitePolicy.max_rounds)",
        )
    _check_site_clipping(policy, site, config)
    if policy.require_secure_aggregation and not config.privacy.secure_aggregation:
        raise refuse(
            site,
            "a training round without secure aggregation; its policy sends no unmasked update",
            "the coordinator must run with PrivacyConfig.secure_aggregation=True (or the site "
            "sets SitePolicy.require_secure_aggregation=False)",
        )
    for setting, value, field in (
        ("model.likelihood", mdl.likelihood, "allowed_likelihoods"),
        ("model.norm", mdl.norm, "allowed_encoder_norms"),
    ):
        allowed = getattr(policy, field)
        if value not in allowed:
            raise refuse(
                site,
                f"{setting}={value!r} is not among its policy's {list(allowed)}",
                f"the coordinator must use one of those (or the site adds it to SitePolicy.{field})",
            )


def _check_site_clipping(policy: SitePolicy, site: str, config: RunConfig) -> None:
    """A site with ``max_clip_norm`` trains only when it clips its own update to that bound."""
    if policy.max_clip_norm is None:
        return
    priv = config.privacy
    if priv.clip_norm is None or priv.clip_at != "site" or priv.clip_norm > policy.max_clip_norm:
        raise refuse(
            site,
            f"privacy.clip_norm={priv.clip_norm!r} with clip_at={priv.clip_at!r}; its policy "
            f"trains only with its update clipped at the site to at most {policy.max_clip_norm}",
            f"the coordinator must run with clip_at='site' and clip_norm <= "
            f"{policy.max_clip_norm} (or the site sets SitePolicy.max_clip_norm=None)",
        )


class PooledBatch(NamedTuple):
    """The coordinator's pooled moments of a batch held by several sites: its cell count and
    per-gene sums and sums of squares over all holders (what the pooled clip values are fitted
    on). A site checks that its own share fits inside them (:func:`check_pooled_batch`)."""

    n: int
    sums: np.ndarray
    sums_sq: np.ndarray


def check_summary(
    policy: SitePolicy,
    site: str,
    label_key: str | None,
    clip_values: Mapping[str, Any] | None,
    batch_counts: Mapping[str, int],
    shared_batches: Mapping[str, PooledBatch] | None = None,
) -> tuple[str, ...]:
    """Refuse a summary query the policy does not allow; return the batches to summarise.

    Parameters
    ----------
    policy
        The site's policy (with its own label key allowed: :meth:`SitePolicy.allowing_label_key`).
    site
        Site name.
    label_key
        The label column the coordinator asks the categories of (``None``: none).
    clip_values
        Per batch, the clip values the coordinator sent (``None``: a first pass).
    batch_counts
        Cells per batch at this site.
    shared_batches
        Per batch held by several sites, the coordinator's pooled moments (:class:`PooledBatch`).
        Clip values are accepted only for these batches.

    Returns
    -------
    The batches with at least ``policy.min_batch_cells`` cells, in sorted order: only they
    are summarised.
    """
    if label_key is not None and label_key not in policy.allowed_label_keys:
        raise refuse(
            site,
            f"label_key={label_key!r} is not among its policy's allowed label keys "
            f"{list(policy.allowed_label_keys)}",
            "the coordinator must ask for no label key or an allowed one (or the site adds it "
            "to SitePolicy.allowed_label_keys)",
        )
    kept = tuple(sorted(b for b, n in batch_counts.items() if n >= policy.min_batch_cells))
    shared = shared_batches or {}
    for b in sorted({*(clip_values or {}), *shared}):
        if b not in batch_counts:
            raise refuse(
                site,
                f"clip values or pooled moments were sent for batch {b!r}, which it does not hold",
                "the coordinator must send clip values only for a site's own shared batches",
            )
        if b not in shared:
            raise refuse(
                site,
                f"clip values were sent for batch {b!r} without the pooled moments showing "
                "another site holds it",
                "the coordinator must send clip values only for batches held by several sites, "
                "with their pooled moments (a site fits its own batches itself)",
            )
        if b not in kept:
            raise refuse(
                site,
                f"clip values or pooled moments were sent for batch {b!r}, which has fewer than "
                f"min_batch_cells={policy.min_batch_cells} cells here and is never summarised",
                "the coordinator must leave this site's part of the batch out",
            )
        extra = int(shared[b].n) - int(batch_counts[b])
        if extra < policy.min_batch_cells:
            raise refuse(
                site,
                f"the pooled batch {b!r} has {shared[b].n} cells, {extra} besides this site's "
                f"{batch_counts[b]}: fewer than min_batch_cells={policy.min_batch_cells} from "
                "other sites",
                "the batch is this site's alone: the site fits its clip values itself",
            )
    return kept


def check_pooled_batch(
    policy: SitePolicy,
    site: str,
    batch: str,
    own_sums: np.ndarray,
    own_sums_sq: np.ndarray,
    pooled: PooledBatch,
) -> None:
    """Refuse pooled moments of a shared batch that cannot contain this site's share (a sum
    below the site's own, per gene): they were not computed from the sites' summaries."""
    tol = 1e-9
    for name, own, tot in (
        ("sums", own_sums, pooled.sums),
        ("sums of squares", own_sums_sq, pooled.sums_sq),
    ):
        tot = np.asarray(tot, dtype=np.float64)
        if tot.shape != np.shape(own) or np.any(tot < np.asarray(own) * (1 - tol) - tol):
            raise refuse(
                site,
                f"the pooled {name} of batch {batch!r} do not contain its own (a gene's pooled "
                "value is below the site's, or the length differs)",
                "the coordinator must send the pooled moments of the sites' summaries",
            )


@dataclasses.dataclass
class QueryLedger:
    """How many queries of each kind a site answered in one run: its query budget.

    Parameters
    ----------
    path
        A JSON file that keeps the counts between processes (Flower: one per run, in the site's
        state folder, :func:`ledger_path`); ``None`` keeps them in memory.
    counts
        The counts so far (read from ``path``).
    runs
        The site's record of the runs it answered
        (:class:`~scfedvi.privacy.run_budget.RunLedger`): every answered query admits this
        run there first (``SitePolicy.max_runs``), and every training round charges its
        epsilon (``SitePolicy.max_total_epsilon``). Default: in memory, this run only.
    run_id
        This run's identifier in ``runs`` (Flower's run id).
    policy
        The site's policy the run budget is checked against (default ``SitePolicy()``).
    """

    path: Path | None = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    runs: RunLedger | None = None
    run_id: str = "run"
    policy: SitePolicy | None = None

    def __post_init__(self) -> None:
        if self.runs is None:
            from scfedvi.privacy.run_budget import RunLedger

            self.runs = RunLedger()
        if self.path is not None:
            self.path = Path(self.path)
            if self.path.exists():
                self.counts = {str(k): int(v) for k, v in json.loads(self.path.read_text()).items()}

    @staticmethod
    def _key(site: str, kind: str, key: str) -> str:
        return f"{site}\x1f{kind}\x1f{key}"

    def used(self, site: str, kind: str, key: str = "") -> int:
        """Queries of ``kind`` (and ``key``) the site answered so far in this run."""
        return self.counts.get(self._key(site, kind, key), 0)

    def spend(
        self,
        site: str,
        kind: str,
        limit: int,
        key: str = "",
        *,
        privacy: PrivacyConfig | None = None,
        policy: SitePolicy | None = None,
    ) -> None:
        """Count one more query of ``kind``; refuse it if the site would answer more than
        ``limit`` of them in this run, or if its run budget refuses the run.

        ``key`` names a separate budget within ``kind`` (for example one balancing pass:
        ``spend(site, "balance-sums", policy.max_balance_rounds, key=f"pass-{p}")``); each key
        has its own count against ``limit``. ``privacy``: a training round under these DP
        settings, charged against ``SitePolicy.max_total_epsilon`` as the run's n-th round.
        ``policy`` overrides the ledger's. A refused query is not counted.
        """
        k = self._key(site, kind, key)
        n = self.counts.get(k, 0) + 1
        if n > limit:
            label = f"{kind} ({key})" if key else kind
            raise refuse(
                site,
                f"query {n} of kind {label!r} exceeds its policy's budget of {limit} per run",
                "start a new run (or the site raises the matching SitePolicy budget)",
            )
        pol = policy or self.policy or SitePolicy()
        assert self.runs is not None  # __post_init__
        self.runs.admit(site, self.run_id, pol, privacy=privacy, rounds=n)
        self.counts[k] = n
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.counts, sort_keys=True))
            os.replace(tmp, self.path)


def site_policy(policy: SitePolicy | Mapping[str, SitePolicy] | None, site: str) -> SitePolicy:
    """The policy of ``site`` from one policy for every site, one per site, or ``None``
    (the default :class:`SitePolicy`)."""
    if policy is None:
        return SitePolicy()
    if isinstance(policy, SitePolicy):
        return policy
    if site not in policy:
        raise ValueError(
            f"no SitePolicy for site {site!r} (policies for {sorted(policy)}); give every site "
            "a policy, or one SitePolicy for all"
        )
    return policy[site]


def ledger_path(state_dir: str | os.PathLike, site: str, run_id: int | str) -> Path:
    """Where a site keeps its query ledger for Flower run ``run_id``."""
    return Path(state_dir) / f"{site}.ledger.run{run_id}.json"


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce(field: dataclasses.Field, value: Any, where: str) -> Any:
    t = str(field.type)
    try:
        if t.startswith("tuple[float"):
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            lo, hi = (float(v) for v in value)
            return (lo, hi)
        if t.startswith("tuple[str"):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if t == "float | None":  # Flower's config has no null: 0 or "" stand for None
            return None if value in (0, 0.0, "", "none", "None") else float(value)
        if t == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t == "bool":
            if isinstance(value, str):
                flag = value.strip().lower()
                if flag not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return flag in ("true", "1", "yes")
            if value not in (True, False, 0, 1):
                raise ValueError(value)
            return bool(value)
        if t == "float":
            return float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{where}: policy key {_kebab(field.name)!r} has an invalid value {value!r} ({t})"
        ) from e
    return value


def policy_from_node_config(node_config: Mapping[str, Any]) -> SitePolicy:
    """The site's :class:`SitePolicy` from its SuperNode's node config.

    ``policy-file='/path/policy.toml'`` names a TOML file of :class:`SitePolicy` fields (snake
    or kebab case; ranges as two-element arrays, key lists as arrays), optionally under a
    ``[policy]`` table; individual node-config keys (``min-train-cells=100``,
    ``lr-range='1e-5,1e-3'``, ``allowed-label-keys='cell_type,tissue'``) override the file.
    The node config's own ``label-key`` is allowed implicitly. Unknown keys in the file are an
    error (a typo must not silently leave a default).
    """
    fields = {f.name: f for f in dataclasses.fields(SitePolicy)}
    values: dict[str, Any] = {}
    file = node_config.get("policy-file")
    if file:
        path = Path(str(file)).expanduser()
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise SiteDataError(
                f"node config policy-file={str(file)!r}: no such file; write the site's policy "
                "there or remove the key"
            ) from e
        except tomllib.TOMLDecodeError as e:
            raise SiteDataError(f"policy file {str(path)!r} is not valid TOML: {e}") from e
        doc = doc.get("policy", doc)
        for k, v in doc.items():
            name = str(k).replace("-", "_")
            if name not in fields:
                raise SiteDataError(
                    f"policy file {str(path)!r}: unknown key {k!r}; known: "
                    f"{', '.join(map(_kebab, fields))}"
                )
            values[name] = _coerce(fields[name], v, f"policy file {str(path)!r}")
    for name, f in fields.items():
        if _kebab(name) in node_config:
            values[name] = _coerce(f, node_config[_kebab(name)], "node config")
    try:
        policy = SitePolicy(**values)
    except ValueError as e:
        raise SiteDataError(f"the site's policy is invalid: {e}") from e
    own = str(node_config.get("label-key", "") or "")
    return policy.allowing_label_key(own or None)
