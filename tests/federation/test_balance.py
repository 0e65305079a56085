"""The two-round balancing protocol: local summaries, the coordinator's k-means, one round of
sums; the same steps in process and over a Flower-like transport; the site's refusals."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from scfedvi.config import FederationConfig, RunConfig, SitePolicy
from scfedvi.federation.balance import (
    CENTROIDS,
    LOCAL_PER_CLUSTER,
    SUMS,
    BalanceStep,
    assign,
    balance_in_process,
    cluster_sums,
    lloyd_update,
    local_centroids,
    local_summary,
    run_balance,
    site_seed,
)
from scfedvi.federation.balance_site import answer, new_ledger
from scfedvi.privacy.policy import PolicyRefusal, QueryLedger

CENTRES = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
MIXES = [(200, 20, 60, 0), (15, 150, 30, 90), (80, 80, 80, 80)]


def _sites(mixes=MIXES, seed=0):
    rng = np.random.default_rng(seed)
    truth = [np.repeat(np.arange(len(CENTRES)), m) for m in mixes]
    return truth, [CENTRES[t] + rng.normal(scale=0.7, size=(len(t), 3)) for t in truth]


def _config(k=4, iterations=2, rounds=1, **fed) -> RunConfig:
    f = FederationConfig(
        balance_clusters=k, balance_iterations=iterations, balance_rounds=rounds, **fed
    )
    return RunConfig(federation=f)


def _old_protocol(zs, k, rounds, seed=0):
    """The Lloyd protocol before (one pass): each site's own k centroids, then ``rounds``
    rounds of sums; the last round's centroids and counts."""
    from scfedvi.federation.balance import start_centroids

    c = start_centroids(
        [local_centroids(z, k, site_seed(seed, 0, i)) for i, z in enumerate(zs)], k, seed
    )
    for r in range(rounds):
        replies = [cluster_sums(z, c) for z in zs]
        if r < rounds - 1:
            c = lloyd_update(c, replies)
    counts = np.sum([n for _, n in replies], axis=0)
    return BalanceStep(c, counts / counts.sum())


def _raw_ask(zs, k, asked):
    def ask(phase, steps, centroids):
        asked.append(phase)
        if phase == CENTROIDS:
            n_local = LOCAL_PER_CLUSTER * k
            return [
                local_summary(z, n_local, site_seed(0, len(steps), i)) for i, z in enumerate(zs)
            ]
        return [cluster_sums(z, centroids) for z in zs]

    return ask


def test_two_rounds_find_the_old_lloyd_clusters_and_composition():
    """Well separated blobs, very different mixes: the two-round pass labels every cell as the
    old 1 + 10 round protocol does (up to a renaming) with the same composition, the
    federation's own."""
    truth, zs = _sites()
    asked: list[str] = []
    (new,) = run_balance(_raw_ask(zs, 4, asked), 4, iterations=1, rounds=1, seed=0)
    assert asked == [CENTROIDS, SUMS]  # two message rounds a pass
    old = _old_protocol(zs, 4, rounds=10)
    z_all, t_all = np.concatenate(zs), np.concatenate(truth)
    a_new, a_old = assign(z_all, new.centroids), assign(z_all, old.centroids)
    assert len({(int(x), int(y)) for x, y in zip(a_new, a_old, strict=True)}) == 4
    assert len({(int(x), int(y)) for x, y in zip(a_new, t_all, strict=True)}) == 4
    share = np.sum(MIXES, axis=0) / np.sum(MIXES)
    np.testing.assert_allclose(np.sort(new.composition), np.sort(share), atol=1e-12)
    np.testing.assert_allclose(np.sort(old.composition), np.sort(new.composition), atol=1e-12)
    # the sums round moved the centroids to the means of their cells
    a = assign(z_all, new.centroids)
    means = np.array([z_all[a == j].mean(0) for j in range(4)])
    np.testing.assert_allclose(new.centroids, means, atol=1e-9)


