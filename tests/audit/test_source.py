"""The reader's own header parser gives nats-py's answer for every header block."""

from __future__ import annotations

import inspect

from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from audit.source import _Client

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
