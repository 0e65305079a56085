"""Secure aggregation with dropout recovery: one site-side and one coordinator-side state machine.

The protocol is SecAgg (Bonawitz et al. 2017) on the complete graph, as Flower's SecAgg+ runs
it when every site neighbours every other (federations of a few dozen sites at most), with four
stages per round:

1. **keys**: each site sends two fresh X25519 public keys, one to derive pairwise masks and
   one to encrypt the shares it sends to the others (:meth:`SiteSession.keys`);
2. **shares**: given the roster of every site's keys and the threshold ``t``, each site splits
   its masking secret key and a fresh 32-byte self-mask seed into Shamir shares (over the
   prime field of ``2**521 - 1``) and sends one share of each to every other site, encrypted
   and authenticated with ChaCha20-Poly1305 under a key that only the two sites can derive
   (:meth:`SiteSession.shares`);
3. **masked**: each site that holds its peers' shares sends its quantized update plus a
   self mask and the pairwise masks it shares with every site that sent shares, modulo
   ``2**32``; all masks are ChaCha20 streams keyed through HKDF-SHA256, a cryptographic PRG
   (:meth:`SiteSession.masked`);
4. **unmask**: told which sites sent a masked update, each site reveals its share of every
   such site's self-mask seed and its share of the masking key of every site that dropped out
   after stage 2; it never reveals both kinds for one site, in this message or a later one
   (:meth:`SiteSession.unmask`).

The coordinator (:func:`secure_sum`) reconstructs the survivors' seeds and the dropped sites'
masking keys from ``t`` shares each, removes those masks from the sum of the masked updates,
and learns the sum of the survivors' updates only. It drives the stages through
``ask(stage, payloads) -> replies`` (``{site: dict}`` both ways; a site absent from the replies
dropped out), which each runtime implements with its own transport, like balancing's
``run_balance(ask, ...)``. The payloads hold only ``bytes``, ``int``, ``str``, lists of them and
one ``uint32`` array, so they map onto Flower's config and array records as they are.

A site checks, before answering, that the roster has at least its policy's
``min_secagg_sites`` sites (default 3) and that the threshold is a majority of the roster (at
least 2); the coordinator refuses to proceed when fewer than ``t`` sites survive a stage. What
the key exchange does not give: authentication of the public keys (a coordinator that replaces
them can read every update unless the sites pin each other's keys), and SecAgg's
malicious-secure signatures and consistency round (a coordinator that shows a site a shorter
peer list than it shows the others can unmask that site's update). It holds against an
honest-but-curious coordinator, other sites and outsiders. See ``docs/privacy.md``.

Light: numpy, :mod:`cryptography` and the standard library.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from scfedvi.privacy.policy import refuse

#: The stages after the keys, in order (the keys travel with the training reply).
SHARES, MASKED, UNMASK = "shares", "masked", "unmask"
#: Kinds of share a site reveals in stage 4.
SEED, KEY = "seed", "key"
#: The Shamir field: the Mersenne prime 2**521 - 1 (every 32-byte secret is below it).
PRIME = (1 << 521) - 1
_SHARE_BYTES = 66
_RAW_PUB = serialization.Encoding.Raw, serialization.PublicFormat.Raw
_RAW_PRIV = (
    serialization.Encoding.Raw,
    serialization.PrivateFormat.Raw,
    serialization.NoEncryption(),
)
MOD = 1 << 32

Payload = dict[str, Any]
Ask = Callable[[str, Mapping[str, Payload]], Mapping[str, Payload]]


class SecAggError(RuntimeError):
    """The coordinator cannot complete secure aggregation (too few sites, bad replies)."""


# -- Shamir secret sharing over GF(2**521 - 1) -----------------------------------------------
def shamir_share(secret: bytes, xs: list[int], threshold: int) -> dict[int, bytes]:
    """Split ``secret`` (at most 65 bytes) into one share per ``x`` in ``xs`` (distinct,
    nonzero); any ``threshold`` of them give it back, fewer reveal nothing about it."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share coordinates must be distinct and nonzero")
    s = int.from_bytes(secret, "big")
    if s >= PRIME:
        raise ValueError("secret too large for the field")
    coeffs = [s] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(_SHARE_BYTES, "big")
    return out


