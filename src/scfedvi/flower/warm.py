"""A site's warm worker, seen from the ClientApp: files, the socket protocol, start and use.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message. With the node config
``warm-worker='true'``, the first message of a run at a site starts one worker process
(:mod:`scfedvi.flower.site_worker`, our code) that keeps torch and scFedVI imported; every
later message of that run hands its message to the worker over a Unix-domain socket and
returns the worker's reply, so the fresh process imports only Flower and this module. The
worker runs the same handler (:func:`scfedvi.flower.client_app.answer`: the site's node config,
its policy and its checks) on the same message, so the reply is the one the message would have
had in its own process.

Its files live in the site's private ``state-dir`` under ``warm/`` (mode 0700), named by a
hash of the site and the run: the socket, a random token (0600), the worker's record (its PID
and process start time, the site and the run) and its log. Before a message is handed over,
both sides prove they hold the token (HMAC of the other side's nonce, so a process that does
not know the token learns nothing from it), the ClientApp checks that the socket's peer is the
recorded worker process of its user (``SO_PEERCRED``) and the worker checks the run. Anything
else (a stale socket, a foreign one, a worker of another run, a failed proof) is never used:
the message is answered in its own process (cold). A worker that died during a run is started
again once; the message it was given is answered cold; after a second death the site answers
cold for the rest of the run.

Light: no torch, pandas or scFedVI training modules here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Node config key: ``'true'`` starts a warm worker per run at this site, ``'false'`` answers
#: every message in its own process.
WARM_KEY = "warm-worker"
#: Node config key: seconds a warm worker waits for the next message before it exits.
IDLE_KEY = "warm-worker-idle"
DEFAULT_WARM = True
DEFAULT_IDLE_S = 300.0
MAGIC = "scfedvi-warm-1"
#: Unix socket paths longer than this are reached through ``/proc/self/fd`` (Linux's limit is
#: 108 bytes with the terminating NUL).
MAX_SOCKET_PATH = 100
_LEN = struct.Struct(">Q")
_MAX_FRAME = 1 << 34


class WorkerUnusable(Exception):
    """The worker cannot be used for this message (the reason is the text)."""


class WorkerGone(WorkerUnusable):
    """The worker died or vanished: start it again (once) and answer cold."""


def enabled(node_config: Mapping[str, Any]) -> bool:
    """Whether this SuperNode uses a warm worker (deployment nodes only: under the simulation
    engine the ClientApps already live on between messages)."""
    if "data-path" not in node_config:
        return False
    value = str(node_config.get(WARM_KEY, str(DEFAULT_WARM))).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(
            f"node config {WARM_KEY}={node_config[WARM_KEY]!r}: give 'true' or 'false'"
        )
    return value in ("true", "1", "yes")


def idle_seconds(node_config: Mapping[str, Any]) -> float:
    raw = node_config.get(IDLE_KEY, DEFAULT_IDLE_S)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0:
        raise ValueError(f"node config {IDLE_KEY}={raw!r}: give a number of seconds > 0")
    return value


# -- files ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerFiles:
    """The files of one site's worker for one run, in ``state-dir/warm``."""

    directory: Path
    stem: str

    @classmethod
    def for_run(cls, state_dir: Path, site: str, run_id: int) -> WorkerFiles:
        stem = hashlib.sha256(f"{site}\0{run_id}".encode()).hexdigest()[:16]
        return cls(Path(state_dir) / "warm", stem)

    @property
    def sock(self) -> Path:
        return self.directory / f"{self.stem}.sock"

    @property
    def token(self) -> Path:
        return self.directory / f"{self.stem}.token"

    @property
    def record(self) -> Path:
        return self.directory / f"{self.stem}.json"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.stem}.log"

    @property
    def lock(self) -> Path:
        return self.directory / f"{self.stem}.lock"

    def read_record(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.record.read_text()))
        except (OSError, ValueError):
            return None

    def write_record(self, record: Mapping[str, Any]) -> None:
        tmp = self.record.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dict(record)))
        tmp.replace(self.record)

    def read_token(self) -> bytes:
        st = os.stat(self.token, follow_symlinks=False)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise WorkerUnusable(f"{self.token} is not this user's private file")
        return bytes.fromhex(self.token.read_text().strip())

    def remove(self, keep_log: bool = True) -> None:
        for p in (self.sock, self.token, self.record, *(() if keep_log else (self.log,))):
            p.unlink(missing_ok=True)


