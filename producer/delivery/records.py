"""The spool's on-disk record format: pure encoding and scanning, bytes in, values out.

A segment file is a sequence of records::

    record = magic (u16 0xCE5B) | kind (u8) | flags (u8) | length (u32) | crc32 (u32) | body

all little-endian; ``crc32`` covers the fields before it and the body, so a flipped bit
in a kind, a flag or a length is caught as surely as one in the payload. Kinds:

- ``EVENT``: one sealed event, ``chain (u32) | sequence (u64) | subject length (u16) |
  subject | payload``, the payload being the event's canonical JSON exactly as published
  in structured mode. ``flags`` say what the chain needs to know about it without parsing
  the JSON (signed, chain event, checkpoint, sealed, record the head once acknowledged).
- ``OPEN``: a chain's identity (JSON), written before its first event.
- ``ACK``: acknowledged watermarks (JSON), so a restart skips what JetStream already has.

A reader trusts nothing: a record whose header or checksum does not hold is damage, and
scanning resynchronises on the next record that does, reporting the bytes in between so
they can be quarantined and the loss declared.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

MAGIC: Final = 0xCE5B
HEADER: Final = struct.Struct("<HBBII")
_PREFIX: Final = struct.Struct("<HBBI")
"""The header fields the checksum covers (all but the checksum itself)."""
EVENT_HEAD: Final = struct.Struct("<IQH")
MAX_BODY: Final = 16 * 1024 * 1024
"""Larger lengths are damage, not records: no event comes near it (a frame is 4 KiB)."""

KIND_EVENT: Final = 1
KIND_OPEN: Final = 2
KIND_ACK: Final = 3
KINDS: Final = frozenset({KIND_EVENT, KIND_OPEN, KIND_ACK})

SIGNED: Final = 1
CONTROL: Final = 2
NOTE_HEAD: Final = 4
CHECKPOINT: Final = 8
SEALED: Final = 16

_MAGIC_BYTES: Final = MAGIC.to_bytes(2, "little")


def encode(kind: int, flags: int, body: bytes) -> bytes:
    prefix = _PREFIX.pack(MAGIC, kind, flags, len(body))
    return prefix + zlib.crc32(body, zlib.crc32(prefix)).to_bytes(4, "little") + body


def encode_event(chain: int, sequence: int, flags: int, subject: str, payload: bytes) -> bytes:
    subj = subject.encode("ascii")
    return encode(KIND_EVENT, flags, EVENT_HEAD.pack(chain, sequence, len(subj)) + subj + payload)


@dataclass(frozen=True, slots=True)
class Record:
    """One intact record found at ``offset``; ``end`` is where the next one starts."""

    offset: int
    end: int
    kind: int
    flags: int
    body: bytes


@dataclass(frozen=True, slots=True)
class EventRecord:
    chain: int
    sequence: int
    subject: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Damage:
    """Bytes ``[offset, end)`` that are not intact records. ``records`` counts the record
    headers that still parse inside them: a lower bound of what was lost."""

    offset: int
    end: int
    records: int


def decode_event(body: bytes) -> EventRecord:
    """Split an ``EVENT`` body; raises ``ValueError`` when it is malformed."""
    if len(body) < EVENT_HEAD.size:
        raise ValueError("event record shorter than its header")
    chain, sequence, subject_len = EVENT_HEAD.unpack_from(body)
    start = EVENT_HEAD.size
    subject = body[start : start + subject_len]
    if len(subject) != subject_len:
        raise ValueError("event record shorter than its subject")
    return EventRecord(chain, sequence, subject.decode("ascii"), body[start + subject_len :])


def _intact_at(buf: bytes | memoryview, pos: int) -> Record | None:
    if len(buf) - pos < HEADER.size:
        return None
    magic, kind, flags, length, crc = HEADER.unpack_from(buf, pos)
    if magic != MAGIC or kind not in KINDS or length > MAX_BODY:
        return None
    start = pos + HEADER.size
    end = start + length
    if end > len(buf):
        return None
    body = bytes(buf[start:end])
    if zlib.crc32(body, zlib.crc32(buf[pos : pos + _PREFIX.size])) != crc:
        return None
    return Record(pos, end, kind, flags, body)


def _headers_in(buf: bytes | memoryview, start: int, end: int) -> int:
    """Plausible record headers in a damaged stretch (magic and a known kind)."""
    count = 0
    data = bytes(buf[start:end])
    pos = data.find(_MAGIC_BYTES)
    while pos != -1:
        if pos + 3 <= len(data) and data[pos + 2] in KINDS:
            count += 1
        pos = data.find(_MAGIC_BYTES, pos + 1)
    return count


def scan(buf: bytes | memoryview, *, final: bool) -> Iterator[Record | Damage]:
    """Yield every intact record of ``buf`` in order, and :class:`Damage` for what lies
    between them.

    ``final``: ``buf`` is the whole rest of the segment, so trailing bytes that do not form
    a record are damage (a torn tail). Otherwise they may be a record the next read
    completes, and scanning stops before them (the last yielded ``end`` says where).
    """
    pos = 0
    size = len(buf)
    while pos < size:
        record = _intact_at(buf, pos)
        if record is not None:
            yield record
            pos = record.end
            continue
        if not final and is_cut_short(buf, pos):
            return
        nxt = _resync(buf, pos + 1)
        if nxt is None and not final:
            return
        end = size if nxt is None else nxt
        yield Damage(pos, end, _headers_in(buf, pos, end))
        pos = end


def is_cut_short(buf: bytes | memoryview, pos: int) -> bool:
    """Whether the bytes from ``pos`` to the end may be the start of one record cut off:
    by a read that ends too early, or by a crash in the middle of a write."""
    rest = len(buf) - pos
    if rest < HEADER.size:
        return bytes(buf[pos : pos + 2]) == _MAGIC_BYTES[:rest]
    magic, kind, _, length, _ = HEADER.unpack_from(buf, pos)
    return (
        magic == MAGIC
        and kind in KINDS
        and length <= MAX_BODY
        and pos + HEADER.size + length > len(buf)
    )


def _resync(buf: bytes | memoryview, pos: int) -> int | None:
    data = bytes(buf)
    while True:
        pos = data.find(_MAGIC_BYTES, pos)
        if pos == -1:
            return None
        if _intact_at(buf, pos) is not None:
            return pos
        pos += 1
