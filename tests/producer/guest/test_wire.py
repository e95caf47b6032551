"""Guest wire codec: the shared vectors, the ordering rules SPEC 2.2 leaves to us, and
properties over the whole valid domain and over hostile input.

CBOR here is built by a small encoder of the test's own (``_head`` and friends), not by
``producer.wire``, so an encoder bug cannot hide a matching decoder bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from producer.errors import ProducerError
from producer.guest import wire
from producer.guest.wire import (
    REASONS,
    BodyError,
    FrameReader,
    FramingError,
    WireError,
    decode_body,
    encode_body,
    encode_frame,
)
from schemas.wire import MAX_BODY, PROBE_SOURCES, Declaration
from tests.support import VECTORS

SPEC_REASONS = {
    "FrameTooLarge",
    "FrameTruncated",
    "ShortHeader",
    "UnexpectedEof",
    "UnsupportedMajor",
    "UnsupportedAdditional",
    "NotMap5",
    "ContentVersionMustBeFirst",
    "UnsupportedContentVersion",
    "MissingField",
    "FieldType",
    "IntegerOverflow",
    "UnknownProbeSource",
    "InvalidUtf8",
    "DuplicateField",
    "TrailingBytes",
}
FRAMING_REASONS = {"FrameTooLarge", "ShortHeader", "FrameTruncated"}
SOURCES = sorted(PROBE_SOURCES)
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


# The test's own CBOR encoder -------------------------------------------------------------

_WIDTH_INFO = {1: 24, 2: 25, 4: 26, 8: 27}


def _head(major: int, value: int, width: int = 0) -> bytes:
    """A head with the argument inline (width 0, value < 24) or in ``width`` bytes."""
    if width == 0:
        assert value < 24
        return bytes([major << 5 | value])
    return bytes([major << 5 | _WIDTH_INFO[width]]) + value.to_bytes(width, "big")


def _shortest(value: int) -> int:
    if value < 24:
        return 0
    return next(w for w in (1, 2, 4, 8) if value < 2 ** (8 * w))


def _uint(value: int, width: int | None = None) -> bytes:
    return _head(0, value, _shortest(value) if width is None else width)


def _text(value: str | bytes, width: int | None = None) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return _head(3, len(raw), _shortest(len(raw)) if width is None else width) + raw


def _map(entries: Sequence[tuple[bytes, bytes]], count: int | None = None) -> bytes:
    n = len(entries) if count is None else count
    return _head(5, n, _shortest(n)) + b"".join(k + v for k, v in entries)


def _entries(
    version: bytes = b"\x01",
    source: bytes | None = None,
    pid: bytes | None = None,
    comm: bytes | None = None,
    ns: bytes | None = None,
) -> list[tuple[bytes, bytes]]:
    return [
        (_text("content_version"), version),
        (_text("probe_source"), _text("process.spawned") if source is None else source),
        (_text("guest_pid"), _uint(42) if pid is None else pid),
        (_text("guest_comm"), _text("sh") if comm is None else comm),
        (_text("guest_monotonic_ns"), _uint(123456789) if ns is None else ns),
    ]


GOOD = _map(_entries())
GOOD_DECL = Declaration(1, "process.spawned", 42, "sh", 123456789)


def _reason(body: bytes) -> str:
    with pytest.raises(BodyError) as info:
        decode_body(body)
    return info.value.reason


# Running a stream through a reader, as a listener would --------------------------------


def _run(stream: bytes, chunk: int | None) -> tuple[list[Declaration], list[str], bool]:
    """Accepted declarations, refused reasons in order, and whether the connection closes."""
    reader = FrameReader()
    outcomes: list[Declaration | BodyError] = []
    closed_by: str | None = None
    step = (len(stream) or 1) if chunk is None else chunk
    pieces = [stream[i : i + step] for i in range(0, len(stream), step)]
    try:
        for piece in pieces:
            outcomes += reader.feed(piece)
            assert reader.buffered <= 4 + MAX_BODY
        reader.eof()
    except FramingError as err:
        outcomes += err.outcomes
        closed_by = err.reason
    accepted = [o for o in outcomes if isinstance(o, Declaration)]
    rejected = [o.reason for o in outcomes if isinstance(o, BodyError)]
    if closed_by is not None:
        rejected.append(closed_by)
    return accepted, rejected, closed_by is not None


# Vectors ----------------------------------------------------------------------------------


def test_vectors_are_found_beside_the_repo() -> None:
    assert len(VECTORS) >= 30
    assert {v["closes_connection"] for v in VECTORS} == {True, False}


@pytest.mark.parametrize("chunk", [None, 1], ids=["whole", "bytewise"])
@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(vector: dict[str, Any], chunk: int | None) -> None:
    accepted, rejected, closed = _run(bytes.fromhex(vector["stream_hex"]), chunk)
    assert [msgspec.structs.asdict(d) for d in accepted] == vector["accepted"]
    assert rejected == vector["rejected"]
    assert closed == vector["closes_connection"]


# The error tree -------------------------------------------------------------------------


def test_reasons_are_exactly_the_spec_names_and_each_is_a_leaf_class() -> None:
    assert len(REASONS) == len(SPEC_REASONS)
    assert set(REASONS) == SPEC_REASONS
    for name in REASONS:
        cls = getattr(wire, name)
        assert issubclass(cls, ProducerError)
        framing = name in FRAMING_REASONS
        assert issubclass(cls, FramingError) is framing
        assert issubclass(cls, BodyError) is not framing
        err = cls(7, "detail")
        assert (err.reason, err.offset) == (name, 7)
        assert str(err) == f"{name} at offset 7: detail"
        assert str(cls(None, "detail")) == f"{name}: detail"  # no offset, no "at offset"


# Body: ordering and the corners SPEC 2.2 leaves to us -----------------------------------


def _value_at(key: str, body: bytes) -> int:
    """Offset of the value that follows ``key`` in ``body``."""
    encoded = _text(key)
    return body.index(encoded) + len(encoded)


def _with(
    entry: int, key: bytes, value: bytes, entries: list[tuple[bytes, bytes]] | None = None
) -> bytes:
    replaced = list(_entries() if entries is None else entries)
    replaced[entry] = (key, value)
    return _map(replaced)


EXTRA = _text("extra")
# Where the error is reported (WireError.offset): a number, the value of a key ("extra" and
# the SPEC keys), that value plus some bytes, or "end" (the body's length).
At = int | str | tuple[str, int]


@pytest.mark.parametrize(
    ("body", "reason", "at"),
    [
        # The initial byte is judged before its meaning, and before its argument.
        (b"\x9f", "UnsupportedMajor", 0),  # major 4 wins over indefinite length
        (b"\xbf", "UnsupportedAdditional", 0),  # indefinite map
        (b"\x1c", "UnsupportedAdditional", 0),  # reserved additional information on a uint
        (b"\x18", "NotMap5", 0),  # a uint is not a map; its missing argument is not read
        (b"\x63ab", "NotMap5", 0),
        (b"\xb8", "UnexpectedEof", 0),  # map count argument missing
        (b"\xa5", "UnexpectedEof", "end"),
        (_map(_entries()[:4]), "NotMap5", 0),  # the map's head, not the key after it
        (b"\xa5\x01\x01", "FieldType", 1),  # first key is not text
        (b"\xa5\x41a", "UnsupportedMajor", 1),  # first key is a byte string
        (b"\xa5\x62\xc3\x28\x01", "InvalidUtf8", 1),  # read before judged as a key
        (b"\xa5\x67cell_id\x01", "ContentVersionMustBeFirst", 1),
        (b"\xa5\x6fcontent_version", "UnexpectedEof", "end"),
        (_map(_entries(version=b"\x00")), "UnsupportedContentVersion", "content_version"),
        (
            _map(_entries(version=_uint(0xFFFF, 2))),
            "UnsupportedContentVersion",
            "content_version",
        ),
        (_map(_entries(version=_text("1"))), "FieldType", "content_version"),
        (_map(_entries(pid=_uint(U32_MAX + 1, 8))), "IntegerOverflow", "guest_pid"),
        (_map(_entries(pid=b"\x62")), "FieldType", "guest_pid"),  # judged before it is read
        (_map(_entries(pid=b"\xa0")), "FieldType", "guest_pid"),
        (_map(_entries(pid=b"\xbf")), "UnsupportedAdditional", "guest_pid"),
        (_map(_entries(source=_uint(1))), "FieldType", "probe_source"),
        (_map(_entries(source=_text(b"\xff"))), "InvalidUtf8", "probe_source"),
        (_map(_entries(source=_text("process.teleported"))), "UnknownProbeSource", "probe_source"),
        (_map(_entries(comm=_uint(1))), "FieldType", "guest_comm"),
        (_map(_entries(comm=b"\x7c")), "UnsupportedAdditional", "guest_comm"),
        (_map(_entries(comm=_text(b"sh\xff"))), "InvalidUtf8", "guest_comm"),
        (GOOD[: _value_at("guest_pid", GOOD)], "UnexpectedEof", "end"),
        (GOOD[: _value_at("guest_comm", GOOD)], "UnexpectedEof", "end"),
        (GOOD[:-1], "UnexpectedEof", "guest_monotonic_ns"),
        (
            GOOD[: GOOD.index(b"guest_monotonic_ns") + 3],
            "UnexpectedEof",
            GOOD.index(b"guest_monotonic_ns") - 1,  # the key, cut short
        ),
        (_map(_entries(ns=b"\x1b\x00")), "UnexpectedEof", "guest_monotonic_ns"),
        (_map(_entries(ns=b"\x1d")), "UnsupportedAdditional", "guest_monotonic_ns"),
        (_map(_entries(ns=b"\xc1")), "UnsupportedMajor", "guest_monotonic_ns"),  # a tag
        # An unknown key's value is read through, item by item.
        (_with(3, EXTRA, b"\xf5"), "UnsupportedMajor", "extra"),
        (_with(3, EXTRA, b"\x1c"), "UnsupportedAdditional", "extra"),  # 28, the first reserved
        (_with(3, EXTRA, _text(b"\xff")), "InvalidUtf8", "extra"),
        (_with(4, EXTRA, b"\x63ab"), "UnexpectedEof", "extra"),
        (_with(3, EXTRA, _map([(_uint(1), _uint(2))])), "FieldType", ("extra", 1)),
        (_map(_entries()[:4], count=5) + EXTRA, "UnexpectedEof", "end"),
        (_with(4, EXTRA, _text("abc")), "MissingField", "end"),
        (
            _with(4, EXTRA, _map([(_text("a"), _uint(1)), (_text("b"), _uint(2))])),
            "MissingField",
            "end",
        ),
    ],
)
def test_first_error_front_to_back(body: bytes, reason: str, at: At) -> None:
    with pytest.raises(BodyError) as info:
        decode_body(body)
    assert info.value.reason == reason
    if at == "end":
        at = len(body)
    elif isinstance(at, str):
        at = _value_at(at, body)
    elif isinstance(at, tuple):
        at = _value_at(at[0], body) + at[1]
    assert info.value.offset == at


KEYS = ("content_version", "probe_source", "guest_pid", "guest_comm", "guest_monotonic_ns")


@pytest.mark.parametrize("key", KEYS)
def test_repeated_known_key_is_a_duplicate_reported_at_the_repeat(key: str) -> None:
    entries = _entries()
    first = KEYS.index(key)
    # The repeat takes the last slot (or, for the last key, the original moves up one).
    at = 3 if first == 4 else first
    entries[at], entries[4] = entries[first], entries[first]
    body = _map(entries)
    with pytest.raises(BodyError) as info:
        decode_body(body)
    assert info.value.reason == "DuplicateField"
    assert str(info.value) == f"DuplicateField at offset {info.value.offset}: {key} occurs twice"
    assert info.value.offset == len(body) - len(b"".join(entries[4]))  # the repeated key


def test_a_duplicate_is_reported_before_anything_later() -> None:
    later_bad = _entries(ns=b"\xfb")
    assert _reason(_with(3, _text("guest_pid"), b"\x01", later_bad)) == "DuplicateField"


def test_unknown_key_value_must_be_a_well_formed_wire_item() -> None:
    key = _text("extra")
    assert _reason(_with(3, key, _uint(1))) == "MissingField"
    assert _reason(_with(3, key, _map([(_text("a"), _map([(_text("b"), _text("c"))]))]))) == (
        "MissingField"
    )
    assert _reason(_with(3, key, b"\x80")) == "UnsupportedMajor"
    assert _reason(_with(3, key, b"\x7f")) == "UnsupportedAdditional"
    assert _reason(_with(3, key, _text(b"\xed\xa0\x80"))) == "InvalidUtf8"  # a surrogate
    second_key_bad = _map([(_text("a"), _uint(2)), (_uint(3), _uint(4))])
    assert _reason(_with(3, key, second_key_bad)) == "FieldType"
    assert _reason(_with(3, key, _head(5, 2**64 - 1, 8))) == "UnexpectedEof"
    assert _reason(_with(3, _text(b"\xc3"), _uint(1))) == "InvalidUtf8"
    assert _reason(_with(3, _uint(1), _uint(1))) == "FieldType"


def test_deep_nesting_in_an_unknown_value_is_no_recursion_hazard() -> None:
    depth = 1300
    value = _head(5, 1) + _text("a")
    nested = value * depth + _uint(0)
    body = _with(3, _text("x"), nested)
    assert len(body) <= MAX_BODY
    assert _reason(body) == "MissingField"
    assert _reason(body[:-20]) == "UnexpectedEof"


def test_checks_after_the_map_run_missing_then_trailing_then_unknown_source() -> None:
    missing = _with(3, _text("extra"), _uint(1))
    assert _reason(missing + b"\x00") == "MissingField"
    unknown = _map(_entries(source=_text("process.teleported")))
    assert _reason(unknown) == "UnknownProbeSource"
    assert _reason(unknown + b"\x00") == "TrailingBytes"
    assert _reason(GOOD + b"\x00") == "TrailingBytes"


def test_offsets_name_the_item_at_fault() -> None:
    def offset(body: bytes) -> int | None:
        with pytest.raises(BodyError) as info:
            decode_body(body)
        return info.value.offset

    assert offset(b"") == 0
    assert offset(GOOD + b"\x00\x00") == len(GOOD)
    assert offset(b"\xa5\x67cell_id\x01") == 1
    pid_at = GOOD.index(_text("guest_pid")) + len(_text("guest_pid"))
    assert offset(_map(_entries(pid=_uint(U32_MAX + 1)))) == pid_at
    assert offset(_with(3, _text("extra"), _uint(1))) == len(_with(3, _text("extra"), _uint(1)))


def test_a_pid_spelling_the_next_key_is_refused_not_skipped() -> None:
    """A text where guest_pid belongs reads like the agent's layout with the pid left out."""
    entries = _entries(pid=_text("guest_comm") + _text("sh"))
    del entries[3]
    body = _map(entries, count=5)
    with pytest.raises(BodyError) as info:
        decode_body(body)
    assert (info.value.reason, info.value.offset) == ("FieldType", _value_at("guest_pid", body))