def private_dir(directory: Path) -> None:
    """Create ``directory`` (mode 0700); refuse one that is not this user's or is open to
    others (a worker's socket and token must not be reachable by anyone else)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.stat(directory, follow_symlinks=False)
    if st.st_uid != os.getuid():
        raise WorkerUnusable(f"{directory} belongs to another user")
    if st.st_mode & 0o077:
        os.chmod(directory, 0o700)


@contextlib.contextmanager
def locked(files: WorkerFiles) -> Iterator[None]:
    """One ClientApp at a time decides about this worker (start, restart, give up)."""
    fd = os.open(files.lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def socket_path(path: Path) -> Iterator[str]:
    """A name for ``path`` short enough for ``bind``/``connect``."""
    if len(os.fsencode(str(path))) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# -- processes -----------------------------------------------------------------------------
def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or ``None`` if it is gone: a PID
    with another start time is another process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def alive(pid: int, ticks: int | None) -> bool:
    return ticks is not None and start_ticks(pid) == ticks


def supernode_pid() -> int | None:
    """The ``flower-supernode`` process above this ClientApp (the worker exits when it is
    gone), or ``None`` when there is none (a handler called outside a SuperNode: no worker)."""
    pid = os.getppid()
    for _ in range(6):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        if any(Path(os.fsdecode(c)).name == "flower-supernode" for c in cmd[:2]):
            return pid
        if ppid <= 1:
            return None
        pid = ppid
    return None


def spawn(
    files: WorkerFiles, site: str, run_id: int, idle: float, restarts: int, watch: int
) -> None:
    """Start the worker (a new session: Flower's ending of this ClientApp does not end it);
    its output goes to its log in ``warm/``, not to the SuperNode's pipes."""
    files.remove()
    fd = os.open(files.token, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    cmd = [sys.executable, "-m", "scfedvi.flower.site_worker", str(files.directory), files.stem]
    cmd += [str(run_id), str(idle), str(watch), str(start_ticks(watch) or 0)]
    with open(files.log, "ab") as out:
        p = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            cwd=files.directory,
        )
    record = {"pid": p.pid, "ticks": start_ticks(p.pid), "site": site, "run_id": run_id}
    files.write_record({**record, "restarts": restarts, "watch": watch})
    log.info("site %r: warm worker started (pid %d, run %s)", site, p.pid, run_id)


# -- frames and proofs ---------------------------------------------------------------------
def send_frame(conn: socket.socket, data: bytes) -> None:
    conn.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 22))
        if not chunk:
            raise WorkerGone("the connection closed")
        buf += chunk
    return bytes(buf)


def recv_frame(conn: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(conn, _LEN.size))
    if n > _MAX_FRAME:
        raise WorkerUnusable(f"a frame of {n} bytes")
    return _recv_exact(conn, n)


def send_json(conn: socket.socket, obj: Mapping[str, Any]) -> None:
    send_frame(conn, json.dumps(dict(obj)).encode())


def recv_json(conn: socket.socket) -> dict[str, Any]:
    try:
        return dict(json.loads(recv_frame(conn)))
    except ValueError as e:
        raise WorkerUnusable(f"not a worker's frame ({e})") from None


def proof(token: bytes, role: str, nonce: str) -> str:
    return hmac.new(token, f"{MAGIC}/{role}/{nonce}".encode(), hashlib.sha256).hexdigest()


def peer(conn: socket.socket) -> tuple[int, int]:
    """``(pid, uid)`` of the process at the other end of a Unix socket."""
    pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


