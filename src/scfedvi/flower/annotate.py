"""Federated scANVI on Flower: the Flower transport of :mod:`scfedvi.annotate.protocol` and the
site's ``query.annotate`` handler.

With the run-config key ``annotate-from`` (a trained run's ``model`` folder) and
``annotate-label-key``, the ServerApp runs federated scANVI on that trained model
(:func:`annotate_run`), as the in-process ``scfedvi annotate --model RUN/model`` continues a
trained run: a run of its own, so each site admits it against its own budgets
(``SitePolicy.max_runs``; a run's balancing queries are budgeted per run, so the scANVI stage's
balancing could not follow the scVI stage's in one run), and the federation can be annotated
later, again with another label column, without training scVI again. The schema is the trained
model's: the sites check that their data fits it (the setup round's ``schema`` step), and
scANVI starts from its weights (as scvi-tools' ``SCANVI.from_scvi_model``). The orchestration is
:func:`~scfedvi.annotate.protocol.label_schema` and
:func:`~scfedvi.annotate.protocol.train_annotate`, the functions the in-process
:class:`~scfedvi.annotate.ScFedANVI` calls; only the carrying differs:

- ``labels``: each site's label counts (:func:`~scfedvi.annotate.site_steps.answer_labels`,
  within its policy's allowed label keys);
- ``train``: a round (:func:`scfedvi.flower.server_app.train_round` with this message type);
- balancing: the scVI balancing messages (:func:`scfedvi.flower.server_app.balance`) with the
  encoder's parameters (the embedding depends on them only);
- ``summary``: each site's per-label and overall sums of its latent codes;
- ``predict``: each site writes its predictions into ``<state-dir>/<site>.annotated.h5ad``
  (its embedded file with ``obs['scfedvi_label']``, ``obs['scfedvi_label_confidence']``,
  ``obs['scfedvi_label_novelty']`` and ``obsm['X_scFedANVI']``) and replies with counts.

The server saves the model in ``<out-dir>/annotate-model`` (:meth:`ScFedANVI.save`), for
``scfedvi embed --model DIR --input new.h5ad --predict``. Torch is imported inside functions.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict

from scfedvi._constants import SCHEMA_HASH
from scfedvi.flower import messages as m

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.config import AnnotateConfig, RunConfig
    from scfedvi.federation.coordinator import Coordinator
    from scfedvi.flower.exchange import Exchange
    from scfedvi.flower.node import NodeSettings
    from scfedvi.flower.settings import AppSettings
    from scfedvi.flower.setup import Federation

log = logging.getLogger(__name__)

#: The message type of every step of the scANVI stage (the step is in the config).
ANNOTATE = "query.annotate"
STEP, LABELS, TRAIN, SUMMARY, PREDICT = "annotate-step", "labels", "train", "summary", "predict"
#: Where the server writes the scANVI model (inside ``out-dir``).
MODEL_DIR = "annotate-model"
#: Array names of a site's summary reply.
LABEL_SUMS = ("label-counts", "label-sums", "label-squares")
MOMENTS = ("moments-n", "moments-sum", "moments-outer")
#: A site's counts after its predictions (:func:`~scfedvi.annotate.site_steps.write_predictions`).
PREDICTED = ("n-predicted", "n-low-confidence", "n-novel")


class AnnotateStageError(RuntimeError):
    """The scANVI stage cannot go on (a site could not answer its label counts)."""


def annotated_path(node: NodeSettings):
    """The site's AnnData with its predictions, in its state folder."""
    return node.state_dir / f"{node.site}.annotated.h5ad"


