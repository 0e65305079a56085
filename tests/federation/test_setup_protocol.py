"""One setup protocol, two transports: the in-process runtime and the Flower ServerApp both
run :func:`scfedvi.federation.setup_protocol.run_setup`, with the same queries in the same
order, and agree on the schema. The Flower side runs its real ClientApp handlers and message
codec, carried by an in-memory exchange (no Flower processes)."""

from __future__ import annotations

import time

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.metadata import Metadata

from scfedvi.config import SitePolicy
from scfedvi.data.harmonize import harmonize
from scfedvi.federation import setup_protocol
from scfedvi.federation.setup_protocol import GENES, SUMMARY, SetupQuery, run_setup
from scfedvi.federation.setup_site import answer_setup
from scfedvi.flower import client_app
from scfedvi.flower import messages as m
from scfedvi.flower import setup as flower_setup
from scfedvi.flower.exchange import Replies
from scfedvi.flower.settings import AppSettings, default_run_config
from scfedvi.privacy.policy import PolicyRefusal
from synthetic import make_counts

N_TOP = 20


@pytest.fixture(scope="module")
def sites():
    """Three sites: lab-a and lab-b hold batches b0 and b1 (a second, pooled pass), lab-c holds
    its own batch and fewer genes (the universe is the intersection)."""
    c = make_counts(100, 40, n_batches=1, seed=3)[:, :34].copy()
    c.obs["batch"] = "c0"
    return {
        "lab-a": make_counts(150, 40, seed=1),
        "lab-b": make_counts(120, 40, seed=2),
        "lab-c": c,
    }


class InMemoryExchange:
    """:class:`scfedvi.flower.exchange.Exchange`'s ``ask``, calling the ClientApp handlers."""

    def __init__(self, nodes: dict[int, dict], run_config: dict) -> None:
        self.nodes, self.run_config = nodes, run_config
        self.handlers = {m.GENES: client_app.genes, m.SUMMARY: client_app.summary}

    def ask(self, contents, message_type, timeout, *, group_id=""):
        out = Replies()
        for n, content in contents.items():
            md = Metadata(
                run_id=11,
                message_id=f"m{time.monotonic_ns()}",
                src_node_id=0,
                dst_node_id=n,
                reply_to_message_id="",
                group_id=group_id,
                created_at=time.time(),
                ttl=3600.0,
                message_type=message_type,
            )
            ctx = Context(
                run_id=11,
                node_id=n,
                node_config=self.nodes[n],
                state=RecordDict(),
                run_config=self.run_config,
            )
            reply = self.handlers[message_type](Message(content=content, metadata=md), ctx)
            if reply.has_error():
                out.failed[n] = str(reply.error.reason)
            else:
                out.ok[n] = reply
        return out


@pytest.fixture
def flower(sites, tmp_path):
    nodes = {}
    for i, (name, a) in enumerate(sorted(sites.items(), reverse=True)):  # node ids not by name
        path = tmp_path / f"{name}.h5ad"
        a.write_h5ad(path)
        nodes[10 + i] = {"site": name, "data-path": str(path), "state-dir": str(tmp_path / name)}
    rc = default_run_config(n_top_genes=N_TOP) | {"out-dir": str(tmp_path / "out")}
    return InMemoryExchange(nodes, rc), AppSettings(n_top_genes=N_TOP)


@pytest.fixture
def spy(monkeypatch):
    """Record every run_setup call's queries: ``(step, sites asked, second pass)``."""
    calls: list[list[tuple]] = []

    def recording(ask, *args, **kw):
        seen: list[tuple] = []
        calls.append(seen)

        def traced(step, queries):
            replies = ask(step, queries)
            asked = sorted(replies) if queries is None else sorted(queries)
            second = queries is not None and any(q.pooled is not None for q in queries.values())
            seen.append((step, tuple(asked), second))
            return replies

        return run_setup(traced, *args, **kw)

    monkeypatch.setattr(setup_protocol, "run_setup", recording)
    return calls


def test_both_runtimes_run_the_same_setup_protocol(sites, flower, spy):
    ex, app = flower
    inproc = harmonize(dict(sorted(sites.items())), batch_key="batch", n_top_genes=N_TOP)
    schema, node_sites = flower_setup.harmonize(ex, set(ex.nodes), app, min_sites=3)
    assert len(spy) == 2, "each runtime orchestrates the setup through run_setup"
    assert spy[0] == spy[1]
    assert spy[0] == [
        (GENES, ("lab-a", "lab-b", "lab-c"), False),
        (SUMMARY, ("lab-a", "lab-b", "lab-c"), False),
        (SUMMARY, ("lab-a", "lab-b"), True),  # only the holders of the shared batches
    ]
    assert schema == inproc and schema.hash == inproc.hash
    assert schema.batches == ("b0", "b1", "c0") and schema.n_genes == N_TOP
    assert set(schema.genes) <= {f"g{j}" for j in range(34)}
    assert {ex.nodes[n]["site"] for n in node_sites} == set(node_sites.values()) == set(sites)


def test_a_site_that_drops_between_the_passes_stops_the_setup(sites):
    def ask(step, queries):
        out = {
            s: answer_setup(q or SetupQuery(step), sites[s], site=s, batch_key="batch")
            for s, q in (queries or {s: None for s in sites}).items()
        }
        if queries and any(q.pooled is not None for q in queries.values()):
            out.pop("lab-b")  # lab-b does not answer the pooled pass
        return out

    with pytest.raises(setup_protocol.SetupProtocolError, match=r"\['lab-b'\] did not answer"):
        run_setup(ask, list(sites), batch_key="batch", n_top_genes=N_TOP)


def test_the_site_answers_within_its_policy_in_the_one_site_side_path(sites):
    a = sites["lab-a"]
    universe = tuple(a.var_names)
    with pytest.raises(PolicyRefusal, match="label_key='cell_type' is not among"):
        answer_setup(
            SetupQuery(SUMMARY, genes=universe),
            a,
            site="lab-a",
            batch_key="batch",
            label_key="cell_type",
            policy=SitePolicy(),
        )
    inv = answer_setup(SetupQuery(GENES), a, site="lab-a", batch_key="batch")
    assert inv.genes == universe and inv.batch_counts == {"b0": 75, "b1": 75}


def test_a_node_cannot_file_its_summary_under_another_sites_name(sites, flower):
    """The Flower transport files a node's replies under the name it gave first: lab-b's
    node answering its summaries as 'lab-a' neither replaces lab-a's nor drops its own."""
    ex, app = flower
    honest = harmonize(dict(sorted(sites.items())), batch_key="batch", n_top_genes=N_TOP)
    answer = ex.ask

    def impersonating(contents, message_type, timeout, *, group_id=""):
        out = answer(contents, message_type, timeout, group_id=group_id)
        for n, reply in out.ok.items():
            if message_type == m.SUMMARY and ex.nodes[n]["site"] == "lab-b":
                reply.content.config_records[m.CONFIG][m.SITE] = "lab-a"
        return out

    ex.ask = impersonating
    schema, node_sites = flower_setup.harmonize(ex, set(ex.nodes), app, min_sites=3)
    assert schema == honest
    assert sorted(node_sites.values()) == ["lab-a", "lab-b", "lab-c"]
