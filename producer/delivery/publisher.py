"""Pipelined JetStream publisher (SPEC 6, 7).

JetStream acknowledges a publish by replying to the message's reply subject. Awaiting those
replies one by one caps a producer at a few thousand events per second, so this publisher
keeps up to ``max_inflight`` messages on the wire at once: every message is a core NATS
publish whose reply subject is ``<inbox>.<token>`` under one wildcard subscription, and the
PubAck that comes back on the token settles it. Nothing is ever dropped here: a message
leaves only on a PubAck (``duplicate: true`` included); an error reply, an ack timeout or a
lost connection puts it back for another attempt, paced by a tenacity wait strategy, and
the same ``Nats-Msg-Id`` lets the stream's duplicate window absorb whatever was already
stored.

The publisher owns no storage: the write-ahead spool hands it durable events and learns of
each settled one through ``on_acked``; only then does the spool forget it. Its window is
bounded (``max_pending``); when full, the spool keeps events on disk and feeds them later.

A retry whose first attempt is older than half the stream's duplicate window may already
be stored where JetStream would no longer recognise its ``Nats-Msg-Id``; such messages are
held back and handed to ``stored_check`` (which asks the stream) before any is sent again,
so nothing is stored twice however long an outage lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import tenacity

from audit.connect import NatsAuth, connect_error_kind, connect_kwargs, telling_error
from audit.errors import ConnectOptionsError
from producer.aio import cancel_and_wait, wait_set
from producer.delivery.client import LeanClient
from producer.delivery.protocol import Raw, hpub, inline_status
from producer.errors import BrokerError

log = logging.getLogger(__name__)


class OutMsg(msgspec.Struct, gc=False):
    """One event on its way to JetStream. ``msg_id`` doubles as the ``Nats-Msg-Id``;
    ``header`` is the encoded header block (:func:`.protocol.header_block`), built once.
    Untracked by the cyclic collector, like the spool's ``SpooledEvent`` it refers to."""

    subject: str
    payload: bytes
    msg_id: str
    header: bytes
    attempts: int = 0
    sent_at: float = 0.0
    not_before: float = 0.0
    first_attempt: float = 0.0
    """Wall-clock time of the first send (0: never sent). A caller that cannot rule out an
    earlier send (a previous run's) sets the earliest time it may have happened."""
    ref: Any = None
    """The caller's handle on the message (the spooled event), returned in ``on_acked``."""


class PubAck(msgspec.Struct, gc=False):
    """A JetStream publish reply, decoded as it comes (``error`` set: a rejection)."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


@dataclass(slots=True)
class PublisherStats:
    submitted: int = 0
    acked: int = 0
    duplicates: int = 0
    retries: int = 0
    error_replies: int = 0
    timeouts: int = 0
    reconnects: int = 0
    disconnects: int = 0
    last_error: str = ""


_ack_decoder = msgspec.json.Decoder(PubAck)

NO_RESPONDERS = "503"
"""The status of a publish no stream answered: JetStream has no stream for the subject."""

SEND_BATCH = 256
"""Commands queued per :meth:`LeanClient.send`: one flush request per batch. The loop goes
on until the window is full, so a turn sends what a turn of reading guests brought."""

AckCallback = Callable[[OutMsg, PubAck], None]
StoredCheck = Callable[[list[OutMsg]], Awaitable[set[str]]]
"""Asks the stream which of these messages it already holds; returns their msg ids."""


def default_retry_wait() -> tenacity.wait.wait_base:
    """Exponential backoff with jitter, capped: a broker outage should not cause a storm."""
    return tenacity.wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2)


@dataclass
class PublisherOptions:
    url: str
    stream: str
    max_pending: int = 65536
    max_inflight: int = 4096
    ack_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0
    name: str = "cellos-producer"
    auth: NatsAuth = field(default_factory=NatsAuth)
    """Authentication and TLS; its files are read again at every connection attempt."""
    retry_wait: tenacity.wait.wait_base = field(default_factory=default_retry_wait)
    connect_wait: tenacity.wait.wait_base = field(default_factory=default_retry_wait)
    connect_attempts: int | None = None
    """None: retry the first connection until ``close()``; a number: give up after it."""
    duplicate_window_s: float = 600.0
    """The stream's duplicate window: retries older than half of it are checked first."""


