"""Secure aggregation's protocol: the sum survives dropouts, a site reveals one kind of share per
site, too few sites or survivors are refused, and a run's model equals the unmasked run's."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from secagg_requests import roster as _roster

from scfedvi.config import FederationConfig, ModelConfig, PrivacyConfig, RunConfig, TrainConfig
from scfedvi.privacy.identity import make_identities
from scfedvi.privacy.policy import PolicyRefusal
from scfedvi.privacy.secagg import decode_sum, encode_update, quantize, scale_for, site_weights
from scfedvi.privacy.secagg_protocol import (
    CONSISTENCY,
    MASKED,
    SHARES,
    UNMASK,
    SecAggError,
    roster_digest,
    secure_sum,
    survivor_set,
    threshold_for,
)
from scfedvi.privacy.secagg_site import SiteSession
from scfedvi.privacy.shamir import shamir_reconstruct, shamir_share

C, D, RUN = 1.0, 4_000, b"run-7"


def _updates(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        x = rng.normal(size=D)
        out[f"site-{i}"] = x / np.linalg.norm(x) * C / n  # so that the sum stays within C
    return out


def _sessions(names, run_id=RUN, r=3) -> dict[str, SiteSession]:
    ids = make_identities(names)
    return {s: SiteSession(s, run_id, r, ids[s]) for s in names}


def _run(n: int, drop: dict[str, str] | None = None, seed: int = 0, threshold=None, tamper=None):
    """The protocol over ``n`` sites in this process; ``drop``: ``{site: stage}`` from which
    the site answers nothing; ``tamper(stage, payloads)`` lets a test play the coordinator."""
    drop = drop or {}
    ups = _updates(n, seed)
    sessions = _sessions(list(ups))
    order = ["keys", SHARES, MASKED, CONSISTENCY, UNMASK]

    def gone(site, stage):
        return site in drop and order.index(drop[site]) <= order.index(stage)

    keys = {s: sess.keys() for s, sess in sessions.items() if not gone(s, "keys")}

    def ask(stage, payloads):
        if tamper is not None:
            payloads = tamper(stage, dict(payloads))
        out = {}
        for s, p in payloads.items():
            if gone(s, stage):
                continue
            if stage == SHARES:
                out[s] = sessions[s].shares(p)
            elif stage == MASKED:
                out[s] = {"masked": sessions[s].masked(quantize(ups[s], C, 1), p)}
            elif stage == CONSISTENCY:
                out[s] = sessions[s].consistency(p)
            else:
                out[s] = sessions[s].unmask(p)
        return out

    res = secure_sum(ask, keys, length=D, run_id=RUN, round_idx=3, threshold=threshold)
    return res, ups, sessions


def _decoded(res) -> np.ndarray:
    return res.total.view(np.int32).astype(np.float64) / scale_for(C, 1)


def test_shamir_any_threshold_shares_reconstruct_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir_share(secret, [1, 2, 3, 4, 5], 3)
    assert shamir_reconstruct({x: shares[x] for x in (1, 3, 5)}) == secret
    assert shamir_reconstruct({x: shares[x] for x in (2, 4, 5)}) == secret
    with pytest.raises(ValueError):  # two shares of a degree-2 polynomial: not the secret
        shamir_reconstruct({x: shares[x] for x in (1, 2)})
    assert threshold_for(3) == 2 and threshold_for(10) == 7


def test_the_sum_equals_the_plain_sum_within_quantization_error():
    res, ups, _ = _run(4)
    assert res.survivors == sorted(ups) and not res.dropped
    err = np.abs(_decoded(res) - np.sum(list(ups.values()), axis=0)).max()
    assert err <= 4 / (2 * scale_for(C, 1)) + 1e-12


def test_one_masked_vector_reveals_nothing_testable():
    ups = _updates(3)
    sessions = _sessions(list(ups), r=0)
    keys = {s: sess.keys() for s, sess in sessions.items()}
    roster = _roster(keys, 2)
    cts = {s: sess.shares(roster) for s, sess in sessions.items()}
    s0 = "site-0"
    inbox = {
        "senders": ["site-1", "site-2"],
        "ciphertexts": [
            cts[j]["ciphertexts"][cts[j]["to"].index(s0)] for j in ("site-1", "site-2")
        ],
    }
    q = quantize(ups[s0], C, 1)
    m = sessions[s0].masked(q, inbox)
    u = m.astype(np.float64) / 2**32
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    assert abs(np.corrcoef(u, ups[s0])[0, 1]) < 0.06
    assert stats.kstest(q.astype(np.float64) / 2**32, "uniform").pvalue < 1e-6  # unmasked: not


@pytest.mark.parametrize("stage", [MASKED, CONSISTENCY, UNMASK])
def test_a_site_dropping_after_stage_2_or_3_is_recovered(stage):
    # MASKED: the site sent shares, then no masked update (its pair masks are removed);
    # CONSISTENCY / UNMASK: it sent its masked update, then did not sign or did not help
    # unmask (the others suffice)
    res, ups, _ = _run(5, drop={"site-2": stage})
    in_sum = [s for s in ups if stage != MASKED or s != "site-2"]
    assert res.survivors == in_sum
    want = np.sum([ups[s] for s in in_sum], axis=0)
    assert np.abs(_decoded(res) - want).max() <= 5 / (2 * scale_for(C, 1)) + 1e-12


def test_a_site_refuses_to_reveal_for_a_second_survivor_set():
    asked: dict = {}

    def keep(stage, payloads):
        if stage == UNMASK:
            asked.update(payloads)
        return payloads

    _, _, sessions = _run(3, tamper=keep)  # every site answered: seeds of all three revealed
    # afterwards, "site-1 dropped": it would reveal site-1's key share too
    with pytest.raises(PolicyRefusal, match="not the set it signed"):
        sessions["site-0"].unmask({**asked["site-0"], "survivors": ["site-0", "site-2"]})
    with pytest.raises(PolicyRefusal, match="sign the survivors while at 'unmask'"):
        sessions["site-0"].consistency({"survivors": ["site-0", "site-2"]})
    # the same request again is answered (a retry), and reveals the same kinds
    again = sessions["site-0"].unmask(asked["site-0"])
    assert set(again["kinds"]) == {"seed"}
    # the rule of one kind per site holds on its own too (defence in depth)
    # (a session whose signed set was changed, with valid signatures over the new set)
    short = ["site-0", "site-2"]
    sessions["site-0"].signed = short
    digest = roster_digest(sessions["site-0"].roster)
    sigs = [sessions[s].identity.sign(survivor_set(RUN, 3, short, digest)) for s in short]
    with pytest.raises(PolicyRefusal, match="both the seed share and the key share"):
        sessions["site-0"].unmask({"survivors": short, "signers": short, "sigs": sigs})


def test_fewer_than_three_sites_are_refused_by_the_coordinator_and_the_site():
    with pytest.raises(SecAggError, match="fewer than 3"):
        _run(2)

    def lift(stage, payloads):  # a coordinator that skips its own check still meets the site's
        return payloads

    sessions = _sessions(["a", "b"], r=0)
    keys = {s: x.keys() for s, x in sessions.items()}
    roster = _roster(keys, 2)
    with pytest.raises(PolicyRefusal, match="min_secagg_sites=3"):
        sessions["a"].shares(roster)


def test_a_minority_threshold_is_refused_at_the_site():
    with pytest.raises(PolicyRefusal, match="threshold 2 for 5 sites"):
        _run(5, threshold=2)


def test_too_few_survivors_raise_a_clear_error():
    with pytest.raises(SecAggError, match="fewer than the threshold 2 of 3"):
        _run(3, drop={"site-0": MASKED, "site-1": MASKED})
    with pytest.raises(SecAggError, match="stage 'shares'"):
        _run(4, drop={"site-0": SHARES, "site-1": SHARES})


def test_substituted_shares_do_not_authenticate():
    def swap(stage, payloads):
        if stage == MASKED:  # the coordinator hands site-0 the ciphertext meant for site-1
            p = payloads["site-0"]
            payloads["site-0"] = {**p, "ciphertexts": list(reversed(p["ciphertexts"]))}
        return payloads

    with pytest.raises(PolicyRefusal, match="do not authenticate"):
        _run(3, tamper=swap)


def test_session_survives_a_round_trip_through_its_state_file():
    s = _sessions(["a"], r=1)["a"]
    keys = s.keys()
    assert "signing" not in str(s.to_dict()) and s.identity.site == "a"
    back = SiteSession.from_dict(s.to_dict(), s.identity)
    assert back.keys() == keys and back.to_dict() == s.to_dict()


def test_encoding_prescales_batch_columns_and_carries_the_counts():
    g = {"w": np.zeros((2, 4), np.float32), "v": np.zeros(3, np.float32)}
    p = {"w": np.full((2, 4), 0.1, np.float32), "v": np.full(3, 0.2, np.float32)}
    owned = {"w": (1, 2)}  # columns 2 and 3 belong to batches 0 and 1
    w = site_weights(30, {0: 10, 1: 25}, 2, weighted=True)
    vec = encode_update(p, g, w, batch_owned=owned, clip_norm=10.0, bound=100)
    sums, counts = decode_sum(vec, g, 2, clip_norm=10.0, bound=100)
    assert counts.tolist() == [30, 10, 25]
    np.testing.assert_allclose(sums["w"][:, :2], 0.1 * 30, rtol=1e-6)
    np.testing.assert_allclose(sums["w"][:, 2], 0.1 * 10, rtol=1e-6)
    np.testing.assert_allclose(sums["w"][:, 3], 0.1 * 25, rtol=1e-6)
    np.testing.assert_allclose(sums["v"], 0.2 * 30, rtol=1e-6)
    with pytest.raises(ValueError, match="exceed the bound"):
        encode_update(p, g, w, batch_owned=owned, clip_norm=10.0, bound=20)


def test_secure_aggregation_needs_site_clipping():
    with pytest.raises(ValueError, match="clip_at='site'"):
        PrivacyConfig(secure_aggregation=True, clip_norm=1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        PrivacyConfig(secure_aggregation=True, clip_at="site")


def _config(priv: PrivacyConfig) -> RunConfig:
    return RunConfig(
        model=ModelConfig(n_hidden=16, n_latent=3),
        train=TrainConfig(batch_size=32, local_epochs=1),
        federation=FederationConfig(n_rounds=2),
        privacy=priv,
    )


def _sites(adata):
    b = adata.obs["batch"].to_numpy()
    # one site per batch and one with both: batch-owned columns are averaged over few sites
    return {
        "a": adata[b == "b0"][:70].copy(),
        "b": adata[b == "b1"][:70].copy(),
        "c": adata[140:].copy(),
    }


def test_a_secure_run_ends_within_quantization_error_of_the_unmasked_run(small_adata):
    from scfedvi import ScFedVI

    plain = ScFedVI.from_sites(
        _sites(small_adata), batch_key="batch", n_top_genes=None, config=_config(PrivacyConfig())
    )
    plain.train(progress=False)
    # a clip norm no update reaches: the secure run sums the same (unclipped) updates
    priv = PrivacyConfig(clip_norm=1e3, clip_at="site", expected_sites=3, secure_aggregation=True)
    secure = ScFedVI.from_sites(
        _sites(small_adata), batch_key="batch", n_top_genes=None, config=_config(priv)
    )
    h = secure.train(progress=False)
    assert (h[h["site"] != "(server)"]["status"] == "ok").all() and len(h) == 6
    # 3 sites, each value's rounding at most C / 2**32 times the bound over the summed cells
    diffs = [np.abs(secure.params[k] - plain.params[k]).max() for k in plain.params]
    assert max(diffs) < 1e-5, max(diffs)
    # while training moved the model by far more than that
    from scfedvi.federation.coordinator import Coordinator

    init = Coordinator(60, 2, _config(PrivacyConfig())).params
    assert max(np.abs(plain.params[k] - init[k]).max() for k in plain.params) > 1e-3


def test_a_site_that_requires_secure_aggregation_refuses_a_plain_round():
    from scfedvi.config import SitePolicy
    from scfedvi.privacy.policy import check_training

    policy = SitePolicy(require_secure_aggregation=True)
    with pytest.raises(PolicyRefusal, match="without secure aggregation"):
        check_training(policy, "a", _config(PrivacyConfig()), 100)
    secure = PrivacyConfig(clip_norm=1.0, clip_at="site", expected_sites=3, secure_aggregation=True)
    check_training(policy, "a", _config(secure), 100)  # accepted


def _secure_aggregate(priv: PrivacyConfig, drop: dict[str, str] | None = None):
    """Three sites' random updates of a small model through the protocol into a coordinator;
    returns (coordinator params after, the updates, the global params before, survivors)."""
    from scfedvi.federation.aggregate import SiteUpdate
    from scfedvi.federation.coordinator import Coordinator
    from scfedvi.privacy.secagg import secagg_bound, vector_length

    drop = drop or {}
    coord = Coordinator(30, 3, _config(priv))
    g = coord.params
    rng = np.random.default_rng(1)
    counts = {"a": {0: 40, 1: 10}, "b": {1: 30}, "c": {0: 5, 2: 50}}
    n_cells = {s: sum(c.values()) for s, c in counts.items()}
    ups = [
        SiteUpdate(
            s,
            {k: (v + 0.01 * rng.normal(size=v.shape)).astype(v.dtype) for k, v in g.items()},
            n_cells[s] - 3,
            c,
        )
        for s, c in counts.items()
    ]
    bound = secagg_bound(priv, n_cells)
    weighted = priv.noise_multiplier == 0
    vecs = {
        u.site: encode_update(
            u.params,
            g,
            site_weights(u.num_examples, u.batch_counts, 3, weighted),
            batch_owned=coord.batch_owned if weighted else {},
            clip_norm=priv.clip_norm,
            bound=bound,
        )
        for u in ups
    }
    sessions = _sessions(list(vecs), r=0)
    order = ["keys", SHARES, MASKED, CONSISTENCY, UNMASK]

    def ask(stage, payloads):
        out = {}
        for s, p in payloads.items():
            if s in drop and order.index(drop[s]) <= order.index(stage):
                continue
            if stage == SHARES:
                out[s] = sessions[s].shares(p)
            elif stage == MASKED:
                out[s] = {"masked": sessions[s].masked(vecs[s], p)}
            elif stage == CONSISTENCY:
                out[s] = sessions[s].consistency(p)
            else:
                out[s] = sessions[s].unmask(p)
        return out

    keys = {s: x.keys() for s, x in sessions.items()}
    res = secure_sum(ask, keys, length=vector_length(g, 3), run_id=RUN, round_idx=0)
    before = {k: v.copy() for k, v in g.items()}
    coord.aggregate_secure(res, ups, bound=bound, dropped=sorted(res.dropped))
    return coord, ups, before, res.survivors


def test_weighted_secure_sum_is_fedavg_with_batch_columns_over_the_survivors():
    from scfedvi.federation.aggregate import fedavg

    priv = PrivacyConfig(clip_norm=1e3, clip_at="site", expected_sites=3, secure_aggregation=True)
    coord, ups, before, alive = _secure_aggregate(priv, drop={"b": MASKED})
    assert alive == ["a", "c"]
    assert coord.batch_owned  # the small model has batch-owned columns
    want = fedavg([u for u in ups if u.site in alive], before, coord.batch_owned)
    for k in want:  # batch 1 now only from "a", batch 2 only from "c", batch 0 weighted 40:5
        np.testing.assert_allclose(coord.params[k], want[k], rtol=0, atol=1e-5, err_msg=k)
    dropped = [h for h in coord.history if h["site"] == "b"]
    assert dropped and dropped[0]["status"] == "dropped"


def test_dp_secure_sum_is_the_fixed_divisor_sum_plus_noise_added_by_the_coordinator():
    from scfedvi.privacy.dp import dp_average

    priv = PrivacyConfig(
        clip_norm=0.05,
        noise_multiplier=1e-6,
        clip_at="site",
        expected_sites=3,
        secure_aggregation=True,
    )
    coord, ups, before, _ = _secure_aggregate(priv)
    want, _ = dp_average(
        ups, before, clip_norm=0.05, noise_multiplier=0.0, divisor=3, noise=lambda s, std: 0
    )
    diffs = max(np.abs(coord.params[k] - want[k]).max() for k in want)
    assert 0 < diffs < 1e-6  # the clipped updates' sum over 3, plus noise of std 1.7e-8
    rows = [h for h in coord.history if h.get("status") == "dp"]
    assert rows and rows[0]["dp_divisor"] == 3.0 and rows[0]["dp_noise_std"] > 0


def test_a_site_that_sent_its_masked_update_refuses_to_be_listed_as_dropped():
    def lie(stage, payloads):
        if stage == CONSISTENCY:  # tell site-0 that it dropped: its key share would be revealed
            payloads["site-0"] = {"survivors": ["site-1", "site-2", "site-3"]}
        return payloads

    with pytest.raises(PolicyRefusal, match="without this site"):
        _run(4, tamper=lie)
