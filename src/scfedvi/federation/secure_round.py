"""A training round under secure aggregation, the parts both runtimes share.

At the site (:func:`site_vector`): after :meth:`SiteWorker.fit`, the update becomes the uint32
vector the site masks (its clipped delta pre-scaled by its cell counts, then the counts; see
:func:`scfedvi.privacy.secagg.encode_update`). At the coordinator:
:func:`scfedvi.privacy.secagg_protocol.secure_sum` runs the protocol's stages through the
runtime's ``ask`` and :meth:`Coordinator.aggregate_secure` turns the unmasked sum into the new
global model. :func:`secure_round_in_process` is the in-process runtime's ``ask``: each site's
:class:`~scfedvi.privacy.secagg_site.SiteSession` answers in this process, with the identity
its policy names (:func:`site_identities`: every site's files, or keys made in memory).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

from scfedvi.federation.aggregate import SiteUpdate
from scfedvi.privacy.identity import SiteIdentity, load_identity, make_identities
from scfedvi.privacy.secagg import encode_update, secagg_bound, site_weights
from scfedvi.privacy.secagg_protocol import (
    CONSISTENCY,
    MASKED,
    SHARES,
    UNMASK,
    Payload,
    SecureSum,
    secure_sum,
)
from scfedvi.privacy.secagg_site import SiteSession
from scfedvi.train.params import Params

#: The stages at which a test may make a site drop out (it answers none after).
STAGES = ("keys", SHARES, MASKED, CONSISTENCY, UNMASK)


def site_identities(sites: Sequence) -> dict[str, SiteIdentity]:
    """Each site's identity from the files its policy names (``secagg_identity_key`` and
    ``secagg_roster``); if no site names any, keys made in memory for this process's
    federation (every site is simulated here). Some sites with files and some without cannot
    authenticate each other: a clear error."""
    named = {s.name: bool(s.policy.secagg_identity_key) for s in sites}
    if not any(named.values()):
        return make_identities(s.name for s in sites)
    if not all(named.values()):
        missing = sorted(n for n, v in named.items() if not v)
        raise ValueError(
            f"secure aggregation: sites {missing} name no identity key in their SitePolicy "
            "while the others do; give every site secagg_identity_key and secagg_roster (or "
            "none, for keys made in memory)"
        )
    return {
        s.name: load_identity(s.policy.secagg_identity_key, s.policy.secagg_roster, s.name)
        for s in sites
    }


def site_vector(worker, update: SiteUpdate, global_params: Params, bound: int) -> np.ndarray:
    """The site's masked-sum vector of ``update`` (computed at the site, by ``worker``)."""
    from scfedvi.train.params import batch_owned_columns

    cfg = worker.config
    owned = batch_owned_columns(worker.module) if cfg.federation.batch_owned else {}
    weighted = cfg.privacy.noise_multiplier == 0
    n_batches = int(worker.module.n_batch)
    w = site_weights(update.num_examples, update.batch_counts, n_batches, weighted)
    return encode_update(
        update.params,
        global_params,
        w,
        batch_owned=owned if weighted else {},
        clip_norm=float(cfg.privacy.clip_norm),
        bound=bound,
        site=worker.name,
    )


def without_params(update: SiteUpdate) -> SiteUpdate:
    """What the coordinator keeps of a site's answer under secure aggregation: counts and
    metrics, no parameters."""
    return dataclasses.replace(update, params={}, control_delta=None)


def secure_round_in_process(
    coordinator,
    sites: Sequence,
    updates: Sequence[SiteUpdate],
    *,
    run_id: bytes | None = None,
    drop: Mapping[str, str] | None = None,
) -> SecureSum:
    """Mask, sum and unmask this round's ``updates`` (one per site of ``sites``, in order)
    and aggregate them into ``coordinator``; ``drop`` (``{site: stage}``) makes sites drop out
    at a stage (tests). Returns the protocol's result."""
    drop = dict(drop or {})
    r = coordinator.round
    run_id = os.urandom(16) if run_id is None else run_id
    bound = secagg_bound(coordinator.config.privacy, {s.name: s.data.n_cells for s in sites})
    params = coordinator.params
    vectors = {
        s.name: site_vector(s, u, params, bound) for s, u in zip(sites, updates, strict=True)
    }
    ids = site_identities(sites)
    sessions = {
        s.name: SiteSession(s.name, run_id, r, ids[s.name], min_sites=s.policy.min_secagg_sites)
        for s in sites
    }
    gone: set[str] = set()

    def alive(stage: str, site: str) -> bool:
        if site in drop and STAGES.index(drop[site]) <= STAGES.index(stage):
            gone.add(site)
        return site not in gone

    keys = {s: sess.keys() for s, sess in sessions.items() if alive("keys", s)}

    def ask(stage: str, payloads: Mapping[str, Payload]) -> dict[str, Payload]:
        out: dict[str, Payload] = {}
        for site, p in payloads.items():
            if not alive(stage, site):
                continue
            sess = sessions[site]
            if stage == SHARES:
                out[site] = sess.shares(p)
            elif stage == MASKED:
                out[site] = {"masked": sess.masked(vectors[site], p)}
            elif stage == CONSISTENCY:
                out[site] = sess.consistency(p)
            else:
                out[site] = sess.unmask(p)
        return out

    length = len(next(iter(vectors.values())))
    result = secure_sum(
        ask,
        keys,
        length=length,
        run_id=run_id,
        round_idx=r,
    )
    late = sorted(set(result.dropped) | (set(sessions) - set(keys)))
    coordinator.aggregate_secure(
        result, [without_params(u) for u in updates], bound=bound, dropped=late
    )
    return result
