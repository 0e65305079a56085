"""A site's warm worker process: ``python -m scfedvi.flower.site_worker DIR STEM RUN IDLE PID TICKS``.

Started by the first ClientApp of a run at a site (:func:`scfedvi.flower.warm.ask`), it imports
torch and the site's handlers once, listens on ``DIR/STEM.sock`` and answers the messages that
later ClientApp processes of the same run hand it, one at a time, with the same handler as a
cold ClientApp (:func:`scfedvi.flower.client_app.answer`). It exits, removing its socket, token
and record:

- after it answered the run's final message (the embedding);
- when no message came for ``IDLE`` seconds (node config ``warm-worker-idle``);
- when the SuperNode that started it (``PID``, with process start time ``TICKS``) is gone;
- when its record no longer names it (a ClientApp gave up on it), or on SIGTERM.

A connection that is not from this user, does not prove it holds the token, or belongs to
another run is closed without an answer (:mod:`scfedvi.flower.warm` describes the exchange).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import select
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from scfedvi.flower import warm

log = logging.getLogger("scfedvi.flower.site_worker")
#: Seconds between the worker's checks of its SuperNode and its record when idle.
CHECK_S = 1.0


class _Capture(logging.Handler):
    """The log records of one message, sent back for the ClientApp to log (so a site's log
    lines appear in its SuperNode's output as they would without the worker)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append((record.name, record.levelno, text))


def serve_one(conn: socket.socket, token: bytes, run_id: int) -> bool:
    """Answer one ClientApp's message; ``True`` if it was the run's final message."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode
    from flwr.common.serde import (
        context_from_proto,
        message_from_proto,
        recorddict_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from scfedvi.flower import client_app
    from scfedvi.flower import messages as m

    conn.settimeout(30)
    _, uid = warm.peer(conn)
    if uid != os.getuid():
        log.warning("refused a connection from uid %d", uid)
        return False
    hello = warm.recv_json(conn)
    if hello.get("magic") != warm.MAGIC:
        return False
    if str(hello.get("run_id")) != str(run_id):
        warm.send_json(conn, {"ok": False, "why": f"a worker of run {run_id}, not of this run"})
        return False
    nonce = secrets.token_hex(16)
    mine = warm.proof(token, "worker", str(hello.get("nonce", "")))
    warm.send_json(conn, {"ok": True, "proof": mine, "nonce": nonce})
    request = warm.recv_json(conn)
    if not hmac.compare_digest(str(request.get("proof", "")), warm.proof(token, "client", nonce)):
        log.warning("refused a connection without the token's proof")
        return False
    context = context_from_proto(ProtoContext.FromString(warm.recv_frame(conn)))
    msg = message_from_proto(ProtoMessage.FromString(warm.recv_frame(conn)))
    handler = client_app.HANDLERS.get(str(request.get("handler")))
    if handler is None or context.run_id != run_id or msg.metadata.run_id != run_id:
        warm.send_json(conn, {"status": "refused", "why": "unknown handler or another run"})
        return False
    conn.settimeout(None)
    capture = _Capture()
    logging.getLogger().addHandler(capture)
    t0 = time.perf_counter()
    try:
        reply: Any = client_app.answer(handler, msg, context)
    except Exception as ex:  # the error reply Flower's runtime gives when a ClientApp raises
        log.exception("the %s handler raised", request.get("handler"))
        reason = str(type(ex)) + ":<'" + str(ex) + "'>"
        reply = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
    finally:
        logging.getLogger().removeHandler(capture)
    head: dict[str, Any] = {"logs": capture.lines, "seconds": time.perf_counter() - t0}
    log.info("answered %s in %.2f s", msg.metadata.message_type, head["seconds"])
    if isinstance(reply, Error):
        warm.send_json(
            conn, {**head, "status": "error", "code": reply.code, "reason": reply.reason}
        )
        return False
    warm.send_json(conn, {**head, "status": "content"})
    warm.send_frame(conn, recorddict_to_proto(reply).SerializeToString())
    return msg.metadata.message_type == m.EMBED


def serve(files: warm.WorkerFiles, run_id: int, idle: float, watch: int, ticks: int) -> str:
    """Listen until one of the exits in the module's description; returns which."""
    token = files.read_token()
    # what a message imports: paid once here, not by every ClientApp
    import anndata  # noqa: F401
    import torch  # noqa: F401

    import scfedvi.federation.site
    import scfedvi.flower.client_app
    import scfedvi.train.embed
    import scfedvi.train.local  # noqa: F401

    me = os.getpid()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        with warm.socket_path(files.sock) as path:
            old = os.umask(0o177)
            try:
                srv.bind(path)
            finally:
                os.umask(old)
        srv.listen(8)
        log.info("worker %d of run %s listening on %s", me, run_id, files.sock)
        last = time.monotonic()
        while True:
            ready, _, _ = select.select([srv], [], [], CHECK_S)
            if not ready:
                if time.monotonic() - last > idle:
                    return f"no message for {idle:g} s"
                if not warm.alive(watch, ticks):
                    return "its SuperNode is gone"
                rec = files.read_record()
                if rec is None or rec.get("pid") != me:
                    return "its record no longer names it"
                continue
            conn, _ = srv.accept()
            with conn:
                try:
                    final = serve_one(conn, token, run_id)
                except (OSError, warm.WorkerUnusable, ValueError) as e:
                    log.warning("a connection ended: %s", e)
                    final = False
            last = time.monotonic()
            if final:
                return "the run's final message was answered"


def run(files: warm.WorkerFiles, run_id: int, idle: float, watch: int, ticks: int) -> str:
    """:func:`serve`, then remove the worker's files on a clean exit (the next message starts
    a new worker). A crash leaves its record, so that the next ClientApp sees a dead worker
    (started again once)."""
    try:
        why = serve(files, run_id, idle, watch, ticks)
    except SystemExit:
        why = "stopped (SIGTERM)"
    except BaseException:
        log.exception("worker %d of run %s failed", os.getpid(), run_id)
        files.sock.unlink(missing_ok=True)
        raise
    rec = files.read_record()
    if rec is not None and rec.get("pid") == os.getpid():
        files.remove()
    log.info("worker %d of run %s exits: %s", os.getpid(), run_id, why)
    return why


def main(argv: list[str] | None = None) -> int:
    directory, stem, run_id, idle, watch, ticks = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    files = warm.WorkerFiles(Path(directory), stem)
    run(files, int(run_id), float(idle), int(watch), int(ticks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
