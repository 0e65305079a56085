"""Secure aggregation against a malicious coordinator: each attack is performed, and refused.

The coordinator here plays by the protocol's message types but chooses their contents. Each
attack that the sites' identity keys, rosters and signed survivor set stop is also run once
against sites without that defence (a roster the coordinator wrote, or signatures not
checked), where it reads the victim's update: so each test would fail without its defence.
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from secagg_requests import roster as _roster

from scfedvi.privacy.identity import SiteIdentity, make_identities
from scfedvi.privacy.policy import PolicyRefusal
from scfedvi.privacy.secagg import quantize, scale_for
from scfedvi.privacy.secagg_protocol import (
    MOD,
    advertised,
    context,
    pair_mask,
    public_bytes,
    self_mask,
    share_cipher,
)
from scfedvi.privacy.secagg_site import SiteSession
from scfedvi.privacy.shamir import SHARE_BYTES, shamir_reconstruct

C, D, RUN, R = 1.0, 2_000, b"salt-of-round-3!", 3


def _update(seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=D)
    return x / np.linalg.norm(x) * C / 5


def _decode(q: np.ndarray) -> np.ndarray:
    return q.view(np.int32).astype(np.float64) / scale_for(C, 1)


# -- (a) key substitution and (c) Sybil sites: the coordinator plays every peer of one site -----
def _impersonate(victim: SiteSession, peers: dict[str, Ed25519PrivateKey | bytes], x: np.ndarray):
    """The coordinator shows ``victim`` peers whose round keys it made itself, signed with
    ``peers[name]`` (its own signing key) or carrying the peer's real signature (bytes),
    collects the victim's shares, and unmasks its masked update alone. Returns the update."""
    fake = {p: (X25519PrivateKey.generate(), X25519PrivateKey.generate()) for p in peers}
    own = victim.keys()
    keys = {victim.site: own}
    for p, signer in peers.items():
        mk, ek = (public_bytes(k) for k in fake[p])
        sig = signer if isinstance(signer, bytes) else signer.sign(advertised(RUN, R, p, mk, ek))
        keys[p] = {"mask_pk": mk, "enc_pk": ek, "sig": sig}
    t = len(peers)  # every share the victim sends goes to the coordinator
    rep = victim.shares(_roster(keys, t))
    xs = {s: k + 1 for k, s in enumerate(sorted(keys))}
    key_sh, seed_sh = {}, {}
    for p, ct in zip(rep["to"], rep["ciphertexts"], strict=True):
        aead = share_cipher(fake[p][1], own["enc_pk"], (p, victim.site), RUN, R)
        plain = aead.decrypt(ct[:12], ct[12:], context(RUN, R, "share", victim.site, p))
        key_sh[xs[p]], seed_sh[xs[p]] = plain[:SHARE_BYTES], plain[SHARE_BYTES:]
    mask_sk = X25519PrivateKey.from_private_bytes(shamir_reconstruct(key_sh))
    seed = shamir_reconstruct(seed_sh)
    inbox = {"senders": sorted(peers), "ciphertexts": []}
    for p in sorted(peers):  # shares "from" each fake peer, so that the victim masks
        aead = share_cipher(fake[p][1], own["enc_pk"], (p, victim.site), RUN, R)
        nonce = secrets.token_bytes(12)
        plain = secrets.token_bytes(2 * SHARE_BYTES)
        ad = context(RUN, R, "share", p, victim.site)
        inbox["ciphertexts"].append(nonce + aead.encrypt(nonce, plain, ad))
    y = victim.masked(quantize(x, C, 1), inbox).astype(np.uint64)
    y = (y + MOD - self_mask(seed, victim.site, RUN, R, D)) % MOD
    for p in sorted(peers):
        m = pair_mask(mask_sk, keys[p]["mask_pk"], (victim.site, p), RUN, R, D).astype(np.uint64)
        y = (y + (MOD - m if victim.site < p else m)) % MOD
    return _decode(y.astype(np.uint32))


