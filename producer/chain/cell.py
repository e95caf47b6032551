"""One registered cell at run time: its chain, its listener's frames, its counters.

Everything here runs on the event loop thread. Sealing (sequence, prevhash, signature) and
appending to the spool happen in one synchronous step, so a chain's sequence order is the
order its events enter the spool, with no await between them that could interleave
another event of the same chain.

A chain outlives this object: a runtime is built either for a new chain (whose first event
is ``opened``) or for one the spool restored after a restart (whose first new event is
``resumed``), and a producer stop *suspends* it (:meth:`suspend`) instead of sealing it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from audit.digest import format_sequence
from producer import __version__
from producer.aio import cancel_and_wait
from producer.chain.events import (
    ChainContext,
    GuestEncoder,
    Pending,
    Rfc3339Clock,
    chain_event,
    silenced_event,
)
from producer.chain.sealer import ChainSealer
from producer.chain.signing import Signer
from producer.chain.signpolicy import SigningPolicy, UnsignedRun
from producer.delivery import records as rec
from producer.delivery.spool import ChainState, Loss, Spool
from producer.guest.listener import CellListener
from producer.guest.wire import BodyError, FramingError
from producer.ops.config import CellSpec
from producer.ops.logs import event
from schemas.wire import Declaration

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CellCounters:
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    events: int = 0
    host_events: int = 0
    signed: int = 0
    dropped_full: int = 0
    silenced: int = 0
    framing_closed: int = 0
    connections_opened: int = 0
    connections_open: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    """Events sealed by type (the last token: ``process_spawned``, ``checkpoint``...)."""


@dataclass(frozen=True, slots=True)
class CellSettings:
    """The slice of the config a cell runtime needs, resolved once by the registry."""

    host_id: str
    signing_mode: str
    checkpoint_every: int
    checkpoint_interval_s: float
    silence_window_ms: int
    drop_newest: bool
    frame_timeout_s: float = 5.0
    log_interval_s: float = 10.0


@dataclass(slots=True)
class _Lost:
    count: int = 0
    first_at: str | None = None
    last_at: str | None = None


HEAD_INTERVAL_S = 1.0
"""Besides every chain event, a signed guest event updates the recorded head at most this
often per chain: a verifier can then date a cut tail to within about a second."""

GuestFrame = tuple[Declaration, str]
"""A decoded guest declaration and the host time it was received, awaiting its seal."""


def _time_of(item: Pending | GuestFrame) -> str:
    return item[1] if isinstance(item, tuple) else str(item.event["time"])


def _flags(signed: bool, kind: str | None) -> int:
    """Spool record flags for an event; ``kind`` is a chain event's kind, or None."""
    flags = rec.SIGNED if signed else 0
    if kind is not None:
        flags |= rec.CONTROL | rec.NOTE_HEAD
        if kind == "checkpoint":
            flags |= rec.CHECKPOINT
        elif kind == "sealed":
            flags |= rec.SEALED
    return flags


