"""Finding 3 of the privacy issue: a coordinator that chooses the balancing centroids.

The attack: two centroids ``(t - 1) u`` and ``(t + 1) u`` split a site's cells by the
hyperplane ``z . u = t``; the counts tell the coordinator how many cells lie below it, so it
bisects ``t`` until ``m`` and then ``m + 1`` cells do, and the difference of the two answers'
sums (each over at least 10 cells, so each passes the 10-cell rule) is one cell's latent
vector, exactly. Asking as often as it likes, it recovers almost every cell.

Through the site's policy-checked entry point (:func:`scfedvi.federation.balance_site.answer`,
the one both runtimes call) the site answers at most the run's declared passes and rounds,
capped by its :class:`~scfedvi.config.SitePolicy`, and refuses the rest. The bound asserted:
a vector is recovered only from the difference of two answered sums queries whose clusters
differ by exactly that cell, so ``q`` answered sums queries give at most ``q - 1`` vectors by
this attack; at the default run (2 passes x 1 sums round) that is at most 1, and at the most a
default policy ever answers (3 passes x 2 rounds = 6 queries, whatever the coordinator
declares) at most 5 of 300. Measured here: all 300 cells from 448 answers without the
policy; 0 at the default run. A site that widens its policy to 10 sums rounds a pass
(30 answers) let the attack recover 13 of 300 (asserted: at most 5%).
"""

from __future__ import annotations

import numpy as np
import pytest

from scfedvi.config import FederationConfig, RunConfig, SitePolicy
from scfedvi.federation.balance import CENTROIDS, SUMS, cluster_sums
from scfedvi.federation.balance_site import answer, new_ledger
from scfedvi.privacy.policy import PolicyRefusal

N_CELLS, N_LATENT = 300, 10


def _cells(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(N_CELLS, N_LATENT))


class _Stop(Exception):
    """The site refuses every further query."""


def bisecting_attack(query, n_cells: int, n_latent: int, seed: int = 1) -> list[np.ndarray]:
    """The coordinator's side: vectors recovered with ``query(centroids) -> (sums, counts)``
    until the site stops answering."""
    u = np.random.default_rng(seed).normal(size=n_latent)
    u /= np.linalg.norm(u)
    known: dict[int, tuple[float, np.ndarray, np.ndarray]] = {}  # cells below -> answer

    def ask(t: float) -> int:
        sums, counts = query(np.stack([(t - 1.0) * u, (t + 1.0) * u]))
        m = int(counts[0])
        known.setdefault(m, (t, sums, counts))
        return m

    lo, hi = -1e3, 1e3  # every cell lies between
    recovered: list[np.ndarray] = []
    try:
        ask(lo)
        ask(hi)
        for m in range(n_cells):  # the (m + 1)-th cell along u
            for target in (m, m + 1):
                a = max([t for c, (t, _, _) in known.items() if c <= target] + [lo])
                b = min([t for c, (t, _, _) in known.items() if c > target] + [hi])
                for _ in range(80):
                    if target in known:
                        break
                    mid = 0.5 * (a + b)
                    if ask(mid) <= target:
                        a = mid
                    else:
                        b = mid
            if m in known and m + 1 in known:
                (_, s0, n0), (_, s1, n1) = known[m], known[m + 1]
                if n0[0] >= 10 and n1[0] >= 10:  # both sums sent: below the plane
                    recovered.append(s1[0] - s0[0])
                elif n0[1] >= 10 and n1[1] >= 10:  # above it
                    recovered.append(s0[1] - s1[1])
    except _Stop:
        pass
    return recovered


def _exact(recovered: list[np.ndarray], z: np.ndarray) -> int:
    """Distinct cells of ``z`` among the recovered vectors (to 1e-8)."""
    hits = set()
    for v in recovered:
        d = np.abs(z - v).max(1)
        if d.min() < 1e-8:
            hits.add(int(d.argmin()))
    return len(hits)


def test_the_attack_works_on_the_raw_sums():
    """Without the policy (the numpy function alone, answering every query) the attack
    recovers most of the site's cells exactly, every answer passing the 10-cell rule."""
    z = _cells()
    n_queries = 0

    def query(centroids):
        nonlocal n_queries
        n_queries += 1
        return cluster_sums(z, centroids)

    got = _exact(bisecting_attack(query, N_CELLS, N_LATENT), z)
    assert got >= 0.9 * N_CELLS, (got, n_queries)


