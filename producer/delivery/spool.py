"""The write-ahead spool (SPEC 7): every sealed event is on disk before it is published
and leaves only after its PubAck; each chain's state survives the process.

Layout under ``<data_dir>/spool``::

    seg-<index>.log     append-only record segments (producer/delivery/records.py)
    state.json          chain states and watermarks, replaced atomically
    reserve             disk space held back for state.json when the disk is full
    quarantine/         damaged bytes moved aside at recovery; never deleted by us
    lock                held (flock) by the one producer using this spool

Why a hand-written log and not SQLite: its storage step (framing, CRC, the batched write)
costs about 1.4 µs of CPU per event against 5-9 µs for an SQLite WAL insert plus delete,
measured on this machine class (docs/architecture.md); the whole append, chain mirror and
durable hand-off included, is 6-10 µs (bench/spool.py), within a producer budget of about
40 µs per event. The
log also makes damage simple to contain: records are checksummed, a reader resynchronises
after damage, and what is damaged is moved aside rather than trusted.

Durability: what a loop turn appended is written with one ``write`` (group commit) and
made durable by ``fsync`` according to the policy (``always``: after every write;
``interval``: at most ``fsync_interval_ms`` later; ``never``: left to the kernel, for
tests). A record reaches the publisher only once durable, so the stream never holds an
event the spool could forget, and a restarted producer never re-seals a sequence that was
published.

Chain state lives beside the records it derives from: each chain's mirror (sequence, head
digest, unsigned run, events since the last checkpoint, last event time) advances as its
records are appended. ``state.json`` is written only right after the log is synced, so it
never runs ahead of the log, and recovery replays the records after it to arrive at the
state the last durable record implies.

Segments are deleted once every event in them is acknowledged, after a fresh snapshot. The
publisher holds a bounded window in memory; when it is full the spool stops handing
records over directly and feeds them back from disk later, so a long broker outage costs
disk, not memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import fcntl
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from audit.digest import digest_of
from audit.keys import put_file
from producer.aio import wait_set
from producer.chain.sealer import Sealed
from producer.delivery import records as rec
from producer.errors import SpoolError
from producer.ops.logs import event

log = logging.getLogger(__name__)

STATE_FILE: Final = "state.json"
RESERVE_FILE: Final = "reserve"
RESERVE_BYTES: Final = 1 << 20
"""Disk held back (a preallocated file) and given up when a snapshot finds the disk full.
Segments are deleted only after a snapshot that no longer needs them, so without it a disk
the spool filled to the last byte could never be freed again. Room for a large state."""
SEGMENT_PREFIX: Final = "seg-"
SEGMENT_SUFFIX: Final = ".log"
ACK_RECORD_INTERVAL_S: Final = 0.1
SPACE_CHECK_BYTES: Final = 1024 * 1024
READ_CHUNK: Final = 256 * 1024
SEALED_RUNS_KEPT: Final = 10_000

FsyncPolicy = Literal["always", "interval", "never"]


class ChainIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """What a chain is, fixed when it opens and written as an ``OPEN`` record."""

    idx: int
    chain_id: str
    cell_id: str
    run_id: str
    spec_signature_hash: str
    opened_at: str
    spec: dict[str, Any] = msgspec.field(default_factory=dict)
    """The registration (CellSpec fields), so a restart can serve the cell again."""
    source: str = "config"
    """``config`` or ``api``: who registered it, so a restart knows who should again."""


class ChainState(msgspec.Struct, kw_only=True):
    """A chain's identity plus what its last durable record implies."""

    identity: ChainIdentity
    sequence: int = 0
    head_hash: str = ""
    unsigned: int = 0
    since_checkpoint: int = 0
    last_event_at: str | None = None
    sealed: bool = False
    acked_seq: int = 0

    @property
    def idx(self) -> int:
        return self.identity.idx


class SpoolSnapshot(msgspec.Struct, kw_only=True):
    version: int = 1
    generation: int = 0
    clean: bool = False
    stopped_at: str | None = None
    next_idx: int = 1
    next_segment: int = 1
    chains: list[ChainState] = msgspec.field(default_factory=list)
    sealed_runs: list[tuple[str, str, str]] = msgspec.field(default_factory=list)
    """Recently settled sealed chains (cell, run, chain id): a sealed run stays sealed."""


class _Meta(msgspec.Struct):
    """The attributes recovery needs from an event's JSON."""

    time: str = ""


_meta_decoder: Final = msgspec.json.Decoder(_Meta)
_identity_decoder: Final = msgspec.json.Decoder(ChainIdentity)
_acks_decoder: Final = msgspec.json.Decoder(list[tuple[int, int]])
_snapshot_decoder: Final = msgspec.json.Decoder(SpoolSnapshot)


class SpooledEvent(msgspec.Struct, gc=False):
    """A durable event on its way to the publisher; ``segment`` is where it lives.

    Up to a publish window of these (65,536) are alive at once: untracked by the cyclic
    garbage collector (``gc=False``; it refers to nothing that refers back), they are not
    walked by every collection, which took a tenth of the loop in ``make bench``."""

    segment: int
    chain: ChainState
    sequence: int
    flags: int
    subject: str
    payload: bytes
    appended_at: float = 0.0
    """Monotonic time it was spooled by this process (0: read back from disk)."""
    sent_since: float = 0.0
    """For an event an earlier run spooled and never saw acknowledged: the wall time from
    which that run may have published it (when it was sealed). 0 for this run's events,
    which reach the publisher once."""