def test_non_shortest_heads_everywhere_are_accepted() -> None:
    entries = [
        (_text("content_version", 8), _uint(1, 8)),
        (_text("guest_monotonic_ns", 4), _uint(5, 8)),
        (_text("guest_comm", 2), _text("sh", 1)),
        (_text("guest_pid", 1), _uint(7, 2)),
        (_text("probe_source", 8), _text("fs.inotify_fired", 4)),
    ]
    body = _head(5, 5, 8) + b"".join(k + v for k, v in entries)
    assert decode_body(body) == Declaration(1, "fs.inotify_fired", 7, "sh", 5)


# Encoder ----------------------------------------------------------------------------------


def test_encoder_is_canonical_cbor_with_the_agents_key_order() -> None:
    assert encode_body(GOOD_DECL) == GOOD
    assert encode_frame(GOOD_DECL) == len(GOOD).to_bytes(4, "little") + GOOD
    big = Declaration(1, "process.exited", U32_MAX, "é" * 300, U64_MAX)
    assert encode_body(big) == _map(
        _entries(
            source=_text("process.exited"),
            pid=_uint(U32_MAX),
            comm=_text("é" * 300),
            ns=_uint(U64_MAX),
        )
    )


@pytest.mark.parametrize(
    "value", [23, 24, 255, 256, 0xFFFF, 0x1_0000, U32_MAX, U32_MAX + 1, U64_MAX]
)
def test_encoder_picks_the_shortest_head_at_each_width_boundary(value: int) -> None:
    pid = min(value, U32_MAX)
    comm = "c" * min(value, 300)
    decl = Declaration(1, "process.spawned", pid, comm, value)
    assert encode_body(decl) == _map(_entries(pid=_uint(pid), comm=_text(comm), ns=_uint(value)))
    assert decode_body(encode_body(decl)) == decl