def test_local_summary_sends_means_of_at_least_min_cells_and_counts_every_cell():
    _, (z,) = _sites([(100, 40, 9, 0)])  # a 9-cell group: never a centroid of its own
    for min_cells in (10, 30):
        c, n = local_summary(z, 16, seed=3, min_cells=min_cells)
        assert n.min() >= min_cells and n.sum() == len(z) and len(c) <= 16
        # each centroid is the mean of the cells it counts, and they partition the site's
        np.testing.assert_allclose((n[:, None] * c).sum(0) / n.sum(), z.mean(0), atol=1e-12)
    assert not np.any(np.linalg.norm(c - CENTRES[2], axis=1) < 1.0)  # merged into others
    empty, none = local_summary(z[:9], 4, seed=0)
    assert empty.shape == (0, 3) and none.shape == (0,)


def test_small_clusters_send_only_their_count_under_the_sites_policy():
    _, (z,) = _sites([(100, 15, 0, 0)])
    cfg = _config(k=2)
    ledger = new_ledger()
    kw = dict(phase=CENTROIDS, n_clusters=2, seed=0, n_steps=0, centroids=None, ledger=ledger)
    strict = SitePolicy(min_cluster_cells=20)
    _, n = answer("a", z, cfg, **kw, policy=strict)
    assert n.min() >= 20
    kw.update(phase=SUMS, centroids=CENTRES[:2].copy())
    sums, counts = answer("a", z, cfg, **kw, policy=strict)
    assert counts.tolist() == [100, 15] and np.all(sums[1] == 0) and np.all(sums[0] != 0)
    # the coordinator keeps that cluster's centroid: the count enters no mean
    moved = lloyd_update(CENTRES[:2].copy(), [(sums, counts)])
    np.testing.assert_array_equal(moved[1], CENTRES[1])
    np.testing.assert_allclose(moved[0], z[:100].mean(0))


class _FakeWorker:
    """A site for :func:`balance_in_process`: fixed cells, each pass's steps shift them."""

    def __init__(self, name, z, policy=None):
        self.name, self.z, self.policy = name, z, policy

    def embed(self, params, steps):
        return self.z + 0.1 * len(steps)


def test_in_process_and_a_message_transport_give_the_same_steps(tmp_path):
    """balance_in_process against run_balance over a transport like Flower's: arrays through
    Flower records, a fresh ledger read from the site's JSON file for every message."""
    from scfedvi.flower import messages as m
    from scfedvi.privacy.policy import ledger_path

    _, zs = _sites()
    names = ["site-b", "site-a", "site-c"]  # sorted by name in both runtimes
    workers = [_FakeWorker(n, z) for n, z in zip(names, zs, strict=True)]
    cfg = _config(k=4)
    in_process = balance_in_process(workers, {}, cfg)
    order = sorted(workers, key=lambda w: w.name)
    asked = []

    def ask(phase, steps, centroids):
        asked.append(phase)
        replies = []
        for i, w in enumerate(order):
            sent = None
            if centroids is not None:
                sent = m.record_to_params(m.params_to_record({"c": centroids}))["c"]
            values, counts = answer(
                w.name,
                w.embed({}, steps),
                cfg,
                phase=phase,
                n_clusters=4,
                seed=site_seed(0, len(steps), i),
                n_steps=len(steps),
                centroids=sent,
                ledger=QueryLedger(ledger_path(tmp_path, w.name, 7)),
            )
            back = m.record_to_params(m.params_to_record({"values": values, "counts": counts}))
            replies.append((back["values"], back["counts"]))
        return replies

    over_messages = run_balance(ask, 4, 2, 1, 0)
    assert asked == [CENTROIDS, SUMS] * 2
    assert len(in_process) == len(over_messages) == 2
    for a, b in zip(in_process, over_messages, strict=True):
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(a.composition, b.composition)
    assert ledger_path(tmp_path, "site-a", 7).exists()


