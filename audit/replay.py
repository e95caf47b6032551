"""Reading a cell's history back from JetStream for verification (the I/O edge of verify).

Messages are fetched with an ephemeral pull consumer over ``<prefix>.<cell>.>`` (or the whole
prefix) until the consumer reports nothing pending. Binary-mode messages are turned back into
the structured event (``ce-`` headers + data) so the pure verifier sees one shape.

A history is returned whole or not at all: a verifier handed a silently shortened chain
would pass its prefix (an open chain with a quiet tail looks the same). So the consumer is
asked up front how many messages match, nothing is fetched when none do, and a fetch that
brings nothing while messages are still due is a :class:`SourceError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Final

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from audit.canonical import canonical
from audit.errors import SourceError


def structured_payload(data: bytes, headers: Mapping[str, str] | None) -> bytes:
    """The event as structured-mode JSON, whichever binding mode it was published in."""
    if not headers or not any(k.startswith("ce-") for k in headers):
        return data
    event: dict[str, Any] = {k[3:]: v for k, v in headers.items() if k.startswith("ce-")}
    event["datacontenttype"] = headers.get("Content-Type", "application/json")
    event["data"] = msgspec.json.decode(data)
    return canonical(event)


_CLIENT_ERRORS: Final = (nats.errors.Error, TimeoutError)
"""What nats-py raises for a failed request: its own errors, and a bare ``TimeoutError``
(``asyncio.TimeoutError`` since Python 3.11), which 2.16 raises from a pull fetch."""


async def fetch_history(
    nc: NatsClient,
    *,
    stream: str,
    subject: str,
    batch: int = 1000,
    timeout_s: float = 2.0,
) -> list[bytes]:
    """Every message on ``subject`` in ``stream``, in stream order, as structured payloads.

    ``timeout_s`` bounds each fetch of up to ``batch`` messages. Raises
    :class:`SourceError` when the stream is missing or cannot be read to the end.
    """
    js = nc.jetstream()
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError as exc:
        raise SourceError(f"stream {stream} not found") from exc
    except _CLIENT_ERRORS as exc:
        raise SourceError(f"cannot read stream {stream}: {exc!r}") from exc
    if info.state.messages == 0:
        return []
    where = f"{subject} from {stream}"
    try:
        sub = await js.pull_subscribe(subject, stream=stream)
    except _CLIENT_ERRORS as exc:
        raise SourceError(f"cannot read {where}: {exc!r}") from exc
    try:
        return await _read_all(sub, where, batch=batch, timeout_s=timeout_s)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _read_all(
    sub: JetStreamContext.PullSubscription, where: str, *, batch: int, timeout_s: float
) -> list[bytes]:
    try:
        due = (await sub.consumer_info()).num_pending or 0
    except _CLIENT_ERRORS as exc:
        raise SourceError(f"cannot read {where}: {exc!r}") from exc
    out: list[bytes] = []
    while due:
        try:
            msgs: list[Msg] = await sub.fetch(min(batch, due), timeout=timeout_s)
        except _CLIENT_ERRORS as exc:
            raise SourceError(
                f"reading {where} stopped with {due} message(s) due: {exc!r}"
            ) from exc
        if not msgs:
            raise SourceError(f"reading {where}: nothing arrived with {due} message(s) due")
        for msg in msgs:
            out.append(structured_payload(msg.data, msg.headers))
            await msg.ack()
        due = msgs[-1].metadata.num_pending
    return out
