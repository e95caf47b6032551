"""NATS protocol lines for the publisher's hot path, as pure functions (bytes in, bytes out).

nats-py builds every ``HPUB`` from a header dict, one regex match per key, on each send.
An event's headers never change between attempts, so the publisher encodes its header
block once, when the spool hands the event over, and each attempt only frames it
(:func:`hpub`). Replies are read the other way round: a PubAck is a plain ``MSG``, an error
is an ``HMSG`` whose header block carries an inline status (``NATS/1.0 503``), read here
without building a header dict (:func:`inline_status`).

The encoding is the one nats-py's ``publish`` uses (the same key check, values stripped and
CR/LF turned into spaces), so a consumer sees the same headers whichever path sent them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from producer.errors import BrokerError

_HEADER_LINE = b"NATS/1.0"
_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
Raw = tuple[bytes, bytes, bytes | None]
"""A message as the publisher's reply handler sees it: subject, payload, header block (None
without one)."""

_MSG = re.compile(rb"MSG ([^ \r\n]+) (\d+) (\d+)\r\n")


class HeaderError(BrokerError):
    """A header key NATS cannot carry (empty, or outside RFC 7230's token characters)."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"header key {key!r} is not a valid NATS header name")


def header_block(headers: Mapping[str, str]) -> bytes:
    """The ``NATS/1.0`` header block of a message, ready to frame with :func:`hpub`."""
    parts = [_HEADER_LINE]
    for key, value in headers.items():
        name = key.strip()
        if not _KEY.fullmatch(name):
            raise HeaderError(key)
        parts.append(f"{name}: {value.strip().translate(_NEWLINES)}".encode())
    parts.append(b"\r\n")
    return b"\r\n".join(parts)


class IdHeader:
    """Header blocks that differ only in their ``Nats-Msg-Id``: the fixed lines are encoded
    once, so each event costs one concatenation. Ids are the producer's own
    (``<chainId>-<sequence>``), made of token characters, so they need no escaping."""

    __slots__ = ("_head", "_tail")

    def __init__(self, fixed: Mapping[str, str]) -> None:
        block = header_block({"Nats-Msg-Id": "", **fixed})
        cut = block.index(b"\r\n", len(_HEADER_LINE) + 2)
        self._head = block[:cut]
        self._tail = block[cut:]

    def __call__(self, msg_id: str) -> bytes:
        return self._head + msg_id.encode() + self._tail


def hpub(subject: bytes, reply: bytes, header: bytes, payload: bytes) -> bytes:
    """One ``HPUB`` command: the control line, then headers and payload, then CRLF."""
    size = len(header)
    return b"HPUB %b %b %d %d\r\n%b%b\r\n" % (
        subject,
        reply,
        size,
        size + len(payload),
        header,
        payload,
    )


def inline_status(header: bytes | None) -> str | None:
    """The status code of a reply's header block (``503`` for ``NATS/1.0 503\\r\\n\\r\\n``),
    or None when it has no header block or no numeric status."""
    if not header or not header.startswith(_HEADER_LINE + b" "):
        return None
    line = header[len(_HEADER_LINE) + 1 : header.find(b"\r\n")]
    code = line.split(b" ", 1)[0].strip()
    return code.decode() if code.isdigit() else None


def plain_msgs(buf: bytes | bytearray) -> tuple[dict[int, list[Raw]], int, bool]:
    """The leading run of whole ``MSG`` commands without a reply subject or headers (every
    PubAck, and most replies to requests), grouped by subscription id.

    Returns them as ``(subject, payload, None)`` in arrival order per sid, how many bytes
    of ``buf`` they took, and whether what follows is only the incomplete start of a
    command (wait for more bytes). Anything else ends the run: a general parser takes it
    from there.
    """
    found: dict[int, list[Raw]] = {}
    pos = 0
    size = len(buf)
    match = _MSG.match
    while (m := match(buf, pos)) is not None:
        start = m.end()
        end = start + int(m[3])
        if end + 2 > size:
            return found, pos, True
        sid = int(m[2])
        run = found.get(sid)
        if run is None:
            run = found[sid] = []
        run.append((m[1], bytes(buf[start:end]), None))
        pos = end + 2
    return found, pos, buf.find(b"\r\n", pos) < 0
