"""Shamir secret sharing over the prime field GF(2**521 - 1), for 32-byte secrets.

Used by secure aggregation (:mod:`scfedvi.privacy.secagg_protocol`) to share a site's masking
key and self-mask seed among the other sites. The polynomial's coefficients come from
:mod:`secrets` (the OS CSPRNG).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

#: The field: the Mersenne prime 2**521 - 1 (every 32-byte secret is below it).
PRIME = (1 << 521) - 1
#: Bytes of one share (an element of the field).
SHARE_BYTES = 66


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
        out[x] = y.to_bytes(SHARE_BYTES, "big")
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
        raise ValueError("the shares do not reconstruct a secret of the expected length")
    return s.to_bytes(length, "big")
