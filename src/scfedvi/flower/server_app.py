"""The coordinator as a Flower ServerApp: setup, training rounds, balancing, final embedding.

The algorithm is :class:`~scfedvi.federation.coordinator.Coordinator`'s; this file only moves
its parameters to the sites and their updates back. Everything the server writes goes to
``out-dir``: ``schema.json``, ``checkpoint/`` (after every round: a restarted ServerApp with
the same run config resumes there), ``model/`` (the format of :meth:`ScFedVI.save`),
``history.csv`` and ``result.json`` (``status``: ``running``, ``completed`` or ``failed``;
``flwr run`` itself does not report a failed run).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from scfedvi._constants import SCHEMA_HASH
from scfedvi.config import RunConfig
from scfedvi.data.schema import FederationSchema
from scfedvi.federation import rounds
from scfedvi.federation.aggregate import SiteUpdate
from scfedvi.federation.balance import BalanceStep, run_balance, site_seeds, steps_to_arrays
from scfedvi.federation.coordinator import CHECKPOINT, Coordinator
from scfedvi.flower import messages as m
from scfedvi.flower.exchange import Exchange
from scfedvi.flower.progress import Progress, log_cache_rebuilds
from scfedvi.flower.settings import AppSettings, annotate_from_flower, run_config_from_flower
from scfedvi.flower.setup import Federation, setup

log = logging.getLogger(__name__)
RESULT_FILE, SCHEMA_FILE, CHECKPOINT_DIR, MODEL_DIR, HISTORY_FILE = (
    "result.json",
    "schema.json",
    "checkpoint",
    "model",
    "history.csv",
)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation; write ``result.json`` whatever happens."""
    logging.basicConfig(level=logging.INFO)
    cfg, settings = run_config_from_flower(context.run_config)
    out = settings.out_path
    out.mkdir(parents=True, exist_ok=True)
    write_result(out, {"status": "running", "run_id": int(context.run_id)})
    progress = Progress(cfg.federation.n_rounds, run_id=int(context.run_id))
    try:
        if settings.annotate_from:  # federated scANVI on a trained model: its own run
            from scfedvi.flower.annotate_server import annotate_run

            result = annotate_run(grid, cfg, settings, annotate_from_flower(context.run_config))
        else:
            result = run_federation(grid, cfg, settings, progress)
    except Exception as e:
        failure = {"error": f"{e}", **progress.failure()}
        log.error("the run failed (%s): %s", progress.stage, failure)
        write_result(out, {"status": "failed", "run_id": int(context.run_id), **failure})
        raise
    write_result(out, {"status": "completed", "run_id": int(context.run_id), **result})


def write_result(out: Path, result: dict[str, Any]) -> None:
    tmp = out / f"{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(out / RESULT_FILE)


def run_federation(
    grid: Grid, cfg: RunConfig, app: AppSettings, progress: Progress | None = None
) -> dict[str, Any]:
    """Setup, rounds ``coordinator.round .. num-server-rounds - 1``, embedding, outputs;
    ``progress`` follows the run (logged each round, and what a failure reports)."""
    out = app.out_path
    progress = progress or Progress(cfg.federation.n_rounds)
    ex = Exchange(grid, Path(app.payload_log).expanduser() if app.payload_log else None)
    min_sites = cfg.federation.min_sites
    resume = (out / CHECKPOINT_DIR / f"{CHECKPOINT}.json").exists()
    schema = FederationSchema.load(out / SCHEMA_FILE) if resume else None
    if schema is not None:
        log.info("resuming with the schema and checkpoint in %s", out)
    fed = setup(ex, app, min_sites, schema)
    fed.schema.save(out / SCHEMA_FILE)
    coord = Coordinator(
        fed.schema.n_genes,
        fed.schema.n_batches,
        cfg,
        schema_hash=fed.schema.hash,
        checkpoint_dir=out / CHECKPOINT_DIR,
    )
    start = coord.round if coord.load_checkpoint(out / CHECKPOINT_DIR) else 0
    schedule = coord.resolve_schedule(fed.n_cells)  # the sites' cells, as in process
    seconds: list[float] = []
    dropped: list[dict[str, Any]] = []

    def after(r: int, failed: Mapping[str, str], secs: float) -> None:
        dropped.extend({"round": r, "site": s, "reason": why} for s, why in failed.items())
        seconds.append(secs)
        rows = [row for row in coord.history if row.get("round") == r]
        info = progress.round_done(r, rows, dict(failed), secs)
        write_result(out, {"status": "running", "run_id": progress.run_id, "progress": info})

    rounds.run_rounds(
        coord, FlowerRounds(ex, coord, fed, app.round_timeout, progress), on_round=after
    )
    last = {str(d["site"]) for d in dropped if d["round"] == coord.round - 1}
    t0 = time.perf_counter()
    progress.stage = "balance"
    steps, failed = balance(ex, coord, fed, cfg, app.round_timeout, skip=last)
    balance_seconds = time.perf_counter() - t0
    dropped += [{"round": "balance", "site": s, "reason": why} for s, why in failed.items()]
    progress.failed("balance", failed)
    progress.stage = "embedding"
    embedded = embed(ex, coord, fed, app.round_timeout, skip=last, steps=steps)
    history = pd.DataFrame(coord.history)
    save_model(out / MODEL_DIR, fed.schema, cfg, app, coord, history, steps)
    history.to_csv(out / HISTORY_FILE, index=False)
    return {
        "rounds": coord.round,
        "resumed_from_round": start,
        "schedule": schedule.to_dict(),
        "early_stopped": coord.early_stopped,
        "schema_hash": fed.schema.hash,
        "sites": sorted(fed.sites.values()),
        "dropped": dropped,
        "embedded": embedded,
        "seconds_per_round": seconds,
        "balance": {
            "clusters": [len(st.composition) for st in steps],
            "seconds": balance_seconds,
        },
    }