class _PolicyQuery:
    """The same attack through the site's entry point: it follows the protocol (one local
    summary, then sums) and moves to the next pass when a pass's sums are refused."""

    def __init__(self, z, config, policy=None):
        self.z, self.config, self.policy = z, config, policy
        self.ledger, self.pass_, self.answered, self.refusals = new_ledger(), 0, 0, []
        self._ask(CENTROIDS, None)

    def _ask(self, phase, centroids):
        k = self.config.balance_clusters
        return answer(
            "site-a", self.z, self.config, phase=phase, n_clusters=k, seed=0,
            n_steps=self.pass_, centroids=centroids, ledger=self.ledger, policy=self.policy,
        )  # fmt: skip

    def __call__(self, centroids):
        while True:
            try:
                out = self._ask(SUMS, centroids)
                self.answered += 1
                return out
            except PolicyRefusal as e:
                self.refusals.append(str(e))
            try:  # the next pass
                self.pass_ += 1
                self._ask(CENTROIDS, None)
            except PolicyRefusal as e:
                self.refusals.append(str(e))
                raise _Stop from e


def _declared(iterations: int, rounds: int) -> RunConfig:
    fed = FederationConfig(balance_clusters=2, balance_iterations=iterations, balance_rounds=rounds)
    return RunConfig(federation=fed)


@pytest.mark.parametrize(
    ("iterations", "rounds", "answered"),
    [
        (2, 1, 2),  # the default run: 2 passes x 1 sums round
        (3, 10, 6),  # the most the default policy answers
        (100, 1000, 6),  # whatever else the coordinator declares
        (3, 10, 30),  # a site that widened its policy to 10 sums rounds a pass
    ],
)
def test_the_sites_policy_refuses_the_attack_after_its_budget(iterations, rounds, answered):
    z = _cells()
    policy = SitePolicy(max_balance_rounds=10) if answered == 30 else None
    query = _PolicyQuery(z, _declared(iterations, rounds), policy)
    got = _exact(bisecting_attack(query, N_CELLS, N_LATENT), z)
    assert query.answered == answered and query.refusals  # the rest was refused
    assert "budget" in query.refusals[0] or "answers" in query.refusals[0]
    assert got <= answered - 1, (got, answered)  # the bound of the module docstring
    assert got <= 0.05 * N_CELLS, got


def test_min_cluster_cells_holds_in_process_too():
    """The 10-cell rule is the site's, in the function both runtimes call: a chosen cluster of
    9 cells gives its count and no sum."""
    z = _cells()
    query = _PolicyQuery(z, _declared(2, 1))
    u = np.zeros(N_LATENT)
    u[0] = 1.0
    t = np.sort(z[:, 0])[8] + 1e-9  # exactly 9 cells below
    sums, counts = query(np.stack([(t - 1.0) * u, (t + 1.0) * u]))
    assert counts.tolist() == [9, N_CELLS - 9] and not sums[0].any() and sums[1].any()
    strict = _PolicyQuery(z, _declared(2, 1), SitePolicy(min_cluster_cells=300))
    sums, counts = strict(np.stack([(t - 1.0) * u, (t + 1.0) * u]))
    assert not sums.any() and counts.sum() == N_CELLS


def test_a_site_refuses_more_clusters_than_its_policy_allows():
    """More clusters let a chosen-centroid coordinator isolate more cells per answer: a run that
    declares more than ``SitePolicy.max_balance_clusters`` is refused at its first query."""
    z = _cells()
    config = RunConfig(federation=FederationConfig(balance_clusters=64))
    with pytest.raises(PolicyRefusal, match="max_balance_clusters=32"):
        answer(
            "site-a", z, config, phase=CENTROIDS, n_clusters=64, seed=0, n_steps=0,
            centroids=None, ledger=new_ledger(),
        )  # fmt: skip
    ok = answer(
        "site-a", z, config, phase=CENTROIDS, n_clusters=64, seed=0, n_steps=0,
        centroids=None, ledger=new_ledger(), policy=SitePolicy(max_balance_clusters=64),
    )  # fmt: skip
    assert ok[1].sum() == len(z)
