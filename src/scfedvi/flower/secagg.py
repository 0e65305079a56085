"""Secure aggregation on Flower: the transport of :mod:`scfedvi.privacy.secagg_protocol`.

Why not Flower's own ``SecAggPlusWorkflow`` + ``secaggplus_mod``: they wrap Flower's legacy
``fit`` messages (``FitIns``/``FitRes``, one ``parameters`` list and one weight per site), while
this app speaks its own message types on the Message API (parameters, control variates,
schedule and counts in named records); carrying its updates would mean moving the whole app to
the legacy path. And Flower 1.42 expands its masks with ``numpy.random.RandomState`` seeded by
the 32-bit XOR of the shared secret's words (``secaggplus_utils.pseudo_rand_gen``): a
non-cryptographic generator with 2**32 seeds, which an observer of one masked vector can search.
Here every mask is a ChaCha20 stream keyed by HKDF-SHA256.

A secure training round is five message exchanges with each site:

1. ``train`` (the round's usual message, with the public bound and a fresh per-round salt):
   the site trains, keeps its update in its state folder as the vector it will mask, and
   replies with its two public keys signed by its identity key, its cell count and its
   (DP-filtered) metrics: no parameter array;
2. ``query.secagg`` phase ``shares`` (the signed keys of all), 3. phase ``masked`` (the only
   array a site sends: the masked ``uint32`` vector), 4. phase ``consistency`` (each site
   signs the survivor set), 5. phase ``unmask`` (the signatures; the shares).

A site's identity key and roster are files its node config names (``secagg-identity-key``,
``secagg-roster``: :class:`~scfedvi.config.SitePolicy` fields); without them it refuses secure
aggregation. The site's session (:class:`~scfedvi.privacy.secagg_site.SiteSession`: its keys,
the shares it holds, the set it signed and the kinds it revealed) lives in its state folder
between messages, since Flower starts a new process for each.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from scfedvi._constants import SCHEMA_HASH
from scfedvi.flower import messages as m
from scfedvi.privacy.identity import SiteIdentity, load_identity
from scfedvi.privacy.policy import refuse
from scfedvi.privacy.secagg_protocol import Payload, secure_sum
from scfedvi.privacy.secagg_site import SiteSession

log = logging.getLogger(__name__)

#: Round-config entries of a secure training round (coordinator -> site).
BOUND, SALT = "secagg-bound", "secagg-salt"
#: Reply entries: the site's signed public keys (stage 1), and the records of stages 2-5.
MASK_PK, ENC_PK, SIG = "mask_pk", "enc_pk", "sig"
PAYLOAD, VECTORS = "secagg", "secagg-arrays"


# -- payloads <-> records --------------------------------------------------------------------
def to_records(payload: Payload, schema_hash: str, r: int, phase: str) -> RecordDict:
    """A stage's payload as records: arrays in :data:`VECTORS`, the rest in :data:`PAYLOAD`,
    the schema hash, round and phase in ``config``."""
    arrays = {k: v for k, v in payload.items() if isinstance(v, np.ndarray)}
    rest = {k: v for k, v in payload.items() if not isinstance(v, np.ndarray)}
    rd = RecordDict(
        {
            m.CONFIG: m.round_config(schema_hash, r, **{m.PHASE: phase}),
            PAYLOAD: ConfigRecord(
                {k: list(v) if isinstance(v, list) else v for k, v in rest.items()}
            ),
        }
    )
    if arrays:
        rd[VECTORS] = m.params_to_record(arrays)
    return rd


def from_records(content: RecordDict) -> Payload:
    out: Payload = dict(content.config_records.get(PAYLOAD, ConfigRecord()).items())
    rec = content.array_records.get(VECTORS)
    if rec is not None:
        out.update(m.record_to_params(rec))
    return out


# -- the site ----------------------------------------------------------------------------------
def _session_path(node, r: int):
    return node.state_dir / f"secagg-{node.site}.round{r:05d}.json"


def _vector_path(node, r: int):
    return node.state_dir / f"secagg-{node.site}.round{r:05d}.npy"


def _save_session(node, session: SiteSession) -> None:
    path = _session_path(node, session.round_idx)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(session.to_dict()), encoding="utf-8")
    os.replace(tmp, path)


def site_identity(node) -> SiteIdentity:
    """The site's identity from the files its node config names; refuses secure aggregation
    without them."""
    pol = node.policy
    if not pol.secagg_identity_key:
        raise refuse(
            node.site,
            "secure aggregation without an identity key: its keys could not be authenticated "
            "to the other sites, so a coordinator could substitute them",
            f"make one with `scfedvi secagg-keygen --site {node.site} --out DIR`, put its "
            "public line in the consortium's roster, and start the SuperNode with "
            "--node-config \"secagg-identity-key='DIR/NAME.key' secagg-roster='roster.toml'\"",
        )
    return load_identity(pol.secagg_identity_key, pol.secagg_roster, node.site)


def site_keys_reply(msg: Message, node, worker, update, global_params, schema_hash: str, r: int):
    """Stage 1 at the site, after training: keep the vector to mask and a fresh session in the
    site's state folder; reply with the signed public keys, the cell count and the metrics."""
    from scfedvi.federation.secure_round import site_vector

    c = msg.content.config_records[m.CONFIG]
    identity = site_identity(node)
    vector = site_vector(worker, update, global_params, int(c[BOUND]))  # type: ignore[arg-type]
    session = SiteSession(
        node.site,
        bytes(c[SALT]),  # type: ignore[arg-type]
        r,
        identity,
        min_sites=node.policy.min_secagg_sites,
    )
    node.state_dir.mkdir(parents=True, exist_ok=True)
    for old in node.state_dir.glob(f"secagg-{node.site}.round*"):
        if int(old.name.split(".round")[1][:5]) < r - 1:
            old.unlink(missing_ok=True)  # earlier rounds' keys and shares
    np.save(_vector_path(node, r), vector)
    _save_session(node, session)
    keys = session.keys()
    extra: dict[str, Any] = {
        m.SITE: node.site,
        MASK_PK: keys["mask_pk"],
        ENC_PK: keys["enc_pk"],
        SIG: keys["sig"],
    }
    return RecordDict(
        {
            m.METRICS: m.metrics_to_record(update.metrics, update.num_examples),
            m.CONFIG: m.round_config(schema_hash, r, **extra),
        }
    )


