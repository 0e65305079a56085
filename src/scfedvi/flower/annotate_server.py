"""Federated scANVI on Flower, the server: :func:`annotate_run` (the ServerApp's run with
``annotate-from``) and :class:`FlowerAnnotate`, the Flower transport of
:func:`scfedvi.annotate.protocol.train_annotate` (the sites' side: :mod:`scfedvi.flower.annotate`).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, RecordDict

from scfedvi._constants import SCHEMA_HASH
from scfedvi.flower import messages as m
from scfedvi.flower.annotate import (
    ANNOTATE,
    LABEL_SUMS,
    LABELS,
    MODEL_DIR,
    PREDICT,
    PREDICTED,
    STEP,
    SUMMARY,
    TRAIN,
)

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.config import AnnotateConfig, RunConfig
    from scfedvi.federation.coordinator import Coordinator
    from scfedvi.flower.exchange import Exchange
    from scfedvi.flower.settings import AppSettings
    from scfedvi.flower.setup import Federation

log = logging.getLogger(__name__)


class AnnotateStageError(RuntimeError):
    """The scANVI stage cannot go on (a site could not answer its label counts)."""


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