@dataclass(slots=True)
class _Segment:
    index: int
    path: str
    size: int = 0
    unacked: int = 0
    first_at: float = 0.0
    """Wall time of its oldest event still unacknowledged (approximate after recovery)."""
    ranges: dict[int, list[int]] = field(default_factory=dict)
    """Per chain: lowest and highest sequence here, and how many events. A chain's events
    are appended in sequence order, so the range is exact unless damage cut a hole."""


@dataclass(frozen=True, slots=True)
class Loss:
    """Events of one chain that recovery could not bring back, for its ``gap`` event."""

    count: int
    first_at: str | None
    last_at: str | None
    first_sequence: int | None = None
    last_sequence: int | None = None


@dataclass(frozen=True, slots=True)
class DamageReport:
    segment: str
    quarantined: str
    bytes: int
    records: int


@dataclass(slots=True)
class SpoolStats:
    appended: int = 0
    acked: int = 0
    bytes_written: int = 0
    writes: int = 0
    fsyncs: int = 0
    spills: int = 0
    refed: int = 0
    full: int = 0
    write_errors: int = 0


@dataclass(frozen=True, slots=True)
class SpoolOptions:
    directory: str
    fsync: FsyncPolicy = "interval"
    fsync_interval_ms: int = 5
    max_bytes: int = 1 << 30
    min_free_bytes: int = 256 << 20
    segment_bytes: int = 64 << 20


Deliver = Callable[[SpooledEvent], bool]
"""Hands a durable event to the publisher; False when its window is full."""


_Pending = tuple[int, int, SpooledEvent | None]
"""A record written but not yet durable: its segment, where it ends, and the event (None
for other records). A tuple: one is made per event, on the hot path."""


