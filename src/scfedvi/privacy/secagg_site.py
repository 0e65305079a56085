"""Secure aggregation, the site's side: :class:`SiteSession`, one site's state machine.

The protocol and the coordinator's side are in :mod:`scfedvi.privacy.secagg_protocol`. A
session answers the stages in order, each once (:meth:`SiteSession.keys`,
:meth:`~SiteSession.shares`, :meth:`~SiteSession.masked`, :meth:`~SiteSession.consistency`,
:meth:`~SiteSession.unmask`), checks each request against the site's policy and its own
roster of identity keys (:class:`~scfedvi.privacy.identity.SiteIdentity`): every peer in the
roster it is sent is a site of its roster whose signature over this round's keys verifies, at
least ``min_secagg_sites`` of them, a majority threshold, its own keys unchanged; it reveals
shares only for the survivor set it signed, after ``t`` valid roster signatures over that same
set, and never both kinds of share of one site. Refusals are
:class:`~scfedvi.privacy.policy.PolicyRefusal` s, logged with their reason. Serializable
(:meth:`SiteSession.to_dict`; the identity is not stored): on Flower each stage is a new
process, which reloads the session from the site's state folder.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from scfedvi.privacy.identity import SiteIdentity
from scfedvi.privacy.policy import refuse
from scfedvi.privacy.secagg_protocol import (
    CONSISTENCY,
    KEY,
    MASKED,
    MOD,
    RAW_PRIVATE,
    SEED,
    SHARES,
    UNMASK,
    Payload,
    advertised,
    context,
    min_threshold,
    pair_mask,
    public_bytes,
    roster_digest,
    self_mask,
    share_cipher,
    survivor_set,
)
from scfedvi.privacy.shamir import SHARE_BYTES, shamir_share

__all__ = ["SiteSession"]


@dataclass
class SiteSession:
    """One site's side of one round. Serializable (:meth:`to_dict`): on Flower each stage is
    a new process, which reloads the session from the site's state folder.

    Parameters
    ----------
    site
        The site's name.
    run_id, round_idx
        Bind every key, mask, ciphertext and signature to this run and round (``run_id``: the
        coordinator's fresh salt of the round).
    identity
        The site's signing key and its roster (:class:`~scfedvi.privacy.identity.SiteIdentity`);
        not serialized.
    min_sites
        The site's policy's ``min_secagg_sites``: fewer sites in the roster are refused.
    """

    site: str
    run_id: bytes
    round_idx: int
    identity: SiteIdentity = field(repr=False, compare=False)
    min_sites: int = 3
    stage: str = "keys"
    mask_sk: bytes = field(
        default_factory=lambda: X25519PrivateKey.generate().private_bytes(*RAW_PRIVATE)
    )
    enc_sk: bytes = field(
        default_factory=lambda: X25519PrivateKey.generate().private_bytes(*RAW_PRIVATE)
    )
    seed: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    roster: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    threshold: int = 0
    held: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # site -> (key, seed) shares
    survivors: list[str] = field(default_factory=list)  # those that sent shares (stage 3)
    signed: list[str] = field(default_factory=list)  # the survivor set it signed (stage 4)
    revealed: dict[str, str] = field(default_factory=dict)  # site -> SEED | KEY

    def __post_init__(self) -> None:
        if self.identity.site != self.site:
            raise ValueError(f"site {self.site!r}: identity of {self.identity.site!r}")

    def _refuse(self, what: str, fix: str) -> Exception:
        return refuse(self.site, f"secure aggregation round {self.round_idx}: {what}", fix)

    def _expect(self, stage: str, nxt: str) -> None:
        if self.stage != stage:
            raise self._refuse(
                f"asked for stage {nxt!r} while at {self.stage!r}",
                "the coordinator must run the stages in order, each once",
            )
        self.stage = nxt

    def _own_keys(self) -> tuple[bytes, bytes]:
        return (
            public_bytes(X25519PrivateKey.from_private_bytes(self.mask_sk)),
            public_bytes(X25519PrivateKey.from_private_bytes(self.enc_sk)),
        )

    def keys(self) -> Payload:
        """Stage 1: the two public keys, signed with the site's identity key over this run's
        salt, the round and the site's name."""
        if self.stage != "keys":
            raise self._refuse("keys asked twice", "a round's keys are sent once")
        mk, ek = self._own_keys()
        sig = self.identity.sign(advertised(self.run_id, self.round_idx, self.site, mk, ek))
        return {"mask_pk": mk, "enc_pk": ek, "sig": sig}

    def shares(self, p: Payload) -> Payload:
        """Stage 2: encrypted shares of the masking key and the seed, one per other site.

        ``p``: ``sites``, ``mask_pks``, ``enc_pks``, ``sigs`` (the sites' signed keys, aligned)
        and ``threshold``. Every site must be in this site's roster and its signature over
        this round's keys must verify against the roster's key.
        """
        mk, ek = self._own_keys()
        self._expect("keys", SHARES)
        sites = [str(s) for s in p["sites"]]
        n, t = len(sites), int(p["threshold"])
        if len(set(sites)) != n or self.site not in sites:
            raise self._refuse("a roster with repeated sites or without this site", "resend it")
        unknown = sorted(s for s in sites if s not in self.identity.roster)
        if unknown:
            raise self._refuse(
                f"sites {unknown} are not in its roster of identity keys (sites it does not "
                "know could be the coordinator's own, to reach the threshold)",
                "run with the consortium's sites only (or the sites add them to their roster)",
            )
        sigs = list(p.get("sigs") or [])
        if len(sigs) != n:
            raise self._refuse(f"{len(sigs)} signatures for {n} sites' keys", "send every one")
        bad = [
            s
            for s, m, e, sig in zip(sites, p["mask_pks"], p["enc_pks"], sigs, strict=True)
            if not self.identity.verify(
                s, advertised(self.run_id, self.round_idx, s, bytes(m), bytes(e)), bytes(sig)
            )
        ]
        if bad:
            raise self._refuse(
                f"the keys of {bad} are not signed by their roster identity key for this "
                f"round (substituted keys, or keys replayed from another round or run)",
                "forward each site's keys and signature of this round unchanged",
            )
        if n < self.min_sites:
            raise self._refuse(
                f"{n} sites in the roster, fewer than its policy's min_secagg_sites="
                f"{self.min_sites} (with 2 sites the sum gives the other site's update away)",
                f"run with at least {self.min_sites} sites",
            )
        if not min_threshold(n) <= t <= n:
            raise self._refuse(
                f"threshold {t} for {n} sites (a minority threshold lets a coordinator collect "
                "both kinds of share of one site)",
                f"use a threshold in [{min_threshold(n)}, {n}] (default ceil(2n/3))",
            )
        i = sites.index(self.site)
        if bytes(p["mask_pks"][i]) != mk or bytes(p["enc_pks"][i]) != ek:
            raise self._refuse("the roster carries other keys for this site", "resend its keys")
        self.roster = {
            s: (bytes(mk), bytes(ek))
            for s, mk, ek in zip(sites, p["mask_pks"], p["enc_pks"], strict=True)
        }
        self.threshold = t
        xs = {s: k + 1 for k, s in enumerate(sorted(sites))}
        sk_sh = shamir_share(self.mask_sk, list(xs.values()), t)
        seed_sh = shamir_share(self.seed, list(xs.values()), t)
        enc = X25519PrivateKey.from_private_bytes(self.enc_sk)
        to, cts = [], []
        for s in sorted(sites):
            plain = sk_sh[xs[s]] + seed_sh[xs[s]]
            if s == self.site:
                self.held[s] = (sk_sh[xs[s]], seed_sh[xs[s]])
                continue
            nonce = secrets.token_bytes(12)
            aead = share_cipher(enc, self.roster[s][1], (self.site, s), self.run_id, self.round_idx)
            ad = context(self.run_id, self.round_idx, "share", self.site, s)
            to.append(s)
            cts.append(nonce + aead.encrypt(nonce, plain, ad))
        return {"to": to, "ciphertexts": cts}

    def masked(self, vector: np.ndarray, p: Payload) -> np.ndarray:
        """Stage 3: ``vector`` (uint32) masked. ``p``: ``senders`` (the other sites that sent
        shares) and ``ciphertexts`` (each one's shares for this site)."""
        self._expect(SHARES, MASKED)
        senders = [str(s) for s in p["senders"]]
        if not set(senders) <= set(self.roster) - {self.site} or len(set(senders)) != len(senders):
            raise self._refuse("shares from sites outside the roster", "resend the stage")
        if len(senders) + 1 < self.threshold:
            raise self._refuse(
                f"{len(senders) + 1} sites left, fewer than the threshold {self.threshold}",
                "the round cannot be unmasked; start a new one",
            )
        enc = X25519PrivateKey.from_private_bytes(self.enc_sk)
        for s, ct in zip(senders, p["ciphertexts"], strict=True):
            ct = bytes(ct)
            aead = share_cipher(enc, self.roster[s][1], (self.site, s), self.run_id, self.round_idx)
            try:
                plain = aead.decrypt(
                    ct[:12], ct[12:], context(self.run_id, self.round_idx, "share", s, self.site)
                )
            except InvalidTag:
                raise self._refuse(f"the shares from {s!r} do not authenticate", "resend") from None
            self.held[s] = (plain[:SHARE_BYTES], plain[SHARE_BYTES:])
        self.survivors = sorted([*senders, self.site])
        v = np.asarray(vector, np.uint32).ravel()
        out = v.astype(np.uint64) + self_mask(
            self.seed, self.site, self.run_id, self.round_idx, v.size
        )
        key = X25519PrivateKey.from_private_bytes(self.mask_sk)
        for s in senders:
            m = pair_mask(
                key, self.roster[s][0], (self.site, s), self.run_id, self.round_idx, v.size
            )
            out = out + (m if self.site < s else MOD - m.astype(np.uint64))
        return (out % MOD).astype(np.uint32)

    def consistency(self, p: Payload) -> Payload:
        """Stage 4: ``p["survivors"]``: the sites whose masked update the coordinator holds.
        Checks the set as :meth:`unmask` will and signs it, bound to this round and to the
        round's roster of keys it received (a signature from another run, or over another
        roster, does not verify); a site signs one survivor set per round (asked again for
        the same set, it signs it again)."""
        if self.stage not in (MASKED, CONSISTENCY):
            raise self._refuse(
                f"asked to sign the survivors while at {self.stage!r}", "run the stages in order"
            )
        alive = sorted({str(s) for s in p["survivors"]})
        self._check_survivors(set(alive))
        if self.signed and alive != self.signed:
            raise self._refuse(
                f"asked to sign the survivors {alive} after signing {self.signed}",
                "a round has one survivor set",
            )
        self.stage, self.signed = CONSISTENCY, alive
        msg = survivor_set(self.run_id, self.round_idx, alive, roster_digest(self.roster))
        return {"sig": self.identity.sign(msg)}

    def _check_survivors(self, alive: set[str]) -> None:
        if not alive <= set(self.survivors):
            raise self._refuse("survivors that did not send shares", "resend the stage")
        if self.site not in alive:  # it sent its masked update: its key share would unmask it
            raise self._refuse(
                "a survivor list without this site, which sent its masked update",
                "list every site whose masked update arrived",
            )
        if len(alive) < self.threshold:
            raise self._refuse(
                f"{len(alive)} masked updates, fewer than the threshold {self.threshold}",
                "the round cannot be unmasked with fewer",
            )

    def unmask(self, p: Payload) -> Payload:
        """Stage 5: ``p``: ``survivors`` (the set this site signed), ``signers`` and ``sigs``:
        the survivors' signatures over it. With at least ``t`` valid signatures of sites of
        its roster over that same set, reveals the seed share of each survivor and the key
        share of each other site that sent shares; refuses a request that would reveal the
        other kind for a site already answered (both kinds of one site unmask its update
        alone). The signatures make every site that reveals agree on one survivor set, so a
        coordinator cannot tell some sites that a peer dropped and others that it survived."""
        if self.stage not in (CONSISTENCY, UNMASK):
            raise self._refuse(
                f"asked to unmask while at {self.stage!r} (before signing the survivors)",
                "run the stages in order",
            )
        alive = {str(s) for s in p["survivors"]}
        if sorted(alive) != self.signed:
            raise self._refuse(
                f"asked to unmask for the survivors {sorted(alive)}, not the set it signed "
                f"{self.signed}",
                "unmask the survivor set the sites signed",
            )
        self._check_survivors(alive)
        msg = survivor_set(self.run_id, self.round_idx, self.signed, roster_digest(self.roster))
        signers = [str(s) for s in p.get("signers") or []]
        sigs = list(p.get("sigs") or [])
        valid = {
            s
            for s, sig in zip(signers, sigs, strict=False)
            if s in alive and self.identity.verify(s, msg, bytes(sig))
        }
        if len(signers) != len(sigs) or len(valid) < self.threshold:
            raise self._refuse(
                f"{len(valid)} valid roster signatures over the survivor set {self.signed} "
                f"(of {len(signers)} sent), fewer than the threshold {self.threshold}: the "
                "other sites may have been told another set",
                "forward the survivors' signatures over the same set",
            )
        kinds = {s: SEED if s in alive else KEY for s in self.survivors}
        clash = sorted(s for s, k in kinds.items() if self.revealed.get(s, k) != k)
        if clash:
            raise self._refuse(
                f"asked for both the seed share and the key share of {clash} (together they "
                "unmask that site's update alone)",
                "a round's survivors are fixed by its first unmask request",
            )
        self.stage = UNMASK
        self.revealed.update(kinds)
        sites = sorted(kinds)
        shares = [self.held[s][0 if kinds[s] == KEY else 1] for s in sites]
        return {"sites": sites, "kinds": [kinds[s] for s in sites], "shares": shares}

    # -- persistence (the site's own state folder) ---------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "run_id": self.run_id.hex(),
            "round_idx": self.round_idx,
            "min_sites": self.min_sites,
            "stage": self.stage,
            "mask_sk": self.mask_sk.hex(),
            "enc_sk": self.enc_sk.hex(),
            "seed": self.seed.hex(),
            "roster": {s: [a.hex(), b.hex()] for s, (a, b) in self.roster.items()},
            "threshold": self.threshold,
            "held": {s: [a.hex(), b.hex()] for s, (a, b) in self.held.items()},
            "survivors": self.survivors,
            "signed": self.signed,
            "revealed": self.revealed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], identity: SiteIdentity) -> SiteSession:
        """The session :meth:`to_dict` saved, with the site's ``identity``."""

        def pairs(x):
            return {s: (bytes.fromhex(a), bytes.fromhex(b)) for s, (a, b) in x.items()}

        return cls(
            site=d["site"],
            run_id=bytes.fromhex(d["run_id"]),
            round_idx=int(d["round_idx"]),
            identity=identity,
            min_sites=int(d["min_sites"]),
            stage=d["stage"],
            mask_sk=bytes.fromhex(d["mask_sk"]),
            enc_sk=bytes.fromhex(d["enc_sk"]),
            seed=bytes.fromhex(d["seed"]),
            roster=pairs(d["roster"]),
            threshold=int(d["threshold"]),
            held=pairs(d["held"]),
            survivors=list(d["survivors"]),
            signed=list(d.get("signed", [])),
            revealed=dict(d["revealed"]),
        )
