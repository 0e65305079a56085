"""The Flower app's scANVI run without Flower processes: the ServerApp's
:func:`~scfedvi.flower.annotate_server.annotate_run` over a grid that hands each message to the
ClientApp in this process (the real handlers, node configs and message records). Fast; the
deployment test (tests/flower/test_annotate_deployment.py) runs the same over SuperLink and
SuperNodes.

Checked: the stage's model equals the in-process :class:`~scfedvi.annotate.ScFedANVI` run; the
site's policy allow-list for the label column applies; bad input (a site whose label column
is missing) is an error naming the site, the column and the fix.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.metadata import Metadata

from scfedvi.annotate import LABEL_KEY, AnnotateConfig, ScFedANVI
from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig
from scfedvi.data.errors import SiteDataError
from scfedvi.flower import client_app
from scfedvi.flower.annotate import MODEL_DIR
from scfedvi.flower.annotate_server import AnnotateStageError, annotate_run
from scfedvi.flower.settings import annotate_from_flower, run_config_from_flower
from scfedvi.model import ScFedVI
from synthetic import make_counts

SITES = ("a", "b", "c")
CFG = RunConfig(
    model=ModelConfig(n_hidden=16, n_latent=4),
    train=TrainConfig(batch_size=32, local_epochs=1),
    federation=FederationConfig(
        n_rounds=1, seed=0, min_sites=2, balance_clusters=2, balance_iterations=1
    ),
)
RUN = {
    "num-server-rounds": 1,
    "local-epochs": 1,
    "n-hidden": 16,
    "n-latent": 4,
    "batch-size": 32,
    "min-sites": 2,
    "balance-clusters": 2,
    "balance-iterations": 1,
    "n-top-genes": 0,
    "batch-key": "batch",
    "annotate-label-key": "ct",
    "annotate-num-server-rounds": 1,
    "annotate-local-epochs": 1,
    "wait-timeout": 5.0,
}


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """What a ServerApp process is told by Flower (messages are stamped with it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class LoopbackGrid:
    """A Flower ``Grid`` whose nodes are ClientApp calls in this process."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict) -> None:
        self.node_configs, self.run_config = node_configs, run_config
        self.replies: dict[str, Message] = {}
        self.ids = itertools.count()

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self.ids)}"
            md = Metadata(
                run_id=7,
                message_id=mid,
                src_node_id=0,
                dst_node_id=msg.metadata.dst_node_id,
                reply_to_message_id="",
                group_id=msg.metadata.group_id,
                created_at=0.0,
                ttl=3600.0,
                message_type=msg.metadata.message_type,
            )
            node = msg.metadata.dst_node_id
            ctx = Context(7, node, self.node_configs[node], RecordDict(), self.run_config)
            self.replies[mid] = client_app.app(Message(content=msg.content, metadata=md), ctx)
            ids.append(mid)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        return [self.replies.pop(i) for i in ids if i in self.replies]


def _sites(
    tmp: Path, drop_label_at: str | None = None, unlabelled: bool = False
) -> dict[str, ad.AnnData]:
    adata = make_counts(240, 30, n_batches=3, n_types=3, seed=2)
    where = np.repeat(np.array(SITES), 80)
    adata.obs["ct"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[where == "c", "ct"] = "Unknown"  # site c has no labels
    adata.obs.loc[(where == "b") & (adata.obs["ct"] == "t0"), "ct"] = "T0 "  # b's name for t0
    sites = {s: adata[where == s].copy() for s in SITES}
    if drop_label_at:
        del sites[drop_label_at].obs["ct"]
    for a in sites.values() if unlabelled else ():
        a.obs["ct"] = "Unknown"
    tmp.mkdir(parents=True, exist_ok=True)
    for s, a in sites.items():
        a.write_h5ad(tmp / f"{s}.h5ad")
    return sites


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The sites and the scFedVI model trained on them in process, saved."""
    d = tmp_path_factory.mktemp("trained")
    sites = _sites(d / "data")
    base = ScFedVI.from_sites(sites, batch_key="batch", n_top_genes=None, config=CFG)
    base.train(progress=False)
    base.save(d / "model")
    return d, base


def _run(tmp: Path, model: Path, node_extra: dict | None = None, **run) -> dict:
    nodes = {
        i + 1: {
            "site": s,
            "data-path": str(tmp / f"{s}.h5ad"),
            "state-dir": str(tmp / "state"),
            "label-key": "ct",
            **(node_extra or {}),
        }
        for i, s in enumerate(SITES)
    }
    rc = {**RUN, "out-dir": str(tmp / "out"), "annotate-from": str(model), **run}
    cfg, settings = run_config_from_flower(rc)
    settings.out_path.mkdir(parents=True, exist_ok=True)
    return annotate_run(LoopbackGrid(nodes, rc), cfg, settings, annotate_from_flower(rc))


def test_flower_run_equals_in_process(trained, tmp_path):
    d, base = trained
    stage = _run(d / "data", d / "model", **{"out-dir": str(tmp_path)})
    assert stage["labels"] == ["T0 ", "t0", "t1", "t2", "Unknown"]
    assert sorted(stage["predicted"]) == list(SITES)
    # the coordinator's warnings are in the run's result: site c has no labelled cell, and
    # two names differ only by case or whitespace (both shown, with their sites; kept apart)
    assert any("site 'c': every cell of obs['ct'] is 'Unknown'" in w for w in stage["warnings"])
    assert any(
        "differ only by case or whitespace: 'T0 ' at ['b']; 't0' at ['a']" in w
        for w in stage["warnings"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        anvi = ScFedANVI.from_scfedvi(
            base, label_key="ct", annotate=AnnotateConfig(n_rounds=1, local_epochs=1)
        )
    anvi.train()
    model = ScFedANVI.load(tmp_path / MODEL_DIR)
    assert model.schema.hash == anvi.schema.hash
    for k, v in anvi.params.items():
        np.testing.assert_allclose(model.params[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    for s in SITES:
        got = ad.read_h5ad(d / "data" / "state" / f"{s}.annotated.h5ad")
        anvi.predict(site=s)
        assert (got.obs[LABEL_KEY] == anvi.sites[s].obs[LABEL_KEY]).all(), s


def test_label_key_outside_the_site_policy_is_refused(trained, tmp_path):
    d, _ = trained
    with pytest.raises(AnnotateStageError, match=r"site 'a' refuses.*'ct'.*allowed label keys"):
        _run(
            d / "data", d / "model", node_extra={"label-key": "other"}, **{"out-dir": str(tmp_path)}
        )


def test_missing_label_column_names_site_column_and_fix(trained, tmp_path):
    d, _ = trained
    _sites(tmp_path, drop_label_at="b")
    with pytest.raises(AnnotateStageError, match=r"site 'b'.*obs\['ct'\].*missing; add it"):
        _run(tmp_path, d / "model")


def test_run_config_must_match_the_trained_model(trained, tmp_path):
    d, _ = trained
    with pytest.raises(ValueError, match=r"differs from the trained model's.*'train.local_epochs'"):
        _run(d / "data", d / "model", **{"local-epochs": 3, "out-dir": str(tmp_path)})


def test_no_labelled_cell_at_any_site_names_the_column_and_fix(trained, tmp_path):
    d, _ = trained
    _sites(tmp_path, unlabelled=True)
    with pytest.raises(
        SiteDataError, match=r"no site has a labelled cell.*obs\['ct'\].*label some"
    ):
        _run(tmp_path, d / "model")
