"""Guest channel codec (SPEC 2.1-2.4): length-prefixed frames carrying a strict CBOR map.

Pure functions over bytes, so the listener owns all I/O and every rule can be tested without
a socket. The decoder accepts exactly the wire subset the in-guest agent speaks and names
the first violation it meets, reading front to back, with one of the SPEC 2.4 reasons:

* an item's initial byte is judged before its meaning, so a major outside 0/3/5 is
  ``UnsupportedMajor`` and additional information 28-31 is ``UnsupportedAdditional``
  wherever the item sits, even where a specific type is expected (``FieldType``);
* a text item (key or value) is read and UTF-8 checked before its meaning is considered;
* errors tied to one item are reported at that item, in place; what can only be judged
  once the map is closed follows in this order: ``MissingField`` (the map itself is
  incomplete), ``TrailingBytes`` (the body is more than one item), and last
  ``UnknownProbeSource``, so that reason only ever counts frames that are perfect apart
  from a kind this host does not know (an agent newer than the host).

``WireError.offset`` is the body offset of the item at fault (its initial byte; the end of
the map for ``MissingField``; the first extra byte for ``TrailingBytes``) for body errors,
and the stream offset of the frame's length prefix for framing errors.
"""

# The leaf exception names are the SPEC 2.4 counter names, so they cannot end in "Error".
# ruff: noqa: N818

from __future__ import annotations

import struct
from typing import Final

from producer.errors import ProducerError
from schemas.wire import CONTENT_VERSION, MAX_BODY, PROBE_SOURCES, Declaration

_U16_MAX: Final = 0xFFFF
_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
_HEADER: Final = 4


class WireError(ProducerError):
    """A guest byte stream broke the wire contract; ``reason`` is the SPEC 2.4 counter name."""

    reason: str
    offset: int | None

    def __init__(self, offset: int | None, detail: str) -> None:
        self.reason = type(self).__name__
        self.offset = offset
        where = "" if offset is None else f" at offset {offset}"
        super().__init__(f"{self.reason}{where}: {detail}")


class FramingError(WireError):
    """Frame boundaries can no longer be trusted, so the connection must be closed.

    ``outcomes`` carries the frames :meth:`FrameReader.feed` completed in the same call
    before the fault, so a caller that closes on this error loses nothing already received.
    """

    def __init__(self, offset: int | None, detail: str) -> None:
        super().__init__(offset, detail)
        self.outcomes: list[Declaration | BodyError] = []


class BodyError(WireError):
    """One frame's body is unacceptable; that frame is dropped and the connection stays."""


class FrameTooLarge(FramingError):
    """The length prefix declares more than ``MAX_BODY`` bytes."""


class ShortHeader(FramingError):
    """The peer left inside a length prefix."""


class FrameTruncated(FramingError):
    """The peer left inside a body."""


class UnexpectedEof(BodyError):
    """The body ended inside an item (an empty body ends before the map)."""


class UnsupportedMajor(BodyError):
    """An item's major type is not 0, 3 or 5."""


class UnsupportedAdditional(BodyError):
    """An item uses additional information 28-31 (reserved or indefinite length)."""


class NotMap5(BodyError):
    """The body is not a map of exactly five entries."""


class ContentVersionMustBeFirst(BodyError):
    """The first key is not ``content_version``."""


class UnsupportedContentVersion(BodyError):
    """``content_version`` is not one this host knows."""


class MissingField(BodyError):
    """The map closed without one of the five required keys."""


class FieldType(BodyError):
    """A known field, or a map key, has the wrong major type."""


class IntegerOverflow(BodyError):
    """An integer field exceeds its width (u16 version, u32 pid)."""


class UnknownProbeSource(BodyError):
    """An otherwise perfect frame declares a ``probe_source`` outside SPEC 2.3."""


class InvalidUtf8(BodyError):
    """A text item is not valid UTF-8."""


class DuplicateField(BodyError):
    """A known key occurs a second time."""


class TrailingBytes(BodyError):
    """Bytes follow the map inside the body."""


REASONS: Final[tuple[str, ...]] = tuple(
    cls.__name__
    for cls in (
        FrameTooLarge,
        FrameTruncated,
        ShortHeader,
        UnexpectedEof,
        UnsupportedMajor,
        UnsupportedAdditional,
        NotMap5,
        ContentVersionMustBeFirst,
        UnsupportedContentVersion,
        MissingField,
        FieldType,
        IntegerOverflow,
        UnknownProbeSource,
        InvalidUtf8,
        DuplicateField,
        TrailingBytes,
    )
)
"""Every rejection reason, in SPEC 2.4 order, so counters can be pre-registered at zero."""

