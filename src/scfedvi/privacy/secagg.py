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

The protocol that runs these over the network, with dropout recovery, is
:mod:`scfedvi.privacy.secagg_protocol`; what a site sums (its clipped delta, pre-scaled by its
cell counts, and the counts) is :func:`encode_update` here, and the coordinator's side of it
:func:`decode_sum` and :func:`secure_average`.
"""

from __future__ import annotations

from collections.abc import Mapping

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


# -- what a site sums under secure aggregation ------------------------------------------------
def _float_keys(global_params: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k, v in global_params.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def vector_length(global_params: Mapping[str, np.ndarray], n_batches: int) -> int:
    """Length of the masked vector: every floating-point value, then ``1 + n_batches`` counts."""
    return sum(int(np.size(global_params[k])) for k in _float_keys(global_params)) + 1 + n_batches


def site_weights(
    num_examples: int, batch_counts: Mapping[int, int], n_batches: int, weighted: bool
) -> np.ndarray:
    """The counts a site adds to the sum: its training cells and its cells per batch
    (``weighted``), or ``1`` and zeros (DP's unweighted sum)."""
    w = np.zeros(1 + n_batches, np.int64)
    w[0] = int(num_examples) if weighted else 1
    if weighted:
        for b, c in batch_counts.items():
            w[1 + int(b)] = int(c)
    return w


def encode_update(
    params: Mapping[str, np.ndarray],
    global_params: Mapping[str, np.ndarray],
    weights: np.ndarray,
    *,
    batch_owned: Mapping[str, tuple[int, int]],
    clip_norm: float,
    bound: int,
    site: str = "?",
) -> np.ndarray:
    """A site's update as the uint32 vector it masks (computed at the site).

    The update is the delta from ``global_params``, clipped to L2 norm ``clip_norm``, every
    column pre-scaled by its weight over the public ``bound`` (the coordinator's total of
    cells, which no sum of weights exceeds): ``weights[0]`` for every value, ``weights[1 + b]``
    for the columns of batch ``b`` in ``batch_owned`` arrays. So every value is within
    ``[-clip_norm, clip_norm]`` and so is their sum over the sites; it is quantized with
    :func:`quantize` (``n_sites=1``). The weights follow as integers. The coordinator divides
    the decoded sums by the summed weights (:func:`decode_sum`).
    """
    from scfedvi.privacy.dp import clip_update

    weights = np.asarray(weights, np.int64)
    if bound < 1 or np.any(weights < 0) or np.any(weights > bound):
        raise ValueError(
            f"site {site!r}: secure aggregation weights {weights.tolist()} exceed the bound "
            f"{bound} the coordinator sent (the federation's total cells); the sum would wrap"
        )
    keys = _float_keys(global_params)
    delta = {
        k: np.asarray(params[k], np.float64) - np.asarray(global_params[k], np.float64)
        for k in keys
    }
    clipped, _ = clip_update(delta, clip_norm)
    parts = []
    for k in keys:
        w: np.ndarray = np.full(np.shape(clipped[k]), float(weights[0]))
        if k in batch_owned:
            axis, first = batch_owned[k]
            wm = np.moveaxis(w, axis, 0)
            for b in range(wm.shape[0] - first):
                wm[first + b] = float(weights[1 + b])
        parts.append((clipped[k] * w / bound).ravel())
    values = np.concatenate(parts) if parts else np.zeros(0)
    return np.concatenate([quantize(values, clip_norm, 1), weights.astype(np.uint32)])


def decode_sum(
    total: np.ndarray,
    global_params: Mapping[str, np.ndarray],
    n_batches: int,
    *,
    clip_norm: float,
    bound: int,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The unmasked uint32 sum as ``(sum_i w_i delta_i per array, summed weights)``."""
    total = np.asarray(total, np.uint32)
    counts = total[-(1 + n_batches) :].astype(np.int64)
    values = dequantize(total[: -(1 + n_batches)], clip_norm, 1) * bound
    sums, at = {}, 0
    for k in _float_keys(global_params):
        size = int(np.size(global_params[k]))
        sums[k] = values[at : at + size].reshape(np.shape(global_params[k]))
        at += size
    return sums, counts


def secure_average(
    sums: Mapping[str, np.ndarray],
    counts: np.ndarray,
    global_params: Mapping[str, np.ndarray],
    batch_owned: Mapping[str, tuple[int, int]],
    *,
    divisor: int | None = None,
) -> dict[str, np.ndarray]:
    """The new parameters from the decoded sums: ``global + sum_i w_i delta_i / sum_i w_i``
    (batch-owned columns over the cells of their batch; a batch no survivor holds keeps its
    columns), or with ``divisor`` (DP's fixed one) ``global + sum_i delta_i / divisor``.
    Integer buffers keep their global value."""
    out = {}
    for k, g in global_params.items():
        g = np.asarray(g)
        if k not in sums:
            out[k] = g.copy()
            continue
        if divisor is not None:
            step = sums[k] / divisor
        else:
            if counts[0] <= 0:
                raise ValueError("secure aggregation: the summed cell count is 0")
            step = sums[k] / counts[0]
            if k in batch_owned:
                axis, first = batch_owned[k]
                sm, st = np.moveaxis(sums[k], axis, 0), np.moveaxis(step, axis, 0)
                for b in range(st.shape[0] - first):
                    c = counts[1 + b] if 1 + b < len(counts) else 0
                    st[first + b] = sm[first + b] / c if c > 0 else 0.0
        out[k] = (g.astype(np.float64) + step).astype(g.dtype)
    return out


def secagg_bound(privacy, n_cells: Mapping[str, int]) -> int:
    """The public bound on the summed weights (see :func:`encode_update`): the federation's
    cells (FedAvg's weights), or its number of sites (DP's unweighted sum, every weight 1)."""
    weighted = privacy.noise_multiplier == 0
    return int(sum(n_cells.values())) if weighted else len(n_cells)
