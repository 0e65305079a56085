"""Secure-aggregation primitives: pairwise masks that cancel in the sum (in process only).

Each site holds an X25519 key pair and publishes its public key. Two sites ``i < j`` derive the
same 32-byte key from their X25519 shared secret with HKDF-SHA256 (salt: the run's identifier;
info: both site identifiers and the round), and expand it with the ChaCha20 stream cipher into
one 32-bit mask word per value. Site ``i`` sends its quantized update plus the masks it shares
with every later site minus those it shares with every earlier site, modulo ``2**32``; in the
sum over all sites every mask appears once with each sign and cancels, so the server learns the
sum only, while a single masked update is uniform on ``[0, 2**32)`` to anyone without the pair
keys.

Quantization: a clipped update has every coordinate in ``[-C, C]`` (its L2 norm is at most
``C``), so with ``n`` sites the sum lies in ``[-n C, n C]``; values are scaled by
``S = (2**31 - 1) / (n C)``, rounded to integers and kept modulo ``2**32`` (two's complement),
so the decoded sum never wraps. The rounding error of the sum is at most ``n / (2 S)`` per
coordinate.

Not here: the Flower integration, the key exchange over the network and its authentication
(a coordinator that substitutes public keys can read updates), and dropout recovery (SecAgg+
secret-shares each site's key so the others can remove a dropped site's masks; here every
site must answer, else the sum cannot be unmasked).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MOD_BITS = 32
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def scale_for(clip_norm: float, n_sites: int) -> float:
    """Fixed-point scale: ``n_sites`` values in ``[-clip_norm, clip_norm]`` sum without wrap."""
    if clip_norm <= 0 or n_sites < 1:
        raise ValueError("secure aggregation needs clip_norm > 0 and at least one site")
    return (2 ** (MOD_BITS - 1) - 1) / (n_sites * clip_norm)


def quantize(x: np.ndarray, clip_norm: float, n_sites: int) -> np.ndarray:
    """``x`` (every value within ``[-clip_norm, clip_norm]``) as uint32 fixed point."""
    x = np.asarray(x, np.float64)
    if np.any(np.abs(x) > clip_norm * (1 + 1e-9)):
        raise ValueError("secure aggregation: clip the update to clip_norm before quantizing")
    q = np.rint(x * scale_for(clip_norm, n_sites)).astype(np.int64)
    return (q % (1 << MOD_BITS)).astype(np.uint32)


def dequantize(total: np.ndarray, clip_norm: float, n_sites: int) -> np.ndarray:
    """The float sum of a uint32 sum of :func:`quantize` d values."""
    signed = np.asarray(total, np.uint32).view(np.int32).astype(np.float64)
    return signed / scale_for(clip_norm, n_sites)


class SecAggSite:
    """One site's side: its key pair and the masking of its quantized update."""

    def __init__(self, site_id: str) -> None:
        self.site_id = site_id
        self._key = X25519PrivateKey.generate()

    @property
    def public_key(self) -> bytes:
        """The 32-byte public key the site publishes."""
        return self._key.public_key().public_bytes(*_RAW)

    def _pair_mask(self, peer: str, peer_key: bytes, run_id: bytes, round_idx: int, n: int):
        shared = self._key.exchange(X25519PublicKey.from_public_bytes(peer_key))
        lo, hi = sorted((self.site_id, peer))
        info = (
            b"scfedvi-secagg|" + lo.encode() + b"|" + hi.encode() + b"|" + str(round_idx).encode()
        )
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=run_id, info=info).derive(shared)
        nonce = round_idx.to_bytes(16, "little")  # one key per round (info), counter from 0
        stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        return np.frombuffer(stream.update(bytes(4 * n)), dtype=np.uint32)

    def mask(
        self,
        quantized: np.ndarray,
        peers: dict[str, bytes],
        *,
        run_id: bytes,
        round_idx: int,
    ) -> np.ndarray:
        """``quantized`` plus the pairwise masks, modulo ``2**32``.

        ``peers`` maps every other site's identifier to its public key.
        """
        q = np.asarray(quantized, np.uint32).ravel()
        out = q.astype(np.uint64)
        for peer, key in sorted(peers.items()):
            if peer == self.site_id:
                continue
            m = self._pair_mask(peer, key, run_id, round_idx, q.size).astype(np.uint64)
            out = out + m if self.site_id < peer else out + ((1 << MOD_BITS) - m)
        return (out % (1 << MOD_BITS)).astype(np.uint32).reshape(np.shape(quantized))


def masked_sum(masked: list[np.ndarray]) -> np.ndarray:
    """The server's side: the sum of every site's masked update, modulo ``2**32`` (the masks
    cancel only when every site that masked is in the sum)."""
    total = np.zeros(np.shape(masked[0]), np.uint64)
    for m in masked:
        total = (total + np.asarray(m, np.uint64)) % (1 << MOD_BITS)
    return total.astype(np.uint32)