class Spool:
    """One producer's write-ahead spool: :meth:`open`, append and deliver, :meth:`close`.

    Everything runs on the event loop apart from background ``fsync`` calls.
    """

    def __init__(self, opts: SpoolOptions, *, wall: Callable[[], float] = time.time) -> None:
        self.opts = opts
        self.stats = SpoolStats()
        self.chains: dict[int, ChainState] = {}
        self.snapshot = SpoolSnapshot()
        self.fresh = True
        """No state existed before this start: the first start, or ``data_dir`` was wiped."""
        self.recovered_clean = False
        self.previous_stop_at: str | None = None
        self.damage: list[DamageReport] = []
        self.losses: dict[int, Loss] = {}
        self.orphans = 0
        """Recovered events whose chain's ``OPEN`` record was lost with damaged data."""
        self._seen: dict[int, list[list[int]]] = {}
        """Recovery only: per chain, the runs of sequences found in the log."""
        self._wall = wall
        self._segments: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._run_first_segment = 0
        """Segments before this one were written by earlier runs."""
        self._fd = -1
        self._retired: list[int] = []
        self._syncing: list[int] = []
        """Retired segment descriptors an in-flight fsync will sync and close."""
        self._lock_fd = -1
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._pending: deque[_Pending] = deque()
        self._written: tuple[int, int] = (0, 0)
        self._durable: tuple[int, int] = (0, 0)
        self._sync_future: asyncio.Future[None] | None = None
        self._sync_handle: asyncio.TimerHandle | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._last_sync = 0.0
        self._deliver: Deliver | None = None
        self._wait_window: Callable[[], Awaitable[Any]] | None = None
        self._spill: tuple[int, int] | None = None
        self._held = False
        """Durable records wait in ``_pending`` for room in the publisher's window."""
        self._feeder: asyncio.Task[None] | None = None
        self._feed_wake = asyncio.Event()
        self._ack_dirty: dict[int, int] = {}
        self._out_of_order: dict[int, set[int]] = {}
        self._last_ack_record = 0.0
        self._since_space_check = 0
        self._disk_low = False
        self._write_error: OSError | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self._full = False
        self._paced = False
        self._space = asyncio.Event()
        self._space.set()
        self._unacked = 0
        self._chain_waiters: dict[int, asyncio.Event] = {}
        self._empty = asyncio.Event()
        self._empty.set()
        self._deletable: set[int] = set()
        self._maintain_handle: asyncio.Handle | None = None
        self._closed = False

    # -- opening and recovery ---------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, recover state and segments, start a new active segment."""
        d = self.opts.directory
        try:
            os.makedirs(os.path.join(d, "quarantine"), mode=0o700, exist_ok=True)
            self._lock_fd = os.open(os.path.join(d, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(d, f"cannot create the spool directory: {exc.strerror}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise SpoolError(d, "another producer holds this spool") from exc
        self._load_snapshot()
        indexes = sorted(segment_indexes(d))
        for index in indexes:
            self._recover_segment(index, newest=index == indexes[-1])
        for seg in self._segments.values():
            seg.unacked = self._unacked_in(seg)
            self._unacked += seg.unacked
            if not seg.unacked:
                seg.first_at = 0.0
                self._deletable.add(seg.index)
        if self._unacked:
            self._empty.clear()
        self._find_holes()
        self.snapshot.generation += 1
        self._open_segment()
        assert self._active is not None
        self._run_first_segment = self._active.index
        self.write_snapshot(clean=False)
        self._reserve()

    def _load_snapshot(self) -> None:
        path = os.path.join(self.opts.directory, STATE_FILE)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            self.fresh = not segment_indexes(self.opts.directory)
            return
        except OSError as exc:
            raise SpoolError(path, f"cannot read: {exc.strerror}") from exc
        self.fresh = False
        try:
            snap = _snapshot_decoder.decode(data)
        except msgspec.DecodeError:
            # Keep the damaged file for inspection; the log still holds the chains.
            moved = self._quarantine_path("state.json", len(data))
            os.replace(path, moved)
            self.damage.append(DamageReport(STATE_FILE, moved, len(data), 0))
            event(log, logging.ERROR, "spool_state_damaged", quarantined=moved)
            return
        self.snapshot = snap
        self.recovered_clean = snap.clean
        self.previous_stop_at = snap.stopped_at
        for chain in snap.chains:
            self.chains[chain.idx] = chain

    def _recover_segment(self, index: int, *, newest: bool) -> None:
        path = segment_path(self.opts.directory, index)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise SpoolError(path, f"cannot read: {exc.strerror}") from exc
        if newest:
            data = self._cut_torn_tail(path, data)
        seg = _Segment(index, path, size=len(data))
        self._segments[index] = seg
        good: list[bytes] = []
        damaged: list[rec.Damage] = []
        near: dict[int, str | None] = {}
        for item in rec.scan(data, final=True):
            if isinstance(item, rec.Damage):
                damaged.append(item)
                continue
            good.append(data[item.offset : item.end])
            touched = self._replay(item, seg)
            if touched is not None:
                near.setdefault(touched, self.chains[touched].last_event_at)
        if damaged:
            self._quarantine(seg, data, good, damaged, near)

    def _cut_torn_tail(self, path: str, data: bytes) -> bytes:
        """A crash in the middle of the last write leaves the newest segment ending in part
        of a record. Nothing in that write was handed to the publisher (hand-off waits for
        the whole write), so no sequence was published from it: the chain goes on from the
        last whole record, as after a crash just before the write. Cutting it off is not
        damage, and declaring a loss would blame chains that lost nothing."""
        end = 0
        for item in rec.scan(data, final=False):
            end = item.end
        if end == len(data) or not rec.is_cut_short(data, end):
            return data
        try:
            with open(path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
        except OSError as exc:
            raise SpoolError(path, f"cannot cut its torn tail: {exc.strerror}") from exc
        event(
            log,
            logging.WARNING,
            "spool_torn_tail_cut",
            segment=os.path.basename(path),
            offset=end,
            bytes=len(data) - end,
        )
        return data[:end]

    def _replay(self, item: rec.Record, seg: _Segment) -> int | None:
        """Apply one recovered record to the chain states; the chain it belongs to."""
        if item.kind == rec.KIND_OPEN:
            ident = _identity_decoder.decode(item.body)
            self.chains.setdefault(ident.idx, ChainState(identity=ident))
            self.snapshot.next_idx = max(self.snapshot.next_idx, ident.idx + 1)
            return ident.idx
        if item.kind == rec.KIND_ACK:
            for idx, acked in _acks_decoder.decode(item.body):
                chain = self.chains.get(idx)
                if chain is not None and acked > chain.acked_seq:
                    chain.acked_seq = acked
            return None
        ev = rec.decode_event(item.body)
        chain = self.chains.get(ev.chain)
        if chain is None:
            self.orphans += 1
            return None
        _extend(seg.ranges, ev.chain, ev.sequence)
        _extend_runs(self._seen.setdefault(ev.chain, []), ev.sequence)
        if not seg.first_at:
            seg.first_at = _epoch(_meta_decoder.decode(ev.payload).time) or self._wall()
        if ev.sequence > chain.sequence:
            at = _meta_decoder.decode(ev.payload).time
            _advance(chain, ev.sequence, digest_of(ev.payload), item.flags, at)
        return ev.chain

    def _find_holes(self) -> None:
        """Every event of a chain not yet acknowledged must be in the log: those that are
        not were lost with damaged data, and their sequences are declared lost (the chain
        itself goes on from its recorded head, so no sequence is ever sealed twice)."""
        for idx, chain in self.chains.items():
            expected_from = chain.acked_seq + 1
            if expected_from > chain.sequence:
                continue
            cursor = expected_from
            for lo, hi in self._seen.get(idx, []):
                if hi < cursor:
                    continue
                if lo > cursor:
                    self._add_loss(
                        idx, Loss(lo - cursor, chain.last_event_at, None, cursor, lo - 1)
                    )
                cursor = hi + 1
            if cursor <= chain.sequence:
                self._add_loss(
                    idx,
                    Loss(
                        chain.sequence - cursor + 1,
                        chain.last_event_at,
                        None,
                        cursor,
                        chain.sequence,
                    ),
                )
        self._seen.clear()

    def _add_loss(self, idx: int, loss: Loss) -> None:
        known = self.losses.get(idx)
        if known is None:
            self.losses[idx] = loss
            return
        firsts = [s for s in (known.first_sequence, loss.first_sequence) if s is not None]
        lasts = [s for s in (known.last_sequence, loss.last_sequence) if s is not None]
        self.losses[idx] = Loss(
            known.count + loss.count,
            known.first_at or loss.first_at,
            loss.last_at or known.last_at,
            min(firsts) if firsts else None,
            max(lasts) if lasts else None,
        )

    def _quarantine(
        self,
        seg: _Segment,
        data: bytes,
        good: list[bytes],
        damaged: list[rec.Damage],
        near: dict[int, str | None],
    ) -> None:
        """Keep the intact records in place, move the damaged file aside, and note a loss
        in every chain that had events here (which records were lost is unknowable)."""
        moved = self._quarantine_path(os.path.basename(seg.path), len(data))
        os.replace(seg.path, moved)
        body = b"".join(good)
        put_file(seg.path, body, mode=0o600, place=os.replace)
        seg.size = len(body)
        lost = max(1, sum(d.records for d in damaged))
        report = DamageReport(
            os.path.basename(seg.path), moved, sum(d.end - d.offset for d in damaged), lost
        )
        self.damage.append(report)
        for idx, before in near.items():
            chain = self.chains.get(idx)
            if chain is not None and not chain.sealed:
                self._add_loss(idx, Loss(lost, before, chain.last_event_at))
        event(
            log,
            logging.ERROR,
            "spool_damage_quarantined",
            segment=report.segment,
            quarantined=moved,
            damaged_bytes=report.bytes,
            records_lost_at_least=lost,
            chains=len(near),
        )

    def _quarantine_path(self, name: str, size: int) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wall()))
        return os.path.join(self.opts.directory, "quarantine", f"{stamp}-{size}-{name}")

    def _unacked_in(self, seg: _Segment) -> int:
        count = 0
        for idx, (lo, hi, n) in seg.ranges.items():
            chain = self.chains.get(idx)
            if chain is not None:
                count += n if chain.acked_seq < lo else max(0, min(n, hi - chain.acked_seq))
        return count

    # -- chains -----------------------------------------------------------------------------

    def open_chain(
        self,
        *,
        chain_id: str,
        cell_id: str,
        run_id: str,
        spec_signature_hash: str,
        opened_at: str,
        spec: dict[str, Any],
        source: str,
    ) -> ChainState:
        """A new chain; its ``OPEN`` record precedes its first event."""
        ident = ChainIdentity(
            idx=self.snapshot.next_idx,
            chain_id=chain_id,
            cell_id=cell_id,
            run_id=run_id,
            spec_signature_hash=spec_signature_hash,
            opened_at=opened_at,
            spec=spec,
            source=source,
        )
        self.snapshot.next_idx += 1
        chain = ChainState(identity=ident)
        self.chains[ident.idx] = chain
        self._append(rec.encode(rec.KIND_OPEN, 0, msgspec.json.encode(ident)), None)
        return chain

    def open_chains(self) -> list[ChainState]:
        """Chains not yet sealed, oldest first."""
        return [c for _, c in sorted(self.chains.items()) if not c.sealed]

    def was_sealed(self, cell_id: str, run_id: str) -> bool:
        """Whether this spool sealed a chain of the run (a sealed run stays sealed)."""
        if any((c, r) == (cell_id, run_id) for c, r, _ in self.snapshot.sealed_runs):
            return True
        return any(
            c.sealed and (c.identity.cell_id, c.identity.run_id) == (cell_id, run_id)
            for c in self.chains.values()
        )

    # -- appending --------------------------------------------------------------------------

    def has_space(self) -> bool:
        """Room for more events: below ``max_bytes``, above the free-disk floor, and the last
        write did not fail."""
        return not self._full

    def accepting(self) -> bool:
        """Whether guest readers may go on: there is room, and they are not running ahead of
        a publisher that is draining (see :meth:`set_paced`)."""
        return self._space.is_set()

    async def wait_for_space(self) -> None:
        """Wait until :meth:`accepting`."""
        await self._space.wait()

    def set_paced(self, paced: bool) -> None:
        """Pace readers by the publisher (``True`` while the broker is connected).

        While the broker takes events, readers that outrun the publisher's window only
        push events through the disk and back (written, read, decoded again), CPU the
        publisher needs: so while paced, readers wait whenever the window is full and
        records are waiting on disk. While the broker is away they read ahead into the
        spool up to its bound, which is what the spool is for.
        """
        self._paced = paced
        if not paced and self._held:
            self._unhold()
        self._update_space()

    def can_overflow(self) -> bool:
        """Whether the disk would still take events beyond ``max_bytes`` (what was already
        read when a stop comes; the bound is soft, the free-space floor and write errors
        are not)."""
        return self._write_error is None and not self._disk_low

    def append_event(
        self, chain: ChainState, sealed: Sealed, flags: int, subject: str, at: str
    ) -> None:
        """Spool one sealed event. Callers check :meth:`has_space` first; a sealed event is
        never refused, so chain events may overshoot the bound by a few."""
        sequence = sealed.sequence
        if sequence != chain.sequence + 1:
            raise SpoolError(
                self.opts.directory,
                f"chain {chain.identity.chain_id}: sequence {sequence} after {chain.sequence}",
            )
        _advance(chain, sequence, sealed.digest, flags, at)
        seg = self._active
        assert seg is not None
        _extend(seg.ranges, chain.idx, sequence)
        seg.unacked += 1
        self._unacked += 1
        self._empty.clear()
        if not seg.first_at:
            seg.first_at = self._wall()
        payload = sealed.payload
        data = rec.encode_event(chain.idx, sequence, flags, subject, payload)
        spooled = SpooledEvent(
            seg.index, chain, sequence, flags, subject, payload, time.monotonic()
        )
        self._append(data, spooled)
        self.stats.appended += 1

    def _append(self, data: bytes, spooled: SpooledEvent | None) -> None:
        if self._closed:
            raise SpoolError(self.opts.directory, "the spool is closed")
        seg = self._active
        assert seg is not None
        self._buffer.append(data)
        self._buffered += len(data)
        self._pending.append((seg.index, seg.size + self._buffered, spooled))
        self._since_space_check += len(data)
        if self._since_space_check >= SPACE_CHECK_BYTES:
            self._since_space_check = 0
            self._check_disk()
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what this loop turn appended, in one ``write`` (the group commit)."""
        self._flush_handle = None
        if self._write_error is None:
            self._write()

    def _write(self) -> bool:
        """Write the buffer; False if that failed (it stays in memory for a retry)."""
        if not self._buffer:
            return True
        try:
            self._write_buffer()
        except OSError as exc:
            self._write_failed(exc)
            return False
        if self.opts.fsync == "never":
            self._durable = self._written
            self._release()
        else:
            self._schedule_sync()
        seg = self._active
        assert seg is not None
        if seg.size >= self.opts.segment_bytes:
            self._rotate()
        self._update_space()
        return True

    def _write_buffer(self) -> None:
        seg = self._active
        assert seg is not None
        data = b"".join(self._buffer)
        try:
            _write_all(self._fd, data)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, seg.size)  # end on a record boundary
            raise
        self._buffer.clear()
        self._buffered = 0
        seg.size += len(data)
        self.stats.bytes_written += len(data)
        self.stats.writes += 1
        self._written = (seg.index, seg.size)

    def _write_failed(self, exc: OSError) -> None:
        """Keep what could not be written in memory (no space: readers pause), say so
        once, and retry every second until it goes through."""
        if self._write_error is None:
            event(
                log,
                logging.ERROR,
                "spool_write_failed",
                error=exc.strerror or repr(exc),
                errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                buffered_bytes=self._buffered,
            )
        self._write_error = exc
        self.stats.write_errors += 1
        self._update_space()
        if self._retry_handle is None and not self._closed:
            self._retry_handle = asyncio.get_running_loop().call_later(1.0, self._retry_write)

    def _retry_write(self) -> None:
        """Try the failed write again; while it keeps failing, say nothing more (the error
        stays set, so readers stay paused instead of flapping every second)."""
        self._retry_handle = None
        if self._write():
            self._write_error = None
            event(log, logging.WARNING, "spool_write_recovered")
            self._check_disk()
        elif self._deletable:
            # Only deleting acknowledged segments frees the disk: if the snapshot that must
            # precede it failed, try it again.
            self._schedule_maintenance()

    # -- durability and hand-off --------------------------------------------------------------

    def _schedule_sync(self) -> None:
        if self._sync_future is not None or self._sync_handle is not None:
            return
        delay = 0.0
        if self.opts.fsync == "interval":
            due = self._last_sync + self.opts.fsync_interval_ms / 1000
            delay = max(0.0, due - time.monotonic())
        self._sync_handle = asyncio.get_running_loop().call_later(delay, self._start_sync)

    def _start_sync(self) -> None:
        self._sync_handle = None
        if self._closed:
            return
        target, retired = self._written, self._retired
        self._retired = []
        self._syncing = retired
        fds = [*retired, self._fd]
        future = asyncio.get_running_loop().run_in_executor(None, _fsync_all, fds)
        self._sync_future = future
        future.add_done_callback(lambda f: self._synced(f, target, retired))

    def _synced(
        self, future: asyncio.Future[None], target: tuple[int, int], retired: list[int]
    ) -> None:
        self._sync_future = None
        self._syncing = []
        self._last_sync = time.monotonic()
        for fd in retired:
            os.close(fd)
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            # The kernel may have dropped dirty pages: nothing since the last good fsync is
            # known to be on disk. Stop taking events until a write works again.
            event(log, logging.CRITICAL, "spool_fsync_failed", error=repr(exc))
            self._write_failed(exc if isinstance(exc, OSError) else OSError(str(exc)))
            return
        self.stats.fsyncs += 1
        if target > self._durable:
            self._durable = target
            self._release()
        if self._written > self._durable:
            self._schedule_sync()

    def _release(self) -> None:
        """Hand every durable record to the publisher, in log order.

        When the publisher's window is full: while paced, the rest waits here in memory
        (readers are held back, so it cannot grow past what they had already read) and the
        feeder resumes it when the window has room; otherwise it spills, to be read back
        from disk, so memory stays bounded however long the broker is away.
        """
        pending, durable, deliver = self._pending, self._durable, self._deliver
        while pending and pending[0][:2] <= durable:
            segment, end, spooled = pending[0]
            if (
                spooled is not None
                and deliver is not None
                and self._spill is None
                and not deliver(spooled)
            ):
                if self._paced:
                    self._held = True
                else:
                    self._spill = (segment, end - _record_size(spooled))
                    self.stats.spills += 1
                self._feed_wake.set()
                self._update_space()
                if self._held:
                    return
            pending.popleft()

    def _unhold(self) -> None:
        """The broker went away while records waited in memory for the window: spill them
        instead, so readers may read ahead into the spool."""
        self._held = False
        for segment, end, spooled in self._pending:
            if spooled is not None:
                self._spill = (segment, end - _record_size(spooled))
                self.stats.spills += 1
                self._feed_wake.set()
                break
        self._release()  # drops the durable ones: the feeder reads them back

    def start_delivery(self, deliver: Deliver, wait_window: Callable[[], Awaitable[Any]]) -> None:
        """Hand records to ``deliver``: first what is already on disk (oldest first), then
        new records as they become durable. ``wait_window`` waits until ``deliver`` has room
        again after it said no."""
        self._deliver = deliver
        self._wait_window = wait_window
        self._spill = (min(self._segments), 0)
        self._update_space()
        self._feed_wake.set()
        self._schedule_maintenance()
        if self._feeder is None:
            self._feeder = asyncio.get_running_loop().create_task(self._feed(), name="spool-feed")

    async def _feed(self) -> None:
        """Resume records held in memory, and bring spilled ones back from disk, while the
        publisher has room."""
        while not self._closed:
            await self._feed_wake.wait()
            self._feed_wake.clear()
            if self._held:
                assert self._wait_window is not None
                await self._wait_window()
                if self._held:  # still paced: go on from memory
                    self._held = False
                    self._release()
                    self._update_space()
            while self._spill is not None and not self._closed:
                if not await self._feed_some():
                    break

    async def _feed_some(self) -> bool:
        """Deliver records from the spill cursor on; False when caught up."""
        assert self._spill is not None and self._deliver is not None
        index, offset = self._spill
        seg = self._segments.get(index)
        limit = 0 if seg is None else min(seg.size, self._durable_end(index))
        if seg is None or offset >= limit:
            later = [i for i in self._segments if i > index and (i, 0) <= self._durable]
            if (seg is not None and index == self._durable[0]) or not later:
                # Caught up with the durable end: new records flow directly again.
                self._spill = None
                self._release()
                if self._paced:
                    self._update_space()
                return False
            self._spill = (min(later), 0)
            return True
        data = await asyncio.to_thread(
            _read_range, seg.path, offset, min(limit, offset + READ_CHUNK)
        )
        consumed = 0
        for item in rec.scan(data, final=False):
            if isinstance(item, rec.Damage):
                raise SpoolError(seg.path, f"damaged record at offset {offset + item.offset}")
            if item.kind == rec.KIND_EVENT:
                ev = rec.decode_event(item.body)
                chain = self.chains.get(ev.chain)
                if chain is not None and not self._is_acked(chain, ev.sequence):
                    spooled = SpooledEvent(
                        index, chain, ev.sequence, item.flags, ev.subject, ev.payload
                    )
                    if index < self._run_first_segment:  # unknown time: long ago
                        spooled.sent_since = _epoch(_meta_decoder.decode(ev.payload).time) or 1.0
                    if not self._deliver(spooled):
                        self._spill = (index, offset + consumed)
                        assert self._wait_window is not None
                        await self._wait_window()
                        return True
                    self.stats.refed += 1
            consumed = item.end
        if consumed == 0:
            raise SpoolError(seg.path, f"record at offset {offset} is larger than a read")
        self._spill = (index, offset + consumed)
        return True

    def _durable_end(self, index: int) -> int:
        d_index, d_offset = self._durable
        if index < d_index:
            return self._segments[index].size
        return d_offset if index == d_index else 0

    def _is_acked(self, chain: ChainState, sequence: int) -> bool:
        if sequence <= chain.acked_seq:
            return True
        later = self._out_of_order.get(chain.idx)
        return later is not None and sequence in later

    # -- acknowledgements -------------------------------------------------------------------

    def acked(self, spooled: SpooledEvent) -> None:
        """JetStream has the event: it may leave the spool."""
        self.stats.acked += 1
        self._settle(spooled.segment, spooled.chain, spooled.sequence)

    def _settle(self, segment: int, chain: ChainState, sequence: int) -> None:
        seg = self._segments.get(segment)
        if seg is not None and seg.unacked > 0:
            seg.unacked -= 1
            self._unacked -= 1
            if not self._unacked:
                self._empty.set()
            if not seg.unacked:
                seg.first_at = 0.0
                if seg is not self._active:
                    self._deletable.add(seg.index)
                    self._schedule_maintenance()
        if sequence == chain.acked_seq + 1:
            chain.acked_seq = sequence
            later = self._out_of_order.get(chain.idx)
            while later and chain.acked_seq + 1 in later:
                later.discard(chain.acked_seq + 1)
                chain.acked_seq += 1
            if later is not None and not later:
                del self._out_of_order[chain.idx]
            self._ack_dirty[chain.idx] = chain.acked_seq
            waiter = self._chain_waiters.get(chain.idx)
            if waiter is not None and chain.acked_seq >= chain.sequence:
                waiter.set()
        elif sequence > chain.acked_seq:
            self._out_of_order.setdefault(chain.idx, set()).add(sequence)
        now = time.monotonic()
        if self._ack_dirty and now - self._last_ack_record >= ACK_RECORD_INTERVAL_S:
            self._last_ack_record = now
            self._append(rec.encode(rec.KIND_ACK, 0, self._ack_body()), None)

    def _ack_body(self) -> bytes:
        body = msgspec.json.encode(sorted(self._ack_dirty.items()))
        self._ack_dirty.clear()
        return body

    # -- rotation, deletion, snapshots, bounds -----------------------------------------------

    def _open_segment(self) -> None:
        index = max([self.snapshot.next_segment, *(i + 1 for i in self._segments)])
        path = segment_path(self.opts.directory, index)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolError(path, f"cannot create segment: {exc.strerror}") from exc
        self._active = _Segment(index, path)
        self._segments[index] = self._active
        self.snapshot.next_segment = index + 1
        self._written = max(self._written, (index, 0))
        self._durable = (
            max(self._durable, (index, 0)) if self.opts.fsync == "never" else self._durable
        )
        _fsync_dir(self.opts.directory)

    def _rotate(self) -> None:
        """Start the next segment; the full one is synced (and closed) by the next fsync,
        which also makes its last records durable before any of the new segment's."""
        old, fd = self._active, self._fd
        assert old is not None
        self._open_segment()
        if self.opts.fsync == "never":
            os.close(fd)
        else:
            self._retired.append(fd)
        if not old.unacked:
            self._deletable.add(old.index)
            self._schedule_maintenance()

    def _schedule_maintenance(self) -> None:
        if self._maintain_handle is None and not self._closed:
            self._maintain_handle = asyncio.get_running_loop().call_soon(self._maintain)

    def _maintain(self) -> None:
        """Delete fully acknowledged segments, after a snapshot that no longer needs them.

        Synchronous on purpose: the snapshot must describe exactly the synced log, so no
        event may be appended between the sync and the snapshot. It runs about once per
        segment (tens of MiB), costing one ``fsync`` each time.
        """
        self._maintain_handle = None
        doomed = sorted(
            i
            for i in self._deletable
            if i in self._segments
            and self._segments[i] is not self._active
            and not self._segments[i].unacked
            and (self._spill is None or self._spill[0] > i)
        )
        self._deletable.clear()
        if not doomed:
            return
        try:
            self.write_snapshot(clean=False)
        except OSError as exc:
            # Nothing is deleted without the snapshot; the next acknowledgement or write
            # retry tries again.
            self._deletable.update(doomed)
            event(log, logging.ERROR, "spool_snapshot_failed", error=exc.strerror or repr(exc))
            return
        for index in doomed:
            seg = self._segments.pop(index)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(seg.path)
        self._forget_settled_chains()
        self._reserve()
        self._update_space()

    def _forget_settled_chains(self) -> None:
        """A sealed chain whose every event is acknowledged needs no state: keep only its
        (cell, run, chain) so the run stays sealed."""
        for idx, chain in list(self.chains.items()):
            if chain.sealed and chain.acked_seq >= chain.sequence:
                ident = chain.identity
                self.snapshot.sealed_runs.append((ident.cell_id, ident.run_id, ident.chain_id))
                del self.chains[idx]
        del self.snapshot.sealed_runs[:-SEALED_RUNS_KEPT]

    def write_snapshot(self, *, clean: bool) -> None:
        """Write and sync the log, then record every chain's state (synchronously)."""
        if self._buffer and self._write_error is None:
            self._write_buffer()
        if self.opts.fsync != "never":
            _fsync_all([*self._syncing, *self._retired, self._fd])
        self._durable = max(self._durable, self._written)
        snap = self.snapshot
        snap.clean = clean
        snap.stopped_at = _last_event_time(self.chains.values()) if clean else None
        snap.chains = [self.chains[i] for i in sorted(self.chains)]
        path = os.path.join(self.opts.directory, STATE_FILE)
        data = msgspec.json.encode(snap)
        try:
            put_file(path, data, mode=0o600, place=os.replace)
        except OSError as exc:
            if exc.errno != errno.ENOSPC or not self._release_reserve():
                raise
            put_file(path, data, mode=0o600, place=os.replace)
        if self._deliver is not None:
            self._release()

    def _reserve(self) -> None:
        """Hold :data:`RESERVE_BYTES` of disk back for a snapshot, if the disk can spare
        twice that now (else at a later deletion)."""
        path = os.path.join(self.opts.directory, RESERVE_FILE)
        if os.path.exists(path) or self._free_bytes() < 2 * RESERVE_BYTES:
            return
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)

    def _release_reserve(self) -> bool:
        """Give the reserve up to a snapshot that found the disk full; False if none."""
        try:
            os.unlink(os.path.join(self.opts.directory, RESERVE_FILE))
        except FileNotFoundError:
            return False
        event(log, logging.WARNING, "spool_reserve_released", bytes=RESERVE_BYTES)
        return True

    def _check_disk(self) -> None:
        low = self._free_bytes() < self.opts.min_free_bytes
        if low and not self._disk_low:
            event(log, logging.ERROR, "spool_disk_low", free_bytes=self._free_bytes())
        self._disk_low = low
        self._update_space()

    def poll_space(self) -> None:
        """Re-check the free-disk floor: space can come back by itself."""
        self._check_disk()

    def _update_space(self) -> None:
        full = (
            self._write_error is not None
            or self._disk_low
            or self.live_bytes() >= self.opts.max_bytes
        )
        if full and not self._full:
            self._full = True
            self.stats.full += 1
            event(
                log,
                logging.WARNING,
                "spool_full",
                live_bytes=self.live_bytes(),
                max_bytes=self.opts.max_bytes,
                disk_low=self._disk_low,
                write_error=self._write_error is not None,
            )
        elif not full and self._full:
            self._full = False
            event(log, logging.INFO, "spool_space_available", live_bytes=self.live_bytes())
        if full or (self._paced and (self._held or self._spill is not None)):
            self._space.clear()
        else:
            self._space.set()

    def _free_bytes(self) -> int:
        try:
            st = os.statvfs(self.opts.directory)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    # -- introspection ----------------------------------------------------------------------

    def live_bytes(self) -> int:
        return sum(s.size for s in self._segments.values()) + self._buffered

    def depth(self) -> int:
        """Events spooled and not yet acknowledged."""
        return self._unacked

    async def wait_empty(self, timeout_s: float | None) -> bool:
        """Wait until every spooled event is acknowledged; False if ``timeout_s`` ran out."""
        return await wait_set(self._empty, timeout_s)

    async def wait_acked(self, chain: ChainState, timeout_s: float) -> bool:
        """Wait until every event of ``chain`` spooled so far is acknowledged; False if
        ``timeout_s`` ran out first."""
        if chain.acked_seq >= chain.sequence:
            return True
        waiter = self._chain_waiters.setdefault(chain.idx, asyncio.Event())
        try:
            return await wait_set(waiter, timeout_s)
        finally:
            self._chain_waiters.pop(chain.idx, None)

    def oldest_unacked_at(self) -> float:
        """Wall time the oldest unacknowledged event was spooled (now, if none is)."""
        firsts = [s.first_at for s in self._segments.values() if s.unacked and s.first_at]
        return min(firsts) if firsts else self._wall()

    def oldest_age_s(self) -> float:
        return max(0.0, self._wall() - self.oldest_unacked_at())

    def backlog_by_cell(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for chain in self.chains.values():
            behind = chain.sequence - chain.acked_seq
            if behind:
                out[chain.identity.cell_id] = out.get(chain.identity.cell_id, 0) + behind
        return out

    @property
    def closed(self) -> bool:
        return self._closed

    # -- closing ----------------------------------------------------------------------------

    async def close(self, *, clean: bool) -> None:
        """Write, sync, record every chain's state (``clean``: an orderly stop) and release
        the directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._feed_wake.set()
        if self._feeder is not None:
            self._feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feeder
        for handle in (
            self._sync_handle,
            self._retry_handle,
            self._flush_handle,
            self._maintain_handle,
        ):
            if handle is not None:
                handle.cancel()
        if self._sync_future is not None:
            with contextlib.suppress(Exception):
                await self._sync_future
        if self._ack_dirty:
            self._buffer.append(rec.encode(rec.KIND_ACK, 0, self._ack_body()))
            self._buffered += len(self._buffer[-1])
        self._write_error = None  # one last attempt at what a failing disk held back
        try:
            self.write_snapshot(clean=clean)
        except OSError as exc:
            event(log, logging.ERROR, "spool_close_failed", error=repr(exc))
        for fd in (*self._retired, self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._retired, self._fd, self._lock_fd = [], -1, -1


# -- helpers -----------------------------------------------------------------------------------


def _advance(chain: ChainState, sequence: int, digest: str, flags: int, at: str | None) -> None:
    chain.sequence = sequence
    chain.head_hash = digest
    chain.unsigned = 0 if flags & rec.SIGNED else chain.unsigned + 1
    chain.since_checkpoint = 0 if flags & rec.CHECKPOINT else chain.since_checkpoint + 1
    if at:
        chain.last_event_at = at
    if flags & rec.SEALED:
        chain.sealed = True


def _extend(ranges: dict[int, list[int]], idx: int, sequence: int) -> None:
    span = ranges.get(idx)
    if span is None:
        ranges[idx] = [sequence, sequence, 1]
        return
    span[2] += 1
    if sequence > span[1]:
        span[1] = sequence
    elif sequence < span[0]:
        span[0] = sequence


def _extend_runs(runs: list[list[int]], sequence: int) -> None:
    if runs and runs[-1][1] + 1 == sequence:
        runs[-1][1] = sequence
    elif not runs or sequence > runs[-1][1]:
        runs.append([sequence, sequence])


def _epoch(rfc3339: str) -> float:
    try:
        return dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _last_event_time(chains: Iterable[ChainState]) -> str | None:
    times = [c.last_event_at for c in chains if c.last_event_at]
    return max(times) if times else None


def _record_size(spooled: SpooledEvent) -> int:
    return rec.HEADER.size + rec.EVENT_HEAD.size + len(spooled.subject) + len(spooled.payload)


def segment_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"{SEGMENT_PREFIX}{index:016x}{SEGMENT_SUFFIX}")


def segment_indexes(directory: str) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX):
            with contextlib.suppress(ValueError):
                found.append(int(name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)], 16))
    return found


def _read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(start)
        return fh.read(end - start)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_all(fds: list[int]) -> None:
    for fd in fds:
        os.fsync(fd)


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
