"""The lean client's contract with nats-py and a real server: what it sends is what a plain
subscriber receives, replies reach the raw handler without ``Msg`` objects, and nothing a
handler does can end the connection's read loop."""

from __future__ import annotations

import logging
from collections.abc import Callable

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg

from producer.delivery.client import LeanClient
from producer.delivery.protocol import Raw, header_block, hpub
from producer.ops.embedded import EmbeddedNats
from tests.support import eventually


async def _lean(url: str) -> LeanClient:
    client = LeanClient()
    await client.connect(url, allow_reconnect=False)
    return client


async def _subscribed(client: nats.NATS, subject: str, seen: Callable[[], int]) -> None:
    """Wait until the server has the subscription: a message the client sends to it after
    subscribing comes back. (``flush()`` is not enough: nats-py writes its PING ahead of
    commands still queued, so the PONG can come back before the server saw the SUB.)"""
    before = seen()
    await client.publish(subject, b"")
    await eventually(lambda: seen() > before)


async def test_sent_commands_arrive_as_published_messages(nats_server: EmbeddedNats) -> None:
    lean = await _lean(nats_server.url)
    plain = await nats.connect(nats_server.url)
    received: list[Msg] = []

    async def collect(msg: Msg) -> None:
        received.append(msg)

    headers = {"Nats-Msg-Id": "chain-1", "Content-Type": "application/cloudevents+json"}
    commands = [
        hpub(b"events.%d" % i, b"replies.%d" % i, header_block(headers), b"payload %d" % i)
        for i in range(300)
    ]
    try:
        await plain.subscribe("events.>", cb=collect)
        await _subscribed(plain, "events.ready", lambda: len(received))
        received.clear()
        await lean.send(commands[:299])
        await lean.send(commands[299:])
        await lean.flush()
        await eventually(lambda: len(received) >= 300)
        assert [(m.subject, m.reply, m.data) for m in received] == [
            (f"events.{i}", f"replies.{i}", b"payload %d" % i) for i in range(300)
        ]
        assert all(m.headers == headers for m in received)
        assert lean.stats["out_msgs"] == 300
    finally:
        await plain.close()
        await lean.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await lean.send(commands[:1])


async def test_replies_reach_the_raw_handler_in_order_straight_from_the_parser(
    nats_server: EmbeddedNats,
) -> None:
    lean = await _lean(nats_server.url)
    plain = await nats.connect(nats_server.url)
    got: list[Raw] = []
    calls = 0

    def handler(replies: list[Raw]) -> None:
        nonlocal calls
        calls += 1
        got.extend(replies)

    try:
        await lean.subscribe_raw("acks.*", handler)
        await _subscribed(lean, "acks.ready", lambda: len(got))
        got.clear()
        calls = 0
        for i in range(2000):
            await plain.publish(f"acks.{i}", b'{"stream":"S","seq":%d}' % i)
        await plain.publish("acks.x", b"", headers={"Nats-Msg-Id": "h"})
        await plain.flush()
        await eventually(lambda: len(got) == 2001)
    finally:
        await plain.close()
        await lean.close()
    assert [s for s, _, _ in got[:2000]] == [b"acks.%d" % i for i in range(2000)]
    assert got[1999][1] == b'{"stream":"S","seq":1999}' and got[0][2] is None
    subject, data, header = got[2000]  # with headers: through nats-py's own parsing
    assert (subject, data) == (b"acks.x", b"")
    assert header is not None and b"Nats-Msg-Id: h" in header
    assert lean.raw_delivered == lean.stats["in_msgs"] == 2002
    assert calls < 2001  # runs of replies come in batches, not one call each


async def test_a_failing_handler_does_not_end_the_read_loop(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="producer")
    lean = await _lean(nats_server.url)
    plain = await nats.connect(nats_server.url)
    got: list[bytes] = []

    def handler(replies: list[Raw]) -> None:
        for subject, _, _ in replies:
            if subject == b"acks.boom":
                raise RuntimeError("boom")
            got.append(subject)

    try:
        await lean.subscribe_raw("acks.*", handler)
        await _subscribed(lean, "acks.ready", lambda: len(got))
        await plain.publish("acks.boom", b"")
        await plain.flush()
        await eventually(lambda: "raw_handler_failed" in caplog.text)
        await plain.publish("acks.after", b"")
        await plain.flush()
        await eventually(lambda: got == [b"acks.ready", b"acks.after"])
        assert lean.is_connected
    finally:
        await plain.close()
        await lean.close()


class _Recording(LeanClient):
    """Records what reaches nats-py's message handling for other subscriptions."""

    def __init__(self) -> None:
        super().__init__()
        self.others: list[tuple[int, bytes, bytes, bytes]] = []

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        if sid in self._raw:
            await super()._process_msg(sid, subject, reply, data, headers)
        else:
            self.others.append((sid, subject, reply, data))


async def test_the_parser_delivers_every_reply_however_the_stream_is_cut() -> None:
    def msg(subject: bytes, sid: int, payload: bytes) -> bytes:
        return b"MSG %b %d %d\r\n%b\r\n" % (subject, sid, len(payload), payload)

    status = b"NATS/1.0 503\r\n\r\n"
    stream = b"".join(
        [
            msg(b"acks.1", 1, b'{"seq":1}'),
            msg(b"acks.2", 1, b'{"seq":2}'),
            b"+OK\r\n",
            msg(b"elsewhere", 9, b"not ours"),
            b"HMSG acks.3 1 %d %d\r\n%b\r\n" % (len(status), len(status), status),
            msg(b"acks.4", 1, b'{"seq":4}'),
        ]
    )
    expected = [
        (b"acks.1", b'{"seq":1}', None),
        (b"acks.2", b'{"seq":2}', None),
        (b"acks.3", b"", status),
        (b"acks.4", b'{"seq":4}', None),
    ]
    for cut in range(len(stream) + 1):
        client = _Recording()  # never connected: the parser is fed by hand
        got: list[Raw] = []
        client._raw[1] = got.extend
        for part in (stream[:cut], stream[cut:]):
            await client._ps.parse(part)
        assert got == expected, cut
        assert client.raw_delivered == 4
        assert client.others == [(9, b"elsewhere", b"", b"not ours")], cut


async def test_replies_cut_anywhere_stay_on_the_fast_path() -> None:
    stream = b"".join(b'MSG acks.%d 1 9\r\n{"seq":%d}\r\n' % (i, i) for i in range(3))
    for cut in range(len(stream) + 1):
        client = LeanClient()
        got: list[Raw] = []
        client._raw[1] = got.extend
        for part in (stream[:cut], stream[cut:]):
            await client._ps.parse(part)
        assert [s for s, _, _ in got] == [b"acks.0", b"acks.1", b"acks.2"], cut
        assert client.raw_parsed == 3, cut  # none left to nats-py's parser


async def test_sending_while_disconnected_is_bounded_by_the_outbound_buffer() -> None:
    client = LeanClient()  # not connected: commands wait for the connection
    client._max_pending_size = 1000  # what connect(pending_size=1000) sets
    await client.send([b"x" * 100, b"y" * 100])
    assert client._pending == [b"x" * 100, b"y" * 100]
    with pytest.raises(nats.errors.OutboundBufferLimitError):
        await client.send([b"z" * 400, b"z" * 401])
    assert client._pending_data_size == 200  # nothing of the refused batch was queued
    await client.send([b"z" * 800])  # exactly full is allowed