_RETRIED = (OSError, nats.errors.Error, TimeoutError, ConnectOptionsError)


async def connect_nats(opts: PublisherOptions, **callbacks: Any) -> LeanClient:
    """Connect with backoff: an unreachable broker at start, refused credentials or an
    unusable credentials file are retried and logged (with what kind of failure it is, so
    the operator knows what to fix), never fatal: fixing the file or the server's
    configuration is enough, the next attempt picks it up."""
    stop: tenacity.stop.stop_base = (
        tenacity.stop_never
        if opts.connect_attempts is None
        else tenacity.stop_after_attempt(opts.connect_attempts)
    )

    # nats-py reports the cause of a failed attempt (a refused certificate, say) to
    # error_cb and then raises something vaguer ("Connection lost"); keep the causes of
    # the current attempt so the log line names the one an operator can act on. They are
    # not passed on while connecting: the retry line reports them once.
    connecting = True
    causes: deque[BaseException] = deque(maxlen=4)
    error_cb = callbacks.pop("error_cb", None)

    async def on_error(exc: Exception) -> None:
        if connecting:
            causes.append(exc)
        elif error_cb is not None:
            await error_cb(exc)

    def cause_of(state: tenacity.RetryCallState) -> BaseException | None:
        raised = state.outcome.exception() if state.outcome else None
        return telling_error([*causes, raised] if raised is not None else list(causes))

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = cause_of(state)
        log.warning(
            "nats_connect_retry",
            extra={
                "fields": {
                    "url": opts.url,
                    "attempt": state.attempt_number,
                    "auth": opts.auth.mode,
                    "kind": connect_error_kind(exc) if exc is not None else "unknown",
                    "error": (str(exc) or repr(exc)) if exc is not None else "",
                    "next_in_s": round(state.upcoming_sleep, 2),
                }
            },
        )

    try:
        async for attempt in tenacity.AsyncRetrying(
            wait=opts.connect_wait,
            stop=stop,
            retry=tenacity.retry_if_exception_type(_RETRIED),
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                # nats-py would retry a first connection forever, silently, when reconnects
                # are allowed; so the first attempt fails fast and tenacity paces and logs
                # the retries. Once connected, reconnecting forever is what we want.
                causes.clear()
                kwargs = connect_kwargs(opts.auth)
                nc = LeanClient()
                await nc.connect(
                    [server.strip() for server in opts.url.split(",")],
                    name=opts.name,
                    connect_timeout=max(1, int(opts.connect_timeout_s)),
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=1,
                    # Outbound bytes buffered while reconnecting; beyond it publishes wait.
                    pending_size=8 * 1024 * 1024,
                    # Subjects are built from ids validated at config load and registration.
                    skip_subject_validation=True,
                    error_cb=on_error,
                    **callbacks,
                    **kwargs,
                )
                connecting = False
                nc.options["allow_reconnect"] = True
                nc.options["max_reconnect_attempts"] = -1
                return nc
    except _RETRIED as exc:
        cause = telling_error([*causes, exc])
        raise BrokerError(f"cannot connect to NATS at {opts.url}: {cause!r}") from exc
    raise AssertionError("unreachable")  # pragma: no cover


class Publisher:
    """Keeps many JetStream publishes in flight and settles each one by its PubAck."""

    def __init__(
        self,
        opts: PublisherOptions,
        *,
        on_acked: AckCallback | None = None,
        stored_check: StoredCheck | None = None,
        on_no_stream: Callable[[], None] | None = None,
        on_connection: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.opts = opts
        self._on_connection = on_connection
        self.stats = PublisherStats()
        self._on_acked = on_acked
        self._stored_check = stored_check
        self._on_no_stream = on_no_stream
        self._clock = clock
        self._wall = wall
        self._held: list[OutMsg] = []
        self._check_wake = asyncio.Event()
        # Only its wait strategy is used: tenacity paces resends, the queue does the rest.
        self._retrying = tenacity.Retrying(wait=opts.retry_wait)
        self._nc: LeanClient | None = None
        self._pending: deque[OutMsg] = deque()
        self._retry: deque[OutMsg] = deque()
        self._inflight: dict[bytes, OutMsg] = {}
        """By reply token: the last subject token of the attempt's reply subject."""
        self._next_token = 0
        self._inbox = b""
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._connected = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._last_reject_log = -1e9
        self._errors_while_down = 0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def nc(self) -> LeanClient:
        if self._nc is None:
            raise BrokerError("publisher is not started")
        return self._nc

    def callbacks(self) -> dict[str, Any]:
        """The nats-py connection callbacks this publisher needs, for :func:`connect_nats`."""
        return {
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "error_cb": self._on_error,
        }

    async def start(self, nc: LeanClient | None = None) -> None:
        """Connect (or adopt ``nc``, connected with :meth:`callbacks`), subscribe to the ack
        inbox, start the send loop."""
        if nc is None:
            nc = await connect_nats(self.opts, **self.callbacks())
        self._nc = nc
        inbox = nc.new_inbox()
        self._inbox = f"{inbox}.".encode()
        await nc.subscribe_raw(inbox + ".*", self._on_replies)
        self._set_connected(True)
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="publisher-send"),
            asyncio.create_task(self._timeout_loop(), name="publisher-timeouts"),
            asyncio.create_task(self._check_loop(), name="publisher-stored-check"),
        ]

    async def drain(self, grace_s: float | None = None) -> bool:
        """Wait until every submitted message is acked; False if ``grace_s`` ran out first."""
        return await wait_set(self._idle, grace_s)

    async def close(self) -> None:
        """Stop sending and disconnect. Idempotent. Unsettled messages stay the caller's."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._space.set()
        await cancel_and_wait(*self._tasks)
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.close()

    # -- submission ------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Messages on the wire awaiting their PubAck."""
        return len(self._inflight)

    @property
    def backlog(self) -> int:
        """Messages accepted but not yet acked (queued, in flight or waiting to retry)."""
        return len(self._pending) + len(self._retry) + len(self._inflight) + len(self._held)

    def has_space(self) -> bool:
        """Room for one more message: everything not yet acked counts against the bound, so
        a broker that rejects or never acks cannot make memory grow."""
        return self.backlog < self.opts.max_pending

    def offer(self, msg: OutMsg, *, force: bool = False) -> bool:
        """Queue ``msg`` without waiting; False (and nothing queued) when the queue is full.

        ``force`` queues it regardless: for an event already sealed into its chain, which
        must not be lost. Callers check :meth:`has_space` before sealing, so forcing only
        ever overshoots the bound by the few chain events sealed in the same step.
        """
        if not force and not self.has_space():
            self._space.clear()
            return False
        self._pending.append(msg)
        self.stats.submitted += 1
        self._idle.clear()
        self._wake.set()
        return True

    async def wait_for_space(self) -> None:
        """Return once there is room; settling acks signal it when the backlog is below half,
        so waiting readers resume in one step instead of one event at a time."""
        while not self.has_space() and not self._closed:
            self._space.clear()
            await self._space.wait()

    # -- send side -------------------------------------------------------------------------

    def _take(self, now: float) -> OutMsg | None:
        retry = self._retry
        while retry and retry[0].not_before <= now:
            msg = retry.popleft()
            if not self._needs_check(msg):
                return msg
            self._hold(msg)
        pending = self._pending
        while pending:
            msg = pending.popleft()
            if not msg.first_attempt or not self._needs_check(msg):
                return msg
            self._hold(msg)  # an earlier run may have sent it, too long ago to resend blind
        return None

    def _needs_check(self, msg: OutMsg) -> bool:
        """A resend JetStream might no longer deduplicate: its first attempt is older than
        half the duplicate window (the other half is margin for clock skew and delay)."""
        return (
            self._stored_check is not None
            and msg.first_attempt > 0
            and self._wall() - msg.first_attempt > self.opts.duplicate_window_s / 2
        )

    def _hold(self, msg: OutMsg) -> None:
        self._held.append(msg)
        self._check_wake.set()

    async def _check_loop(self) -> None:
        """Settle held messages the stream already has; send the others again."""
        while not self._closed:
            await self._check_wake.wait()
            self._check_wake.clear()
            await self._connected.wait()
            # Take every retry that would be held anyway: one question to the stream.
            for msg in [m for m in self._retry if self._needs_check(m)]:
                self._retry.remove(msg)
                self._held.append(msg)
            batch, self._held = self._held, []
            if not batch:
                continue
            assert self._stored_check is not None
            try:
                stored = await self._stored_check(batch)
            except Exception as exc:  # the stream may be unreachable again: try later
                self.stats.last_error = repr(exc)
                log.warning("stored_check_failed", extra={"fields": {"error": repr(exc)}})
                self._held = batch + self._held
                await asyncio.sleep(1.0)
                self._check_wake.set()
                continue
            now = self._wall()
            resend = []
            for msg in batch:
                if msg.msg_id in stored:
                    self._settle(msg, PubAck(self.opts.stream, 0, duplicate=True))
                else:
                    msg.first_attempt = now  # not stored as of now: a fresh window starts
                    msg.not_before = 0.0
                    resend.append(msg)
            self._retry.extendleft(reversed(resend))
            log.info(
                "stored_check",
                extra={"fields": {"checked": len(batch), "already_stored": len(stored)}},
            )
            self._after_settle()

    async def _send_loop(self) -> None:
        nc = self.nc
        window = self.opts.max_inflight
        inflight = self._inflight
        inbox = self._inbox
        while not self._closed:
            await self._connected.wait()
            now = self._clock()
            wall = self._wall()
            room = min(window - len(inflight), SEND_BATCH)
            batch: list[tuple[bytes, OutMsg]] = []
            commands: list[bytes] = []
            while room > 0 and (msg := self._take(now)) is not None:
                token = b"%d" % self._next_token
                self._next_token += 1
                msg.attempts += 1
                msg.sent_at = now
                if not msg.first_attempt:
                    msg.first_attempt = wall
                inflight[token] = msg
                batch.append((token, msg))
                commands.append(hpub(msg.subject.encode(), inbox + token, msg.header, msg.payload))
                room -= 1
            if not batch:
                self._wake.clear()
                delay = None
                if self._retry and len(inflight) < window:
                    delay = max(0.0, self._retry[0].not_before - now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            try:
                await nc.send(commands)
            except (nats.errors.Error, OSError) as exc:
                # Not on the wire: back into line first, in order, then wait for the
                # connection. (A reconnect in the meantime may already have moved them.)
                self._retry.extendleft(
                    msg for token, msg in reversed(batch) if inflight.pop(token, None)
                )
                self.stats.last_error = repr(exc)
                self._connected.clear()
                if nc.is_connected:
                    self._connected.set()
                    await asyncio.sleep(0.05)
                continue

    # -- settle side -----------------------------------------------------------------------

    def _on_replies(self, replies: list[Raw]) -> None:
        """Replies on the ack inbox, a read's worth at a time, straight from the read loop."""
        inflight = self._inflight
        cut = len(self._inbox)
        decode = _ack_decoder.decode
        for subject, data, header in replies:
            msg = inflight.pop(subject[cut:], None)
            if msg is None:
                continue  # a late reply for a message already re-sent under another token
            status = None if header is None else inline_status(header)
            ack: PubAck | None = None
            if status is None:
                try:
                    ack = decode(data)
                except msgspec.DecodeError:
                    ack = None
            if ack is None or ack.error is not None or not ack.stream:
                self._reject(msg, status or (ack.error if ack is not None else data[:200]))
            else:
                self._settle(msg, ack)
        self._after_settle()

    def _reject(self, msg: OutMsg, reason: object) -> None:
        """An error reply: count it, say so (a line a second at most), send again later."""
        self.stats.error_replies += 1
        if reason == NO_RESPONDERS and self._on_no_stream is not None:
            # No stream captures the subject: it may have vanished with a wiped broker.
            self._on_no_stream()
        self.stats.last_error = str(reason)
        now = self._clock()
        if now - self._last_reject_log >= 1.0:
            self._last_reject_log = now
            log.warning(
                "publish_rejected_will_retry",
                extra={
                    "fields": {
                        "subject": msg.subject,
                        "id": msg.msg_id,
                        "reply": str(reason),
                        "rejected_total": self.stats.error_replies,
                    }
                },
            )
        self._schedule_retry(msg)

    def _settle(self, msg: OutMsg, ack: PubAck) -> None:
        self.stats.acked += 1
        if ack.duplicate:
            self.stats.duplicates += 1
        if self._on_acked is not None:
            self._on_acked(msg, ack)

    def _after_settle(self) -> None:
        backlog = self.backlog
        if not backlog:
            self._idle.set()
        if not self._space.is_set() and backlog <= self.opts.max_pending // 2:
            self._space.set()
        self._wake.set()

    def _schedule_retry(self, msg: OutMsg) -> None:
        state = tenacity.RetryCallState(self._retrying, None, (), {})
        state.attempt_number = msg.attempts
        msg.not_before = self._clock() + self.opts.retry_wait(state)
        self.stats.retries += 1
        self._retry.append(msg)
        self._wake.set()

    async def _timeout_loop(self) -> None:
        period = max(0.05, self.opts.ack_timeout_s / 4)
        while not self._closed:
            await asyncio.sleep(period)
            deadline = self._clock() - self.opts.ack_timeout_s
            expired = [t for t, m in self._inflight.items() if m.sent_at <= deadline]
            for token in expired:
                msg = self._inflight.pop(token)
                self.stats.timeouts += 1
                self._schedule_retry(msg)
            if expired:
                log.warning("publish_ack_timeout", extra={"fields": {"count": len(expired)}})

    # -- connection events -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _set_connected(self, up: bool) -> None:
        if up:
            self._connected.set()
        else:
            self._connected.clear()
        if self._on_connection is not None:
            self._on_connection(up)

    async def _on_disconnected(self) -> None:
        if self._closed:
            return
        self.stats.disconnects += 1
        self._set_connected(False)
        self._errors_while_down = 0
        log.warning(
            "nats_disconnected",
            extra={"fields": {"inflight": len(self._inflight), "backlog": self.backlog}},
        )

    async def _on_reconnected(self) -> None:
        # Replies to what was in flight may be lost with the old connection: send it again
        # now (same Nats-Msg-Id, so anything the stream already stored comes back duplicate).
        self.stats.reconnects += 1
        stranded = sorted(self._inflight.values(), key=lambda m: m.sent_at)
        self._inflight.clear()
        for msg in reversed(stranded):
            self._retry.appendleft(msg)
            msg.not_before = 0.0
        self._set_connected(True)
        self._wake.set()
        self._check_wake.set()
        log.info(
            "nats_reconnected",
            extra={
                "fields": {
                    "resent": len(stranded),
                    "failed_reconnect_attempts": self._errors_while_down,
                }
            },
        )

    async def _on_error(self, exc: Exception) -> None:
        """While disconnected every failed reconnect attempt lands here: count those and
        say nothing (the disconnect and the reconnect are each logged once)."""
        self.stats.last_error = repr(exc)
        if not self._connected.is_set() and self._nc is not None:
            self._errors_while_down += 1
            return
        log.warning("nats_error", extra={"fields": {"error": repr(exc)}})
