"""The requests an honest secure-aggregation coordinator sends, for the protocol tests."""

from __future__ import annotations


def roster(keys: dict, threshold: int) -> dict:
    """The stage-2 request an honest coordinator sends for these stage-1 ``keys``."""
    sites = sorted(keys)
    return {
        "sites": sites,
        "mask_pks": [keys[s]["mask_pk"] for s in sites],
        "enc_pks": [keys[s]["enc_pk"] for s in sites],
        "sigs": [keys[s]["sig"] for s in sites],
        "threshold": threshold,
    }