# -- the server -------------------------------------------------------------------------------
def annotate_run(grid: Any, cfg: RunConfig, app: AppSettings, annotate: AnnotateConfig):
    """The ServerApp's run with ``annotate-from``: the setup round's schema step with the
    trained model's schema, then :func:`run_annotate_stage`; what ``result.json`` reports."""
    import time
    from pathlib import Path

    from scfedvi.flower.exchange import Exchange
    from scfedvi.flower.setup import setup
    from scfedvi.model import ScFedVI

    if not app.annotate_label_key:
        raise ValueError(
            "annotate-from is set but annotate-label-key is not: name the obs column of the "
            "sites' cell-type labels (run config annotate-label-key='cell_type')"
        )
    base = ScFedVI.load(app.annotate_from)
    run, model = _flat(cfg.to_dict()), _flat(base.config.to_dict())
    differ = sorted(k for k in run if run[k] != model.get(k))
    if differ:
        raise ValueError(
            f"the run config differs from the trained model's ({app.annotate_from}) in "
            f"{differ}: the sites train with the run config, so pass the model's settings "
            "(its config.json) in the run config"
        )
    t0 = time.perf_counter()
    ex = Exchange(grid, Path(app.payload_log).expanduser() if app.payload_log else None)
    fed = setup(ex, app, cfg.federation.min_sites, base.schema)
    assert base.params is not None
    out = run_annotate_stage(ex, base.params, fed, cfg, app, annotate, app.round_timeout)
    return {**out, "sites": sorted(fed.sites.values()), "seconds": time.perf_counter() - t0}


