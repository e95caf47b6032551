"""The spool's record format: what is written is read back, and damage never hides an
intact record or raises."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.delivery import records as rec

events = st.builds(
    rec.encode_event,
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 31),
    st.from_regex(r"[a-z0-9.-]{0,40}", fullmatch=True),
    st.binary(max_size=300),
)
metas = st.builds(
    lambda kind, body: rec.encode(kind, 0, body),
    st.sampled_from([rec.KIND_OPEN, rec.KIND_ACK]),
    st.binary(max_size=80),
)
streams = st.lists(events | metas, max_size=12)

WHOLE = rec.encode_event(1, 1, 0, "s", b"x" * 40)


def forged(magic: int, kind: int, body: bytes, length: int | None = None) -> bytes:
    """A record with any header fields and a checksum that holds for them."""
    size = len(body) if length is None else length
    prefix = rec.HEADER.pack(magic, kind, 0, size, 0)[:8]
    return prefix + zlib.crc32(body, zlib.crc32(prefix)).to_bytes(4, "little") + body


def flipped(record: bytes) -> bytes:
    """The record with its last body byte flipped, so its checksum fails."""
    return record[:-1] + bytes([record[-1] ^ 0xFF])


@given(streams)
def test_what_is_written_is_read_back(records: list[bytes]) -> None:
    data = b"".join(records)
    found = list(rec.scan(data, final=True))
    assert all(isinstance(r, rec.Record) for r in found)
    assert [data[r.offset : r.end] for r in found if isinstance(r, rec.Record)] == records


def test_event_fields_round_trip() -> None:
    raw = rec.encode_event(7, 2**64 - 1, rec.SIGNED | rec.SEALED, "a.b.c", b'{"x":1}')
    (record,) = rec.scan(raw, final=True)
    assert isinstance(record, rec.Record)
    assert (record.kind, record.flags) == (rec.KIND_EVENT, rec.SIGNED | rec.SEALED)
    ev = rec.decode_event(record.body)
    assert (ev.chain, ev.sequence, ev.subject, ev.payload) == (7, 2**64 - 1, "a.b.c", b'{"x":1}')


@settings(max_examples=300)
@given(streams, st.data())
def test_damage_is_reported_and_every_untouched_record_survives(
    records: list[bytes], data: st.DataObject
) -> None:
    raw = bytearray(b"".join(records))
    if not raw:
        return
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    found = list(rec.scan(bytes(raw), final=True))
    covered = 0
    for item in found:
        assert item.offset == covered  # records and damage tile the buffer
        covered = item.end
    assert covered == len(raw)
    assert any(isinstance(i, rec.Damage) for i in found)
    # every record not containing the flipped byte is still found intact
    offset = 0
    intact = {(r.offset, r.end) for r in found if isinstance(r, rec.Record)}
    for record in records:
        end = offset + len(record)
        if not offset <= at < end:
            assert (offset, end) in intact or any(
                isinstance(d, rec.Damage) and d.offset <= offset < d.end for d in found
            )
        offset = end


def test_a_flipped_byte_costs_only_its_record() -> None:
    records = [rec.encode_event(1, n, 0, "s", b"p" * 50) for n in range(1, 6)]
    raw = bytearray(b"".join(records))
    raw[len(records[0]) + 20] ^= 0xFF  # inside record 2's body
    found = list(rec.scan(bytes(raw), final=True))
    seqs = [rec.decode_event(r.body).sequence for r in found if isinstance(r, rec.Record)]
    assert seqs == [1, 3, 4, 5]
    (damage,) = [d for d in found if isinstance(d, rec.Damage)]
    assert (damage.offset, damage.end) == (len(records[0]), 2 * len(records[0]))
    assert damage.records == 1


def test_a_torn_tail_is_damage_when_final_and_pending_otherwise() -> None:
    whole = rec.encode_event(1, 1, 0, "s", b"x" * 40)
    torn = whole + whole[:30]
    assert [type(i) for i in rec.scan(torn, final=True)] == [rec.Record, rec.Damage]
    assert [type(i) for i in rec.scan(torn, final=False)] == [rec.Record]
    assert [type(i) for i in rec.scan(whole[:5], final=False)] == []


def test_an_absurd_length_is_damage_not_a_huge_read() -> None:
    bad = rec.HEADER.pack(rec.MAGIC, rec.KIND_EVENT, 0, rec.MAX_BODY + 1, 0) + b"x" * 10
    good = rec.encode_event(1, 1, 0, "s", b"x")
    found = list(rec.scan(bad + good, final=False))
    assert isinstance(found[0], rec.Damage) and isinstance(found[1], rec.Record)


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.from_regex(r"[a-z0-9.-]{0,40}", fullmatch=True),
    st.binary(max_size=300),
)
def test_every_event_field_is_decoded_as_written(
    chain: int, sequence: int, subject: str, payload: bytes
) -> None:
    (record,) = rec.scan(rec.encode_event(chain, sequence, 0, subject, payload), final=True)
    assert isinstance(record, rec.Record)
    assert rec.decode_event(record.body) == rec.EventRecord(chain, sequence, subject, payload)


def test_an_event_with_no_subject_and_no_payload_is_decoded() -> None:
    """Its body is exactly the event header: the shortest valid event."""
    (record,) = rec.scan(rec.encode_event(3, 4, 0, "", b""), final=True)
    assert isinstance(record, rec.Record)
    assert rec.decode_event(record.body) == rec.EventRecord(3, 4, "", b"")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (rec.EVENT_HEAD.pack(1, 1, 0)[:-1], "event record shorter than its header"),
        (rec.EVENT_HEAD.pack(1, 1, 5) + b"abcd", "event record shorter than its subject"),
    ],
)
def test_a_malformed_event_body_is_refused(body: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=f"^{why}$"):
        rec.decode_event(body)


def test_an_empty_record_and_one_of_the_largest_length_are_intact() -> None:
    empty = rec.encode(rec.KIND_ACK, 0, b"")
    largest = rec.encode(rec.KIND_OPEN, 0, bytes(rec.MAX_BODY))
    assert list(rec.scan(empty + largest, final=True)) == [
        rec.Record(0, rec.HEADER.size, rec.KIND_ACK, 0, b""),
        rec.Record(rec.HEADER.size, len(empty + largest), rec.KIND_OPEN, 0, bytes(rec.MAX_BODY)),
    ]


@pytest.mark.parametrize(
    ("bad", "headers"),
    [
        (forged(rec.MAGIC, 99, b"y" * 20), 0),
        (forged(rec.MAGIC ^ 1, rec.KIND_EVENT, b"y" * 20), 0),
        (rec.HEADER.pack(rec.MAGIC, rec.KIND_EVENT, 0, 20, 0) + b"y" * 20, 1),
        (WHOLE[:3] + bytes([WHOLE[3] ^ rec.SIGNED]) + WHOLE[4:], 1),
    ],
    ids=["unknown kind", "wrong magic", "wrong checksum", "flipped flag"],
)
def test_a_header_that_does_not_hold_is_damage_even_with_a_matching_checksum(
    bad: bytes, headers: int
) -> None:
    found = list(rec.scan(bad + WHOLE, final=True))
    assert found == [
        rec.Damage(0, len(bad), headers),
        rec.Record(len(bad), len(bad) + len(WHOLE), rec.KIND_EVENT, 0, WHOLE[rec.HEADER.size :]),
    ]


def test_scanning_resyncs_on_the_very_next_byte() -> None:
    found = list(rec.scan(b"\x00" + WHOLE, final=True))
    assert found == [
        rec.Damage(0, 1, 0),
        rec.Record(1, 1 + len(WHOLE), rec.KIND_EVENT, 0, WHOLE[rec.HEADER.size :]),
    ]


def test_damage_across_records_counts_each_header_it_holds() -> None:
    """The count is the lower bound of records lost that the spool declares."""
    records = [rec.encode_event(1, n, 0, "s", b"p" * 50) for n in range(1, 6)]
    raw = records[0] + b"".join(flipped(r) for r in records[1:4]) + records[4]
    found = list(rec.scan(raw, final=True))
    size = len(records[0])
    assert [rec.decode_event(r.body).sequence for r in found if isinstance(r, rec.Record)] == [1, 5]
    assert [d for d in found if isinstance(d, rec.Damage)] == [rec.Damage(size, 4 * size, 3)]


@pytest.mark.parametrize(
    ("tail", "headers"),
    [
        (WHOLE[:5], 1),
        (b"\x00" * 5 + WHOLE[:2], 0),
        (b"\x00" * 5 + WHOLE[:3], 1),
        (WHOLE[:2] + b"\x07" + b"\x00" * 10, 0),
    ],
    ids=["short header", "magic at the end", "magic and kind at the end", "unknown kind"],
)
def test_a_short_damaged_tail_is_damage_with_the_headers_it_holds(
    tail: bytes, headers: int
) -> None:
    found = list(rec.scan(WHOLE + tail, final=True))
    assert found[1:] == [rec.Damage(len(WHOLE), len(WHOLE) + len(tail), headers)]


@pytest.mark.parametrize(
    ("tail", "cut_short"),
    [
        (WHOLE[:1], True),
        (WHOLE[:5], True),
        (WHOLE[: rec.HEADER.size], True),
        (WHOLE[:-1], True),
        (rec.HEADER.pack(rec.MAGIC, rec.KIND_OPEN, 0, rec.MAX_BODY, 0) + b"z", True),
        (b"\x00", False),
        (b"\x00" * 2, False),
        (b"\x00" * 5, False),
        (flipped(WHOLE), False),
        (rec.HEADER.pack(rec.MAGIC, rec.KIND_OPEN, 0, rec.MAX_BODY + 1, 0), False),
        (forged(rec.MAGIC, 99, b"y" * 20)[:-1], False),
        (forged(rec.MAGIC ^ 1, rec.KIND_EVENT, b"y" * 20)[:-1], False),
    ],
    ids=[
        "first byte",
        "part of a header",
        "header only",
        "all but the last byte",
        "largest length",
        "a byte no record starts with",
        "two such bytes",
        "five such bytes",
        "whole but damaged",
        "header only, of an absurd length",
        "unknown kind",
        "wrong magic",
    ],
)
def test_only_the_start_of_a_record_is_cut_short(tail: bytes, cut_short: bool) -> None:
    """What a crash in the middle of a write can leave is cut off; anything else is damage."""
    assert rec.is_cut_short(WHOLE + tail, len(WHOLE)) is cut_short