def shamir_reconstruct(shares: Mapping[int, bytes], length: int = 32) -> bytes:
    """The secret (``length`` bytes) from shares ``{x: y}`` (Lagrange interpolation at 0);
    with fewer shares than the threshold the result is unrelated to the secret."""
    pts = [(int(x), int.from_bytes(y, "big")) for x, y in shares.items()]
    s = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        s = (s + yi * num * pow(den, -1, PRIME)) % PRIME
    if s >= 1 << (8 * length):
        raise SecAggError("the shares do not reconstruct a secret of the expected length")
    return s.to_bytes(length, "big")


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


def _ctx(run_id: bytes, round_idx: int, *parts: str) -> bytes:
    return b"|".join([b"scfedvi-secagg", run_id, str(round_idx).encode(), *map(str.encode, parts)])


def pair_mask(
    own_key: X25519PrivateKey, peer_pk: bytes, pair: tuple[str, str], run_id: bytes, r: int, n: int
) -> np.ndarray:
    """The mask sites ``pair`` share (either side's private key with the other's public)."""
    shared = own_key.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    lo, hi = sorted(pair)
    return prg(_hkdf(shared, run_id, _ctx(run_id, r, "mask", lo, hi)), n)


def self_mask(seed: bytes, site: str, run_id: bytes, r: int, n: int) -> np.ndarray:
    """The site's own mask from its 32-byte seed."""
    return prg(_hkdf(seed, run_id, _ctx(run_id, r, "self", site)), n)


def _aead(
    own: X25519PrivateKey, peer_pk: bytes, pair: tuple[str, str], run_id, r
) -> ChaCha20Poly1305:
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    lo, hi = sorted(pair)
    return ChaCha20Poly1305(_hkdf(shared, run_id, _ctx(run_id, r, "enc", lo, hi)))


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW_PUB)


