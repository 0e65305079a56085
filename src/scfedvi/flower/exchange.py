"""The server's side of the wire: send one message per site, collect the replies in time.

:class:`Exchange` wraps Flower's :class:`~flwr.serverapp.Grid`: it pushes the messages,
pulls the replies every ``poll`` seconds (:data:`POLL`, 0.05 s; Flower's ``send_and_receive``
sleeps 3 s between pulls) until all arrived or the timeout passed, and sorts them into replies and failures
(error replies, or no reply in time). With a payload log it describes every reply it
receives (record names, array dtypes and shapes, scalar types) in a JSON-lines file.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)
#: Seconds between two pulls of the replies: a pull is one small request to the SuperLink, and
#: a reply waits at most this long to be seen.
POLL = 0.05


@dataclass
class Replies:
    """Replies of one exchange: ``ok[node_id]`` and ``failed[node_id] = reason``."""

    ok: dict[int, Message] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)


def describe(msg: Message) -> dict[str, Any]:
    """What a reply carries, without its values (see :func:`describe_content`)."""
    out: dict[str, Any] = {"type": msg.metadata.message_type, "node": msg.metadata.src_node_id}
    if msg.has_error():
        out["error"] = msg.error.reason
    else:
        out["records"] = describe_content(msg.content)
    return out


def describe_content(content: RecordDict) -> dict[str, Any]:
    """Record names and kinds; arrays' dtypes and shapes; scalars' types (no values)."""
    records: dict[str, Any] = {}
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            items = {k: {"dtype": a.dtype, "shape": list(a.shape)} for k, a in rec.items()}
            records[name] = {"kind": "array", "items": items}
        elif isinstance(rec, MetricRecord | ConfigRecord):
            kind = "metric" if isinstance(rec, MetricRecord) else "config"
            records[name] = {"kind": kind, "items": {k: _scalar(v) for k, v in rec.items()}}
        else:  # pragma: no cover - RecordDict holds only the three record types
            records[name] = {"kind": type(rec).__name__}
    return records


def _scalar(v: Any) -> dict[str, Any]:
    if isinstance(v, list):
        types = sorted({type(x).__name__ for x in v})
        return {"type": f"list[{'|'.join(types)}]", "len": len(v)}
    d: dict[str, Any] = {"type": type(v).__name__}
    if isinstance(v, str):
        d["len"] = len(v)
    return d


class Exchange:
    """Send messages to nodes and collect their replies (see the module docstring).

    Parameters
    ----------
    grid
        The ServerApp's grid.
    payload_log
        JSON-lines file describing every reply (``None``: no log).
    poll
        Seconds between two pulls.
    """

    def __init__(self, grid: Grid, payload_log: Path | None = None, poll: float = POLL) -> None:
        self.grid = grid
        self.payload_log = payload_log
        self.poll = poll

    def online(self) -> set[int]:
        return set(self.grid.get_node_ids())

    def wait_for_nodes(self, n: int, timeout: float) -> set[int]:
        """Wait until ``n`` nodes are connected (or the timeout); return the connected ones."""
        end = time.monotonic() + timeout
        nodes = self.online()
        while len(nodes) < n and time.monotonic() < end:
            time.sleep(min(1.0, self.poll * 5))
            nodes = self.online()
        return nodes

    def ask(
        self,
        contents: Mapping[int, RecordDict],
        message_type: str,
        timeout: float,
        *,
        group_id: str = "",
    ) -> Replies:
        """Send ``contents[node_id]`` to each node; wait up to ``timeout`` seconds for replies."""
        out = Replies()
        if not contents:
            return out
        msgs = [
            Message(c, dst_node_id=n, message_type=message_type, group_id=group_id)
            for n, c in contents.items()
        ]
        ids = list(self.grid.push_messages(msgs))
        pending = {mid: n for mid, n in zip(ids, contents, strict=True) if mid}
        for n in set(contents) - set(pending.values()):
            out.failed[n] = "the message could not be pushed to the SuperLink"
        end = time.monotonic() + timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                self._log(reply, message_type)
                if reply.has_error():
                    out.failed[node] = str(reply.error.reason)
                else:
                    out.ok[node] = reply
            if not pending or time.monotonic() >= end:
                break
            time.sleep(self.poll)
        for node in pending.values():
            out.failed[node] = f"no reply within {timeout:g} s"
        return out

    def _log(self, reply: Message, message_type: str) -> None:
        if self.payload_log is None:
            return
        d = describe(reply)
        d["sent_type"] = message_type
        with self.payload_log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(d) + "\n")
