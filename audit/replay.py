"""Reading a cell's history back from JetStream for verification (the I/O edge of verify).

Messages are fetched with an ephemeral pull consumer over ``<prefix>.<cell>.>`` (or the whole
prefix) until the consumer reports nothing pending. Binary-mode messages are turned back into
the structured event (``ce-`` headers + data) so the pure verifier sees one shape.
"""

from __future__ import annotations

import contextlib

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from audit.errors import SourceError
from audit.message import structured_bytes


async def fetch_history(
    nc: NatsClient,
    *,
    stream: str,
    subject: str,
    batch: int = 1000,
    timeout_s: float = 2.0,
) -> list[bytes]:
    """Every message on ``subject`` in ``stream``, in stream order, as structured payloads."""
    js = nc.jetstream()
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError as exc:
        raise SourceError(f"stream {stream} not found") from exc
    if info.state.messages == 0:
        return []
    out: list[bytes] = []
    try:
        sub = await js.pull_subscribe(subject, stream=stream)
    except nats.errors.Error as exc:
        raise SourceError(f"cannot read {subject} from {stream}: {exc!r}") from exc
    try:
        while True:
            try:
                msgs: list[Msg] = await sub.fetch(batch, timeout=timeout_s)
            except nats.errors.TimeoutError:
                break
            for msg in msgs:
                out.append(structured_bytes(msg.data, msg.headers))
                await msg.ack()
            if msgs and msgs[-1].metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out