# -- the site ----------------------------------------------------------------------------------
@dataclass
class SiteSession:
    """One site's side of one round. Serializable (:meth:`to_dict`): on Flower each stage is
    a new process, which reloads the session from the site's state folder.

    Parameters
    ----------
    site
        The site's name.
    run_id, round_idx
        Bind every key, mask and ciphertext to this run and round.
    min_sites
        The site's policy's ``min_secagg_sites``: fewer sites in the roster are refused.
    """

    site: str
    run_id: bytes
    round_idx: int
    min_sites: int = 3
    stage: str = "keys"
    mask_sk: bytes = field(
        default_factory=lambda: X25519PrivateKey.generate().private_bytes(*_RAW_PRIV)
    )
    enc_sk: bytes = field(
        default_factory=lambda: X25519PrivateKey.generate().private_bytes(*_RAW_PRIV)
    )
    seed: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    roster: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    threshold: int = 0
    held: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # site -> (key, seed) shares
    survivors: list[str] = field(default_factory=list)  # those that sent shares (stage 3)
    revealed: dict[str, str] = field(default_factory=dict)  # site -> SEED | KEY

    def _refuse(self, what: str, fix: str) -> Exception:
        return refuse(self.site, f"secure aggregation round {self.round_idx}: {what}", fix)

    def _expect(self, stage: str, nxt: str) -> None:
        if self.stage != stage:
            raise self._refuse(
                f"asked for stage {nxt!r} while at {self.stage!r}",
                "the coordinator must run the stages in order, each once",
            )
        self.stage = nxt

    def keys(self) -> Payload:
        """Stage 1: the two public keys."""
        if self.stage != "keys":
            raise self._refuse("keys asked twice", "a round's keys are sent once")
        return {
            "mask_pk": _pub(X25519PrivateKey.from_private_bytes(self.mask_sk)),
            "enc_pk": _pub(X25519PrivateKey.from_private_bytes(self.enc_sk)),
        }

    def shares(self, p: Payload) -> Payload:
        """Stage 2: encrypted shares of the masking key and the seed, one per other site.

        ``p``: ``sites``, ``mask_pks``, ``enc_pks`` (the roster, aligned) and ``threshold``.
        """
        own = self.keys()
        self._expect("keys", SHARES)
        sites = [str(s) for s in p["sites"]]
        n, t = len(sites), int(p["threshold"])
        if len(set(sites)) != n or self.site not in sites:
            raise self._refuse("a roster with repeated sites or without this site", "resend it")
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
        if bytes(p["mask_pks"][i]) != own["mask_pk"] or bytes(p["enc_pks"][i]) != own["enc_pk"]:
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
            aead = _aead(enc, self.roster[s][1], (self.site, s), self.run_id, self.round_idx)
            ad = _ctx(self.run_id, self.round_idx, "share", self.site, s)
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
            aead = _aead(enc, self.roster[s][1], (self.site, s), self.run_id, self.round_idx)
            try:
                plain = aead.decrypt(
                    ct[:12], ct[12:], _ctx(self.run_id, self.round_idx, "share", s, self.site)
                )
            except InvalidTag:
                raise self._refuse(f"the shares from {s!r} do not authenticate", "resend") from None
            self.held[s] = (plain[:_SHARE_BYTES], plain[_SHARE_BYTES:])
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

    def unmask(self, p: Payload) -> Payload:
        """Stage 4: ``p["survivors"]``: the sites whose masked update the coordinator holds.
        Reveals the seed share of each of them and the key share of each other site that sent
        shares; refuses a request that would reveal the other kind for a site already answered
        (SecAgg's rule: both kinds of one site unmask its update alone)."""
        if self.stage not in (MASKED, UNMASK):
            raise self._refuse(
                f"asked to unmask while at {self.stage!r}", "run the stages in order"
            )
        alive = {str(s) for s in p["survivors"]}
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
            "revealed": self.revealed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SiteSession:
        def pairs(x):
            return {s: (bytes.fromhex(a), bytes.fromhex(b)) for s, (a, b) in x.items()}

        return cls(
            site=d["site"],
            run_id=bytes.fromhex(d["run_id"]),
            round_idx=int(d["round_idx"]),
            min_sites=int(d["min_sites"]),
            stage=d["stage"],
            mask_sk=bytes.fromhex(d["mask_sk"]),
            enc_sk=bytes.fromhex(d["enc_sk"]),
            seed=bytes.fromhex(d["seed"]),
            roster=pairs(d["roster"]),
            threshold=int(d["threshold"]),
            held=pairs(d["held"]),
            survivors=list(d["survivors"]),
            revealed=dict(d["revealed"]),
        )


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
    """Run stages 2-4 over the sites whose stage-1 ``keys`` (``{site: {"mask_pk",
    "enc_pk"}}``) arrived; ``length`` is the masked vector's. Raises :class:`SecAggError`
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
    rep = ask(UNMASK, {s: {"survivors": u3} for s in u3})
    u4 = sorted(s for s in u3 if s in rep)
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
        secret = shamir_reconstruct(dict(list(got[s].items())[:t]))
        if s in u3:  # a survivor: remove its self mask
            total = (
                total + (MOD - self_mask(secret, s, run_id, round_idx, length).astype(np.uint64))
            ) % MOD
            continue
        key = X25519PrivateKey.from_private_bytes(secret)
        if _pub(key) != bytes(keys[s]["mask_pk"]):
            raise SecAggError(f"{where}: the shares of {s!r}'s masking key do not match its key")
        for i in u3:  # a dropped site: remove the masks the survivors shared with it
            m = pair_mask(key, bytes(keys[i]["mask_pk"]), (s, i), run_id, round_idx, length)
            total = (total + (MOD - m.astype(np.uint64) if i < s else m)) % MOD
    return SecureSum(total.astype(np.uint32), u3, dropped)
