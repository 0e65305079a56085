"""The schedule over Flower messages, without processes: a site reports its cells with the
schema check, and trains the local work the round's message names (one code path with the
in-process runtime: SiteWorker.fit with the coordinator's work)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from scfedvi._constants import SCHEMA_HASH
from scfedvi.federation.coordinator import Coordinator
from scfedvi.flower import messages as m
from scfedvi.flower.node import NodeSettings
from scfedvi.flower.settings import AppSettings

pytestmark = pytest.mark.flower


def test_work_round_trips_through_the_round_config():
    for work in ((20, None), (None, 317)):
        c = m.round_config("h", 0, **m.work_to_config(work))
        assert m.config_to_work(c) == work
    assert m.config_to_work(m.round_config("h", 0)) is None


def test_a_site_reports_its_cells_and_trains_the_work_it_is_sent(site_files, tmp_path):
    import anndata as ad
    from flower_sites import N_TOP, run_config

    from scfedvi.data.harmonize import harmonize
    from scfedvi.flower import client_app

    sites = {s: ad.read_h5ad(p) for s, p in sorted(site_files.paths.items())}
    schema = harmonize(sites, batch_key="batch", n_top_genes=N_TOP)
    node = NodeSettings("site-a", site_files.paths["site-a"], tmp_path / "state")
    cfg = run_config()
    msg = SimpleNamespace(
        content=RecordDict(
            {m.CONFIG: ConfigRecord({"schema": schema.to_json(), SCHEMA_HASH: schema.hash})}
        )
    )
    reply = client_app.schema.__wrapped__(msg, node, cfg, AppSettings())
    n_cells = int(reply.config_records[m.CONFIG][m.N_CELLS])
    assert n_cells == sites["site-a"].n_obs

    coord = Coordinator(schema.n_genes, schema.n_batches, cfg, schema_hash=schema.hash)
    coord.resolve_schedule({"site-a": n_cells, "site-b": sites["site-b"].n_obs})
    for work in ((None, 3), (2, None)):
        params, _ = coord.broadcast()
        content = RecordDict(
            {
                m.ARRAYS: m.params_to_record(params),
                m.CONFIG: m.round_config(schema.hash, 0, **m.work_to_config(work)),
            }
        )
        msg = SimpleNamespace(content=content, metadata=SimpleNamespace(run_id=1))
        out = client_app.train.__wrapped__(msg, node, cfg, AppSettings())
        steps = float(out.metric_records[m.METRICS]["steps"])
        n_train = int(np.ceil(cfg.train.train_size * n_cells))
        per_epoch = -(-n_train // cfg.train.batch_size)
        assert steps == (work[1] if work[1] is not None else work[0] * per_epoch)
