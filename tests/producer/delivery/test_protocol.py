"""The publisher's protocol lines, held to what nats-py itself would put on the wire."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from producer.delivery.protocol import (
    HeaderError,
    IdHeader,
    header_block,
    hpub,
    inline_status,
    plain_msgs,
)

_token = st.text(alphabet="!#$%&'*+-.^_`|~0123456789AZaz", min_size=1, max_size=12)
_value = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)


async def _nats_py_hpub(subject: str, reply: str, headers: dict[str, str], payload: bytes) -> bytes:
    """What nats-py's ``publish`` queues for the same message."""
    client = Client()
    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(cmd)

    client._send_command = capture  # type: ignore[method-assign]
    await client._send_publish(subject, reply, payload, len(payload), headers)
    (command,) = sent
    return command


@given(
    headers=st.dictionaries(_token, _value, min_size=1, max_size=4),
    payload=st.binary(max_size=64),
)
def test_hpub_is_byte_for_byte_what_nats_py_sends(headers: dict[str, str], payload: bytes) -> None:
    ours = hpub(b"cellos.cell-1.events", b"_INBOX.x.7", header_block(headers), payload)
    theirs = asyncio.run(_nats_py_hpub("cellos.cell-1.events", "_INBOX.x.7", headers, payload))
    assert ours == theirs


def test_an_id_header_is_the_block_with_that_id_first() -> None:
    fixed = {"Content-Type": "application/cloudevents+json"}
    make = IdHeader(fixed)
    for msg_id in ("c0ffee-1", "0f3a9c2e-18446744073709551615"):
        assert make(msg_id) == header_block({"Nats-Msg-Id": msg_id, **fixed})


@pytest.mark.parametrize("key", ["", " ", "Bad Key", "colon:", "new\nline", "é"])
def test_a_key_nats_cannot_carry_is_refused_by_name(key: str) -> None:
    with pytest.raises(HeaderError) as info:
        header_block({"Nats-Msg-Id": "x", key: "v"})
    assert info.value.key == key


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (b"NATS/1.0 503\r\n\r\n", "503"),
        (b"NATS/1.0 404 No Messages\r\n\r\n", "404"),
        (b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Stream: 4\r\n\r\n", "100"),
        (b"NATS/1.0\r\nNats-Msg-Id: x\r\n\r\n", None),
        (b"NATS/1.0 abc\r\n\r\n", None),
        (None, None),
        (b"", None),
    ],
)
def test_inline_status(header: bytes | None, status: str | None) -> None:
    assert inline_status(header) == status


def _msg(subject: bytes, sid: int, payload: bytes) -> bytes:
    return b"MSG %b %d %d\r\n%b\r\n" % (subject, sid, len(payload), payload)


def test_plain_msgs_takes_the_run_by_sid_and_stops_at_anything_else() -> None:
    run = _msg(b"in.1", 1, b'{"seq":1}') + _msg(b"other.1", 3, b"x") + _msg(b"in.2", 1, b"")
    buf = run + b"+OK\r\n" + _msg(b"in.4", 1, b"z")
    found, used, waiting = plain_msgs(buf)
    assert found == {
        1: [(b"in.1", b'{"seq":1}', None), (b"in.2", b"", None)],
        3: [(b"other.1", b"x", None)],
    }
    assert used == len(run) and not waiting  # +OK: a general parser goes on

    assert plain_msgs(b"+OK\r\n" + run) == ({}, 0, False)
    hmsg = b"HMSG in.5 1 12 12\r\nNATS/1.0\r\n\r\n\r\n"
    assert plain_msgs(hmsg) == ({}, 0, False)
    reply = b"MSG in.6 1 reply.to 1\r\nq\r\n"
    assert plain_msgs(reply) == ({}, 0, False)


def test_plain_msgs_waits_for_the_rest_of_a_command_cut_anywhere() -> None:
    whole = _msg(b"in.1", 1, b"abc") + _msg(b"in.2", 1, b"defgh")
    first = len(_msg(b"in.1", 1, b"abc"))
    for cut in range(len(whole)):
        found, used, waiting = plain_msgs(whole[:cut])
        expected = [(b"in.1", b"abc", None)] if cut >= first else []
        assert found.get(1, []) == expected, cut
        assert used == (first if cut >= first else 0), cut
        assert waiting, cut
    found, used, waiting = plain_msgs(whole)
    assert len(found[1]) == 2 and used == len(whole) and waiting
