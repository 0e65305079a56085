"""A site's warm worker (:mod:`scfedvi.flower.warm`, :mod:`scfedvi.flower.site_worker`)
without Flower processes: its reply equals the cold reply, it is never used when it is not
provably this run's worker, it is restarted once, and it exits on its own."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flower_sites import N_TOP, SiteFiles, flower_run_config, run_config
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_to_proto

from handler_messages import handler_message
from scfedvi._constants import SCHEMA_HASH
from scfedvi.flower import client_app, warm
from scfedvi.flower import messages as m
from scfedvi.flower.settings import default_run_config

RUN = 4242


@pytest.fixture(scope="module")
def site(site_files: SiteFiles, tmp_path_factory: pytest.TempPathFactory):
    """One site that answered the setup round: its node config, run config and schema."""
    import anndata as ad

    from scfedvi.data.harmonize import harmonize

    d = tmp_path_factory.mktemp("warm")
    data = d / "site-a.h5ad"
    shutil.copy(site_files.paths["site-a"], data)
    schema = harmonize({"site-a": ad.read_h5ad(data)}, batch_key="batch", n_top_genes=N_TOP)
    node_config = {"site": "site-a", "data-path": str(data), "state-dir": str(d / "state")}
    rc = default_run_config() | flower_run_config(d / "out")
    content = {m.CONFIG: ConfigRecord({"schema": schema.to_json(), SCHEMA_HASH: schema.hash})}
    reply = client_app.answer(
        client_app.HANDLERS["schema"],
        handler_message(content, m.SCHEMA, RUN),
        _ctx(node_config, rc),
    )
    assert isinstance(reply, RecordDict), reply
    return node_config, rc, schema, d


def _ctx(node_config: dict, rc: dict, run_id: int = RUN) -> Context:
    return Context(
        run_id=run_id, node_id=1, node_config=node_config, state=RecordDict(), run_config=rc
    )


def _train_message(schema, message_type: str = m.TRAIN, run_id: int = RUN) -> Message:
    from scfedvi.federation.coordinator import Coordinator

    coord = Coordinator(schema.n_genes, schema.n_batches, run_config(), schema_hash=schema.hash)
    coord.resolve_schedule({"site-a": 150})
    params, _ = coord.broadcast()
    work = m.work_to_config(coord.work("site-a"))
    content = {
        m.ARRAYS: m.params_to_record(params),
        m.CONFIG: m.round_config(schema.hash, 0, **work),
    }
    return handler_message(content, message_type, run_id)


def _wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what} after {timeout} s")
        time.sleep(0.1)


def _without_seconds(rd: RecordDict):
    """The reply's protobuf, its timing metrics left out (they differ between two runs)."""
    proto = recorddict_to_proto(rd)
    for item in proto.items:
        if item.HasField("metric_record"):
            keep = [e for e in item.metric_record.items if "seconds" not in e.key]
            del item.metric_record.items[:]
            item.metric_record.items.extend(keep)
    return proto


