"""The reader's own message handling: its header parser gives nats-py's answer for every
header block, status lines are read as nats-py reads them, and nats-py still calls the
methods the reader's client overrides."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.protocol.parser import Parser

from audit.source import _Client, _status_of

_piece = st.sampled_from(
    [
        b"Nats-Msg-Id",
        b"Content-Type",
        b"Status",
        b" ",
        b"\t",
        b"\x0b",
        b"\x1c",
        b"\x85",
        b"\xc3\xa9",
        b"\xff",
        b":",
        b": ",
        b"a",
        b"1",
        b"-",
        b"\r",
        b"\n",
        b"\r\n",
        b"",
    ]
)
_line = st.lists(_piece, max_size=8).map(b"".join)
_block = st.lists(_line, max_size=6).map(b"\r\n".join)


@given(_block)
def test_header_lines_parse_as_nats_py_parses_them(raw: bytes) -> None:
    assert _Client._parse_header_lines(raw) == Client._parse_header_lines(raw)


def test_nats_py_still_parses_headers_through_the_overridden_method() -> None:
    """If nats-py stopped calling it, the override would silently cost nothing and save
    nothing; this says so when nats-py is upgraded."""
    assert "_parse_header_lines" in inspect.getsource(Client._process_headers)


def test_nats_py_still_hands_every_message_to_the_overridden_method() -> None:
    assert "_process_msg" in inspect.getsource(Parser.parse)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"NATS/1.0 404 No Messages\r\n\r\n", ("404", "No Messages")),
        (
            b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 3\r\n\r\n",
            ("408", "Request Timeout"),
        ),
        (b"NATS/1.0 409 Consumer Deleted\r\n\r\n", ("409", "Consumer Deleted")),
        (b"NATS/1.0 100\r\n\r\n", ("100", "")),
        (b"NATS/1.0\r\nNats-Msg-Id: c-1\r\n\r\n", None),
        (b"", None),
    ],
)
def test_status_lines_read_as_code_and_description(
    headers: bytes, status: tuple[str, str] | None
) -> None:
    assert _status_of(headers) == status
