"""One round loop, two transports: the in-process runtime and the Flower ServerApp both run
:func:`scfedvi.federation.rounds.run_rounds` (broadcast, the sites' updates, the choice of
aggregation, early stopping); each only carries a round to its sites."""

from __future__ import annotations

import numpy as np
import pytest

from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig
from scfedvi.data.schema import FederationSchema
from scfedvi.federation import rounds
from scfedvi.federation.aggregate import SiteUpdate
from scfedvi.federation.coordinator import Coordinator
from scfedvi.federation.inprocess import InProcessRounds
from scfedvi.flower import server_app
from scfedvi.flower.server_app import FlowerRounds
from scfedvi.flower.settings import AppSettings
from scfedvi.flower.setup import Federation
from scfedvi.model import ScFedVI
from synthetic import make_counts

CFG = RunConfig(
    model=ModelConfig(n_hidden=16, n_latent=4),
    train=TrainConfig(batch_size=32, local_epochs=1),
    federation=FederationConfig(n_rounds=2),
)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = rounds.run_rounds

    def recording(coordinator, transport, *args, **kw):
        calls.append(type(transport))
        if isinstance(transport, FlowerRounds):  # no SuperLink here: the call is what counts
            raise StopIteration("spied")
        return real(coordinator, transport, *args, **kw)

    monkeypatch.setattr(rounds, "run_rounds", recording)
    return calls


def test_both_runtimes_train_through_run_rounds(spy, monkeypatch, tmp_path):
    adata = make_counts(120, 30)
    adata.obs["lab"] = np.where(np.arange(adata.n_obs) < 60, "lab-a", "lab-b")
    model = ScFedVI.from_sites(
        adata, split_key="lab", batch_key="batch", n_top_genes=None, config=CFG
    )
    model.train(progress=False)
    assert spy == [InProcessRounds] and model.coordinator.round == 2

    fed = Federation(model.schema, {1: "lab-a", 2: "lab-b"}, {"lab-a": 60, "lab-b": 60})
    monkeypatch.setattr(server_app, "setup", lambda *a, **k: fed)
    app = AppSettings(out_dir=str(tmp_path / "out"))
    app.out_path.mkdir()  # (the ServerApp's main makes it)
    with pytest.raises(StopIteration, match="spied"):
        server_app.run_federation(None, CFG, app)  # type: ignore[arg-type]
    assert spy == [InProcessRounds, FlowerRounds]


class Scripted:
    """A transport whose sites send back the broadcast parameters (and one site drops out)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def train(self, r, params, control):
        self.calls.append(("train", r))
        upd = SiteUpdate("a", dict(params), 10, {0: 10}, {"loss": 1.0})
        return [upd], {"b": "no reply"}

    def train_secure(self, r, params, control):
        raise AssertionError("not under secure aggregation")


def test_run_rounds_aggregates_each_round_and_records_the_dropped_site():
    schema = FederationSchema(genes=("g0", "g1", "g2"), batches=("x",), batch_key="batch")
    coord = Coordinator(schema.n_genes, schema.n_batches, CFG)
    coord.resolve_schedule({"a": 100, "b": 100})
    t, seen = Scripted(), []
    rounds.run_rounds(coord, t, on_round=lambda r, failed, s: seen.append((r, dict(failed))))
    assert t.calls == [("train", 0), ("train", 1)] and coord.round == 2
    assert seen == [(0, {"b": "no reply"}), (1, {"b": "no reply"})]
    status = [(h["round"], h["site"], h["status"]) for h in coord.history]
    assert status == [(0, "a", "ok"), (0, "b", "dropped"), (1, "a", "ok"), (1, "b", "dropped")]