def test_encoder_refuses_what_cbor_or_the_frame_limit_cannot_carry() -> None:
    with pytest.raises(ValueError, match="guest_pid"):
        encode_body(Declaration(1, "process.spawned", -1, "sh", 0))
    with pytest.raises(ValueError, match="guest_monotonic_ns"):
        encode_body(Declaration(1, "process.spawned", 1, "sh", U64_MAX + 1))
    with pytest.raises(ValueError, match="4096"):
        encode_frame(Declaration(1, "process.spawned", 1, "x" * MAX_BODY, 0))
    # ...but a body of exactly the limit is a frame.
    filler = MAX_BODY - len(encode_body(Declaration(1, "process.spawned", 1, "", 2))) - 2
    largest = encode_frame(Declaration(1, "process.spawned", 1, "c" * filler, 2))
    assert largest[:4] == MAX_BODY.to_bytes(4, "little")


# FrameReader ------------------------------------------------------------------------------

FRAME = encode_frame(GOOD_DECL)
OVERSIZE = (MAX_BODY + 1).to_bytes(4, "little")


def test_frames_before_an_oversize_prefix_travel_on_the_error() -> None:
    reader = FrameReader()
    with pytest.raises(wire.FrameTooLarge) as info:
        reader.feed(FRAME + FRAME + OVERSIZE + FRAME)
    assert info.value.outcomes == [GOOD_DECL, GOOD_DECL]
    assert info.value.offset == 2 * len(FRAME)
    assert reader.buffered == 0