@pytest.mark.parametrize("signature", ["forwarded", "coordinator's"])
def test_substituted_keys_are_refused(signature):
    ids = make_identities(["a", "b", "c"])
    honest = {s: SiteSession(s, RUN, R, ids[s]) for s in ("b", "c")}
    mine = Ed25519PrivateKey.generate()
    # the peers' real signatures (over their real keys) or the coordinator's own
    peers = {
        s: sess.keys()["sig"] if signature == "forwarded" else mine for s, sess in honest.items()
    }
    victim = SiteSession("a", RUN, R, ids["a"])
    with pytest.raises(PolicyRefusal, match=r"keys of \['b', 'c'\] are not signed by their roster"):
        _impersonate(victim, peers, _update())
    assert victim.held == {}  # nothing was shared


def test_sybil_sites_outside_the_roster_are_refused():
    ids = make_identities(["a", "b", "c"])  # the consortium: a, b and c
    sybils = {"sybil-1": Ed25519PrivateKey.generate(), "sybil-2": Ed25519PrivateKey.generate()}
    victim = SiteSession("a", RUN, R, ids["a"])
    with pytest.raises(
        PolicyRefusal, match=r"sites \['sybil-1', 'sybil-2'\] are not in its roster"
    ):
        _impersonate(victim, sybils, _update())


def test_without_an_independent_roster_the_same_attack_reads_the_update():
    """The control: a site whose roster the coordinator wrote (its own keys for the peers)
    accepts the same messages, and its update is read within the rounding."""
    mine = {"b": Ed25519PrivateKey.generate(), "c": Ed25519PrivateKey.generate()}
    a = Ed25519PrivateKey.generate()
    raw = {s: k.public_key().public_bytes_raw() for s, k in {"a": a, **mine}.items()}
    victim = SiteSession("a", RUN, R, SiteIdentity("a", a, raw))
    x = _update(1)
    got = _impersonate(victim, dict(mine), x)
    assert np.abs(got - x).max() <= 1 / scale_for(C, 1)


# -- replay -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("salt", "r"), [(RUN, R + 1), (b"salt-of-run-two!", R)])
def test_keys_replayed_from_another_round_or_run_are_refused(salt, r):
    ids = make_identities(["a", "b", "c"])
    old = {s: SiteSession(s, RUN, R, ids[s]).keys() for s in ids}  # round 3's signed keys
    new = {s: SiteSession(s, salt, r, ids[s]) for s in ids}
    keys = {s: x.keys() for s, x in new.items()}
    keys["b"] = old["b"]  # b's keys of round 3, with its valid signature of round 3
    with pytest.raises(PolicyRefusal, match=r"keys of \['b'\] .* replayed"):
        new["a"].shares(_roster(keys, 2))
    new["c"].shares(_roster({**keys, "b": new["b"].keys()}, 2))  # this round's keys: accepted


def test_survivor_signatures_from_a_run_with_the_same_salt_and_round_are_refused():
    """A coordinator that reuses a salt and a round index in a new run holds the earlier
    run's signatures over the survivor set; they are bound to that run's roster of fresh
    keys, so they do not verify in the new one."""
    ids = make_identities(["a", "b", "c"])
    everyone = sorted(ids)

    def to_consistency() -> dict[str, SiteSession]:
        sess = {s: SiteSession(s, RUN, R, ids[s]) for s in everyone}
        keys = {s: x.keys() for s, x in sess.items()}
        shares = {s: x.shares(_roster(keys, 2)) for s, x in sess.items()}
        for s in everyone:
            senders = [j for j in everyone if j != s]
            cts = [shares[j]["ciphertexts"][shares[j]["to"].index(s)] for j in senders]
            sess[s].masked(quantize(_update(), C, 1), {"senders": senders, "ciphertexts": cts})
        return sess

    first = to_consistency()
    old = {s: first[s].consistency({"survivors": everyone})["sig"] for s in everyone}
    second = to_consistency()  # same salt, same round: a new run
    own = second["a"].consistency({"survivors": everyone})["sig"]
    req = {"survivors": everyone, "signers": everyone, "sigs": [own, old["b"], old["c"]]}
    with pytest.raises(PolicyRefusal, match="1 valid roster signatures"):
        second["a"].unmask(req)
    new = [second[s].consistency({"survivors": everyone})["sig"] for s in ("b", "c")]
    rep = second["a"].unmask({**req, "sigs": [own, *new]})  # this run's signatures: answered
    assert rep["kinds"] == ["seed"] * 3