class FlowerRounds:
    """The Flower transport of :func:`~scfedvi.federation.rounds.run_rounds`: a round's
    messages to the connected sites and their replies (:func:`train_round`, or secure
    aggregation's :func:`scfedvi.flower.secagg.secure_train_round`)."""

    def __init__(
        self, ex: Exchange, coord: Coordinator, fed: Federation, timeout: float, progress: Progress
    ) -> None:
        self.ex, self.coord, self.fed, self.timeout, self.progress = (
            ex,
            coord,
            fed,
            timeout,
            progress,
        )

    def train(self, r: int, params: Any, control: Any) -> tuple[list[SiteUpdate], dict[str, str]]:
        """The sites' updates (sorted by site) and failures; ``params`` and ``control`` are
        the coordinator's broadcast, which :func:`train_round` sends."""
        self.progress.stage = f"round {r}"
        updates, failed = train_round(self.ex, self.coord, self.fed, r, self.timeout)
        self.progress.failed(r, failed)
        return updates, failed

    def train_secure(self, r: int, params: Any, control: Any) -> dict[str, str]:
        """The round under secure aggregation (aggregated into the coordinator there)."""
        from scfedvi.flower.secagg import secure_train_round

        self.progress.stage = f"round {r}"
        failed = secure_train_round(self.ex, self.coord, self.fed, r, self.timeout)
        self.progress.failed(r, failed)
        return failed


def train_content(coord: Coordinator, schema_hash: str, r: int) -> RecordDict:
    """A training message's content: the global parameters (and control variates) and the
    round config (also :func:`scfedvi.flower.secagg.secure_train_round`'s first message)."""
    params, control = coord.broadcast()
    rd = RecordDict(
        {m.ARRAYS: m.params_to_record(params), m.CONFIG: m.round_config(schema_hash, r)}
    )
    if control is not None:
        rd[m.CONTROL] = m.params_to_record(control)
    return rd


def train_round(
    ex: Exchange,
    coord: Coordinator,
    fed: Federation,
    r: int,
    timeout: float,
    message_type: str = m.TRAIN,
    extra: Mapping[str, Any] | None = None,
) -> tuple[list[SiteUpdate], dict[str, str]]:
    """One round at the sites: their updates (sorted by site) and ``{site: why}`` failures
    (``message_type`` and ``extra`` round-config entries: the scANVI stage's rounds,
    :mod:`scfedvi.flower.annotate`)."""
    online = ex.online()
    failed = {s: "not connected" for n, s in fed.sites.items() if n not in online}
    targets = {n: train_content(coord, fed.schema.hash, r) for n in fed.sites if n in online}
    for n, rd in targets.items():  # each site's local work this round (the schedule)
        work = m.work_to_config(coord.work(fed.sites[n]))
        rd[m.CONFIG] = m.round_config(fed.schema.hash, r, **work, **(extra or {}))
    group = str(r) if message_type == m.TRAIN else f"{message_type}-{r}"
    res = ex.ask(targets, message_type, timeout, group_id=group)
    updates = []
    _log_rebuilds(f"round {r + 1}", fed, res.ok)  # 1-based, as the progress lines
    for node, reply in res.ok.items():
        site = fed.sites[node]
        c = reply.content.config_records[m.CONFIG]
        if c.get(SCHEMA_HASH) != fed.schema.hash or int(c.get(m.ROUND, -1)) != r:  # type: ignore[arg-type]
            failed[site] = f"reply for schema {c.get(SCHEMA_HASH)!r} round {c.get(m.ROUND)!r}"
            continue
        metrics, n = m.record_to_metrics(reply.content.metric_records[m.METRICS])
        control = reply.content.array_records.get(m.CONTROL)
        updates.append(
            SiteUpdate(
                site=site,
                params=m.record_to_params(reply.content.array_records[m.ARRAYS]),
                num_examples=n,
                batch_counts=m.list_to_batch_counts(list(c[m.BATCH_COUNTS])),  # type: ignore[arg-type]
                metrics=metrics,
                control_delta=None if control is None else m.record_to_params(control),
            )
        )
    for node, why in res.failed.items():
        failed[fed.sites[node]] = why
        log.warning("round %d: site %r dropped: %s", r, fed.sites[node], why)
    return sorted(updates, key=lambda u: u.site), failed