def test_oversize_prefix_is_refused_as_its_last_byte_arrives() -> None:
    reader = FrameReader()
    assert reader.feed(FRAME + OVERSIZE[:3]) == [GOOD_DECL]
    with pytest.raises(wire.FrameTooLarge) as info:
        reader.feed(OVERSIZE[3:])
    assert info.value.outcomes == []
    assert info.value.offset == len(FRAME)


def test_offsets_count_the_whole_stream_across_feeds() -> None:
    reader = FrameReader()
    for _ in range(2):
        assert reader.feed(FRAME) == [GOOD_DECL]
    with pytest.raises(wire.FrameTooLarge) as too_large:
        reader.feed(OVERSIZE)
    assert too_large.value.offset == 2 * len(FRAME)

    reader = FrameReader()
    for _ in range(3):
        assert reader.feed(FRAME) == [GOOD_DECL]
    assert reader.feed(FRAME[:3]) == []
    with pytest.raises(wire.ShortHeader) as short:
        reader.eof()
    assert short.value.offset == 3 * len(FRAME)


def test_a_frame_split_inside_its_prefix_waits_for_all_of_its_body() -> None:
    reader = FrameReader()
    assert reader.feed(FRAME[:2]) == []
    assert reader.feed(FRAME[2:-1]) == []
    assert reader.buffered == len(FRAME) - 1
    assert reader.feed(FRAME[-1:]) == [GOOD_DECL]