# -- (b) different survivor sets told to different sites ------------------------------------
#: Five sites, threshold 3 (a majority, which every site accepts). Site s0 is told that only
#: s1 and s2 sent shares, so it masks with them only; then each site is told another set of
#: survivors: s0's seed shares come from s0, s2, s3, s4, and s1's and s2's masking keys from
#: the sites told that s1, or s2, dropped. With them the coordinator removes every mask of
#: s0's vector. No site reveals both kinds of share of one site.
SPLIT = {
    "s0": ["s0", "s1", "s2"],
    "s1": ["s1", "s3", "s4"],
    "s2": ["s0", "s2", "s3"],
    "s3": ["s0", "s3", "s4"],
    "s4": ["s0", "s3", "s4"],
}


def _split_views(check_signatures: bool, monkeypatch) -> tuple[np.ndarray, np.ndarray, list]:
    """Run the attack; returns (s0's update, what the coordinator recovered, refusals)."""
    if not check_signatures:  # sites that take the coordinator's word for the survivors
        monkeypatch.setattr(SiteIdentity, "verify", lambda self, peer, msg, sig: True)
    names = sorted(SPLIT)
    ids = make_identities(names)
    sess = {s: SiteSession(s, RUN, R, ids[s]) for s in names}
    ups = {s: _update(i) for i, s in enumerate(names)}
    keys = {s: x.keys() for s, x in sess.items()}
    shares = {s: x.shares(_roster(keys, 3)) for s, x in sess.items()}

    def inbox(dst, senders):
        cts = [shares[j]["ciphertexts"][shares[j]["to"].index(dst)] for j in senders]
        return {"senders": senders, "ciphertexts": cts}

    masked = {}
    for s in names:
        senders = ["s1", "s2"] if s == "s0" else [j for j in names if j != s]
        masked[s] = sess[s].masked(quantize(ups[s], C, 1), inbox(s, senders))
    sigs = {s: sess[s].consistency({"survivors": SPLIT[s]})["sig"] for s in names}
    revealed: dict[str, dict[str, dict[int, bytes]]] = {"seed": {}, "key": {}}
    refusals = []
    xs = {s: k + 1 for k, s in enumerate(names)}
    for s in names:
        view = SPLIT[s]  # the coordinator forwards every signature it holds, as "the survivors'"
        req = {"survivors": view, "signers": view, "sigs": [sigs[v] for v in view]}
        try:
            rep = sess[s].unmask(req)
        except PolicyRefusal as e:
            refusals.append(str(e))
            continue
        for site, kind, share in zip(rep["sites"], rep["kinds"], rep["shares"], strict=True):
            revealed[kind].setdefault(site, {})[xs[s]] = share
    if refusals:
        return ups["s0"], np.full(D, np.nan), refusals
    seed = shamir_reconstruct(revealed["seed"]["s0"])
    y = (masked["s0"].astype(np.uint64) + MOD - self_mask(seed, "s0", RUN, R, D)) % MOD
    for p in ("s1", "s2"):
        sk = X25519PrivateKey.from_private_bytes(shamir_reconstruct(revealed["key"][p]))
        assert public_bytes(sk) == keys[p]["mask_pk"]
        y = (y + MOD - pair_mask(sk, keys["s0"]["mask_pk"], (p, "s0"), RUN, R, D)) % MOD
    return ups["s0"], _decode(y.astype(np.uint32)), []


def test_different_survivor_sets_for_different_sites_are_refused(monkeypatch):
    _, got, refusals = _split_views(True, monkeypatch)
    assert len(refusals) == 5 and np.isnan(got).all()  # no site revealed any share
    assert all("valid roster signatures over the survivor set" in r for r in refusals)


def test_without_the_signed_survivor_set_the_split_reads_one_update(monkeypatch):
    """The control: sites that do not check the survivors' signatures each reveal one kind
    of share per site, and still give s0's update away."""
    x, got, refusals = _split_views(False, monkeypatch)
    assert not refusals
    assert np.abs(got - x).max() <= 1 / scale_for(C, 1)


def test_a_session_cannot_be_built_with_another_sites_identity():
    ids = make_identities(["a", "b", "c"])
    with pytest.raises(ValueError, match="identity of 'b'"):
        SiteSession("a", RUN, R, ids["b"])