def test_warm_reply_equals_the_cold_reply_and_the_worker_ends_with_the_run(site):
    """The first message starts the worker and is answered cold; the next ones go to the
    worker, whose replies (training update, embedding) equal the cold replies bit for bit;
    the ClientApp's process imports no torch for them; a message of another run is refused;
    the worker exits after the run's final message (the embedding) and removes its socket
    and token."""
    node_config, rc, schema, d = site
    files = warm.WorkerFiles.for_run(Path(node_config["state-dir"]), "site-a", RUN)
    msg = _train_message(schema)
    ctx = _ctx(node_config, rc)
    assert warm.ask("train", msg, ctx, "site-a", files.directory.parent, watch=os.getpid()) is None
    rec = files.read_record()
    assert rec is not None and warm.alive(rec["pid"], rec["ticks"])
    assert oct(files.directory.stat().st_mode & 0o777) == "0o700"
    assert oct(files.token.stat().st_mode & 0o777) == "0o600"
    _wait(files.sock.exists, 120, "the worker does not listen")

    hot = warm.ask("train", msg, ctx, "site-a", files.directory.parent, watch=os.getpid())
    assert isinstance(hot, Message) and hot.has_content(), hot
    cold = client_app.answer(client_app.HANDLERS["train"], msg, ctx)
    assert _without_seconds(hot.content) == _without_seconds(cold)
    assert hot.metadata.reply_to_message_id == msg.metadata.message_id

    # a fresh process (as Flower starts per message) hands its message over: no torch in it
    on = {**node_config, "warm-worker": "true"}
    code = f"""
import sys
from flwr.app import Context, RecordDict
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as P
from scfedvi.flower import client_app, warm
warm.supernode_pid = lambda: {os.getpid()}
msg = message_from_proto(P.FromString(open(sys.argv[1], "rb").read()))
ctx = Context(run_id={RUN}, node_id=1, node_config={on!r}, state=RecordDict(),
              run_config={rc!r})
reply = client_app.train(msg, ctx)
assert reply.has_content(), reply
print(sorted(k for k in ("torch", "pandas", "anndata", "scipy") if k in sys.modules))
"""
    from flwr.common.serde import message_to_proto

    (d / "msg.pb").write_bytes(message_to_proto(msg).SerializeToString())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    res = subprocess.run(
        [sys.executable, "-c", code, str(d / "msg.pb")], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"

    # the worker checks the run: a message of another run gets a refusal, not an answer
    other = _train_message(schema, run_id=RUN + 1)
    with pytest.raises(warm.WorkerUnusable, match=f"a worker of run {RUN}"):
        warm._exchange(files, rec, "train", other, _ctx(node_config, rc, RUN + 1))

    embed = _train_message(schema, m.EMBED)
    hot = warm.ask("embed", embed, ctx, "site-a", files.directory.parent, watch=os.getpid())
    assert isinstance(hot, Message) and hot.has_content(), hot
    _wait(lambda: not warm.alive(rec["pid"], rec["ticks"]), 30, "the worker still runs")
    assert not files.sock.exists() and not files.token.exists() and files.read_record() is None
    cold = client_app.answer(client_app.HANDLERS["embed"], embed, ctx)
    assert _without_seconds(hot.content) == _without_seconds(cold)


class FakeWorker:
    """A process at the worker's socket that does not hold the token: it records what it got."""

    def __init__(self, files: warm.WorkerFiles, proof: str = "0" * 64) -> None:
        self.got: list[bytes] = []
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(str(files.sock))
        self.srv.listen(1)
        self.proof = proof
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        try:
            conn, _ = self.srv.accept()
        except OSError:  # closed before anyone connected
            return
        with conn:
            try:
                self.got.append(warm.recv_frame(conn))
            except (OSError, warm.WorkerGone):  # the ClientApp left without a word
                return
            warm.send_json(conn, {"ok": True, "proof": self.proof, "nonce": "00"})
            conn.settimeout(2)
            try:
                while chunk := conn.recv(1 << 16):
                    self.got.append(chunk)
            except OSError:
                pass

    def close(self) -> None:
        self.thread.join(5)
        self.srv.close()


def _planted(tmp_path: Path, pid: int) -> warm.WorkerFiles:
    """A worker record naming ``pid`` (alive) with a token, as a ClientApp would find it."""
    files = warm.WorkerFiles.for_run(tmp_path / "state", "site-a", RUN)
    warm.private_dir(files.directory)
    files.token.write_text("ab" * 32)
    files.token.chmod(0o600)
    files.write_record(
        {"pid": pid, "ticks": warm.start_ticks(pid), "site": "site-a", "run_id": RUN}
    )
    return files


def test_a_foreign_socket_never_gets_the_message(site, tmp_path):
    """A process at the socket that cannot prove it holds the token gets the hello (a nonce)
    and nothing else; one that is not the recorded worker process gets nothing at all. The
    message is answered in the ClientApp's process (``None``)."""
    _, _, schema, _ = site
    msg, ctx = _train_message(schema), _ctx({}, {})
    files = _planted(tmp_path, os.getpid())
    fake = FakeWorker(files)
    assert warm.ask("train", msg, ctx, "site-a", tmp_path / "state", watch=os.getpid()) is None
    fake.close()
    assert len(fake.got) == 1 and b"nonce" in fake.got[0]  # the hello only: no message
    assert b"ab" * 32 not in b"".join(fake.got)  # nor the token

    # the same socket, but the record names another process: not even a hello
    other = subprocess.Popen(["sleep", "30"])
    try:
        files.sock.unlink()
        files = _planted(tmp_path, other.pid)
        fake = FakeWorker(files)
        assert warm.ask("train", msg, ctx, "site-a", tmp_path / "state", watch=os.getpid()) is None
        fake.close()
        assert fake.got == []
    finally:
        other.kill()
        other.wait()


def test_a_dead_worker_is_restarted_once_then_the_site_answers_cold(tmp_path, monkeypatch):
    """A stale socket of a worker that died: restarted once, the message answered cold; after
    a second death the run's messages are all answered cold (no more workers started)."""
    started: list[subprocess.Popen] = []

    def fake_spawn(files, site, run_id, idle, restarts, watch):  # a "worker" that never listens
        p = subprocess.Popen(["sleep", "30"])
        started.append(p)
        files.remove()
        files.write_record(
            {
                "pid": p.pid,
                "ticks": warm.start_ticks(p.pid),
                "site": site,
                "run_id": run_id,
                "restarts": restarts,
            }
        )

    monkeypatch.setattr(warm, "spawn", fake_spawn)
    ctx = _ctx({"warm-worker-idle": 60}, {})
    msg = handler_message({}, m.TRAIN, RUN)
    files = warm.WorkerFiles.for_run(tmp_path / "state", "site-a", RUN)
    ask = lambda: warm.ask("train", msg, ctx, "site-a", tmp_path / "state", watch=os.getpid())  # noqa: E731
    try:
        assert ask() is None and len(started) == 1  # the first message starts it
        started[0].kill()
        started[0].wait()
        with socket.socket(socket.AF_UNIX) as s:  # its socket file stays behind
            s.bind(str(files.sock))
        assert ask() is None and len(started) == 2  # restarted once
        assert files.read_record()["restarts"] == 1
        started[1].kill()
        started[1].wait()
        assert ask() is None and ask() is None and len(started) == 2  # never again
        assert files.read_record()["disabled"] is True
    finally:
        for p in started:
            p.kill()
            p.wait()


def test_the_worker_exits_when_its_supernode_is_gone_or_idle(tmp_path):
    """No orphans: the worker's loop (here in a thread of this process, which has its imports
    already) ends when the process it watches (its SuperNode) ends, and when left idle; each
    removes its socket, token and record."""
    from scfedvi.flower import site_worker

    supernode = subprocess.Popen(["sleep", "600"])
    cases = {"gone": (600.0, supernode.pid), "idle": (1.0, os.getpid())}
    threads, why = {}, {}
    try:
        for name, (idle, watch) in cases.items():
            files = _planted(tmp_path / name, os.getpid())
            args = (files, RUN, idle, watch, warm.start_ticks(watch))
            threads[name] = threading.Thread(
                target=lambda n=name, a=args: why.__setitem__(n, site_worker.run(*a)), daemon=True
            )
            threads[name].start()
            _wait(files.sock.exists, 30, "the worker does not listen")
        time.sleep(1.5)
        assert threads["gone"].is_alive()  # its SuperNode still runs
        supernode.kill()
        supernode.wait()
        for t in threads.values():
            t.join(10)
        assert why == {"gone": "its SuperNode is gone", "idle": "no message for 1 s"}
        for name in cases:
            files = warm.WorkerFiles.for_run(tmp_path / name / "state", "site-a", RUN)
            assert not files.sock.exists() and not files.token.exists()
            assert files.read_record() is None
    finally:
        supernode.kill()
        supernode.wait()


def test_node_config_switch_and_bad_values(site):
    """``warm-worker='false'`` answers in the process; a bad value is a clear error reply that
    names the node-config key; without a SuperNode above it, a ClientApp starts no worker."""
    node_config, rc, schema, _ = site
    assert warm.enabled(node_config) is warm.DEFAULT_WARM
    assert not warm.enabled({**node_config, "warm-worker": "false"})
    assert not warm.enabled({"partition-id": 0})  # the simulation engine: never
    reply = client_app.train(
        _train_message(schema), _ctx({**node_config, "warm-worker": "maybe"}, rc)
    )
    assert reply.has_error() and "warm-worker='maybe': give 'true' or 'false'" in reply.error.reason
    reply = client_app.train(
        _train_message(schema),
        _ctx({**node_config, "warm-worker": "true", "warm-worker-idle": "x"}, rc),
    )
    assert reply.has_error() and "warm-worker-idle='x'" in reply.error.reason
    assert warm.supernode_pid() is None  # pytest is not under a SuperNode: cold, no worker
    before = set(Path(node_config["state-dir"]).glob("warm/*.json"))
    on = {**node_config, "warm-worker": "true"}
    assert client_app.train(_train_message(schema), _ctx(on, rc)).has_content()
    assert set(Path(node_config["state-dir"]).glob("warm/*.json")) == before
    np.testing.assert_equal(warm.DEFAULT_IDLE_S > 0, True)


def test_a_clientapp_process_imports_neither_pandas_nor_torch():
    """What Flower's fresh process imports before a handler runs: the ClientApp module and the
    worker's client, without pandas, scipy, anndata or torch (``scfedvi.data``'s package init
    imports its submodules on first use); ``scfedvi.data``'s names still resolve."""
    code = (
        "import sys\n"
        "import scfedvi.flower.client_app, scfedvi.flower.warm\n"
        "heavy = sorted(k for k in ('pandas', 'scipy', 'anndata', 'torch') if k in sys.modules)\n"
        "import scfedvi.data.harmonize, scfedvi.data.simulate\n"
        "from scfedvi.data import harmonize, simulate, SiteDataError, project\n"
        "print(heavy, callable(harmonize) and callable(simulate))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[] True"