def test_a_dead_reader_interprets_nothing_more() -> None:
    reader = FrameReader()
    with pytest.raises(wire.FrameTooLarge):
        reader.feed(OVERSIZE)
    for _ in range(2):
        with pytest.raises(wire.FrameTooLarge) as info:
            reader.feed(FRAME)
        assert info.value.outcomes == []
        assert info.value.offset == 0
    with pytest.raises(wire.FrameTooLarge):
        reader.eof()

    reader = FrameReader()
    reader.feed(FRAME[:2])
    with pytest.raises(wire.ShortHeader):
        reader.eof()
    with pytest.raises(wire.ShortHeader):
        reader.feed(FRAME)


@pytest.mark.parametrize(
    ("left", "reason"),
    [
        (1, "ShortHeader"),
        (3, "ShortHeader"),
        (4, "FrameTruncated"),
        (len(FRAME) - 1, "FrameTruncated"),
    ],
)
def test_eof_names_where_the_peer_left(left: int, reason: str) -> None:
    reader = FrameReader()
    assert reader.feed(FRAME + FRAME[:left]) == [GOOD_DECL]
    with pytest.raises(FramingError) as info:
        reader.eof()
    assert info.value.reason == reason
    assert info.value.offset == len(FRAME)
    assert info.value.outcomes == []


