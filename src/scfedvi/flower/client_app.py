"""A site as a Flower ClientApp: answers the setup, training and embedding messages.

Flower starts a fresh process for every message, so the site keeps nothing in memory: its
data is read from ``data-path`` each time, and its private training state (normalization
statistics, optimizer moments, control variates) is saved in ``state-dir`` after each round
and reloaded for the next. A reply carries only what :mod:`scfedvi` lets leave a site:
gene names and per-gene summaries (setup), shared parameters, cell counts (in total and per
batch), scalar metrics, the schema hash and the round, and for balancing cluster centroids and
sums with their counts (see :mod:`scfedvi.federation.payload`); the embedding stays at the
site.

The training modules (torch) are imported only by the handlers that train or embed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from scfedvi._constants import SCHEMA_HASH
from scfedvi.config import RunConfig
from scfedvi.data.errors import SchemaMismatchError, SiteDataError
from scfedvi.flower import messages as m
from scfedvi.flower.device import node_device
from scfedvi.flower.node import NodeSettings
from scfedvi.flower.progress import cache_note
from scfedvi.flower.settings import AppSettings, run_config_from_flower

log = logging.getLogger(__name__)
#: Error code of a reply that explains why the site's data cannot be used.
SITE_DATA_ERROR = 2  # flwr's ErrorCode.CLIENT_APP_RAISED_EXCEPTION

app = ClientApp()

Handler = Callable[[Message, NodeSettings, RunConfig, AppSettings], RecordDict]
#: The site's handlers by name, for the warm worker (:mod:`scfedvi.flower.site_worker`).
HANDLERS: dict[str, Handler] = {}


def site_handler(fn: Handler) -> Callable[[Message, Context], Message]:
    """Answer a message with ``fn`` through :func:`answer`: in the site's warm worker when
    its node config allows one (:mod:`scfedvi.flower.warm`), else in this process."""
    HANDLERS[fn.__name__] = fn

    @functools.wraps(fn)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            reply = _warm_reply(fn.__name__, msg, context)
        except SiteDataError as e:
            log.error("%s", e)
            return Message(Error(code=SITE_DATA_ERROR, reason=str(e)), reply_to=msg)
        if reply is not None:
            return reply
        return Message(answer(fn, msg, context), reply_to=msg)

    return wrapper


def answer(fn: Handler, msg: Message, context: Context) -> RecordDict | Error:
    """Parse the configs and the site's own policy, run ``fn``; a :class:`SiteDataError`
    (a :class:`~scfedvi.privacy.policy.PolicyRefusal` too) becomes a clear error.

    The one code path of every message, in a ClientApp's own process and in the site's warm
    worker. The site's :class:`~scfedvi.config.SitePolicy` comes from its node config only
    (:func:`~scfedvi.privacy.policy.policy_from_node_config`: ``policy-file`` and/or
    individual keys), never from the run config; handlers find it as ``node.policy``.
    """
    cfg, settings = run_config_from_flower(context.run_config)
    try:
        cfg = node_device(cfg, context.node_config)  # the site's own device
        node = NodeSettings.from_configs(context.node_config, settings)  # policy included
        return fn(msg, node, cfg, settings)
    except SiteDataError as e:
        log.error("%s", e)
        return Error(code=SITE_DATA_ERROR, reason=str(e))


def _warm_reply(name: str, msg: Message, context: Context) -> Message | None:
    """The site's warm worker's reply, or ``None`` (no worker for this message)."""
    from scfedvi.flower import warm

    try:
        if not warm.enabled(context.node_config):
            return None
        warm.idle_seconds(context.node_config)
    except ValueError as e:
        raise SiteDataError(f"SuperNode --node-config: {e}") from None
    node = NodeSettings.from_configs(context.node_config, AppSettings())
    return warm.ask(name, msg, context, node.site, node.state_dir)


def _config(**values) -> ConfigRecord:
    return ConfigRecord(values)


def _answer_setup(msg: Message, node: NodeSettings, app_: AppSettings, step: str) -> RecordDict:
    """A setup query through :func:`scfedvi.federation.setup_site.answer_setup` (the site's
    policy, its query budget for this run and the summary whitelist: the same function as in
    process)."""
    from scfedvi.federation.setup_site import answer_setup
    from scfedvi.flower.setup import record_to_query, reply_to_record

    reply = answer_setup(
        record_to_query(msg.content, step),
        node.read(app_.batch_key),
        site=node.site,
        batch_key=app_.batch_key,
        layer=node.layer_or(app_.layer),
        label_key=app_.label_key or None,
        policy=node.policy,
        ledger=_ledger(msg, node),
    )
    return reply_to_record(reply)


@app.query("genes")
@site_handler
def genes(msg: Message, node: NodeSettings, cfg: RunConfig, app_: AppSettings) -> RecordDict:
    """Setup 1: the gene names the site measured and its cells per batch."""
    return _answer_setup(msg, node, app_, "genes")


@app.query("summary")
@site_handler
def summary(msg: Message, node: NodeSettings, cfg: RunConfig, app_: AppSettings) -> RecordDict:
    """Setup 2: per-batch, per-gene summaries over the server's gene universe."""
    return _answer_setup(msg, node, app_, "summary")


