"""The write-ahead spool on its own: what is appended is delivered in order once durable,
survives a crash, leaves only when acknowledged, and damage is contained and declared."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from audit.digest import digest_of
from producer.chain.sealer import Sealed
from producer.delivery import records as rec
from producer.delivery import spool as spool_module
from producer.delivery.spool import ChainState, Spool, SpooledEvent, SpoolOptions
from producer.errors import SpoolError
from tests.support import eventually


def opts(tmp_path: Path, **kw: object) -> SpoolOptions:
    base: dict[str, object] = {"directory": str(tmp_path / "spool"), "fsync": "never"}
    base.update(kw)
    return SpoolOptions(**base)  # type: ignore[arg-type]


def crash(spool: Spool) -> None:
    """What the kernel does when the process dies: descriptors closed, nothing else."""
    for fd in (*spool._retired, *spool._syncing, spool._fd, spool._lock_fd):
        if fd >= 0:
            os.close(fd)
    spool._closed = True


def new_chain(spool: Spool, cell: str = "cell-1", run: str = "run-1") -> ChainState:
    return spool.open_chain(
        chain_id=("%016x" % (len(spool.chains) + 1)),
        cell_id=cell,
        run_id=run,
        spec_signature_hash="sha256:" + "0" * 64,
        opened_at="2026-12-01T10:00:00.000000Z",
        spec={"cell_id": cell},
        source="config",
    )


def append(spool: Spool, chain: ChainState, n: int, *, flags: int = rec.SIGNED) -> list[bytes]:
    payloads = []
    for _ in range(n):
        seq = chain.sequence + 1
        at = f"2026-12-01T10:00:{seq % 60:02d}.000000Z"
        payload = b'{"time":"%s","sequence":"%020d","cell":"%s"}' % (
            at.encode(),
            seq,
            chain.identity.cell_id.encode(),
        )
        sealed = Sealed(seq, digest_of(payload), payload, bool(flags & rec.SIGNED))
        spool.append_event(chain, sealed, flags, f"t.{chain.identity.cell_id}.guest.x", at)
        payloads.append(payload)
    return payloads


def add_bytes(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)


class Sink:
    """Stands in for the publisher: a window of ``room`` messages."""

    def __init__(self, room: int = 10**9) -> None:
        self.room = room
        self.got: list[SpooledEvent] = []
        self.opened = asyncio.Event()

    def deliver(self, ev: SpooledEvent) -> bool:
        if len(self.got) >= self.room:
            self.opened.clear()
            return False
        self.got.append(ev)
        return True

    async def wait(self) -> None:
        await self.opened.wait()

    def widen(self, room: int) -> None:
        self.room = room
        self.opened.set()


async def until(cond: Callable[[], bool]) -> None:
    await eventually(cond, timeout=30)


async def test_events_are_delivered_in_order_once_written(tmp_path: Path) -> None:
    spool = Spool(opts(tmp_path))
    spool.open()
    sink = Sink()
    spool.start_delivery(sink.deliver, sink.wait)
    a, b = new_chain(spool, "a"), new_chain(spool, "b")
    sent = append(spool, a, 3) + append(spool, b, 2) + append(spool, a, 1)
    await until(lambda: len(sink.got) == 6)
    assert [e.payload for e in sink.got] == sent
    assert [(e.chain.identity.cell_id, e.sequence) for e in sink.got] == [
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("b", 1),
        ("b", 2),
        ("a", 4),
    ]
    assert spool.depth() == 6
    await spool.close(clean=True)


async def test_fsync_policies_deliver_only_what_was_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[list[int]] = []
    real = spool_module._fsync_all

    def counting(fds: list[int]) -> None:
        synced.append(fds)
        real(fds)

    monkeypatch.setattr(spool_module, "_fsync_all", counting)
    for policy in ("always", "interval"):
        synced.clear()
        spool = Spool(opts(tmp_path / policy, fsync=policy, fsync_interval_ms=1))
        spool.open()
        sink = Sink()
        spool.start_delivery(sink.deliver, sink.wait)
        chain = new_chain(spool)
        append(spool, chain, 5)
        before = len(synced)
        await until(lambda sink=sink: len(sink.got) == 5)  # type: ignore[misc]
        assert len(synced) > before  # nothing was handed over before an fsync
        await spool.close(clean=True)


async def test_a_crash_loses_nothing_that_was_written(tmp_path: Path) -> None:
    spool = Spool(opts(tmp_path))
    spool.open()
    chain = new_chain(spool)
    sent = append(spool, chain, 5)
    append(spool, chain, 1, flags=0)  # unsigned tail
    spool.flush()
    crash(spool)

    again = Spool(opts(tmp_path))
    again.open()
    assert not again.fresh and not again.recovered_clean
    (restored,) = again.open_chains()
    assert restored.identity.chain_id == chain.identity.chain_id
    assert (restored.sequence, restored.head_hash) == (6, chain.head_hash)
    assert restored.unsigned == 1 and restored.since_checkpoint == 6
    assert restored.last_event_at == chain.last_event_at
    sink = Sink()
    again.start_delivery(sink.deliver, sink.wait)
    await until(lambda: len(sink.got) == 6)
    assert [e.payload for e in sink.got][:5] == sent
    await again.close(clean=True)


async def test_a_clean_stop_is_recorded_with_its_time(tmp_path: Path) -> None:
    spool = Spool(opts(tmp_path))
    spool.open()
    chain = new_chain(spool)
    append(spool, chain, 2)
    await spool.close(clean=True)
    again = Spool(opts(tmp_path))
    again.open()
    assert again.recovered_clean and again.previous_stop_at == chain.last_event_at
    await again.close(clean=False)
    third = Spool(opts(tmp_path))
    third.open()
    assert not third.recovered_clean
    await third.close(clean=True)


async def test_acknowledged_events_are_not_delivered_again(tmp_path: Path) -> None:
    spool = Spool(opts(tmp_path))
    spool.open()
    sink = Sink()
    spool.start_delivery(sink.deliver, sink.wait)
    chain = new_chain(spool)
    append(spool, chain, 10)
    await until(lambda: len(sink.got) == 10)
    for ev in sink.got[:4]:
        spool.acked(ev)
    spool.acked(sink.got[6])  # out of order: seq 7
    await spool.close(clean=True)

    again = Spool(opts(tmp_path))
    again.open()
    sink2 = Sink()
    again.start_delivery(sink2.deliver, sink2.wait)
    # Only the contiguous watermark is kept: seq 7 comes again (JetStream deduplicates it).
    await until(lambda: len(sink2.got) == 6)
    assert [e.sequence for e in sink2.got] == [5, 6, 7, 8, 9, 10]
    assert again.depth() == 6
    await again.close(clean=True)


async def test_acked_segments_are_deleted_and_space_returns(tmp_path: Path) -> None:
    spool = Spool(opts(tmp_path, segment_bytes=2000, max_bytes=6000))
    spool.open()
    sink = Sink()
    spool.start_delivery(sink.deliver, sink.wait)
    chain = new_chain(spool)
    while spool.has_space():
        append(spool, chain, 5)
        spool.flush()
    assert len(spool_module.segment_indexes(spool.opts.directory)) >= 3
    await until(lambda: len(sink.got) == chain.sequence)
    for ev in sink.got:
        spool.acked(ev)
    await until(spool.has_space)
    assert spool.depth() == 0
    assert len(spool_module.segment_indexes(spool.opts.directory)) == 1  # the active one
    await spool.close(clean=True)
    again = Spool(opts(tmp_path))
    again.open()
    (restored,) = again.open_chains()
    assert restored.sequence == chain.sequence and restored.acked_seq == chain.sequence
    await again.close(clean=True)


async def test_a_full_window_spills_to_disk_and_is_fed_back_in_order(tmp_path: Path) -> None:
    spool = Spool(opts(tmp_path, segment_bytes=3000))
    spool.open()
    sink = Sink(room=7)
    spool.start_delivery(sink.deliver, sink.wait)
    chain = new_chain(spool)
    sent = append(spool, chain, 1)
    await until(lambda: len(sink.got) == 1 and spool._spill is None)
    for _ in range(8):
        sent += append(spool, chain, 5)
        spool.flush()
        await asyncio.sleep(0)
    await until(lambda: len(sink.got) == 7)
    assert spool.stats.spills == 1
    sink.widen(10**9)
    await until(lambda: len(sink.got) == 41)
    assert [e.payload for e in sink.got] == sent
    refed = spool.stats.refed
    await until(lambda: spool._spill is None)
    append(spool, chain, 2)  # caught up: direct hand-off again
    await until(lambda: len(sink.got) == 43)
    assert [e.sequence for e in sink.got] == list(range(1, 44))
    assert spool.stats.refed == refed
    await spool.close(clean=True)


async def paced(tmp_path: Path, room: int) -> tuple[Spool, Sink, ChainState]:
    """A spool handing records to a window of ``room``, paced as while the broker is up."""
    spool = Spool(opts(tmp_path))
    spool.open()
    sink = Sink(room=room)
    spool.start_delivery(sink.deliver, sink.wait)
    chain = new_chain(spool)
    await until(lambda: spool._spill is None)
    spool.set_paced(True)
    return spool, sink, chain


async def test_a_paced_spool_holds_readers_back_while_records_wait_for_the_window(
    tmp_path: Path,
) -> None:
    spool, sink, chain = await paced(tmp_path, room=3)
    append(spool, chain, 5)
    spool.flush()
    await until(lambda: len(sink.got) == 3)
    # The window is full and two records wait in memory: readers pause, the bound is not
    # hit, and nothing goes through the disk and back.
    assert spool.has_space() and not spool.accepting()
    assert spool.stats.spills == 0
    sink.widen(4)
    await until(lambda: len(sink.got) == 4)
    await asyncio.sleep(0)
    assert not spool.accepting() and spool.stats.refed == 0  # one still waits for room
    spool.set_paced(False)  # the broker went away: read ahead into the spool
    assert spool.accepting() and spool.stats.spills == 1  # what waited is on disk only
    spool.set_paced(True)
    assert not spool.accepting()
    sink.widen(10**9)
    await asyncio.wait_for(spool.wait_for_space(), 30)  # caught up: readers go on
    assert [e.sequence for e in sink.got] == [1, 2, 3, 4, 5]  # once each, in order
    assert spool.stats.refed == 1
    assert spool.accepting() and spool.stats.full == 0
    await spool.close(clean=True)


async def test_records_held_for_the_window_are_handed_over_when_it_has_room(
    tmp_path: Path,
) -> None:
    spool, sink, chain = await paced(tmp_path, room=2)
    for _ in range(3):
        append(spool, chain, 2)
        spool.flush()
        await asyncio.sleep(0)
    await until(lambda: len(sink.got) == 2)
    assert not spool.accepting()
    sink.widen(10**9)
    await asyncio.wait_for(spool.wait_for_space(), 30)
    await until(lambda: len(sink.got) == 6)
    assert [e.sequence for e in sink.got] == [1, 2, 3, 4, 5, 6]
    assert spool.stats.spills == 0 and spool.stats.refed == 0
    await spool.close(clean=True)


async def test_a_write_cut_short_by_a_crash_is_cut_off_without_declaring_a_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing of a write is handed to the publisher before the whole write is done, so a
    # record a crash cut short was never published: the chain goes on from the last whole
    # record, and declaring a loss would blame a chain that lost nothing.
    spool = Spool(opts(tmp_path))
    spool.open()
    chain = new_chain(spool)
    append(spool, chain, 5)
    spool.flush()
    path = spool._active.path
    whole = os.path.getsize(path)
    append(spool, chain, 1)  # the crash comes before this one is written
    crash(spool)
    record = rec.encode_event(0, 6, rec.SIGNED, "t.cell-1.guest.x", b"x" * 100)
    add_bytes(Path(path), record[:60])  # what a write killed half-way leaves behind

    again = Spool(opts(tmp_path))
    again.open()
    (restored,) = again.open_chains()
    assert restored.sequence == 5
    assert again.damage == [] and again.losses == {}
    assert os.path.getsize(path) == whole
    assert os.listdir(tmp_path / "spool" / "quarantine") == []
    assert any(r.msg == "spool_torn_tail_cut" for r in caplog.records)
    append(again, restored, 1)  # the chain continues at 6, once
    sink = Sink()
    again.start_delivery(sink.deliver, sink.wait)
    await until(lambda: len(sink.got) == 6)
    assert [e.sequence for e in sink.got] == [1, 2, 3, 4, 5, 6]
    await again.close(clean=True)


@pytest.mark.parametrize(
    "where", ["end of an older segment", "garbage at the end", "one stray byte at the end"]
)
async def test_damage_that_no_crash_explains_is_quarantined_and_declared(
    tmp_path: Path, where: str
) -> None:
    # A single byte that is not the first byte of a record is no write a crash cut short.
    small = {"segment_bytes": 400} if where == "end of an older segment" else {}
    spool = Spool(opts(tmp_path, **small))
    spool.open()
    chain = new_chain(spool)
    append(spool, chain, 6)
    spool.flush()
    segments = sorted((tmp_path / "spool").glob("seg-*.log"))
    crash(spool)
    if where != "end of an older segment":
        target = segments[-1]
        add_bytes(target, b"\x00" * (1 if where == "one stray byte at the end" else 40))
    else:
        assert len(segments) > 1
        target = segments[0]
        os.truncate(target, os.path.getsize(target) - 20)  # a closed segment lost its end
    size = os.path.getsize(target)

    again = Spool(opts(tmp_path))
    again.open()
    (restored,) = again.open_chains()
    (report,) = again.damage
    assert os.path.getsize(report.quarantined) == size
    assert again.losses[restored.idx].count >= 1
    await again.close(clean=True)


async def test_a_flipped_byte_loses_one_event_and_names_its_sequence(tmp_path: Path) -> None:
    spool = Spool(opts(tmp_path))
    spool.open()
    chain = new_chain(spool)
    append(spool, chain, 8)
    spool.flush()
    path = spool._active.path
    crash(spool)
    data = bytearray(Path(path).read_bytes())
    fourth = data.find(b'"sequence":"%020d"' % 4)
    data[fourth] ^= 0x01
    Path(path).write_bytes(bytes(data))

    again = Spool(opts(tmp_path))
    again.open()
    (restored,) = again.open_chains()
    assert restored.sequence == 8  # the events after the damage are kept
    loss = again.losses[restored.idx]
    assert (loss.first_sequence, loss.last_sequence) == (4, 4)
    sink = Sink()
    again.start_delivery(sink.deliver, sink.wait)
    await until(lambda: len(sink.got) == 7)
    assert [e.sequence for e in sink.got] == [1, 2, 3, 5, 6, 7, 8]
    await again.close(clean=True)


async def test_a_damaged_state_file_is_set_aside_and_the_log_still_restores(
    tmp_path: Path,
) -> None:
    spool = Spool(opts(tmp_path))
    spool.open()
    chain = new_chain(spool)
    append(spool, chain, 3)
    await spool.close(clean=True)
    state = Path(spool.opts.directory) / "state.json"
    state.write_bytes(state.read_bytes()[:17])
    again = Spool(opts(tmp_path))
    again.open()
    (restored,) = again.open_chains()
    assert restored.sequence == 3
    assert any(d.segment == "state.json" for d in again.damage)
    await again.close(clean=True)


async def test_write_failure_stops_intake_keeps_events_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(opts(tmp_path))
    spool.open()
    sink = Sink()
    spool.start_delivery(sink.deliver, sink.wait)
    chain = new_chain(spool)
    real = spool_module._write_all

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "_write_all", full)
    append(spool, chain, 3)
    spool.flush()
    assert not spool.has_space() and sink.got == []
    monkeypatch.setattr(spool_module, "_write_all", real)
    spool._retry_write()
    assert spool.has_space()
    await until(lambda: len(sink.got) == 3)
    await spool.close(clean=True)


async def test_one_spool_one_producer(tmp_path: Path) -> None:
    spool = Spool(opts(tmp_path))
    spool.open()
    with pytest.raises(SpoolError, match="another producer"):
        Spool(opts(tmp_path)).open()
    await spool.close(clean=True)


async def test_events_an_earlier_run_left_unacked_say_since_when_they_may_be_stored(
    tmp_path: Path,
) -> None:
    # The publisher asks the stream about such an event before sending it once more, if
    # its seal time is older than half the duplicate window: the earlier run may have
    # published it and lost only the PubAck. Events of this run were never sent.
    spool = Spool(opts(tmp_path))
    spool.open()
    chain = new_chain(spool)
    append(spool, chain, 3)
    spool.flush()
    crash(spool)
    again = Spool(opts(tmp_path))
    again.open()
    (restored,) = again.open_chains()
    append(again, restored, 2)
    again.flush()
    sink = Sink()
    again.start_delivery(sink.deliver, sink.wait)
    await until(lambda: len(sink.got) == 5)
    sealed_at = [f"2026-12-01T10:00:{seq:02d}.000000Z" for seq in (1, 2, 3)]
    assert [e.sent_since for e in sink.got[:3]] == [spool_module._epoch(t) for t in sealed_at]
    assert [e.sent_since for e in sink.got[3:]] == [0.0, 0.0]
    await again.close(clean=True)


async def test_sealed_and_settled_chains_are_forgotten_but_stay_sealed(tmp_path: Path) -> None:
    spool = Spool(opts(tmp_path, segment_bytes=500))
    spool.open()
    sink = Sink()
    spool.start_delivery(sink.deliver, sink.wait)
    chain = new_chain(spool)
    append(spool, chain, 3)
    append(spool, chain, 1, flags=rec.SIGNED | rec.SEALED | rec.CONTROL)
    spool.flush()
    await until(lambda: len(sink.got) == 4)
    assert spool.open_chains() == [] and spool.was_sealed("cell-1", "run-1")
    for ev in sink.got:
        spool.acked(ev)
    append(spool, new_chain(spool, "cell-2"), 5)  # rotate past the sealed chain's segment
    spool.flush()
    await until(lambda: chain.idx not in spool.chains)
    await spool.close(clean=True)
    again = Spool(opts(tmp_path))
    again.open()
    assert again.was_sealed("cell-1", "run-1") and not again.was_sealed("cell-2", "run-1")
    await again.close(clean=True)