def test_eof_at_a_frame_boundary_is_clean() -> None:
    reader = FrameReader()
    assert reader.feed(FRAME) == [GOOD_DECL]
    reader.eof()
    reader.eof()


def test_buffer_holds_at_most_one_incomplete_frame() -> None:
    # A comm of n >= 256 bytes costs 2 more head bytes than an empty one.
    filler = MAX_BODY - len(encode_body(Declaration(1, "process.spawned", 1, "", 2))) - 2
    body = encode_body(Declaration(1, "process.spawned", 1, "c" * filler, 2))
    frame = len(body).to_bytes(4, "little") + body
    assert len(body) == MAX_BODY
    reader = FrameReader()
    assert reader.feed(frame[:-1]) == []
    assert reader.buffered == 4 + MAX_BODY - 1
    assert len(reader.feed(frame[-1:] + frame[:100])) == 1
    assert reader.buffered == 100


def test_body_errors_keep_the_stream_going() -> None:
    bad = b"\x00\x00\x00\x00" + (1).to_bytes(4, "little") + b"\x01"
    out = FrameReader().feed(FRAME + bad + FRAME)
    assert [o if isinstance(o, Declaration) else o.reason for o in out] == [
        GOOD_DECL,
        "UnexpectedEof",
        "NotMap5",
        GOOD_DECL,
    ]


# Properties -------------------------------------------------------------------------------

declarations = st.builds(
    Declaration,
    content_version=st.just(1),
    probe_source=st.sampled_from(SOURCES),
    guest_pid=st.integers(0, U32_MAX),
    guest_comm=st.text(max_size=40),
    guest_monotonic_ns=st.integers(0, U64_MAX),
)


def _widths(value: int) -> st.SearchStrategy[int]:
    shortest = _shortest(value)
    return st.sampled_from([w for w in (0, 1, 2, 4, 8) if w >= shortest and (w or value < 24)])


@st.composite
def wire_bodies(draw: st.DrawFn) -> tuple[Declaration, bytes]:
    """Any valid encoding of any valid declaration: key order, head widths all free."""
    decl = draw(declarations)

    def uint(value: int) -> bytes:
        return _uint(value, draw(_widths(value)))

    def text(value: str) -> bytes:
        return _text(value, draw(_widths(len(value.encode()))))

    rest = [
        (text("probe_source"), text(decl.probe_source)),
        (text("guest_pid"), uint(decl.guest_pid)),
        (text("guest_comm"), text(decl.guest_comm)),
        (text("guest_monotonic_ns"), uint(decl.guest_monotonic_ns)),
    ]
    entries = [(text("content_version"), uint(1)), *draw(st.permutations(rest))]
    return decl, _head(5, 5, draw(_widths(5))) + b"".join(k + v for k, v in entries)


@given(declarations)
def test_round_trip_through_the_canonical_encoding(decl: Declaration) -> None:
    assert decode_body(encode_body(decl)) == decl
    assert FrameReader().feed(encode_frame(decl)) == [decl]