@app.query("schema")
@site_handler
def schema(msg: Message, node: NodeSettings, cfg: RunConfig, app_: AppSettings) -> RecordDict:
    """Setup 3: check that the site's data fits the schema, and keep the schema."""
    from scfedvi.data.schema import FederationSchema

    c = msg.content.config_records[m.CONFIG]
    sch = FederationSchema.from_json(str(c["schema"]))
    if sch.hash != c[SCHEMA_HASH]:
        raise SchemaMismatchError(f"site {node.site!r}: the schema does not match its hash")
    _, sd = node.project(sch, cfg.train.batch_size)  # a SiteDataError names the field and fix
    node.save_schema(sch)
    n_cells = int(sd.X.shape[0])  # the schedule's input (also each round's update weight)
    return RecordDict(
        {m.CONFIG: _config(**{m.SITE: node.site, SCHEMA_HASH: sch.hash, m.N_CELLS: n_cells})}
    )


def _ledger(msg: Message, node: NodeSettings):
    """The site's query budget for this Flower run, kept in its state folder, with its
    record of all the runs it answered on its data file (``SitePolicy.max_runs``,
    ``max_total_epsilon``: :mod:`scfedvi.privacy.run_budget`); in memory for a message
    without Flower's metadata (a test calling a handler directly)."""
    from scfedvi.privacy.policy import QueryLedger, ledger_path
    from scfedvi.privacy.run_budget import RunLedger, runs_ledger_path

    run_id = getattr(getattr(msg, "metadata", None), "run_id", None)
    if run_id is None:
        return QueryLedger(policy=node.policy)
    record = None if node.simulated else runs_ledger_path(node.state_dir, node.site)
    runs = RunLedger(record, data_key=str(node.data_path))  # simulated: this run only
    return QueryLedger(
        ledger_path(node.state_dir, node.site, run_id),
        runs=runs,
        run_id=str(run_id),
        policy=node.policy,
    )


def _worker(msg: Message, node: NodeSettings, cfg: RunConfig):
    import os

    import torch

    from scfedvi._malloc import tune_malloc
    from scfedvi.federation.site import SiteWorker
    from scfedvi.train.local import SiteTensors

    # as the `scfedvi` command: one thread unless the site says otherwise (SCFEDVI_THREADS);
    # the same thread count as the in-process runtime gives the same floating-point sums
    torch.set_num_threads(max(1, int(os.environ.get("SCFEDVI_THREADS", "1"))))
    tune_malloc()  # a fresh process per message: glibc's defaults would fault each step in

    c = msg.content.config_records[m.CONFIG]
    sch = node.load_schema(str(c[SCHEMA_HASH]))
    # the projected counts of the setup round, mapped from the site's data cache (rebuilt
    # from data-path if the file, the schema or the settings changed); not a dense copy
    sd, log_factorial = node.site_data(sch, cfg.train.batch_size)
    tensors = SiteTensors(sd.X, sd.batch_index)
    tensors.set_log_factorial(log_factorial)  # computed once, at the setup round
    # only the final embedding writes the site's whole AnnData back (with the latent space)
    embedding = getattr(getattr(msg, "metadata", None), "message_type", "") == m.EMBED
    adata = node.read(sch.batch_key) if embedding else None
    policy = node.policy
    worker = SiteWorker(
        node.site,
        tensors,
        sch.n_genes,
        sch.n_batches,
        cfg,
        policy=policy,
        ledger=_ledger(msg, node),
    )
    return worker, adata, sd, sch


@app.train()
@site_handler
def train(msg: Message, node: NodeSettings, cfg: RunConfig, app_: AppSettings) -> RecordDict:
    """One round: train from the global parameters, keep the private state, send the update."""
    worker, _, _, sch = _worker(msg, node, cfg)
    r = int(msg.content.config_records[m.CONFIG][m.ROUND])  # type: ignore[arg-type]
    if r > 0:
        prev = node.state_path(r - 1)
        if prev.exists():
            worker.load_state(prev)
        else:
            log.warning("site %r: no state of round %d in %s; fresh state", node.site, r - 1, prev)
    from scfedvi.federation.payload import check_update

    params = m.record_to_params(msg.content.array_records[m.ARRAYS])
    rec = msg.content.array_records.get(m.CONTROL)
    control = None if rec is None else m.record_to_params(rec)
    upd = worker.fit(params, r, control, m.config_to_work(msg.content.config_records[m.CONFIG]))
    check_update(  # the site's own whitelist check before anything leaves it
        upd,
        {k: v.shape for k, v in params.items()},
        control_shapes=None if control is None else {k: v.shape for k, v in control.items()},
    )
    worker.save_state(node.state_path(r))
    node.prune_states(keep_from=r - 1)  # a restarted round r reloads the state of r - 1
    if cfg.privacy.secure_aggregation:  # the update stays here until it is masked
        from scfedvi.flower.secagg import site_keys_reply

        return site_keys_reply(msg, node, worker, upd, params, sch.hash, r)
    extra: dict[str, str | list[int]] = {
        m.SITE: node.site,
        m.BATCH_COUNTS: m.batch_counts_to_list(upd.batch_counts),
        **cache_note(node),  # why the site rebuilt its data cache, if it did
    }
    rd = RecordDict(
        {
            m.ARRAYS: m.params_to_record(upd.params),
            m.METRICS: m.metrics_to_record(upd.metrics, upd.num_examples),
            m.CONFIG: m.round_config(sch.hash, r, **extra),
        }
    )
    if upd.control_delta is not None:
        rd[m.CONTROL] = m.params_to_record(upd.control_delta)
    return rd


