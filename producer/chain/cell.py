"""One registered cell at run time: its chain, its listener's frames, its counters.

Everything here runs on the event loop thread. Sealing (sequence, prevhash, signature)
and handing the message to the publisher happen in one synchronous step, so a chain's
sequence order is the order its events enter the publisher queue, with no await between
them that could interleave another event of the same chain.
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
    STRUCTURED_CONTENT_TYPE,
    ChainContext,
    GuestEncoder,
    Pending,
    Rfc3339Clock,
    binary_payload,
    chain_event,
    guest_event,
    nats_headers,
    silenced_event,
)
from producer.chain.sealer import ChainSealer, Sealed
from producer.chain.signing import Signer
from producer.chain.signpolicy import SigningPolicy, UnsignedRun
from producer.delivery.publisher import OutMsg, Publisher
from producer.guest.listener import CellListener
from producer.guest.wire import BodyError, FramingError
from producer.ops.config import CellSpec
from schemas.heads import ChainHead
from schemas.wire import Declaration

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CellCounters:
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    events: int = 0
    signed: int = 0
    dropped_full: int = 0
    connections_opened: int = 0
    connections_open: int = 0


@dataclass(frozen=True, slots=True)
class CellSettings:
    """The slice of the config a cell runtime needs, resolved once by the registry."""

    binary_mode: bool
    checkpoint_every: int
    checkpoint_interval_s: float
    silence_window_ms: int
    drop_newest: bool


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


class CellRuntime:
    """Turns one cell's frames and readings into sealed events on the publisher's queue."""

    def __init__(
        self,
        spec: CellSpec,
        ctx: ChainContext,
        *,
        signer: Signer,
        policy: SigningPolicy,
        publisher: Publisher,
        settings: CellSettings,
        max_connections: int,
        wall: Rfc3339Clock,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.cell_id = spec.cell_id
        self.ctx = ctx
        self.counters = CellCounters()
        self.listener = CellListener(self, max_connections=max_connections)
        self.socket_path = ""
        self._signer = signer
        self._policy = policy
        self._publisher = publisher
        self._settings = settings
        self._wall = wall
        self._mono = mono
        self._sealer = ChainSealer(signer)
        self._unsigned = UnsignedRun()
        self._batch: list[Pending | GuestFrame] = []
        self._guest = GuestEncoder(ctx)
        self._since_checkpoint = 0
        self._last_checkpoint_s = mono()
        self._last_frame_s = mono()  # registration counts as "just heard" (SPEC 8)
        self._last_frame_at: str | None = None
        self._silenced = False
        self._lost = _Lost()
        self._waiter: asyncio.Task[None] | None = None
        self._cover: asyncio.TimerHandle | None = None
        self.sealed = False
        self._head_noted_s = -HEAD_INTERVAL_S
        self.closing = False
        """Set when sealing starts: from then on only seal() may add events."""

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
        self.counters.rejected[error.reason] += 1
        log.info(
            "guest_connection_closed_framing",
            extra={"fields": {"cell_id": self.cell_id, "reason": error.reason}},
        )

    def on_connection(self, opened: bool) -> None:
        if opened:
            self.counters.connections_opened += 1
            self.counters.connections_open += 1
        else:
            self.counters.connections_open -= 1

    # -- sealing ---------------------------------------------------------------------------

    def _seal_and_offer(self, pending: Pending, *, last_in_batch: bool, now_s: float) -> None:
        """Seal one event and queue it; the caller has checked the queue has room."""
        sign = self._policy.decide(
            self._unsigned, control=pending.control, last_in_batch=last_in_batch, now_s=now_s
        )
        event = pending.event
        sealer = self._sealer
        event["id"] = f"{self.ctx.chain_id}-{sealer.sequence + 1}"
        sealed = sealer.seal(event, sign=sign)
        self._policy.record(self._unsigned, signed=sign, now_s=now_s)
        binary = self._settings.binary_mode
        payload = binary_payload(event) if binary else sealed.payload
        msg = OutMsg(pending.subject, payload, event["id"], nats_headers(event, binary=binary))
        if sign and (pending.control or now_s - self._head_noted_s >= HEAD_INTERVAL_S):
            msg.head = self._head(sealed, event["id"], event["type"], now_s)
        self._publisher.offer(msg, force=True)
        self.counters.events += 1
        if sign:
            self.counters.signed += 1
        self._since_checkpoint += 1

    def _seal_guest(self, frame: GuestFrame, *, last_in_batch: bool, now_s: float) -> None:
        """The hot path: a guest event sealed from the chain's template, no dict built."""
        if self._settings.binary_mode:  # binary mode needs every attribute as a header
            pending = guest_event(self.ctx, frame[0], frame[1])
            self._seal_and_offer(pending, last_in_batch=last_in_batch, now_s=now_s)
            return
        sign = self._policy.decide(
            self._unsigned, control=False, last_in_batch=last_in_batch, now_s=now_s
        )
        decl, at = frame
        guest = self._guest
        sealed = self._sealer.seal_encoded(
            lambda seq, prev, kid: guest.encode(decl, at, seq, prev, kid), sign=sign
        )
        self._policy.record(self._unsigned, signed=sign, now_s=now_s)
        event_id = guest.event_id(sealed.sequence)
        msg = OutMsg(
            guest.subject(decl),
            sealed.payload,
            event_id,
            {"Nats-Msg-Id": event_id, "Content-Type": STRUCTURED_CONTENT_TYPE},
        )
        if sign and now_s - self._head_noted_s >= HEAD_INTERVAL_S:
            msg.head = self._head(sealed, event_id, guest.type_(decl), now_s)
        self._publisher.offer(msg, force=True)
        self.counters.events += 1
        if sign:
            self.counters.signed += 1
        self._since_checkpoint += 1

    def _head(self, sealed: Sealed, event_id: str, type_: str, now_s: float) -> ChainHead:
        """The chain head to record once this signed event is acknowledged (SPEC 5.3)."""
        self._head_noted_s = now_s
        ctx = self.ctx
        return ChainHead(
            cell_id=ctx.cell_id,
            run_id=ctx.run_id,
            chain_id=ctx.chain_id,
            sequence=sealed.sequence,
            digest=sealed.digest,
            event_id=event_id,
            type=type_,
            sealed=type_.endswith(".sealed"),
        )

    def _flush(self) -> bool:
        """Seal and queue the batch; False when the queue filled and readers must pause."""
        batch = self._batch
        now_s = self._mono()
        if not batch:
            return True
        publisher = self._publisher
        last = len(batch) - 1
        done = 0
        every = self._settings.checkpoint_every
        for i, item in enumerate(batch):
            if not publisher.has_space():
                break
            if isinstance(item, tuple):
                self._seal_guest(item, last_in_batch=i == last, now_s=now_s)
            else:
                self._seal_and_offer(item, last_in_batch=i == last, now_s=now_s)
            done = i + 1
            if self._since_checkpoint >= every:
                self._checkpoint(now_s)
        self._arm_cover(now_s)
        if done == len(batch):
            batch.clear()
            return True
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
        gap = chain_event(
            self.ctx,
            "gap",
            self._wall.now(),
            {
                "reason": reason,
                "lostCount": lost.count,
                "firstLostAt": lost.first_at,
                "lastLostAt": lost.last_at,
            },
        )
        self._seal_and_offer(gap, last_in_batch=True, now_s=self._mono())

    def _wait_for_space(self) -> None:
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_task(self._resume_when_space())

    async def _resume_when_space(self) -> None:
        await self._room()
        self._waiter = None
        if self.closing:
            return  # seal() takes over what is left
        self._declare_lost("queue_full")
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
        self._seal_and_offer(event, last_in_batch=True, now_s=now_s)
        self._since_checkpoint = 0
        self._last_checkpoint_s = now_s

    def _cover_tail(self) -> None:
        """An unsigned tail is about to outlive ``max_unsigned_ms``: sign a checkpoint over
        it, even into a full queue (a chain event may overshoot the bound by one)."""
        self._cover = None
        if not self.sealed and self._unsigned.count:
            self._checkpoint(self._mono())

    # -- control events --------------------------------------------------------------------

    async def _room(self) -> None:
        while not self._publisher.has_space():
            await self._publisher.wait_for_space()

    async def emit(self, pending: Pending) -> None:
        """Seal and queue an event from outside the frame path, waiting for queue room.

        Nothing is sealed once the chain is closing: ``sealed`` must stay the last event.
        An event left unsigned here (``agent_silenced`` while the budget is dry) is covered
        like a frame's.
        """
        await self._room()
        if not self.closing:
            now_s = self._mono()
            self._seal_and_offer(pending, last_in_batch=True, now_s=now_s)
            self._arm_cover(now_s)

    async def open(self, *, host_id: str, socket_path: str, signing_mode: str) -> None:
        self.socket_path = socket_path
        targets = {
            k: v
            for k, v in {
                "nftFamily": self.spec.nft_family,
                "nftTable": self.spec.nft_table,
                "netns": self.spec.netns,
                "cgroupPath": self.spec.cgroup_path,
                "fcApiSocket": self.spec.fc_api_socket,
                "fcMetricsPath": self.spec.fc_metrics_path,
                "tapIface": self.spec.tap_iface,
                "vsockCid": self.spec.vsock_cid,
            }.items()
            if v is not None
        }
        await self.emit(
            chain_event(
                self.ctx,
                "opened",
                self._wall.now(),
                {
                    "hostId": host_id,
                    "producerVersion": __version__,
                    "signkid": self._signer.kid,
                    "publicKey": self._signer.public_key_b64,
                    "chainId": self.ctx.chain_id,
                    "socketPath": socket_path,
                    "probeTargets": targets,
                    "signingMode": signing_mode,
                },
            )
        )

    async def run_tick(self) -> None:
        """Periodic duties: the silence watchdog (SPEC 8) and the time-based checkpoint."""
        if self.closing:
            return
        now_s = self._mono()
        if self.listener.paused or self._batch:
            # Our own backpressure holds the guest's frames unread: it is not silent.
            self._last_frame_s = now_s
        window_ms = self._settings.silence_window_ms
        silent_ms = int((now_s - self._last_frame_s) * 1000)
        if not self._silenced and silent_ms > window_ms:
            self._silenced = True  # at most once per chain
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
            await self._room()
            if not self.closing:
                self._checkpoint(self._mono())

    async def seal(self, reason: str, *, grace_s: float = 5.0) -> None:
        """Stop the listener, queue what was read, then the ``sealed`` event (always last).

        Frames already read wait up to ``grace_s`` for queue room (a broker outage can keep
        the queue full); past that they are dropped and declared by a ``gap`` event, so
        deregistration and shutdown always finish. Chain events are queued even into a
        full queue: a few over the bound, never lost.
        """
        self.closing = True
        await self.listener.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while not self._flush():
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._drop(self._batch)
                break
            room = loop.create_task(self._room())
            await asyncio.wait({room}, timeout=remaining)
            await cancel_and_wait(room)
        await cancel_and_wait(self._waiter)
        self._waiter = None
        if self._cover is not None:
            self._cover.cancel()
            self._cover = None
        self._declare_lost("queue_full")
        final = format_sequence(self._sealer.sequence + 1)
        sealed = chain_event(
            self.ctx, "sealed", self._wall.now(), {"reason": reason, "finalSequence": final}
        )
        self._seal_and_offer(sealed, last_in_batch=True, now_s=self._mono())
        self.sealed = True

    def snapshot(self) -> dict[str, Any]:
        """Counters for the live view and the logs."""
        c = self.counters
        return {
            "cell_id": self.cell_id,
            "run_id": self.ctx.run_id,
            "accepted": c.accepted,
            "rejected": dict(c.rejected),
            "events": c.events,
            "signed": c.signed,
            "dropped": c.dropped_full,
            "connections": c.connections_open,
            "sequence": self._sealer.sequence,
        }
