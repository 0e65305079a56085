"""A site's answer to a balancing query, within its own policy and query budget.

:func:`answer` is the only way a site's cells reach a balancing reply, in process
(:func:`scfedvi.federation.balance.balance_in_process`) and over Flower (the ``balance``
handler of :mod:`scfedvi.flower.client_app`). Before it computes anything it checks the query
against the site's :class:`~scfedvi.config.SitePolicy` and the run's declared settings:

- the ``k`` asked for is the run's ``balance_clusters``; the coordinator's centroids are
  finite, ``k`` of them, of the embedding's latent size;
- per run at most ``min(policy.max_balance_passes, balance_iterations)`` passes, each with
  one local-summary query and at most ``min(policy.max_balance_rounds, balance_rounds)``
  sums queries, and never more than ``balance_iterations x (1 + balance_rounds)`` queries
  in all; a sums query only after its pass's summary query;
- clusters of fewer than ``policy.min_cluster_cells`` of its cells send only their count.

A query outside these bounds raises :class:`~scfedvi.privacy.policy.PolicyRefusal`; the
ledger (:class:`~scfedvi.privacy.policy.QueryLedger`) counts what was answered. The bound
this puts on the bisecting-hyperplane attack (a coordinator that chooses the centroids) is in
``tests/federation/test_balance_privacy.py``.
"""

from __future__ import annotations

import numpy as np

from scfedvi.config import FederationConfig, RunConfig, SitePolicy
from scfedvi.federation.balance import (
    CENTROIDS,
    LOCAL_PER_CLUSTER,
    SUMS,
    cluster_sums,
    local_summary,
)
from scfedvi.federation.payload import check_balance_reply
from scfedvi.privacy.policy import PolicyRefusal, QueryLedger

#: Ledger kinds of the balancing queries (each counted per site and run).
QUERIES, SUMMARIES, SUM_QUERIES = "balance", "balance-summary", "balance-sums"


def new_ledger() -> QueryLedger:
    """An in-memory ledger: one balancing run in one process."""
    return QueryLedger()


def _refuse(site: str, what: str, fix: str) -> PolicyRefusal:
    return PolicyRefusal(f"site {site!r} refuses a balancing query: {what}; {fix}")


def answered_passes(fc: FederationConfig, policy: SitePolicy) -> tuple[int, int]:
    """The balancing passes and sums rounds a site answers in a run: the run's declared
    ``balance_iterations`` / ``balance_rounds`` within its policy's maxima."""
    return (
        min(policy.max_balance_passes, fc.balance_iterations),
        min(policy.max_balance_rounds, fc.balance_rounds),
    )


def pass_refusal(
    n_steps: int, passes: int, fc: FederationConfig, policy: SitePolicy
) -> tuple[str, str]:
    """The reason and the fix for refusing pass ``n_steps + 1`` of ``passes``."""
    return (
        f"pass {n_steps + 1} asked; it answers {passes} (balance_iterations="
        f"{fc.balance_iterations}, SitePolicy.max_balance_passes={policy.max_balance_passes})",
        "run at most that many passes (or the site raises SitePolicy.max_balance_passes)",
    )


def _check_centroids(site: str, centroids: np.ndarray | None, k: int, n_latent: int) -> np.ndarray:
    if centroids is None:
        raise _refuse(site, "a sums query without centroids", "send the pass's k centroids")
    c = np.asarray(centroids)
    if c.shape != (k, n_latent) or c.dtype.kind not in "fiu":
        raise _refuse(
            site,
            f"centroids of shape {c.shape} ({c.dtype}), expected the run's {k} clusters x "
            f"{n_latent} latent dimensions",
            "send balance_clusters real-valued centroids of the model's latent size",
        )
    c = c.astype(np.float64)
    if not np.isfinite(c).all():
        raise _refuse(site, "centroids that are not finite", "send finite centroids")
    return c