# Decoding -----------------------------------------------------------------------------------

_MAJOR_UINT: Final = 0
_MAJOR_TEXT: Final = 3
_MAJOR_MAP: Final = 5
_WIRE_MAJORS: Final = frozenset({_MAJOR_UINT, _MAJOR_TEXT, _MAJOR_MAP})
# Additional information 24-27: the argument follows big-endian in 1, 2, 4 or 8 bytes.
# struct beats int.from_bytes on the hot path by a wide margin.
_ARGUMENTS: Final = tuple((struct.calcsize(c), struct.Struct(">" + c).unpack_from) for c in "BHIQ")

_KEY_VERSION: Final = b"content_version"
# Slots of the four keys that may follow content_version, looked up by their raw bytes so
# the common path never decodes a key.
_SOURCE, _PID, _COMM, _NS = range(4)
_SLOTS: Final[dict[bytes, int]] = {
    b"probe_source": _SOURCE,
    b"guest_pid": _PID,
    b"guest_comm": _COMM,
    b"guest_monotonic_ns": _NS,
}
_SLOT_NAMES: Final = ("probe_source", "guest_pid", "guest_comm", "guest_monotonic_ns")
# Interned names, so accepted frames share one str per kind and need no decoding.
_SOURCES: Final[dict[bytes, str]] = {name.encode(): name for name in PROBE_SOURCES}
# The agent's layout around its values (a map of 5, content_version 1 first, then the
# other keys in declaration order, shortest heads), for the fast path and the encoder.
_CANONICAL_OPENING: Final = b"\xa5\x6fcontent_version"
_FAST_OPENING: Final = _CANONICAL_OPENING + b"\x01\x6cprobe_source"
_FAST_KEY_PID: Final = b"\x69guest_pid"
_FAST_KEY_COMM: Final = b"\x6aguest_comm"
_FAST_KEY_NS: Final = b"\x72guest_monotonic_ns"


def _initial_error(ib: int, pos: int, wanted: int, what: str) -> BodyError:
    """Name what is wrong with an initial byte that is not the item expected here.

    Judges the byte before its meaning: the wire's major/additional rules come first, and
    only a well-formed item of another major is a ``FieldType``.
    """
    major = ib >> 5
    if major not in _WIRE_MAJORS:
        return UnsupportedMajor(pos, f"{what}: major type {major} (byte 0x{ib:02x})")
    if ib & 31 >= 28:
        return UnsupportedAdditional(pos, f"{what}: additional information {ib & 31}")
    return FieldType(pos, f"{what}: major type {major}, expected {wanted}")


def _argument(body: bytes, pos: int, end: int, ib: int, what: str) -> tuple[int, int]:
    """Read the argument of a head whose additional information is 24-27 (any width)."""
    width, unpack = _ARGUMENTS[(ib & 31) - 24]
    stop = pos + 1 + width
    if stop > end:
        raise UnexpectedEof(pos, f"{what}: head needs {stop - pos} bytes, body ends at {end}")
    value: int = unpack(body, pos + 1)[0]
    return value, stop


def _head(body: bytes, pos: int, end: int, what: str) -> tuple[int, int, int]:
    """Read any wire item's head: (major, argument, offset after the head)."""
    if pos >= end:
        raise UnexpectedEof(pos, f"body ends before {what}")
    ib = body[pos]
    major = ib >> 5
    info = ib & 31
    if major not in _WIRE_MAJORS or info >= 28:
        raise _initial_error(ib, pos, major, what)
    if info < 24:
        return major, info, pos + 1
    value, after = _argument(body, pos, end, ib, what)
    return major, value, after


def _uint(body: bytes, pos: int, end: int, limit: int, what: str) -> tuple[int, int]:
    """Read an unsigned integer field no larger than ``limit``."""
    if pos >= end:
        raise UnexpectedEof(pos, f"body ends before {what}")
    ib = body[pos]
    if ib < 24:
        return ib, pos + 1
    if ib >= 28:
        raise _initial_error(ib, pos, _MAJOR_UINT, what)
    value, after = _argument(body, pos, end, ib, what)
    if value > limit:
        raise IntegerOverflow(pos, f"{what} {value} exceeds {limit}")
    return value, after


