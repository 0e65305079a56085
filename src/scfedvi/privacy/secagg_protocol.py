"""Secure aggregation with dropout recovery: the protocol and the coordinator's side.

The protocol is SecAgg (Bonawitz et al. 2017) on the complete graph, as Flower's SecAgg+ runs
it when every site neighbours every other (federations of a few dozen sites at most), in its
version secure against an active (malicious) coordinator, with five stages per round:

1. **keys**: each site sends two fresh X25519 public keys, one to derive pairwise masks and
   one to encrypt the shares it sends to the others, signed with its long-term Ed25519
   identity key over the round's salt, the round and its name
   (:meth:`~scfedvi.privacy.secagg_site.SiteSession.keys`; identities:
   :mod:`scfedvi.privacy.identity`);
2. **shares**: given every site's signed keys and the threshold ``t``, each site checks every
   peer against its own roster of identity keys (unknown names, bad or replayed signatures,
   fewer than its ``min_secagg_sites`` sites and repeated names are refused), then splits
   its masking secret key and a fresh 32-byte self-mask seed into Shamir shares (over the
   prime field of ``2**521 - 1``) and sends one share of each to every other site, encrypted
   and authenticated with ChaCha20-Poly1305 under a key that only the two sites can derive
   (:meth:`~scfedvi.privacy.secagg_site.SiteSession.shares`);
3. **masked**: each site that holds its peers' shares sends its quantized update plus a
   self mask and the pairwise masks it shares with every site that sent shares, modulo
   ``2**32``; all masks are ChaCha20 streams keyed through HKDF-SHA256, a cryptographic PRG
   (:meth:`~scfedvi.privacy.secagg_site.SiteSession.masked`);
4. **consistency**: told which sites sent a masked update (the survivors), each site checks
   the set (it sent shares to them all, it is in it, at least ``t`` of them) and signs it
   (:meth:`~scfedvi.privacy.secagg_site.SiteSession.consistency`);
5. **unmask**: given the survivors' signatures, each site checks at least ``t`` valid roster
   signatures over the set it signed, then reveals its share of every survivor's self-mask
   seed and its share of the masking key of every site that dropped out after stage 2; it
   never reveals both kinds for one site, in this message or a later one
   (:meth:`~scfedvi.privacy.secagg_site.SiteSession.unmask`).

The coordinator (:func:`secure_sum`) reconstructs the survivors' seeds and the dropped sites'
masking keys from ``t`` shares each, removes those masks from the sum of the masked updates,
and learns the sum of the survivors' updates only. It drives the stages through
``ask(stage, payloads) -> replies`` (``{site: dict}`` both ways; a site absent from the replies
dropped out), which each runtime implements with its own transport, like balancing's
``run_balance(ask, ...)``. The payloads hold only ``bytes``, ``int``, ``str``, lists of them and
one ``uint32`` array, so they map onto Flower's config and array records as they are.

A site also checks that the threshold is a majority of the sites it is sent (at least 2);
the coordinator refuses to proceed when fewer than ``t`` sites survive a stage. The signed keys
stop a coordinator that substitutes a site's keys (a man in the middle), invents sites that
are not in the rosters (Sybils) or replays another round's keys; the signed survivor set stops
one that tells different sites different sets of dropped sites to collect both kinds of share
of one site. What remains assumed: the rosters are distributed out of band, and fewer than
``2t - n`` sites collude with the coordinator (with more, two groups of honest sites plus the
colluders can each reach ``t`` signatures on different sets). See ``docs/privacy.md``.

Light: numpy, :mod:`cryptography` and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from scfedvi.privacy.identity import signed_bytes
from scfedvi.privacy.shamir import shamir_reconstruct

#: The stages after the keys, in order (the keys travel with the training reply).
SHARES, MASKED, CONSISTENCY, UNMASK = "shares", "masked", "consistency", "unmask"
#: Kinds of share a site reveals in stage 4.
SEED, KEY = "seed", "key"
_RAW_PUB = serialization.Encoding.Raw, serialization.PublicFormat.Raw
RAW_PRIVATE = (
    serialization.Encoding.Raw,
    serialization.PrivateFormat.Raw,
    serialization.NoEncryption(),
)
MOD = 1 << 32

Payload = dict[str, Any]
Ask = Callable[[str, Mapping[str, Payload]], Mapping[str, Payload]]


class SecAggError(RuntimeError):
    """The coordinator cannot complete secure aggregation (too few sites, bad replies)."""


def threshold_for(n_sites: int) -> int:
    """The default threshold: ``ceil(2 n / 3)``, at least 2 (SecAgg's choice against a
    coordinator that shows different survivor sets to different sites)."""
    return max(2, math.ceil(2 * n_sites / 3))


def min_threshold(n_sites: int) -> int:
    """The smallest threshold a site accepts: a strict majority, at least 2."""
    return max(2, n_sites // 2 + 1)


# -- key derivation and the PRG --------------------------------------------------------------
def _hkdf(secret: bytes, run_id: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=run_id, info=info).derive(secret)


def prg(key: bytes, n: int) -> np.ndarray:
    """``n`` uint32 words of the ChaCha20 stream under the 32-byte ``key`` (zero nonce: each
    key is used for one stream only)."""
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * n)), dtype=np.uint32)


def context(run_id: bytes, round_idx: int, *parts: str) -> bytes:
    return b"|".join([b"scfedvi-secagg", run_id, str(round_idx).encode(), *map(str.encode, parts)])


def pair_mask(
    own_key: X25519PrivateKey, peer_pk: bytes, pair: tuple[str, str], run_id: bytes, r: int, n: int
) -> np.ndarray:
    """The mask sites ``pair`` share (either side's private key with the other's public)."""
    shared = own_key.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    lo, hi = sorted(pair)
    return prg(_hkdf(shared, run_id, context(run_id, r, "mask", lo, hi)), n)


def self_mask(seed: bytes, site: str, run_id: bytes, r: int, n: int) -> np.ndarray:
    """The site's own mask from its 32-byte seed."""
    return prg(_hkdf(seed, run_id, context(run_id, r, "self", site)), n)