def _flat(d: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{sec}.{k}": v for sec, part in d.items() for k, v in dict(part).items()}


def run_annotate_stage(
    ex: Exchange,
    init_params: Mapping[str, Any],
    fed: Federation,
    cfg: RunConfig,
    app: AppSettings,
    annotate: AnnotateConfig,
    timeout: float,
) -> dict[str, Any]:
    """The scANVI stage over Flower from the trained scFedVI ``init_params`` (the protocol's
    functions over :class:`FlowerAnnotate`); what ``result.json`` reports of it."""
    from scfedvi.annotate.model import ScFedANVI
    from scfedvi.annotate.protocol import label_schema, train_annotate
    from scfedvi.flower.setup import Federation

    label_key, sites = app.annotate_label_key, dict(fed.sites)
    ask = _Asker(ex, fed.schema.hash, label_key, annotate, timeout)
    replies = ask(LABELS, {n: RecordDict() for n in sites}, strict=True)
    counts = {
        sites[n]: dict(zip(map(str, c["labels"]), map(int, c["counts"]), strict=True))
        for n, (c, _) in replies.items()
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            schema = label_schema(
                counts,
                fed.schema,
                label_key=label_key,
                unlabeled_category=annotate.unlabeled_category,
            )
        finally:  # in the server's log, also when no site has a labelled cell
            for w in caught:
                log.warning("annotate: %s", w.message)
    ask.labels = schema.labels
    afed = Federation(schema, {n: s for n, s in sites.items() if s in counts}, fed.n_cells)
    transport = FlowerAnnotate(ask, afed, fed, cfg, annotate, timeout)
    n_cells = {s: fed.n_cells[s] for s in afed.sites.values()}
    trained = train_annotate(transport, schema, dict(init_params), cfg, annotate, n_cells)
    pred = ask(PREDICT, transport.params_content(trained.params, trained.balance, trained))
    model = ScFedANVI(schema, cfg, annotate, layer=app.layer or None)
    model.use_trained(trained)
    model.save(app.out_path / MODEL_DIR, overwrite=True)
    return {
        "label_key": label_key,
        "labels": list(schema.labels or ()),
        "rounds": len({row.get("round") for row in trained.history}),
        "warnings": [str(w.message) for w in caught],
        "predicted": {
            afed.sites[n]: {k: int(c[k]) for k in PREDICTED} for n, (c, _) in pred.items()
        },
        "model": str(app.out_path / MODEL_DIR),
    }


class _Asker:
    """Sends one step of the stage to sites and returns ``{node: (config, arrays)}``."""

    def __init__(
        self,
        ex: Exchange,
        scvi_hash: str,
        label_key: str,
        annotate: AnnotateConfig,
        timeout: float,
    ) -> None:
        self.ex, self.scvi_hash, self.label_key, self.timeout = ex, scvi_hash, label_key, timeout
        self.annotate, self.schema_hash = annotate, scvi_hash
        self.labels: tuple[str, ...] | None = None

    def config(self, step: str, r: int = 0, **extra: Any) -> ConfigRecord:
        """What every message of the stage carries: how the site rebuilds the labelled schema
        and checks it against the hash, and the scANVI settings."""
        return m.round_config(
            self.schema_hash,
            r,
            **{
                STEP: step,
                "scvi-schema-hash": self.scvi_hash,
                "label-key": self.label_key,
                "annotate": json.dumps(asdict(self.annotate)),
                **({"labels": list(self.labels)} if self.labels else {}),
                **extra,
            },
        )

    def __call__(
        self, step: str, content: Mapping[int, RecordDict], strict: bool = False
    ) -> dict[int, tuple[Any, dict[str, dict[str, Any]]]]:
        for rd in content.values():
            rd[m.CONFIG] = self.config(step)
        res = self.ex.ask(dict(content), ANNOTATE, self.timeout, group_id=f"annotate-{step}")
        if res.failed and strict:
            why = "; ".join(f"node {n}: {r}" for n, r in sorted(res.failed.items()))
            raise AnnotateStageError(f"annotate ({step}): sites could not answer: {why}")
        for n, why in res.failed.items():
            log.warning("annotate (%s): node %s failed: %s", step, n, why)
        return {
            n: (
                r.content.config_records[m.CONFIG],
                {k: m.record_to_params(a) for k, a in r.content.array_records.items()},
            )
            for n, r in res.ok.items()
        }


class _EncoderView:
    """The scANVI coordinator as scVI's balancing sees it: the VAE's parameters only (the
    encoder gives the embedding; the classifier and the ``z2`` layers are not the VAE's)."""

    def __init__(self, coord: Coordinator, keys: set[str]) -> None:
        self.coord, self.keys = coord, keys

    @property
    def round(self) -> int:
        return self.coord.round

    def broadcast(self) -> tuple[dict[str, Any], None]:
        params, _ = self.coord.broadcast()
        return {k: v for k, v in params.items() if k in self.keys}, None


class FlowerAnnotate:
    """The Flower transport of :func:`~scfedvi.annotate.protocol.train_annotate`."""

    def __init__(
        self,
        ask: _Asker,
        afed: Federation,
        fed: Federation,
        cfg: RunConfig,
        annotate: AnnotateConfig,
        timeout: float,
    ) -> None:
        self.ask, self.afed, self.fed, self.cfg, self.timeout = ask, afed, fed, cfg, timeout
        self.annotate = annotate
        ask.schema_hash = afed.schema.hash
        self.coord: Any = None

    def start(self, coordinator: Coordinator) -> None:
        self.coord = coordinator

    def train(self, r: int, params: Any, control: Any) -> tuple[list[Any], dict[str, str]]:
        from scfedvi.flower.server_app import train_round

        extra = {
            k: v for k, v in self.ask.config(TRAIN, r).items() if k not in (SCHEMA_HASH, m.ROUND)
        }
        updates, failed = train_round(
            self.ask.ex, self.coord, self.afed, r, self.timeout, ANNOTATE, extra
        )
        log.info("annotate: round %d: %d sites, failed %s", r + 1, len(updates), dict(failed))
        return updates, failed

    def train_secure(self, r: int, params: Any, control: Any) -> dict[str, str]:
        raise AssertionError("train_annotate refuses secure aggregation before any round")

    def balance(self, params: Any) -> list[Any]:
        from scfedvi.annotate.protocol import annotate_run_config
        from scfedvi.flower.server_app import balance
        from scfedvi.train.local import build_module

        s = self.fed.schema
        keys = set(build_module(s.n_genes, s.n_batches, self.cfg.model).state_dict())
        cfg = annotate_run_config(self.cfg, self.annotate)
        steps, failed = balance(
            self.ask.ex,
            _EncoderView(self.coord, keys),  # type: ignore[arg-type]
            self.fed,
            cfg,
            self.timeout,
            set(),
        )
        for site, why in failed.items():
            log.warning("annotate: balancing: site %r dropped: %s", site, why)
        return steps

    def params_content(self, params: Any, steps: Sequence[Any], trained: Any = None):
        """Each site's message: the parameters, the balancing steps, and (``trained``) the
        label centroids and pooled latent moments."""
        import numpy as np

        from scfedvi.federation.balance import steps_to_arrays

        out = {}
        for n in self.afed.sites:
            rd = RecordDict({m.ARRAYS: m.params_to_record(params)})
            if steps:
                rd[m.STEPS] = m.params_to_record(steps_to_arrays(steps))
            if trained is not None:
                extra = {}
                if trained.label_centroids is not None:
                    extra["centroids"], extra["spread"] = trained.label_centroids
                if trained.latent_moments is not None:
                    extra["mean"], extra["cov"] = trained.latent_moments
                rd["annotate"] = m.params_to_record({k: np.asarray(v) for k, v in extra.items()})
            out[n] = rd
        return out

    def summaries(self, params: Any, steps: Sequence[Any]) -> list[Any]:
        replies = self.ask(SUMMARY, self.params_content(params, steps))
        out = []
        for n in sorted(replies, key=lambda n: self.afed.sites[n]):  # the in-process order
            a = replies[n][1].get("summary", {})
            per_label = tuple(a[k] for k in LABEL_SUMS) if LABEL_SUMS[0] in a else None
            out.append((per_label, (float(a["moments-n"]), a["moments-sum"], a["moments-outer"])))
        return out


# -- the site ---------------------------------------------------------------------------------
def site_step(msg: Message, node: NodeSettings, cfg: RunConfig, app_: AppSettings) -> RecordDict:
    """One step of the scANVI stage at the site (registered as ``query.annotate``)."""
    from scfedvi.annotate.site_steps import answer_labels
    from scfedvi.config import AnnotateConfig

    c = msg.content.config_records[m.CONFIG]
    annotate = AnnotateConfig(**json.loads(str(c["annotate"])))
    step = str(c[STEP])
    reply: dict[str, Any] = {m.SITE: node.site}
    if step == LABELS:
        counts = answer_labels(
            node.read(app_.batch_key),
            site=node.site,
            label_key=str(c["label-key"]),
            unlabeled_category=annotate.unlabeled_category,
            policy=node.policy,
        )
        reply.update({"labels": list(counts), "counts": [int(v) for v in counts.values()]})
        return RecordDict({m.CONFIG: ConfigRecord(reply)})
    worker, schema, sd = _annotate_worker(msg, node, cfg, annotate)
    arrays = {k: m.record_to_params(a) for k, a in msg.content.array_records.items()}
    if step == TRAIN:
        return _train(msg, node, worker, schema.hash, arrays)
    from scfedvi.federation.balance import steps_from_arrays

    steps = steps_from_arrays(arrays.get(m.STEPS, {}))
    rd = RecordDict()
    if step == SUMMARY:
        from scfedvi.annotate.site_steps import answer_summary

        per_label, (n, s1, s2) = answer_summary(worker, arrays[m.ARRAYS], steps, worker.n_labels)
        sums = dict(zip(MOMENTS, (n, s1, s2), strict=True))
        if per_label is not None:
            sums.update(zip(LABEL_SUMS, per_label, strict=True))
        rd["summary"] = m.params_to_record({k: _array(v) for k, v in sums.items()})
    elif step == PREDICT:
        reply.update(_predict(node, app_, worker, schema, sd, annotate, arrays, steps))
    else:
        raise ValueError(f"annotate: unknown step {step!r}")
    rd[m.CONFIG] = m.round_config(schema.hash, int(c[m.ROUND]), **reply)  # type: ignore[arg-type]
    return rd


def _array(v: Any):
    import numpy as np

    return np.asarray(v, dtype=np.float64)


def _annotate_worker(msg: Message, node: NodeSettings, cfg: RunConfig, annotate: AnnotateConfig):
    import os

    import torch

    from scfedvi.annotate.model import annotate_worker
    from scfedvi.annotate.protocol import annotate_run_config
    from scfedvi.data.errors import SchemaMismatchError

    torch.set_num_threads(max(1, int(os.environ.get("SCFEDVI_THREADS", "1"))))  # as training
    c = msg.content.config_records[m.CONFIG]
    scvi = node.load_schema(str(c["scvi-schema-hash"]))
    labels = tuple(str(x) for x in c["labels"])  # type: ignore[union-attr]
    schema = replace(scvi, labels=labels, label_key=str(c["label-key"]))
    if schema.hash != c[SCHEMA_HASH]:
        raise SchemaMismatchError(
            f"site {node.site!r}: the labelled schema {schema.short_hash} does not match the "
            f"coordinator's {str(c[SCHEMA_HASH])[:12]}; the run's schema changed: start it again"
        )
    sd, log_factorial = node.site_data(schema, cfg.train.batch_size)
    run_cfg = annotate_run_config(cfg, annotate)
    worker = annotate_worker(node.site, sd, schema, run_cfg, annotate, policy=node.policy)
    worker.labelled_data.set_log_factorial(log_factorial)
    return worker, schema, sd


def _train(msg: Message, node: NodeSettings, worker: Any, schema_hash: str, arrays) -> RecordDict:
    from scfedvi.federation.payload import check_update

    c = msg.content.config_records[m.CONFIG]
    r = int(c[m.ROUND])  # type: ignore[arg-type]
    state = node.state_dir / f"{node.site}.annotate-round-{{}}.pt"
    if r > 0 and (prev := state.with_name(state.name.format(r - 1))).exists():
        worker.load_state(prev)
    params, control = arrays[m.ARRAYS], arrays.get(m.CONTROL)
    upd = worker.fit(params, r, control, m.config_to_work(c))
    # only the parameters the coordinator sent go back (not the fixed prior p(y))
    upd = replace(upd, params={k: v for k, v in upd.params.items() if k in params})
    shapes = {k: v.shape for k, v in params.items()}
    check_update(upd, shapes, control_shapes=control and {k: v.shape for k, v in control.items()})
    worker.save_state(state.with_name(state.name.format(r)))
    state.with_name(state.name.format(r - 1)).unlink(missing_ok=True)
    counts = m.batch_counts_to_list(upd.batch_counts)
    out = RecordDict(
        {
            m.ARRAYS: m.params_to_record(upd.params),
            m.METRICS: m.metrics_to_record(upd.metrics, upd.num_examples),
            m.CONFIG: m.round_config(schema_hash, r, site=node.site, **{m.BATCH_COUNTS: counts}),
        }
    )
    if upd.control_delta is not None:
        out[m.CONTROL] = m.params_to_record(upd.control_delta)
    return out


def _predict(node, app_, worker, schema, sd, annotate, arrays, steps) -> dict[str, int]:
    """Predict the site's cells, write them into its annotated file; the counts."""
    from scfedvi.annotate.site_steps import write_predictions
    from scfedvi.data.loaders import read_site_h5ad

    a = arrays.get("annotate", {})
    moments = (a["mean"], a["cov"]) if "mean" in a else None
    centroids = (a["centroids"], a["spread"]) if "centroids" in a else None
    pooled = annotate.classifier_stats == "pooled"
    z, probs = worker.predict(arrays[m.ARRAYS], steps, moments if pooled else None)
    emb = node.embedded_path
    adata = read_site_h5ad(emb, node.site) if emb.exists() else node.read(app_.batch_key)
    labels = (schema.labels or ())[:-1]
    counts = write_predictions(
        adata,
        sd.obs_names,
        z,
        probs,
        labels=labels,
        annotate=annotate,
        centroids=centroids,
        site=node.site,
    )
    adata.uns["scfedvi_annotate"] = {"schema_hash": schema.hash, "site": node.site}
    path = annotated_path(node)
    tmp = path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp)
    tmp.replace(path)
    return counts