def site_stage(msg: Message, node) -> RecordDict:
    """Stages 2-5 at the site: reload the round's session, answer, save it again."""
    from scfedvi.privacy.secagg_protocol import CONSISTENCY, MASKED, SHARES, UNMASK

    c = msg.content.config_records[m.CONFIG]
    r, phase = int(c[m.ROUND]), str(c[m.PHASE])  # type: ignore[arg-type]
    path = _session_path(node, r)
    if not path.exists():
        raise refuse(node.site, f"secure aggregation round {r}: no session", "train first")
    saved = json.loads(path.read_text(encoding="utf-8"))
    session = SiteSession.from_dict(saved, site_identity(node))
    p = from_records(msg.content)
    if phase == SHARES:
        reply: Payload = session.shares(p)
    elif phase == MASKED:
        reply = {"masked": session.masked(np.load(_vector_path(node, r)), p)}
        _vector_path(node, r).unlink(missing_ok=True)  # masked once; the update is gone
    elif phase == CONSISTENCY:
        reply = session.consistency(p)
    elif phase == UNMASK:
        reply = session.unmask(p)
    else:
        raise refuse(node.site, f"unknown secure aggregation phase {phase!r}", "update the app")
    _save_session(node, session)
    rd = to_records(reply, str(c[SCHEMA_HASH]), r, phase)
    rd[m.CONFIG][m.SITE] = node.site
    return rd


# -- the coordinator -------------------------------------------------------------------------
def secure_train_round(ex, coord, fed, r: int, timeout: float) -> dict[str, str]:
    """One training round under secure aggregation (see the module docstring); aggregates
    into ``coord`` and returns ``{site: why}`` for the sites that dropped out."""
    from scfedvi.federation.aggregate import SiteUpdate
    from scfedvi.flower.server_app import train_content
    from scfedvi.privacy.secagg import secagg_bound, vector_length

    sh = fed.schema.hash
    online = ex.online()
    failed = {s: "not connected" for n, s in fed.sites.items() if n not in online}
    bound = secagg_bound(coord.config.privacy, fed.n_cells)
    salt = os.urandom(16)
    targets = {}
    for n in fed.sites:
        if n in online:
            rd = train_content(coord, sh, r)
            extra = {**m.work_to_config(coord.work(fed.sites[n])), BOUND: bound}
            config = m.round_config(sh, r, **extra)
            config[SALT] = salt
            rd[m.CONFIG] = config
            targets[n] = rd
    res = ex.ask(targets, m.TRAIN, timeout, group_id=str(r))
    keys: dict[str, Payload] = {}
    metas = []
    node_of = {s: n for n, s in fed.sites.items()}
    for node, reply in res.ok.items():
        site = fed.sites[node]
        c = reply.content.config_records[m.CONFIG]
        if c.get(SCHEMA_HASH) != sh or int(c.get(m.ROUND, -1)) != r or MASK_PK not in c:
            failed[site] = f"reply for schema {c.get(SCHEMA_HASH)!r} round {c.get(m.ROUND)!r}"
            continue
        keys[site] = {
            "mask_pk": bytes(c[MASK_PK]),
            "enc_pk": bytes(c[ENC_PK]),
            "sig": bytes(c.get(SIG, b"")),
        }
        metrics, n_ex = m.record_to_metrics(reply.content.metric_records[m.METRICS])
        metas.append(
            SiteUpdate(site=site, params={}, num_examples=n_ex, batch_counts={}, metrics=metrics)
        )
    for node, why in res.failed.items():
        failed[fed.sites[node]] = why
        log.warning("round %d: site %r dropped: %s", r, fed.sites[node], why)

    def ask(phase: str, payloads: Mapping[str, Payload]) -> dict[str, Payload]:
        contents = {node_of[s]: to_records(p, sh, r, phase) for s, p in payloads.items()}
        got = ex.ask(contents, m.SECAGG, timeout, group_id=f"{r}-secagg-{phase}")
        out = {}
        for node, reply in got.ok.items():
            c = reply.content.config_records[m.CONFIG]
            if c.get(m.PHASE) != phase or int(c.get(m.ROUND, -1)) != r:
                failed[fed.sites[node]] = f"secure aggregation: reply for {c.get(m.PHASE)!r}"
                continue
            out[fed.sites[node]] = from_records(reply.content)
        for node, why in got.failed.items():
            failed[fed.sites[node]] = f"secure aggregation ({phase}): {why}"
            log.warning("round %d: site %r dropped at %s: %s", r, fed.sites[node], phase, why)
        return out

    length = vector_length(coord.params, fed.schema.n_batches)
    result = secure_sum(ask, keys, length=length, run_id=salt, round_idx=r)
    for s, stage in result.dropped.items():
        failed.setdefault(s, f"secure aggregation: dropped at {stage}")
    coord.aggregate_secure(
        result, sorted(metas, key=lambda u: u.site), bound=bound, dropped=sorted(failed)
    )
    return failed