# -- the ClientApp's side ------------------------------------------------------------------
def ask(
    handler: str,
    msg: Any,
    context: Any,
    site: str,
    state_dir: Path,
    watch: int | None = None,
) -> Any | None:
    """The site's worker's reply to ``msg`` (a :class:`flwr.app.Message` in reply to it), or
    ``None``: answer the message in this process. The first message of a run starts the worker
    and is answered here. ``watch``: the process whose end ends the worker (default: this
    ClientApp's SuperNode; without one, no worker)."""
    run_id = getattr(getattr(msg, "metadata", None), "run_id", None)
    watch = supernode_pid() if watch is None else watch
    if run_id is None or watch is None:
        return None
    files = WorkerFiles.for_run(state_dir, site, int(run_id))
    rec: dict[str, Any] | None = None
    try:
        private_dir(files.directory)
        with locked(files):
            rec = files.read_record()
            idle = idle_seconds(context.node_config)
            if rec is None:
                _sweep(files)
                spawn(files, site, int(run_id), idle, restarts=0, watch=watch)
                return None
            if rec.get("disabled"):
                return None
            if not alive(int(rec["pid"]), rec.get("ticks")):
                _restart(files, rec, "it exited", idle, watch)
                return None
            if not files.sock.exists():
                return None  # still importing: this message is answered here
        return _exchange(files, rec, handler, msg, context)
    except WorkerGone as e:
        with locked(files):
            now = files.read_record()
            if rec is not None and now is not None and now.get("pid") == rec.get("pid"):
                _restart(files, now, str(e), idle_seconds(context.node_config), watch)
        return None
    except (WorkerUnusable, OSError, KeyError, TypeError) as e:
        log.warning("site %r: warm worker not used (%s); answering in this process", site, e)
        return None


def _restart(files: WorkerFiles, rec: dict[str, Any], why: str, idle: float, watch: int) -> None:
    """The worker died during the run: start it again once; after that, answer cold."""
    pid, site = int(rec["pid"]), str(rec.get("site", ""))
    if alive(pid, rec.get("ticks")):
        os.kill(pid, 9)  # our own worker (PID and start time match its record)
    restarts = int(rec.get("restarts", 0))
    if restarts >= 1:
        files.remove()
        files.write_record({**rec, "disabled": True})
        log.warning(
            "site %r: warm worker died again (%s; log: %s); answering every message of this "
            "run in its own process",
            site,
            why,
            files.log,
        )
        return
    log.warning("site %r: warm worker died (%s; log: %s); starting it again", site, why, files.log)
    spawn(files, site, int(rec["run_id"]), idle, restarts=restarts + 1, watch=watch)


def _sweep(files: WorkerFiles) -> None:
    """Remove the files of other runs' workers that are no longer running."""
    for path in files.directory.glob("*.json"):
        other = WorkerFiles(files.directory, path.stem)
        if other.stem == files.stem:
            continue
        rec = other.read_record()
        if rec is None or not alive(int(rec.get("pid", 0)), rec.get("ticks")):
            other.remove(keep_log=False)
            other.lock.unlink(missing_ok=True)


def _exchange(files: WorkerFiles, rec: dict[str, Any], handler: str, msg: Any, context: Any):
    from flwr.app import Error, Message
    from flwr.common.serde import context_to_proto, message_to_proto, recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    token = files.read_token()
    with socket_path(files.sock) as path, socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(30)
        try:
            conn.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise WorkerGone(f"its socket does not answer ({e})") from None
        pid, uid = peer(conn)
        if uid != os.getuid() or pid != rec.get("pid"):
            raise WorkerUnusable(f"the socket's process ({pid}, uid {uid}) is not the worker")
        nonce = secrets.token_hex(16)
        send_json(conn, {"magic": MAGIC, "run_id": msg.metadata.run_id, "nonce": nonce})
        hello = recv_json(conn)
        if not hello.get("ok"):
            raise WorkerUnusable(str(hello.get("why", "the worker refused")))
        if not hmac.compare_digest(str(hello.get("proof", "")), proof(token, "worker", nonce)):
            raise WorkerUnusable("the socket's process does not hold the worker's token")
        send_json(conn, {"proof": proof(token, "client", str(hello["nonce"])), "handler": handler})
        send_frame(conn, context_to_proto(context).SerializeToString())
        send_frame(conn, message_to_proto(msg).SerializeToString())
        conn.settimeout(None)  # a training round takes as long as it takes
        head = recv_json(conn)
        body = recv_frame(conn) if head.get("status") == "content" else b""
    for name, level, text in head.get("logs", []):
        logging.getLogger(str(name)).log(int(level), "%s", text)
    log.info(
        "%s answered by the site's warm worker (pid %s) in %.2f s",
        msg.metadata.message_type,
        rec.get("pid"),
        float(head.get("seconds", float("nan"))),
    )
    if head.get("status") == "error":
        return Message(Error(code=int(head["code"]), reason=str(head["reason"])), reply_to=msg)
    if head.get("status") != "content":
        raise WorkerUnusable(str(head.get("why", "no reply")))
    content = recorddict_from_proto(ProtoRecordDict.FromString(body))
    return Message(content, reply_to=msg)