def _steps(msg: Message) -> list:
    from scfedvi.federation.balance import steps_from_arrays

    if m.STEPS not in msg.content.array_records:
        return []
    return steps_from_arrays(m.record_to_params(msg.content.array_records[m.STEPS]))


@app.query("balance")
@site_handler
def balance(msg: Message, node: NodeSettings, cfg: RunConfig, app_: AppSettings) -> RecordDict:
    """Balancing: embed with the steps so far; send the local summary or the sums, and counts,
    through :func:`scfedvi.federation.balance_site.answer` (the site's policy and its query
    budget for this run, kept in ``state-dir``; the same function as in process).

    The embedding is the same in every message of a pass (same parameters, same steps): the
    first computes it and keeps it in the site's state folder, keyed by everything it depends
    on; the next ones read it back without importing torch or reading the data.
    """
    from scfedvi.federation.balance import steps_from_arrays
    from scfedvi.federation.balance_site import answer

    c = msg.content.config_records[m.CONFIG]
    arrays = {
        name: m.record_to_params(msg.content.array_records[name])
        for name in (m.ARRAYS, m.STEPS)
        if name in msg.content.array_records
    }
    steps = steps_from_arrays(arrays.get(m.STEPS, {}))
    key = node.embedding_key(str(c[SCHEMA_HASH]), cfg.to_dict(), arrays)
    z = node.load_embedding(key)
    if z is None:
        worker, _, _, sch = _worker(msg, node, cfg)
        z = worker.embed(arrays[m.ARRAYS], steps)
        if key is not None:
            node.save_embedding(key, z)
    else:
        sch = node.load_schema(str(c[SCHEMA_HASH]))
    phase = str(c[m.PHASE])
    rec = msg.content.array_records.get(m.CENTROIDS)
    values, counts = answer(
        node.site,
        z,
        cfg,
        phase=phase,
        n_clusters=int(c[m.N_CLUSTERS]),  # type: ignore[arg-type]
        seed=int(c[m.SEED]),  # type: ignore[arg-type]
        n_steps=len(steps),
        centroids=None if rec is None else m.record_to_params(rec).get(m.CENTROIDS),
        ledger=_ledger(msg, node),  # this run's, in the site's state dir
        policy=node.policy,  # the site's own (site_handler), or the default
    )
    rd = {m.CLUSTERS: m.params_to_record({"values": values, "counts": counts})}
    extra = {m.SITE: node.site, m.PHASE: phase, **cache_note(node)}
    return RecordDict({**rd, m.CONFIG: m.round_config(sch.hash, int(c[m.ROUND]), **extra)})  # type: ignore[arg-type]


@app.query("secagg")
@site_handler
def secagg(msg: Message, node: NodeSettings, cfg: RunConfig, app_: AppSettings) -> RecordDict:
    """Secure aggregation's stages 2-4 of a round (:mod:`scfedvi.flower.secagg`)."""
    from scfedvi.flower.secagg import site_stage

    return site_stage(msg, node)


@app.query("annotate")
@site_handler
def annotate(msg: Message, node: NodeSettings, cfg: RunConfig, app_: AppSettings) -> RecordDict:
    """The scANVI stage's steps at the site (:func:`scfedvi.flower.annotate.site_step`)."""
    from scfedvi.flower.annotate import site_step

    return site_step(msg, node, cfg, app_)


@app.query("embed")
@site_handler
def embed(msg: Message, node: NodeSettings, cfg: RunConfig, app_: AppSettings) -> RecordDict:
    """Embed the site's cells with the global model and the balancing steps; write them
    locally, send only a count."""
    from scfedvi.train.embed import write_embedding

    worker, adata, sd, sch = _worker(msg, node, cfg)
    z = worker.embed(m.record_to_params(msg.content.array_records[m.ARRAYS]), _steps(msg))
    write_embedding(adata, z, sd.obs_names)  # cells without counts stay NaN
    adata.uns["scfedvi"] = {"schema_hash": sch.hash, "site": node.site}
    node.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = node.embedded_path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp)
    tmp.replace(node.embedded_path)
    node.balance_cache_path.unlink(missing_ok=True)  # the balancing's embedding is done with
    c = {m.SITE: node.site, SCHEMA_HASH: sch.hash, m.N_EMBEDDED: int(z.shape[0])}
    c.update(cache_note(node))
    return RecordDict({m.CONFIG: _config(**c)})