def _log_rebuilds(stage: str, fed: Federation, ok: dict[int, Any]) -> None:
    """A line in the coordinator's log for each site that rebuilt its data cache."""
    log_cache_rebuilds(
        stage, {fed.sites[n]: r.content.config_records[m.CONFIG] for n, r in ok.items()}
    )


def balance(
    ex: Exchange,
    coord: Coordinator,
    fed: Federation,
    cfg: RunConfig,
    timeout: float,
    skip: set[str],
) -> tuple[list[BalanceStep], dict[str, str]]:
    """Composition balancing (:func:`~scfedvi.federation.balance.run_balance`) over the
    sites, as message rounds; ``(steps, {site: why})`` for sites that failed (left out of
    the passes that follow)."""
    k = cfg.balance_clusters
    if not k:
        return [], {}
    fc = cfg.federation
    failed: dict[str, str] = {}

    def ask(phase: str, steps: list[BalanceStep], centroids: np.ndarray | None) -> list[Any]:
        online = ex.online()
        targets = {}
        seeds = site_seeds(fc.seed, len(steps), fed.sites.values())
        for n, s in fed.sites.items():
            if n not in online or s in skip or s in failed:
                continue
            rd = train_content(coord, fed.schema.hash, coord.round)
            extra: dict[str, str | int] = {
                m.PHASE: phase,
                m.N_CLUSTERS: k,
                m.SEED: seeds[s],
            }
            rd[m.CONFIG] = m.round_config(fed.schema.hash, coord.round, **extra)
            if steps:
                rd[m.STEPS] = m.params_to_record(steps_to_arrays(steps))
            if centroids is not None:
                rd[m.CENTROIDS] = m.params_to_record({m.CENTROIDS: centroids})
            targets[n] = rd
        res = ex.ask(targets, m.BALANCE, timeout, group_id=f"balance-{len(steps)}")
        _log_rebuilds("balancing", fed, res.ok)
        replies = {}
        for n, reply in res.ok.items():
            c = reply.content.config_records[m.CONFIG]
            if c.get(SCHEMA_HASH) != fed.schema.hash or c.get(m.PHASE) != phase:
                failed[fed.sites[n]] = f"reply for schema {c.get(SCHEMA_HASH)!r} {c.get(m.PHASE)!r}"
                continue
            r = m.record_to_params(reply.content.array_records[m.CLUSTERS])
            replies[fed.sites[n]] = (r["values"], r["counts"])
        for n, why in res.failed.items():
            failed[fed.sites[n]] = why
            log.warning("balancing: site %r dropped: %s", fed.sites[n], why)
        if not replies:
            raise RuntimeError(f"balancing: no site answered ({failed})")
        return [replies[s] for s in sorted(replies)]  # the in-process runtime's order

    steps = run_balance(ask, k, fc.balance_iterations, fc.balance_rounds, fc.seed)
    return steps, failed


def embed(
    ex: Exchange,
    coord: Coordinator,
    fed: Federation,
    timeout: float,
    skip: set[str],
    steps: list[BalanceStep] | None = None,
) -> dict[str, Any]:
    """Each site embeds its own cells with the global model and the balancing ``steps``;
    returns ``{site: count}``.

    Sites in ``skip`` (those that dropped out of the last round) are not asked; they can
    embed later from the saved model (``scfedvi embed --model OUT/model ...``).
    """
    online = ex.online()
    targets = {
        n: train_content(coord, fed.schema.hash, coord.round)
        for n, s in fed.sites.items()
        if n in online and s not in skip
    }
    if steps:
        for rd in targets.values():
            rd[m.STEPS] = m.params_to_record(steps_to_arrays(steps))
    res = ex.ask(targets, m.EMBED, timeout)
    _log_rebuilds("embedding", fed, res.ok)
    out: dict[str, Any] = {
        fed.sites[n]: int(r.content.config_records[m.CONFIG][m.N_EMBEDDED])  # type: ignore[arg-type]
        for n, r in res.ok.items()
    }
    for n, why in res.failed.items():
        log.warning("embedding: site %r failed: %s", fed.sites[n], why)
        out[fed.sites[n]] = f"failed: {why}"
    out.update({s: "skipped: dropped out of the last round" for s in skip})
    return out


def save_model(
    directory: Path,
    schema: FederationSchema,
    cfg: RunConfig,
    app: AppSettings,
    coord: Coordinator,
    history: pd.DataFrame,
    steps: list[BalanceStep] | None = None,
) -> None:
    """The global model in :meth:`scfedvi.model.ScFedVI.save`'s format."""
    from scfedvi.model import ScFedVI

    model = ScFedVI(schema, cfg, layer=app.layer or None)
    model.params = coord.params
    model.history = history
    model.schedule, model.early_stopped = coord.schedule, coord.early_stopped
    model.set_balance_steps(list(steps or []))
    model.save(directory, overwrite=True)
