"""The spool's record format: what is written is read back, and damage never hides an
intact record or raises."""

from __future__ import annotations

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