class CellRuntime:
    """Turns one cell's frames and readings into sealed events in the spool."""

    def __init__(
        self,
        spec: CellSpec,
        ctx: ChainContext,
        chain: ChainState,
        *,
        signer: Signer,
        policy: SigningPolicy,
        spool: Spool,
        settings: CellSettings,
        max_connections: int,
        wall: Rfc3339Clock,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.cell_id = spec.cell_id
        self.ctx = ctx
        self.chain = chain
        self.counters = CellCounters()
        self.listener = CellListener(self, max_connections=max_connections)
        self.socket_path = ""
        self.signer = signer
        self._policy = policy
        self._spool = spool
        self._settings = settings
        self._wall = wall
        self._mono = mono
        self._sealer = ChainSealer(signer, sequence=chain.sequence, head_hash=chain.head_hash)
        now = mono()
        self._unsigned = UnsignedRun(count=chain.unsigned, since_s=now)
        self._batch: list[Pending | GuestFrame] = []
        self._guest = GuestEncoder(ctx)
        self._since_checkpoint = chain.since_checkpoint
        self._last_checkpoint_s = now
        self._last_frame_s = now  # registration counts as "just heard" (SPEC 8)
        self._last_frame_at: str | None = None
        self._silenced = False
        self._lost = _Lost()
        self._waiter: asyncio.Task[None] | None = None
        self._cover: asyncio.TimerHandle | None = None
        self._head_noted_s = -HEAD_INTERVAL_S
        self.ticks = 0
        """Periodic duties run so far (the silence watchdog looks at every one)."""
        self._logged_s = now
        self._logged: tuple[int, int, int] = (0, 0, 0)
        self.closing = False
        """Set when the chain is being sealed or suspended: from then on no frame is taken."""

    @property
    def sealed(self) -> bool:
        return self.chain.sealed

    @property
    def last_frame_at(self) -> str | None:
        """Host time of the last good frame (None: none since this process serves it)."""
        return self._last_frame_at

    # -- FrameHandler ----------------------------------------------------------------------

    def on_outcomes(self, outcomes: list[Declaration | BodyError]) -> bool:
        if self.closing:
            return True
        at = self._wall.now()
        batch = self._batch
        accepted = 0
        for outcome in outcomes:
            if isinstance(outcome, Declaration):
                batch.append((outcome, at))
                accepted += 1
            else:
                self.counters.rejected[outcome.reason] += 1
        if accepted:
            self.counters.accepted += accepted
            self._last_frame_s = self._mono()
            self._last_frame_at = at
        return self._flush()

    def on_framing_error(self, error: FramingError) -> None:
        # Counted; logged with the others once per interval (a hostile guest must not be
        # able to flood the log one connection at a time).
        self.counters.rejected[error.reason] += 1
        self.counters.framing_closed += 1

    def on_connection(self, opened: bool) -> None:
        if opened:
            self.counters.connections_opened += 1
            self.counters.connections_open += 1
        else:
            self.counters.connections_open -= 1

    # -- sealing ---------------------------------------------------------------------------

    def _seal_pending(self, pending: Pending, *, last_in_batch: bool, now_s: float) -> None:
        """Seal one event and spool it; the caller has checked the spool has room."""
        sign = self._policy.decide(
            self._unsigned, control=pending.control, last_in_batch=last_in_batch, now_s=now_s
        )
        event = pending.event
        event["id"] = f"{self.ctx.chain_id}-{self._sealer.sequence + 1}"
        sealed = self._sealer.seal(event, sign=sign)
        self._policy.record(self._unsigned, signed=sign, now_s=now_s)
        kind = str(event["type"]).rsplit(".", 1)[1] if pending.control else None
        flags = _flags(sign, kind)
        if sign and kind is None and now_s - self._head_noted_s >= HEAD_INTERVAL_S:
            flags |= rec.NOTE_HEAD
        if flags & rec.NOTE_HEAD:
            self._head_noted_s = now_s
        self._spool.append_event(self.chain, sealed, flags, pending.subject, str(event["time"]))
        self._count(sign)
        self.counters.by_type[str(event["type"]).rsplit(".", 1)[1]] += 1

    def _seal_guest(self, frame: GuestFrame, *, last_in_batch: bool, now_s: float) -> None:
        """The hot path: a guest event sealed from the chain's template, no dict built."""
        sign = self._policy.decide(
            self._unsigned, control=False, last_in_batch=last_in_batch, now_s=now_s
        )
        decl, at = frame
        guest = self._guest
        sealed = self._sealer.seal_encoded(
            lambda seq, prev, kid: guest.encode(decl, at, seq, prev, kid), sign=sign
        )
        self._policy.record(self._unsigned, signed=sign, now_s=now_s)
        flags = rec.SIGNED if sign else 0
        if sign and now_s - self._head_noted_s >= HEAD_INTERVAL_S:
            flags |= rec.NOTE_HEAD
            self._head_noted_s = now_s
        self._spool.append_event(self.chain, sealed, flags, guest.subject(decl), at)
        self._count(sign)
        self.counters.by_type[decl.probe_source] += 1

    def _count(self, signed: bool) -> None:
        self.counters.events += 1
        if signed:
            self.counters.signed += 1
        self._since_checkpoint += 1

    def _flush(self, *, force: bool = False) -> bool:
        """Seal and spool the batch; False when the spool is full and readers must pause.
        ``force`` spools it regardless (what was read at a stop: a bounded overshoot)."""
        batch = self._batch
        if not batch:
            return True
        now_s = self._mono()
        spool = self._spool
        last = len(batch) - 1
        done = 0
        every = self._settings.checkpoint_every
        for i, item in enumerate(batch):
            if not force and not spool.has_space():
                break
            if isinstance(item, tuple):
                self._seal_guest(item, last_in_batch=i == last, now_s=now_s)
            else:
                self._seal_pending(item, last_in_batch=i == last, now_s=now_s)
            done = i + 1
            if self._since_checkpoint >= every:
                self._checkpoint(now_s)
        self._arm_cover(now_s)
        if done == len(batch):
            batch.clear()
            if force or spool.accepting():
                return True
            self._wait_for_space()  # the spool paces readers by the publisher
            return False
        del batch[:done]
        if self._settings.drop_newest:
            self._drop(batch)
            return True
        self._wait_for_space()
        return False

    def _drop(self, batch: list[Pending | GuestFrame]) -> None:
        """Spool-full policy ``drop_newest``: count what is lost; a gap event declares it."""
        lost = self._lost
        lost.count += len(batch)
        lost.first_at = lost.first_at or _time_of(batch[0])
        lost.last_at = _time_of(batch[-1])
        self.counters.dropped_full += len(batch)
        batch.clear()
        self._wait_for_space()

    def _declare_lost(self, reason: str) -> None:
        """Seal the ``gap`` event for what :meth:`_drop` counted (forced: a chain event)."""
        if not self._lost.count:
            return
        lost, self._lost = self._lost, _Lost()
        self.declare_gap(reason, Loss(lost.count, lost.first_at, lost.last_at))

    def declare_gap(self, reason: str, loss: Loss) -> None:
        """Seal a ``gap`` event: events this producer knows it lost are never silent."""
        fields: dict[str, Any] = {
            "reason": reason,
            "lostCount": loss.count,
            "firstLostAt": loss.first_at,
            "lastLostAt": loss.last_at,
        }
        if loss.first_sequence is not None and loss.last_sequence is not None:
            fields["firstLostSequence"] = format_sequence(loss.first_sequence)
            fields["lastLostSequence"] = format_sequence(loss.last_sequence)
        gap = chain_event(self.ctx, "gap", self._wall.now(), fields)
        self._seal_pending(gap, last_in_batch=True, now_s=self._mono())

    def _wait_for_space(self) -> None:
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_task(self._resume_when_space())

    async def _resume_when_space(self) -> None:
        await self._spool.wait_for_space()
        self._waiter = None
        if self.closing:
            return  # seal() or suspend() takes over what is left
        self._declare_lost("spool_full")
        if self._flush():
            self.listener.resume()

    def _arm_cover(self, now_s: float) -> None:
        due = self._policy.cover_due(self._unsigned, now_s)
        if due is not None and self._cover is None:
            self._cover = asyncio.get_running_loop().call_later(due, self._cover_tail)

    def _checkpoint(self, now_s: float) -> None:
        seq, head = self._sealer.sequence, self._sealer.head_hash
        event = chain_event(
            self.ctx,
            "checkpoint",
            self._wall.now(),
            {"headSequence": format_sequence(seq), "headHash": head},
        )
        self._seal_pending(event, last_in_batch=True, now_s=now_s)
        self._since_checkpoint = 0
        self._last_checkpoint_s = now_s

    def _cover_tail(self) -> None:
        """An unsigned tail is about to outlive ``max_unsigned_ms``: sign a checkpoint over
        it, even into a full spool (a chain event may overshoot the bound by one)."""
        self._cover = None
        if not self.sealed and self._unsigned.count:
            self._checkpoint(self._mono())

    # -- control events --------------------------------------------------------------------

    async def emit(self, pending: Pending) -> bool:
        """Seal and spool an event from outside the frame path, waiting for spool room.

        Nothing is sealed once the chain is closing: ``sealed`` must stay the last event.
        An event left unsigned here (``agent_silenced`` while the budget is dry) is covered
        like a frame's.
        """
        await self._spool.wait_for_space()
        if self.closing:
            return False
        self._seal_alone(pending)
        return True

    def offer(self, pending: Pending) -> bool:
        """Seal and spool a host probe reading if the spool has room now; False otherwise
        (the probe scheduler skips the tick and counts it)."""
        if self.closing or not self._spool.has_space():
            return False
        self._seal_alone(pending)
        self.counters.host_events += 1
        return True

    def _seal_alone(self, pending: Pending) -> None:
        """Seal an event that comes outside a frame batch; if the policy leaves it unsigned
        it is covered in time like a frame's event (SPEC 5.1)."""
        now_s = self._mono()
        self._seal_pending(pending, last_in_batch=True, now_s=now_s)
        self._arm_cover(now_s)

    def open_chain(self, *, socket_path: str, supersedes: dict[str, Any] | None) -> None:
        """Seal ``opened``, the first event of a new chain."""
        self.socket_path = socket_path
        self._seal_pending(
            chain_event(
                self.ctx,
                "opened",
                self._wall.now(),
                {
                    "hostId": self._settings.host_id,
                    "producerVersion": __version__,
                    "signkid": self.signer.kid,
                    "publicKey": self.signer.public_key_b64,
                    "chainId": self.ctx.chain_id,
                    "socketPath": socket_path,
                    "probeTargets": probe_targets(self.spec),
                    "signingMode": self._settings.signing_mode,
                    "supersedes": supersedes,
                },
            ),
            last_in_batch=True,
            now_s=self._mono(),
        )

    def resume_chain(self, *, socket_path: str, previous_stop_at: str | None, clean: bool) -> None:
        """Seal ``resumed``, the first event a restarted producer adds to this chain."""
        self.socket_path = socket_path
        self._seal_pending(
            chain_event(
                self.ctx,
                "resumed",
                self._wall.now(),
                {
                    "previousStopAt": previous_stop_at,
                    "clean": clean,
                    "hostId": self._settings.host_id,
                    "producerVersion": __version__,
                    "signkid": self.signer.kid,
                    "publicKey": self.signer.public_key_b64,
                },
            ),
            last_in_batch=True,
            now_s=self._mono(),
        )

    def rekey(self, signer: Signer) -> None:
        """Sign this chain's next events with ``signer`` (key rotation: the chain goes on,
        its events name the new ``signkid``)."""
        self.signer = signer
        self._sealer = ChainSealer(
            signer, sequence=self._sealer.sequence, head_hash=self._sealer.head_hash
        )

    async def run_tick(self) -> None:
        """Periodic duties: the silence watchdog (SPEC 8) and the time-based checkpoint."""
        if self.closing:
            return
        self.ticks += 1
        now_s = self._mono()
        self.listener.expire_slow(self._settings.frame_timeout_s)
        if now_s - self._logged_s >= self._settings.log_interval_s:
            self._log_guest_trouble(now_s)
        if self.listener.paused or self._batch:
            # Our own backpressure holds the guest's frames unread: it is not silent.
            self._last_frame_s = now_s
        window_ms = self._settings.silence_window_ms
        silent_ms = int((now_s - self._last_frame_s) * 1000)
        if not self._silenced and silent_ms > window_ms:
            self._silenced = True  # at most once per chain
            self.counters.silenced += 1
            await self.emit(
                silenced_event(
                    self.ctx,
                    self._wall.now(),
                    window_ms=window_ms,
                    silent_for_ms=silent_ms,
                    last_frame_at=self._last_frame_at,
                )
            )
        if (
            self._since_checkpoint
            and now_s - self._last_checkpoint_s >= self._settings.checkpoint_interval_s
        ):
            await self._spool.wait_for_space()
            if not self.closing:
                self._checkpoint(self._mono())

    def _log_guest_trouble(self, now_s: float) -> None:
        """One line per interval with what hostile or broken guests cost this cell since
        the last one: refused connections, framing errors, frame deadlines."""
        self._logged_s = now_s
        seen = (self.listener.refused, self.counters.framing_closed, self.listener.expired)
        refused, framing, expired = (a - b for a, b in zip(seen, self._logged, strict=True))
        self._logged = seen
        if refused or framing or expired:
            event(
                log,
                logging.WARNING,
                "guest_connection_trouble",
                cell_id=self.cell_id,
                refused=refused,
                closed_on_framing_error=framing,
                closed_on_frame_deadline=expired,
                rejected_by_reason=dict(self.counters.rejected),
                connection_limit=self.listener.max_connections,
            )

    async def _stop_reading(self, grace_s: float) -> None:
        """Close the listener and spool what was already read. A spool that is full by its
        own bound takes it anyway (at most one read per connection over); only when the disk
        itself refuses does the rest wait up to ``grace_s`` and is then dropped, declared in
        a ``gap`` event."""
        self.closing = True
        await self.listener.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while not self._flush(force=self._spool.can_overflow()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._drop(self._batch)
                break
            room = loop.create_task(self._spool.wait_for_space())
            await asyncio.wait({room}, timeout=remaining)
            await cancel_and_wait(room)
        await cancel_and_wait(self._waiter)
        self._waiter = None
        if self._cover is not None:
            self._cover.cancel()
            self._cover = None
        self._declare_lost("spool_full")

    async def suspend(self, *, grace_s: float = 5.0) -> None:
        """A producer stop: stop reading and spool what was read. The chain stays open; the
        next start continues it with ``resumed``."""
        await self._stop_reading(grace_s)

    async def seal(self, reason: str, *, grace_s: float = 5.0) -> None:
        """End the chain: stop reading, spool what was read, then ``sealed`` (always last)."""
        await self._stop_reading(grace_s)
        final = format_sequence(self._sealer.sequence + 1)
        sealed = chain_event(
            self.ctx, "sealed", self._wall.now(), {"reason": reason, "finalSequence": final}
        )
        self._seal_pending(sealed, last_in_batch=True, now_s=self._mono())

    def snapshot(self) -> dict[str, Any]:
        """Counters for the live view and the logs."""
        c = self.counters
        return {
            "cell_id": self.cell_id,
            "run_id": self.ctx.run_id,
            "chain_id": self.ctx.chain_id,
            "accepted": c.accepted,
            "rejected": dict(c.rejected),
            "events": c.events,
            "host_events": c.host_events,
            "signed": c.signed,
            "dropped": c.dropped_full,
            "connections": c.connections_open,
            "sequence": self._sealer.sequence,
            "acked_sequence": self.chain.acked_seq,
        }


def probe_targets(spec: CellSpec) -> dict[str, Any]:
    """The registration's probe targets as ``opened`` announces them."""
    return {
        k: v
        for k, v in {
            "nftFamily": spec.nft_family,
            "nftTable": spec.nft_table,
            "netns": spec.netns,
            "cgroupPath": spec.cgroup_path,
            "fcApiSocket": spec.fc_api_socket,
            "fcMetricsPath": spec.fc_metrics_path,
            "tapIface": spec.tap_iface,
            "vsockCid": spec.vsock_cid,
        }.items()
        if v is not None
    }