def share_cipher(
    own: X25519PrivateKey, peer_pk: bytes, pair: tuple[str, str], run_id, r
) -> ChaCha20Poly1305:
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    lo, hi = sorted(pair)
    return ChaCha20Poly1305(_hkdf(shared, run_id, context(run_id, r, "enc", lo, hi)))


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW_PUB)


# -- what the sites sign -----------------------------------------------------------------------
def advertised(run_id: bytes, r: int, site: str, mask_pk: bytes, enc_pk: bytes) -> bytes:
    """The bytes a site signs in stage 1: its round keys, bound to the salt, round and name."""
    return signed_bytes("keys", run_id, r, site, mask_pk, enc_pk)


def roster_digest(roster: Mapping[str, tuple[bytes, bytes]]) -> bytes:
    """SHA-256 of the round's roster (``{site: (mask_pk, enc_pk)}``, the keys of stage 2):
    fresh keys every round, so it ties a signature to this round of this run even if the
    coordinator reuses a salt."""
    parts = [x for s in sorted(roster) for x in (s, *roster[s])]
    h = hashes.Hash(hashes.SHA256())
    h.update(signed_bytes("roster", *parts))
    return h.finalize()


def survivor_set(run_id: bytes, r: int, survivors: list[str], digest: bytes) -> bytes:
    """The bytes a site signs in stage 4: the sorted survivor set, bound to the round and to
    the round's roster (:func:`roster_digest`, the same for every site an honest coordinator
    sends the roster to)."""
    return signed_bytes("survivors", run_id, r, digest, *sorted(survivors))


# -- the coordinator ---------------------------------------------------------------------------
@dataclass
class SecureSum:
    """The unmasked sum (uint32, modulo ``2**32``) of the ``survivors``' vectors, and the
    sites that dropped out, with the stage at which they did."""

    total: np.ndarray
    survivors: list[str]
    dropped: dict[str, str]