def _text_span(body: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    """Locate a text item's payload: (start, stop); the caller decides whether to decode."""
    if pos >= end:
        raise UnexpectedEof(pos, f"body ends before {what}")
    ib = body[pos]
    if 0x60 <= ib < 0x78:
        start = pos + 1
        stop = start + ib - 0x60
    else:
        if not 0x78 <= ib < 0x7C:
            raise _initial_error(ib, pos, _MAJOR_TEXT, what)
        length, start = _argument(body, pos, end, ib, what)
        stop = start + length
    if stop > end:
        raise UnexpectedEof(pos, f"{what} needs {stop - start} bytes, body ends at {end}")
    return start, stop


def _utf8(body: bytes, start: int, stop: int, pos: int, what: str) -> str:
    try:
        return body[start:stop].decode()
    except UnicodeDecodeError as exc:
        raise InvalidUtf8(pos, f"{what}: {exc.reason} at payload byte {exc.start}") from None


def _skip(body: bytes, pos: int, end: int) -> int:
    """Check and pass over an unknown key's value, however deeply its maps nest.

    Iterative rather than recursive: a 4096-byte body can nest ~2000 maps, deeper than
    Python's recursion limit, and SPEC 2.4 has no reason to report a depth bound with.
    Each open map is a count of items still due; an even count means a key comes next.
    """
    due = [1]
    while due:
        is_key = due[-1] % 2 == 0
        due[-1] -= 1
        what = "nested map key" if is_key else "unknown field value"
        major, arg, after = _head(body, pos, end, what)
        if is_key and major != _MAJOR_TEXT:
            raise FieldType(pos, f"{what}: major type {major}, expected 3")
        if major == _MAJOR_TEXT:
            stop = after + arg
            if stop > end:
                raise UnexpectedEof(pos, f"{what} needs {arg} bytes, body ends at {end}")
            _utf8(body, after, stop, pos, what)
            after = stop
        elif major == _MAJOR_MAP:
            due.append(2 * arg)
        pos = after
        while due and not due[-1]:
            due.pop()
    return pos


def decode_body(body: bytes) -> Declaration:
    """Decode one frame body or raise the :class:`BodyError` the first violation earns."""
    if body.startswith(_FAST_OPENING):
        decl = _decode_canonical(body)
        if decl is not None:
            return decl
    return _decode_strict(body)


def _fast_uint(body: bytes, pos: int, widest: int) -> tuple[int, int]:
    """An unsigned int whose initial byte is below ``widest``, and the position after it;
    ``(-1, pos)`` for anything else (left to the strict path)."""
    ib = body[pos]
    if ib < 24:
        return ib, pos + 1
    if ib < widest:
        width, unpack = _ARGUMENTS[ib - 24]
        return unpack(body, pos + 1)[0], pos + 1 + width
    return -1, pos


def _decode_canonical(body: bytes) -> Declaration | None:
    """Accept the agent's own layout quickly, or return None to let the strict path judge.

    The agent writes keys in one order with shortest heads, so nearly every frame is a fixed
    sequence of known byte strings around four values. Any deviation, including every
    error, falls back to :func:`_decode_strict`, which alone decides what to refuse and why;
    this path may only ever accept what the strict path accepts, with the same result.
    """
    end = len(body)
    try:
        pos = len(_FAST_OPENING)
        ib = body[pos]
        if not 0x60 <= ib < 0x78:
            return None
        start = pos + 1
        pos = start + ib - 0x60
        source = _SOURCES.get(body[start:pos])
        if source is None or not body.startswith(_FAST_KEY_PID, pos):
            return None
        pid, pos = _fast_uint(body, pos + len(_FAST_KEY_PID), 27)  # up to 4-byte argument
        if pid < 0:
            return None
        if not body.startswith(_FAST_KEY_COMM, pos):
            return None
        pos += len(_FAST_KEY_COMM)
        ib = body[pos]
        if 0x60 <= ib < 0x78:
            start = pos + 1
            pos = start + ib - 0x60
        elif ib == 0x78:
            start = pos + 2
            pos = start + body[pos + 1]
        else:
            return None
        # A comm running past the end decodes short, then fails the key check below.
        comm = body[start:pos].decode()
        if not body.startswith(_FAST_KEY_NS, pos):
            return None
        ns, pos = _fast_uint(body, pos + len(_FAST_KEY_NS), 28)  # up to 8-byte argument
        if ns < 0:
            return None
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    if pos != end:
        return None
    return Declaration(CONTENT_VERSION, source, pid, comm, ns)


def _decode_strict(body: bytes) -> Declaration:
    """The full SPEC 2.2 decoder: every wire form accepted, every violation named."""
    end = len(body)
    if not end:
        raise UnexpectedEof(0, "empty body")
    ib = body[0]
    if ib >> 5 not in _WIRE_MAJORS or ib & 31 >= 28:
        raise _initial_error(ib, 0, _MAJOR_MAP, "top-level item")
    if ib >> 5 != _MAJOR_MAP:
        raise NotMap5(0, f"body is major type {ib >> 5}, expected a map of 5 entries")
    _, count, pos = _head(body, 0, end, "top-level map")
    if count != 5:
        raise NotMap5(0, f"body is a map of {count} entries, expected 5")
    start, stop = _text_span(body, pos, end, "first map key")
    if body[start:stop] != _KEY_VERSION:
        first = _utf8(body, start, stop, pos, "first map key")
        raise ContentVersionMustBeFirst(pos, f"first key is {first!r}")
    pos = stop

    version_at = pos
    version, pos = _uint(body, pos, end, _U16_MAX, "content_version")
    if version != CONTENT_VERSION:
        raise UnsupportedContentVersion(version_at, f"content_version {version}")

    source: bytes | None = None
    source_at = 0
    pid: int | None = None
    comm: str | None = None
    ns: int | None = None
    for _ in range(4):
        key_at = pos
        start, pos = _text_span(body, pos, end, "map key")
        key = body[start:pos]
        slot = _SLOTS.get(key)
        if slot is None:
            if key == _KEY_VERSION:
                raise DuplicateField(key_at, "content_version occurs twice")
            _utf8(body, start, pos, key_at, "map key")
            pos = _skip(body, pos, end)
        elif slot == _SOURCE:
            if source is not None:
                raise DuplicateField(key_at, "probe_source occurs twice")
            source_at = pos
            start, pos = _text_span(body, pos, end, "probe_source")
            source = body[start:pos]
            if source not in _SOURCES:
                _utf8(body, start, pos, source_at, "probe_source")
        elif slot == _PID:
            if pid is not None:
                raise DuplicateField(key_at, "guest_pid occurs twice")
            pid, pos = _uint(body, pos, end, _U32_MAX, "guest_pid")
        elif slot == _COMM:
            if comm is not None:
                raise DuplicateField(key_at, "guest_comm occurs twice")
            comm_at = pos
            start, pos = _text_span(body, pos, end, "guest_comm")
            comm = _utf8(body, start, pos, comm_at, "guest_comm")
        else:
            if ns is not None:
                raise DuplicateField(key_at, "guest_monotonic_ns occurs twice")
            ns, pos = _uint(body, pos, end, _U64_MAX, "guest_monotonic_ns")

    if source is None or pid is None or comm is None or ns is None:
        absent = [n for n, v in zip(_SLOT_NAMES, (source, pid, comm, ns), strict=True) if v is None]
        raise MissingField(pos, "missing " + ", ".join(absent))
    if pos != end:
        raise TrailingBytes(pos, f"{end - pos} bytes follow the map")
    name = _SOURCES.get(source)
    if name is None:
        raise UnknownProbeSource(source_at, f"probe_source {source.decode()!r}")
    return Declaration(version, name, pid, comm, ns)


# Encoding -----------------------------------------------------------------------------------


def _encode_head(major: int, value: int) -> bytes:
    """Shortest head for ``value``; the agent is canonical even though readers need not be."""
    mt = major << 5
    if value < 24:
        return bytes((mt | value,))
    if value <= 0xFF:
        return bytes((mt | 24, value))
    if value <= _U16_MAX:
        return bytes((mt | 25,)) + value.to_bytes(2, "big")
    if value <= _U32_MAX:
        return bytes((mt | 26,)) + value.to_bytes(4, "big")
    return bytes((mt | 27,)) + value.to_bytes(8, "big")


def _encode_uint(value: int, what: str) -> bytes:
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{what} {value} cannot be carried by a CBOR unsigned integer")
    return _encode_head(_MAJOR_UINT, value)


def _encode_text(value: str) -> bytes:
    raw = value.encode()
    return _encode_head(_MAJOR_TEXT, len(raw)) + raw


_ENCODED_KEYS: Final = tuple(_encode_text(name) for name in _SLOT_NAMES)


def encode_body(decl: Declaration) -> bytes:
    """Encode as the agent does: canonical CBOR, content_version first.

    Values are not range-checked beyond what CBOR can carry, so tests can build frames the
    decoder must refuse (a u32-overflowing pid, an unknown probe_source).
    """
    k_source, k_pid, k_comm, k_ns = _ENCODED_KEYS
    return b"".join(
        (
            _CANONICAL_OPENING,
            _encode_uint(decl.content_version, "content_version"),
            k_source,
            _encode_text(decl.probe_source),
            k_pid,
            _encode_uint(decl.guest_pid, "guest_pid"),
            k_comm,
            _encode_text(decl.guest_comm),
            k_ns,
            _encode_uint(decl.guest_monotonic_ns, "guest_monotonic_ns"),
        )
    )


def encode_frame(decl: Declaration) -> bytes:
    """Length-prefix one body; refuses what the receiver would refuse as ``FrameTooLarge``."""
    body = encode_body(decl)
    if len(body) > MAX_BODY:
        raise ValueError(f"body of {len(body)} bytes exceeds the {MAX_BODY}-byte frame limit")
    return len(body).to_bytes(_HEADER, "little") + body


# Stream -------------------------------------------------------------------------------------


class FrameReader:
    """Split one connection's byte stream into frames and decode each.

    Holds at most one incomplete frame (``_HEADER + MAX_BODY`` bytes): complete frames are
    decoded straight out of the data passed to :meth:`feed`, and an oversize length prefix
    is refused before any of its body is kept.

    A :class:`FramingError` is raised as soon as it is known, so the caller can close the
    connection at once; frames completed earlier in the same :meth:`feed` call travel on the
    exception as ``outcomes``. The reader is then dead: every later call raises the same
    reason again (with no outcomes), so no byte after the fault is ever interpreted.
    """

    __slots__ = ("_dead", "_pending", "_pending_at", "_received")

    def __init__(self) -> None:
        self._pending = bytearray()
        self._pending_at = 0  # stream offset of the first pending byte
        self._received = 0  # stream offset of the next byte fed
        self._dead: FramingError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (never more than ``4 + MAX_BODY``)."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[Declaration | BodyError]:
        """Consume ``data``; return every frame it completes, decoded or refused, in order."""
        self._check_alive()
        out: list[Declaration | BodyError] = []
        base = self._received
        self._received += len(data)
        end = len(data)
        pos = 0
        pending = self._pending
        if pending:
            if len(pending) < _HEADER:
                pos = min(_HEADER - len(pending), end)
                pending += data[:pos]
                if len(pending) < _HEADER:
                    return out
                self._check_size(int.from_bytes(pending, "little"), self._pending_at, out)
            missing = _HEADER + int.from_bytes(pending[:_HEADER], "little") - len(pending)
            take = min(missing, end - pos)
            pending += data[pos : pos + take]
            pos += take
            if take < missing:
                return out
            out.append(_outcome(bytes(pending[_HEADER:])))
            pending.clear()
        while end - pos >= _HEADER:
            size = int.from_bytes(data[pos : pos + _HEADER], "little")
            self._check_size(size, base + pos, out)
            stop = pos + _HEADER + size
            if stop > end:
                break
            out.append(_outcome(data[pos + _HEADER : stop]))
            pos = stop
        if pos < end:
            pending += data[pos:]
            self._pending_at = base + pos
        return out

    def eof(self) -> None:
        """The peer closed: refuse a frame left incomplete (nothing is due at a boundary)."""
        self._check_alive()
        have = len(self._pending)
        if not have:
            return
        if have < _HEADER:
            err: FramingError = ShortHeader(
                self._pending_at, f"stream ended {have} bytes into a length prefix"
            )
        else:
            size = int.from_bytes(self._pending[:_HEADER], "little")
            err = FrameTruncated(
                self._pending_at,
                f"stream ended {have - _HEADER} bytes into a {size}-byte body",
            )
        self._die(err, [])

    def _check_size(self, size: int, at: int, out: list[Declaration | BodyError]) -> None:
        if size > MAX_BODY:
            self._die(
                FrameTooLarge(at, f"length prefix declares {size} bytes, limit is {MAX_BODY}"),
                out,
            )

    def _die(self, err: FramingError, out: list[Declaration | BodyError]) -> None:
        self._dead = err
        self._pending.clear()
        err.outcomes = out
        raise err

    def _check_alive(self) -> None:
        dead = self._dead
        if dead is not None:
            raise type(dead)(dead.offset, f"reader already failed: {dead}")


def _outcome(body: bytes) -> Declaration | BodyError:
    try:
        return decode_body(body)
    except BodyError as err:
        return err