@example(Declaration(1, "process.exited", U32_MAX, "c" * 255, U64_MAX))  # 1-byte length head
@given(declarations)
def test_the_agents_own_layout_takes_the_fast_path(decl: Declaration) -> None:
    # Nearly every frame is the agent's layout; the hot path's speed rests on decoding it
    # without the strict decoder (which must agree: see _check_decode).
    assert wire._decode_canonical(encode_body(decl)) == decl


@given(wire_bodies())
def test_every_valid_encoding_decodes(case: tuple[Declaration, bytes]) -> None:
    decl, body = case
    assert decode_body(body) == decl


def _check_decode(body: bytes) -> None:
    """decode_body only ever returns a valid declaration or raises a BodyError."""
    try:
        decl = decode_body(body)
    except BodyError as err:
        assert err.reason in SPEC_REASONS - FRAMING_REASONS
        assert err.offset is not None
        assert 0 <= err.offset <= len(body)
        return
    assert decl.content_version == 1
    assert decl.probe_source in PROBE_SOURCES
    assert 0 <= decl.guest_pid <= U32_MAX
    assert 0 <= decl.guest_monotonic_ns <= U64_MAX
    # The fast path may only accept what the strict path accepts, identically.
    assert wire._decode_strict(body) == decl


@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_body_errors(body: bytes) -> None:
    _check_decode(body)


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
        st.integers(0, 10_000),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def _mutate(body: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(body)
    for op, where, byte in ops:
        i = where % (len(data) + 1)
        if op == "insert":
            data.insert(i, byte)
        elif op == "truncate":
            del data[i:]
        elif i < len(data):
            if op == "flip":
                data[i] ^= 1 << (byte % 8)
            elif op == "set":
                data[i] = byte
            else:
                del data[i]
    return bytes(data)


@given(st.one_of(wire_bodies(), declarations.map(lambda d: (d, encode_body(d)))), mutations)
def test_mutated_valid_bodies_only_ever_raise_body_errors(
    case: tuple[Declaration, bytes], ops: list[tuple[str, int, int]]
) -> None:
    _check_decode(_mutate(case[1], ops))


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Frames with honest prefixes around good, mutated and random bodies, maybe a bad tail."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        body = draw(
            st.one_of(
                declarations.map(encode_body),
                st.tuples(declarations.map(encode_body), mutations).map(lambda c: _mutate(*c)),
                st.binary(max_size=60),
            )
        )
        parts.append(len(body).to_bytes(4, "little") + body)
    parts.append(draw(st.one_of(st.just(b""), st.binary(max_size=12), st.just(OVERSIZE))))
    return b"".join(parts)


@settings(max_examples=200)
@given(streams(), st.lists(st.integers(1, 300), max_size=20))
def test_any_chunking_of_any_stream_gives_the_same_outcomes(stream: bytes, cuts: list[int]) -> None:
    whole = _run(stream, None)
    reader = FrameReader()
    outcomes: list[Declaration | BodyError] = []
    closed_by: str | None = None
    pos = 0
    try:
        for size in [*cuts, len(stream)]:
            outcomes += reader.feed(stream[pos : pos + size])
            assert reader.buffered <= 4 + MAX_BODY
            pos += size
        reader.eof()
    except WireError as err:
        assert isinstance(err, FramingError)
        outcomes += err.outcomes
        closed_by = err.reason
    rejected = [o.reason for o in outcomes if isinstance(o, BodyError)]
    if closed_by is not None:
        rejected.append(closed_by)
    assert (
        [o for o in outcomes if isinstance(o, Declaration)],
        rejected,
        closed_by is not None,
    ) == (whole)


@given(st.lists(st.binary(max_size=64), max_size=10))
def test_random_chunks_only_ever_raise_framing_errors(chunks: list[bytes]) -> None:
    reader = FrameReader()
    try:
        for chunk in chunks:
            for outcome in reader.feed(chunk):
                assert isinstance(outcome, Declaration | BodyError)
            assert reader.buffered <= 4 + MAX_BODY
        reader.eof()
    except FramingError as err:
        assert err.reason in FRAMING_REASONS