def secure_sum(
    ask: Ask,
    keys: Mapping[str, Payload],
    *,
    length: int,
    run_id: bytes,
    round_idx: int,
    min_sites: int = 3,
    threshold: int | None = None,
) -> SecureSum:
    """Run stages 2-5 over the sites whose stage-1 ``keys`` (``{site: {"mask_pk", "enc_pk",
    "sig"}}``) arrived; ``length`` is the masked vector's. Raises :class:`SecAggError`
    with fewer than ``min_sites`` sites or fewer than the threshold left at any stage."""
    u1 = sorted(keys)
    where = f"secure aggregation, round {round_idx}"
    if len(u1) < min_sites:
        raise SecAggError(
            f"{where}: {len(u1)} sites sent keys ({u1}), fewer than {min_sites}; with fewer "
            "the sum gives a site's update away to the others. Run with more sites."
        )
    t = threshold_for(len(u1)) if threshold is None else int(threshold)
    dropped: dict[str, str] = {}

    def enough(stage: str, alive: list[str]) -> None:
        if len(alive) < t:
            raise SecAggError(
                f"{where}: {len(alive)} sites answered stage {stage!r} ({alive}), fewer than "
                f"the threshold {t} of {len(u1)}; the round cannot be unmasked (dropped: "
                f"{dropped})"
            )

    roster = {
        "sites": u1,
        "mask_pks": [bytes(keys[s]["mask_pk"]) for s in u1],
        "enc_pks": [bytes(keys[s]["enc_pk"]) for s in u1],
        "sigs": [bytes(keys[s].get("sig", b"")) for s in u1],
        "threshold": t,
    }
    rep = ask(SHARES, {s: roster for s in u1})
    u2 = sorted(s for s in u1 if s in rep)
    dropped.update({s: SHARES for s in u1 if s not in rep})
    enough(SHARES, u2)
    inbox: dict[str, dict[str, bytes]] = {s: {} for s in u2}
    for s in u2:
        to, cts = [str(x) for x in rep[s]["to"]], rep[s]["ciphertexts"]
        if sorted(to) != sorted(set(u1) - {s}):
            raise SecAggError(f"{where}: site {s!r} sent shares for {to}, not the roster")
        for dst, ct in zip(to, cts, strict=True):
            if dst in inbox:
                inbox[dst][s] = bytes(ct)
    rep = ask(
        MASKED,
        {
            s: {"senders": sorted(inbox[s]), "ciphertexts": [inbox[s][j] for j in sorted(inbox[s])]}
            for s in u2
        },
    )
    u3 = sorted(s for s in u2 if s in rep)
    dropped.update({s: MASKED for s in u2 if s not in rep})
    enough(MASKED, u3)
    total = np.zeros(length, np.uint64)
    for s in u3:
        v = np.asarray(rep[s]["masked"])
        if v.dtype != np.uint32 or v.shape != (length,):
            raise SecAggError(f"{where}: site {s!r} sent a masked vector {v.dtype} {v.shape}")
        total = (total + v) % MOD
    rep = ask(CONSISTENCY, {s: {"survivors": u3} for s in u3})
    signers = sorted(s for s in u3 if s in rep)
    enough(CONSISTENCY, signers)
    sigs = [bytes(rep[s]["sig"]) for s in signers]
    unmask = {"survivors": u3, "signers": signers, "sigs": sigs}
    rep = ask(UNMASK, {s: unmask for s in signers})
    u4 = sorted(s for s in signers if s in rep)
    enough(UNMASK, u4)
    xs = {s: k + 1 for k, s in enumerate(u1)}
    got: dict[str, dict[int, bytes]] = {s: {} for s in u2}
    for s in u4:
        r = rep[s]
        for site, kind, share in zip(r["sites"], r["kinds"], r["shares"], strict=True):
            want = SEED if site in u3 else KEY
            if site in got and kind == want:
                got[site][xs[s]] = bytes(share)
    for s in u2:
        if len(got[s]) < t:
            raise SecAggError(f"{where}: {len(got[s])} shares for {s!r}, fewer than {t}")
        try:
            secret = shamir_reconstruct(dict(list(got[s].items())[:t]))
        except ValueError as e:
            raise SecAggError(f"{where}: the shares of {s!r} are inconsistent ({e})") from None
        if s in u3:  # a survivor: remove its self mask
            total = (
                total + (MOD - self_mask(secret, s, run_id, round_idx, length).astype(np.uint64))
            ) % MOD
            continue
        key = X25519PrivateKey.from_private_bytes(secret)
        if public_bytes(key) != bytes(keys[s]["mask_pk"]):
            raise SecAggError(f"{where}: the shares of {s!r}'s masking key do not match its key")
        for i in u3:  # a dropped site: remove the masks the survivors shared with it
            m = pair_mask(key, bytes(keys[i]["mask_pk"]), (s, i), run_id, round_idx, length)
            total = (total + (MOD - m.astype(np.uint64) if i < s else m)) % MOD
    return SecureSum(total.astype(np.uint32), u3, dropped)
