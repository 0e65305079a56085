"""A Flower message as the SuperNode hands it to the ClientApp's handlers (no processes), for
the tests that call those handlers directly."""

from __future__ import annotations

import time

from flwr.app import Message, RecordDict
from flwr.app.metadata import Metadata


def handler_message(content: dict, message_type: str, run_id: int = 7) -> Message:
    md = Metadata(
        run_id=run_id,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=RecordDict(content), metadata=md)
