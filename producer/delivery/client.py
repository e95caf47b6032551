"""A nats-py client with a lean path for the publisher's own traffic.

Measured on the end-to-end bench, nats-py's per-message work was over a third of the
producer's event loop: ``publish`` encodes a header dict and queues a flush future per
message; every PubAck becomes a ``Msg`` object, goes through a subscription queue and a
task, and only then reaches the publisher. This subclass keeps everything nats-py does for
the connection (TLS, authentication, reconnects, server discovery, pings, the outbound
buffer while reconnecting) and adds two narrow doors:

- :meth:`LeanClient.send` queues ready-made protocol commands (:mod:`.protocol`) and asks
  the flusher once per batch;
- :meth:`LeanClient.subscribe_raw` hands the messages of one subscription to a plain
  function, a read's worth at a time, as its parser cuts them off the buffer: no ``Msg``,
  no queue, no task.

Both use nats-py internals (``_pending``, ``_flush_pending``, the parser and
``_process_msg``), which is why nats-py is pinned below 3 and
``tests/producer/delivery/test_client.py`` checks this contract against a real server. If
a nats-py release stopped routing messages through its parser and ``_process_msg``,
replies would still arrive through the ordinary callback, only slower, and that test would
say so. Payload size is not checked here as ``publish`` does: events are a few KiB at
most (guest bodies are capped at 4 KiB), far below any server's ``max_payload``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

from producer.delivery.protocol import Raw, plain_msgs

log = logging.getLogger(__name__)

RawHandler = Callable[[list[Raw]], None]
"""Called with messages in arrival order, as many at once as one read brought."""


class LeanClient(Client):
    def __init__(self) -> None:
        super().__init__()
        self._raw: dict[int, RawHandler] = {}
        self._ps = _LeanParser(self)
        self.raw_delivered = 0
        """Messages handed to raw handlers."""
        self.raw_parsed = 0
        """Of those, the ones taken straight off the read buffer (the fast path)."""

    async def send(self, commands: list[bytes]) -> None:
        """Queue protocol commands for the flusher, with the checks ``publish`` makes:
        closed or draining connections refuse, and while reconnecting the outbound buffer
        is bounded. Raises nats-py's errors, like ``publish``."""
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        size = sum(map(len, commands))
        limit = self._max_pending_size
        if not self.is_connected and (limit <= 0 or size + self._pending_data_size > limit):
            raise nats.errors.OutboundBufferLimitError
        self._pending.extend(commands)
        self._pending_data_size += size
        self.stats["out_msgs"] += len(commands)
        if limit > 0 and self._pending_data_size > limit:
            await self._flush_pending(force_flush=True)
        elif self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    async def subscribe_raw(self, subject: str, handler: RawHandler) -> None:
        """Subscribe ``handler`` to ``subject``; it runs synchronously in the read loop, so
        it must be quick and must not raise."""

        async def fallback(msg: Msg) -> None:
            header = None
            if msg.headers:
                header = b"NATS/1.0 " + msg.headers.get("Status", "").encode() + b"\r\n\r\n"
            self._deliver_raw(sub._id, [(msg.subject.encode(), msg.data, header)])

        # Unbounded here: what can arrive is bounded by what the caller has in flight.
        sub = await self.subscribe(
            subject, cb=fallback, pending_msgs_limit=0, pending_bytes_limit=0
        )
        self._raw[sub._id] = handler

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        if sid in self._raw:
            self._deliver_raw(sid, [(subject, data, headers)])
        else:
            await super()._process_msg(sid, subject, reply, data, headers or b"")

    def _deliver_raw(self, sid: int, messages: list[Raw]) -> None:
        self.stats["in_msgs"] += len(messages)
        self.stats["in_bytes"] += sum(len(m[1]) for m in messages)
        self.raw_delivered += len(messages)
        try:
            self._raw[sid](messages)
        except Exception:
            # Raised into the parser it would end the read loop, and with it the connection.
            log.exception("raw_handler_failed", extra={"fields": {"messages": len(messages)}})


class _LeanParser(Parser):
    """nats-py's parser, with runs of plain ``MSG`` commands (every PubAck) taken straight
    off the buffer: raw subscriptions get theirs in one call, other subscriptions through
    nats-py's ``_process_msg`` as its parser would; anything else goes the usual way."""

    nc: LeanClient

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        if self.state == AWAITING_CONTROL_LINE:
            found, used, waiting = plain_msgs(buf)
            if used:
                del buf[:used]
            nc = self.nc
            for sid, run in found.items():
                if sid in nc._raw:
                    nc.raw_parsed += len(run)
                    nc._deliver_raw(sid, run)
                    continue
                for subject, payload, _ in run:  # as nats-py's parser would hand them on
                    await nc._process_msg(sid, subject, b"", payload, None)
            if waiting:
                return
        if buf:
            await super().parse()
