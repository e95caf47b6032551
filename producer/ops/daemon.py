"""The producer process: startup, serve, graceful shutdown (SPEC 7).

Startup never waits for the broker: the configuration is validated, the spool recovered
and every cell's socket bound first (a start that cannot do all of that fails with nothing
published and nothing spooled), then chains are opened or continued into the spool, and
only then, in the background, the broker is connected, the stream checked and the spool's
backlog published. Guests can talk from the first second whether NATS is up or not.

Shutdown suspends rather than ends: every cell stops reading and spools what it read, the
producer waits (up to ``spool.stop_grace_s``) for PubAcks, records every chain's state, and
exits 0; whatever is unacknowledged stays in the spool and the next start publishes it and
continues each chain with ``resumed``. Shutdown is idempotent and bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

import msgspec
import tenacity
from aiohttp import web
from nats.js import JetStreamContext

from audit.connect import connect_kwargs
from audit.digest import digest_of, format_sequence
from audit.errors import ConnectOptionsError
from audit.message import STRUCTURED_CONTENT_TYPE, binary_headers, binary_payload
from probes.base import ProbeReading
from probes.scheduler import ProbeScheduler
from producer.aio import cancel_and_wait
from producer.chain.events import Rfc3339Clock, host_event
from producer.chain.signing import Signer
from producer.chain.signpolicy import SignBudget, SigningPolicy
from producer.delivery import records as rec
from producer.delivery.dedup import stored_ids
from producer.delivery.heads import HeadRecorder, latest_head, open_bucket
from producer.delivery.protocol import IdHeader, header_block
from producer.delivery.publisher import (
    OutMsg,
    PubAck,
    Publisher,
    PublisherOptions,
    connect_nats,
)
from producer.delivery.spool import Spool, SpooledEvent, SpoolOptions
from producer.delivery.stream import StreamCheck, ensure_stream
from producer.errors import BrokerError, ConfigError, ProducerError, StreamConfigError
from producer.guest.listener import VsockRouter
from producer.ops.config import CellSpec, Config
from producer.ops.control import remove_control_socket, serve_control
from producer.ops.embedded import EmbeddedNats
from producer.ops.logs import event
from producer.ops.metrics import serve_metrics
from producer.ops.registry import Registry
from producer.stats import Histogram
from schemas.heads import ChainHead

log = logging.getLogger(__name__)

_STRUCTURED_HEADER = IdHeader({"Content-Type": STRUCTURED_CONTENT_TYPE})

ADAPTIVE_SIGN_SHARE = 0.25
"""Adaptive mode lets signing take at most this share of one core (SPEC 5.1): at ordinary
rates that signs every event, under bursts the rest of the pipeline keeps three quarters."""


def measure_sign_cost(signer: Signer, rounds: int = 64) -> float:
    """Seconds per signature on this host, so the adaptive budget fits this CPU."""
    sample = b"x" * 700
    start = time.perf_counter()
    for _ in range(rounds):
        signer.sign(sample)
    return (time.perf_counter() - start) / rounds


def make_policy(config: Config, signer: Signer) -> SigningPolicy:
    s = config.signing
    budget = None
    if s.mode == "adaptive":
        rate = ADAPTIVE_SIGN_SHARE / measure_sign_cost(signer)
        budget = SignBudget(rate, burst=max(8.0, rate / 50), now_s=time.monotonic())
    return SigningPolicy(
        strict=s.mode == "strict",
        max_unsigned=s.max_unsigned,
        max_unsigned_ms=s.max_unsigned_ms,
        budget=budget,
    )


PUBLISH_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
STREAM_RECHECK_S = 5.0
"""Publishes answered "no stream" re-check the stream at most this often."""


class _TypeOnly(msgspec.Struct):
    type: str = ""


_type_decoder = msgspec.json.Decoder(_TypeOnly)


class Producer:
    def __init__(self, config: Config, *, signer: Signer | None = None) -> None:
        self.config = config
        self.signer = signer
        self.spool: Spool | None = None
        self.embedded: EmbeddedNats | None = None
        self.publisher: Publisher | None = None
        self.registry: Registry | None = None
        self.vsock: VsockRouter | None = None
        self.heads: HeadRecorder | None = None
        self.probes: ProbeScheduler | None = None
        self.publish_latency = Histogram(PUBLISH_LATENCY_BUCKETS_S)
        """Spooled to acknowledged, per event (events read back from disk excluded)."""
        self._wall = Rfc3339Clock()
        self.nats_url = config.nats.url or ""
        self.fatal: BaseException | None = None
        """What stopped the producer on its own (an unfit stream, say), if anything."""
        self._js: JetStreamContext | None = None
        self._broker_task: asyncio.Task[None] | None = None
        self._broker_ready = asyncio.Event()
        self._stream_checked_at = -STREAM_RECHECK_S
        self._stop = asyncio.Event()
        self._metrics: web.AppRunner | None = None
        self._control: web.AppRunner | None = None
        self._started = False
        self._shutdown_done = False

    # -- startup ----------------------------------------------------------------------------

    async def startup(self) -> None:
        cfg = self.config
        if self.signer is None:
            self.signer = Signer.load(cfg.signing.key_file, kid=cfg.signing.kid)
        try:
            # An unusable credentials file is the operator's to fix before a start, like
            # the key file; credentials the broker refuses are retried instead.
            connect_kwargs(cfg.nats.auth)
        except ConnectOptionsError as exc:
            where = f"{exc.path}: " if exc.path is not None else ""
            raise ConfigError(f"nats.{exc.field}", where + exc.reason) from exc
        spool = self.spool = Spool(
            SpoolOptions(
                directory=os.path.join(cfg.data_dir, "spool"),
                fsync=cfg.spool.fsync,
                fsync_interval_ms=cfg.spool.fsync_interval_ms,
                max_bytes=cfg.spool.max_bytes,
                min_free_bytes=cfg.spool.min_free_bytes,
                segment_bytes=cfg.spool.segment_bytes,
            )
        )
        spool.open()
        if cfg.listener.vsock:
            self.vsock = VsockRouter(cfg.listener.vsock_port)
            await self.vsock.start()
        if cfg.probes.enabled:
            self.probes = ProbeScheduler(
                self._dispatch_probe,
                interval_s=cfg.probes.interval_s,
                timeout_s=cfg.probes.timeout_s,
                max_concurrency=cfg.probes.max_concurrency,
            )
        registry = self.registry = Registry(
            cfg,
            signer=self.signer,
            policy=make_policy(cfg, self.signer),
            spool=spool,
            vsock=self.vsock,
            lookup=self._supersedes,
            on_stats=self._log_stats,
            probes=self.probes,
        )
        specs, sources = self._registrations()
        socks = registry.bind_all(specs)
        if cfg.metrics.listen:
            try:
                self._metrics = await serve_metrics(
                    self, cfg.metrics.listen, max_cell_labels=cfg.metrics.max_cell_labels
                )
            except OSError as exc:
                for sock in socks:
                    sock.close()
                raise ConfigError("metrics.listen", f"cannot listen: {exc.strerror}") from exc
        self.publisher = Publisher(
            PublisherOptions(
                url=self.nats_url,
                stream=cfg.nats.stream,
                max_pending=cfg.queue.max_events,
                max_inflight=cfg.nats.max_inflight,
                ack_timeout_s=cfg.nats.ack_timeout_s,
                connect_timeout_s=cfg.nats.connect_timeout_s,
                auth=cfg.nats.auth,
                name=f"cellos-producer@{cfg.host_id}",
                duplicate_window_s=cfg.nats.duplicate_window_s,
            ),
            on_acked=self._on_acked,
            stored_check=self._stored_check,
            on_no_stream=self._on_no_stream,
            on_connection=spool.set_paced,
        )
        self._broker_task = asyncio.get_running_loop().create_task(
            self._run_broker(), name="broker"
        )
        for spec, sock, source in zip(specs, socks, sources, strict=True):
            await registry.start(spec, sock, source=source)
        await registry.seal_unregistered()
        registry.start_ticker()
        if self.probes is not None:
            self.probes.start()
        self._started = True
        self._control = await serve_control(self)
        if not cfg.cells and self._control is None:
            event(
                log,
                logging.WARNING,
                "no_cells",
                note="no cells in the config and the control API is off: nothing to serve",
            )
        event(
            log,
            logging.INFO,
            "producer_started",
            host_id=cfg.host_id,
            cells=len(specs),
            signing=cfg.signing.mode,
            kid=self.signer.kid,
            spool_depth=spool.depth(),
            recovered=not spool.fresh,
            clean_previous_stop=spool.recovered_clean,
        )

    def _registrations(self) -> tuple[list[CellSpec], list[str]]:
        """The configured cells, then cells registered through the API before a restart
        whose chains the spool still holds open: both are served again."""
        assert self.spool is not None
        specs = list(self.config.cells)
        sources = ["config"] * len(specs)
        configured = {s.cell_id for s in specs}
        for chain in self.spool.open_chains():
            ident = chain.identity
            if ident.source == "api" and ident.cell_id not in configured:
                specs.append(msgspec.convert(ident.spec, CellSpec))
                sources.append("api")
                configured.add(ident.cell_id)
        return specs, sources

    async def _run_broker(self) -> None:
        """Connect (retrying for as long as it takes), check the stream, then publish the
        spool. A stream that cannot keep the delivery promise stops the producer."""
        cfg = self.config
        assert self.publisher is not None and self.spool is not None
        try:
            if cfg.nats.url is None:
                store = os.path.join(cfg.data_dir, "nats")
                os.makedirs(store, mode=0o700, exist_ok=True)
                self.embedded = EmbeddedNats(store_dir=store)
                await self.embedded.start()
                self.nats_url = self.publisher.opts.url = self.embedded.url
                event(log, logging.INFO, "embedded_nats_started", url=self.nats_url)
            nc = await connect_nats(self.publisher.opts, **self.publisher.callbacks())
            await self.publisher.start(nc)
            js = self._js = nc.jetstream()
            await self._set_up_stream(js)
            self._broker_ready.set()
            self.spool.start_delivery(self._deliver, self.publisher.wait_for_space)
            event(log, logging.INFO, "broker_ready", nats=self.nats_url, stream=cfg.nats.stream)
        except asyncio.CancelledError:
            raise
        except ProducerError as exc:
            self.fatal = exc
            event(log, logging.ERROR, "broker_setup_failed", error=str(exc))
            self.request_shutdown()

    async def _set_up_stream(self, js: JetStreamContext) -> None:
        """Check (or create) the stream and open the heads bucket. What the broker could not
        answer yet (a cluster still electing a leader, a host too busy to reply in time) is
        tried again, paced, for as long as it takes; only a stream that cannot keep the
        delivery promise (:class:`StreamConfigError`) is final."""
        cfg = self.config
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(_transient),
            wait=tenacity.wait_exponential(multiplier=0.5, max=30),
            before_sleep=_log_setup_retry,
            reraise=True,
        )
        replicas = cfg.nats.stream_replicas
        async for attempt in retrying:
            with attempt:
                check = await self._ensure_stream(js)
                bucket = await open_bucket(js, cfg.nats.heads_bucket, replicas=replicas)
        for warning in check.warnings:
            event(log, logging.WARNING, "stream_warning", stream=cfg.nats.stream, problem=warning)
        self.heads = HeadRecorder(
            bucket, reopen=lambda: open_bucket(js, cfg.nats.heads_bucket, replicas=replicas)
        )
        self.heads.start()

    async def _ensure_stream(self, js: JetStreamContext) -> StreamCheck:
        nats_cfg = self.config.nats
        return await ensure_stream(
            js,
            name=nats_cfg.stream,
            subject_prefix=nats_cfg.subject_prefix,
            duplicate_window_s=nats_cfg.duplicate_window_s,
            create=nats_cfg.create_stream,
            replicas=nats_cfg.stream_replicas,
        )

    def _on_no_stream(self) -> None:
        """Publishes find no stream: it was deleted, or the broker's store was wiped. Make
        it again (if allowed) and let the retries go through; say loudly that the history
        acknowledged before is gone with it (a verifier will show the hole)."""
        now = time.monotonic()
        if self._js is None or now - self._stream_checked_at < STREAM_RECHECK_S:
            return
        self._stream_checked_at = now
        asyncio.get_running_loop().create_task(self._recreate_stream(self._js))

    async def _recreate_stream(self, js: JetStreamContext) -> None:
        try:
            check = await self._ensure_stream(js)
        except ProducerError as exc:
            event(
                log, logging.ERROR, "stream_missing", stream=self.config.nats.stream, error=str(exc)
            )
            return
        if check.created:
            event(
                log,
                logging.ERROR,
                "stream_recreated",
                stream=self.config.nats.stream,
                note="the stream had vanished; events acknowledged before are no longer in it",
            )

    async def _supersedes(self, cell_id: str, run_id: str) -> dict[str, Any] | None:
        """For a new chain when this producer's state was lost: the chain it replaces, from
        the broker's recorded heads (waiting a bounded time for the broker)."""
        wait = 2 * self.config.nats.connect_timeout_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._broker_ready.wait(), wait)
        if self._js is None:
            event(log, logging.WARNING, "supersedes_unknown", cell_id=cell_id, reason="no broker")
            return None
        try:
            head = await latest_head(self._js, self.config.nats.heads_bucket, cell_id, run_id)
        except BrokerError as exc:
            event(log, logging.WARNING, "supersedes_unknown", cell_id=cell_id, reason=str(exc))
            return None
        if head is None:
            return None
        return {
            "chainId": head.chain_id,
            "lastKnownSequence": format_sequence(head.sequence),
            "lastKnownDigest": head.digest,
            "reason": "state_lost",
        }

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where ``/metrics`` is served (the port the OS chose for a configured port 0)."""
        if self._metrics is None or not self._metrics.addresses:
            return None
        host, port = self._metrics.addresses[0][:2]
        return str(host), int(port)

    @property
    def started(self) -> bool:
        """Startup finished: key loaded, spool recovered, every configured cell served."""
        return self._started

    # -- delivery ---------------------------------------------------------------------------

    def _deliver(self, spooled: SpooledEvent) -> bool:
        publisher = self.publisher
        assert publisher is not None
        if not publisher.has_space():
            return False
        msg_id = f"{spooled.chain.identity.chain_id}-{spooled.sequence}"
        if self.config.nats.mode == "binary":
            full = msgspec.json.decode(spooled.payload)
            header = header_block(binary_headers(full))
            msg = OutMsg(spooled.subject, binary_payload(full), msg_id, header)
        else:
            msg = OutMsg(spooled.subject, spooled.payload, msg_id, _STRUCTURED_HEADER(msg_id))
        msg.ref = spooled
        msg.first_attempt = spooled.sent_since
        publisher.offer(msg, force=True)
        return True

    def _on_acked(self, msg: OutMsg, _ack: PubAck) -> None:
        spooled: SpooledEvent = msg.ref
        assert self.spool is not None
        self.spool.acked(spooled)
        if spooled.appended_at:
            self.publish_latency.observe(time.monotonic() - spooled.appended_at)
        if spooled.flags & rec.NOTE_HEAD and self.heads is not None:
            ident = spooled.chain.identity
            type_ = _type_decoder.decode(spooled.payload).type
            self.heads.note(
                ChainHead(
                    cell_id=ident.cell_id,
                    run_id=ident.run_id,
                    chain_id=ident.chain_id,
                    sequence=spooled.sequence,
                    digest=digest_of(spooled.payload),
                    event_id=msg.msg_id,
                    type=type_,
                    sealed=bool(spooled.flags & rec.SEALED),
                )
            )

    async def _dispatch_probe(self, cell_id: str, reading: ProbeReading) -> bool:
        """A probe reading becomes a ``host.v1.<probe>`` event of its cell, stamped now (at
        dispatch, SPEC 8); False (skipped, counted by the scheduler) when the spool is full."""
        cell = self.registry.cells.get(cell_id) if self.registry is not None else None
        if cell is None:
            return False
        at = self._wall.now()
        return cell.offer(host_event(cell.ctx, reading.probe, at, reading.inputs, reading.output))

    async def _stored_check(self, msgs: list[OutMsg]) -> set[str]:
        if self._js is None:
            raise BrokerError("not connected")
        return await stored_ids(
            self._js,
            stream=self.config.nats.stream,
            subject_prefix=self.config.nats.subject_prefix,
            candidates=[(m.ref.chain.identity.cell_id, m.msg_id, m.first_attempt) for m in msgs],
        )

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every spooled event is acknowledged; False if ``timeout_s`` ran out."""
        assert self.spool is not None
        return await self.spool.wait_empty(timeout_s)

    # -- key rotation -----------------------------------------------------------------------

    def reload_key(self) -> None:
        """SIGHUP: load the key file again; every chain continues under the new key."""
        cfg = self.config
        try:
            signer = Signer.load(cfg.signing.key_file, kid=cfg.signing.kid)
        except ProducerError as exc:
            event(log, logging.ERROR, "signing_key_reload_failed", error=str(exc))
            return
        old = self.signer
        self.signer = signer
        if self.registry is not None:
            self.registry.rekey(signer)
        event(
            log,
            logging.INFO,
            "signing_key_reloaded",
            kid=signer.kid,
            previous_kid=old.kid if old is not None else None,
        )

    # -- serve and shutdown -----------------------------------------------------------------

    def request_shutdown(self) -> None:
        self._stop.set()

    async def serve(self, *, install_signals: bool = True) -> bool:
        """Run until SIGTERM/SIGINT (or ``request_shutdown``), then shut down gracefully.

        Returns whether every spooled event was acknowledged before the grace period ran
        out (what was not stays in the spool; nothing is lost either way).
        """
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_shutdown)
            loop.add_signal_handler(signal.SIGHUP, self.reload_key)
        try:
            # A signal during startup must stop us too, not wait for startup to finish.
            starting = asyncio.create_task(self.startup())
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()
                await stopping
            else:
                await cancel_and_wait(starting)
                event(log, logging.INFO, "startup_interrupted")
        finally:
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            drained = await self.shutdown()
        return drained

    async def shutdown(self, grace_s: float | None = None) -> bool:
        """Suspend every chain and wait up to ``grace_s`` (default ``spool.stop_grace_s``)
        for PubAcks, then record the chain states and stop. Idempotent.

        Returns whether every spooled event was acknowledged in time.
        """
        if self._shutdown_done:
            return True
        self._shutdown_done = True
        grace = self.config.spool.stop_grace_s if grace_s is None else grace_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._control is not None:
            await self._control.cleanup()
            remove_control_socket(self)
        if self.registry is not None:
            await self.registry.stop_ticker()
            await self.registry.suspend_all(grace_s=grace / 2)
        if self.probes is not None:
            await self.probes.close()
        if self._metrics is not None:
            await self._metrics.cleanup()
        if self.vsock is not None:
            await self.vsock.close()
        drained = True
        if self.spool is not None and not self.spool.closed:
            if self._broker_ready.is_set():
                drained = await self.drain(max(0.0, deadline - loop.time()))
            else:
                drained = self.spool.depth() == 0
            if self.heads is not None:
                await self.heads.flush(max(0.1, deadline - loop.time()))
            kept = self.spool.depth()
            await self.spool.close(clean=True)
            if kept:
                event(log, logging.WARNING, "shutdown_events_kept_in_spool", events=kept)
        await cancel_and_wait(self._broker_task)
        if self.heads is not None:
            await self.heads.close()
        if self.publisher is not None:
            await self.publisher.close()
        if self.embedded is not None:
            with contextlib.suppress(BrokerError):
                await self.embedded.stop()
        if self._started:
            event(log, logging.INFO, "producer_stopped", drained=drained)
        return drained

    def _log_stats(self) -> None:
        if self.probes is not None:
            for (cell_id, probe), counts in sorted(self.probes.stats().items()):
                event(
                    log,
                    logging.INFO,
                    "probe_stats",
                    cell_id=cell_id,
                    probe=probe,
                    readings=counts.readings,
                    skipped=counts.skipped,
                    missed=counts.missed,
                    failures=counts.failures,
                )
        if self.publisher is None:
            return
        st = self.publisher.stats
        event(
            log,
            logging.INFO,
            "publisher_stats",
            connected=self.publisher.connected,
            acked=st.acked,
            duplicates=st.duplicates,
            retries=st.retries,
            timeouts=st.timeouts,
            error_replies=st.error_replies,
            reconnects=st.reconnects,
            backlog=self.publisher.backlog,
        )


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, BrokerError) and not isinstance(exc, StreamConfigError)


def _log_setup_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    event(
        log,
        logging.WARNING,
        "broker_setup_retrying",
        attempt=state.attempt_number,
        retry_in_s=round(state.next_action.sleep, 2) if state.next_action else None,
        error=str(exc),
    )