def answer(
    site: str,
    z: np.ndarray,
    config: RunConfig,
    *,
    phase: str,
    n_clusters: int,
    seed: int,
    n_steps: int,
    centroids: np.ndarray | None,
    ledger: QueryLedger,
    policy: SitePolicy | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The site's reply to one balancing query: ``(values, counts)``.

    Parameters
    ----------
    site
        The site's name (ledger key and messages).
    z
        The site's cells embedded with the pass's steps (never leaves the site).
    config
        The run's configuration as the site received it (its declared balancing settings).
    phase
        :data:`~scfedvi.federation.balance.CENTROIDS` (the site's local summary: up to
        ``LOCAL_PER_CLUSTER * k`` centroids with counts) or
        :data:`~scfedvi.federation.balance.SUMS` (per-cluster sums and counts).
    n_clusters
        The ``k`` the coordinator asks for (must be the run's ``balance_clusters``).
    seed
        Seed of the site's own k-means (local summary).
    n_steps
        The balancing steps the query's embedding used: the pass index.
    centroids
        The coordinator's ``(k, n_latent)`` centroids (sums queries).
    ledger
        The site's query counts for this run.
    policy
        The site's policy (default :class:`~scfedvi.config.SitePolicy`).

    Raises
    ------
    PolicyRefusal
        The query is outside the policy, the budget or the run's declared settings.
    """
    policy = policy or SitePolicy()
    fc = config.federation
    z = np.asarray(z, dtype=np.float64)
    if phase not in (CENTROIDS, SUMS):
        raise _refuse(site, f"unknown phase {phase!r}", f"ask for {CENTROIDS!r} or {SUMS!r}")
    if n_clusters != config.balance_clusters or n_clusters < 1:
        raise _refuse(
            site,
            f"{n_clusters} clusters asked, the run declares balance_clusters="
            f"{config.balance_clusters}",
            "ask for the run's declared number of clusters",
        )
    if n_clusters > policy.max_balance_clusters:
        raise _refuse(
            site,
            f"{n_clusters} clusters asked, above SitePolicy.max_balance_clusters="
            f"{policy.max_balance_clusters}",
            "run with fewer balance_clusters (or the site raises SitePolicy.max_balance_clusters)",
        )
    passes, rounds = answered_passes(fc, policy)
    if not 0 <= n_steps < passes:
        raise _refuse(site, *pass_refusal(n_steps, passes, fc, policy))
    pass_key = f"pass-{n_steps}"
    if phase == SUMS:
        c = _check_centroids(site, centroids, n_clusters, z.shape[1])
        if ledger.used(site, SUMMARIES, pass_key) == 0:
            raise _refuse(
                site,
                f"a sums query of pass {n_steps + 1} before its local-summary query",
                "ask for the pass's local summaries first",
            )
    budgets = [(QUERIES, fc.balance_iterations * (1 + fc.balance_rounds), "")]
    if phase == CENTROIDS:
        budgets += [(SUMMARIES, passes, ""), (SUMMARIES, 1, pass_key)]
    else:
        budgets += [(SUM_QUERIES, passes * rounds, ""), (SUM_QUERIES, rounds, pass_key)]
    for kind, limit, key in budgets:  # a refused query spends nothing
        if ledger.used(site, kind, key) >= limit:
            ledger.spend(site, kind, limit, key)  # raises, naming the budget
    for kind, limit, key in budgets:
        ledger.spend(site, kind, limit, key)
    if phase == CENTROIDS:
        n_rows = LOCAL_PER_CLUSTER * n_clusters
        values, counts = local_summary(z, n_rows, seed, policy.min_cluster_cells)
    else:
        n_rows = n_clusters
        values, counts = cluster_sums(z, c, policy.min_cluster_cells)
    check_balance_reply(  # the site's own whitelist check before anything leaves it
        site,
        phase,
        values,
        counts,
        n_clusters=n_rows,
        n_latent=z.shape[1],
        min_cells=policy.min_cluster_cells,
    )
    return values, counts
