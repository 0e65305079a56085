"""Federated scANVI on Flower: the site's ``query.annotate`` handler (:func:`site_step`) and the
protocol's names; the server's side is :mod:`scfedvi.flower.annotate_server`.

With the run-config key ``annotate-from`` (a trained run's ``model`` folder) and
``annotate-label-key``, the ServerApp runs federated scANVI on that trained model
(:func:`~scfedvi.flower.annotate_server.annotate_run`), as the in-process ``scfedvi annotate
--model RUN/model`` continues a trained run: a run of its own, so each site admits it against its own budgets
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
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict

from scfedvi._constants import SCHEMA_HASH
from scfedvi.flower import messages as m

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.config import AnnotateConfig, RunConfig
    from scfedvi.flower.node import NodeSettings
    from scfedvi.flower.settings import AppSettings

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


def annotated_path(node: NodeSettings):
    """The site's AnnData with its predictions, in its state folder."""
    return node.state_dir / f"{node.site}.annotated.h5ad"


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