def test_the_site_refuses_queries_outside_its_policy_and_the_runs_declaration():
    _, (z,) = _sites([(60, 60, 0, 0)])
    cfg = _config(k=2, iterations=2, rounds=1)
    ok = CENTRES[:2].copy()

    def ask(phase, ledger, n_steps=0, centroids=ok, k=2, policy=None, config=cfg):
        return answer(
            "a", z, config, phase=phase, n_clusters=k, seed=0, n_steps=n_steps,
            centroids=centroids, ledger=ledger, policy=policy,
        )  # fmt: skip

    ledger = new_ledger()
    with pytest.raises(PolicyRefusal, match="before its local-summary query"):
        ask(SUMS, ledger)
    with pytest.raises(PolicyRefusal, match="3 clusters asked, the run declares"):
        ask(CENTROIDS, ledger, k=3)
    ask(CENTROIDS, ledger)
    with pytest.raises(PolicyRefusal, match="budget of 1"):
        ask(CENTROIDS, ledger)  # one local summary per pass
    for bad, why in (
        (np.array([[0.0, 0.0, np.nan], [1.0, 1.0, 1.0]]), "not finite"),
        (np.zeros((3, 3)), "expected the run's 2 clusters x 3"),
        (np.zeros((2, 4)), "expected the run's 2 clusters x 3"),
        (None, "without centroids"),
    ):
        with pytest.raises(PolicyRefusal, match=why):
            ask(SUMS, ledger, centroids=bad)
    ask(SUMS, ledger)
    with pytest.raises(PolicyRefusal, match="budget of 1"):
        ask(SUMS, ledger)  # the run declared one sums round a pass
    ask(CENTROIDS, ledger, n_steps=1)
    ask(SUMS, ledger, n_steps=1)
    with pytest.raises(PolicyRefusal, match="pass 3 asked; it answers 2"):
        ask(CENTROIDS, ledger, n_steps=2)  # the run declared two passes
    # the site's policy caps what the run declares
    greedy = _config(k=2, iterations=50, rounds=50)
    tight = SitePolicy(max_balance_passes=1, max_balance_rounds=2)
    ledger = new_ledger()
    ask(CENTROIDS, ledger, policy=tight, config=greedy)
    ask(SUMS, ledger, policy=tight, config=greedy)
    ask(SUMS, ledger, policy=tight, config=greedy)
    with pytest.raises(PolicyRefusal, match="budget of 2"):
        ask(SUMS, ledger, policy=tight, config=greedy)
    with pytest.raises(PolicyRefusal, match="max_balance_passes=1"):
        ask(CENTROIDS, ledger, n_steps=1, policy=tight, config=greedy)


def test_in_process_a_refusing_site_is_left_out_as_over_flower(caplog):
    _, zs = _sites()
    one_pass = SitePolicy(max_balance_passes=1)
    workers = [_FakeWorker("a", zs[0]), _FakeWorker("b", zs[1], one_pass), _FakeWorker("c", zs[2])]
    cfg = _config(k=4)
    with caplog.at_level(logging.WARNING):
        steps = balance_in_process(workers, {}, cfg)
    assert len(steps) == 2 and "site 'b' dropped" in caplog.text
    assert "max_balance_passes=1" in caplog.text
    # the second pass counts only the sites that answered it
    cells = len(zs[0]) + len(zs[2])
    composition = steps[1].composition * cells
    np.testing.assert_allclose(composition, np.round(composition), atol=1e-9)
    alone = [_FakeWorker("b", zs[1], one_pass)]
    with pytest.raises(RuntimeError, match=r"no site answered.*max_balance_passes"):
        balance_in_process(alone, {}, cfg)


def test_the_default_is_two_message_rounds_a_pass():
    cfg = RunConfig()
    assert cfg.federation.balance_rounds == 1 and cfg.federation.balance_iterations == 2
    pol = SitePolicy()
    assert cfg.federation.balance_iterations <= pol.max_balance_passes
    assert cfg.federation.balance_rounds <= pol.max_balance_rounds
