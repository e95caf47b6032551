"""The producer process: startup, serve, graceful shutdown.

Startup order matters for the delivery promise: the broker connection and the stream check
come first (a stream that cannot hold the promise stops us before any cell is opened), then
cells are registered, each binding its socket before its VM may boot. Shutdown runs the
other way round and is idempotent: stop reading, seal every chain, wait (up to a grace
period) for the PubAcks, disconnect, stop the embedded broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

from producer.aio import cancel_and_wait
from producer.chain.signing import Signer
from producer.chain.signpolicy import SignBudget, SigningPolicy
from producer.delivery.heads import HeadRecorder, open_bucket
from producer.delivery.publisher import OutMsg, PubAck, Publisher, PublisherOptions
from producer.delivery.stream import ensure_stream
from producer.errors import BrokerError
from producer.guest.listener import VsockRouter
from producer.ops.config import Config
from producer.ops.embedded import EmbeddedNats
from producer.ops.logs import event
from producer.ops.registry import Registry

log = logging.getLogger(__name__)

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


class Producer:
    def __init__(self, config: Config, *, signer: Signer | None = None) -> None:
        self.config = config
        self.signer = signer
        self.embedded: EmbeddedNats | None = None
        self.publisher: Publisher | None = None
        self.registry: Registry | None = None
        self.vsock: VsockRouter | None = None
        self.heads: HeadRecorder | None = None
        self.nats_url = config.nats.url or ""
        self._stop = asyncio.Event()
        self._shutdown_done = False

    async def startup(self) -> None:
        cfg = self.config
        if self.signer is None:
            self.signer = Signer.load(cfg.signing.key_file, kid=cfg.signing.kid)
        if cfg.nats.url is None:
            store = os.path.join(cfg.data_dir, "nats")
            os.makedirs(store, mode=0o700, exist_ok=True)
            self.embedded = EmbeddedNats(store_dir=store)
            await self.embedded.start()
            self.nats_url = self.embedded.url
            log.info("embedded_nats_started", extra={"fields": {"url": self.nats_url}})
        self.publisher = Publisher(
            PublisherOptions(
                url=self.nats_url,
                stream=cfg.nats.stream,
                max_pending=cfg.queue.max_events,
                max_inflight=cfg.nats.max_inflight,
                ack_timeout_s=cfg.nats.ack_timeout_s,
                connect_timeout_s=cfg.nats.connect_timeout_s,
                credentials=cfg.nats.credentials,
                name=f"cellos-producer@{cfg.host_id}",
            ),
            on_acked=self._on_acked,
        )
        await self.publisher.start()
        check = await ensure_stream(
            self.publisher.nc.jetstream(),
            name=cfg.nats.stream,
            subject_prefix=cfg.nats.subject_prefix,
            duplicate_window_s=cfg.nats.duplicate_window_s,
            create=cfg.nats.create_stream,
        )
        for warning in check.warnings:
            event(log, logging.WARNING, "stream_warning", stream=cfg.nats.stream, problem=warning)
        self.heads = HeadRecorder(
            await open_bucket(self.publisher.nc.jetstream(), cfg.nats.heads_bucket)
        )
        self.heads.start()
        if cfg.listener.vsock:
            self.vsock = VsockRouter(cfg.listener.vsock_port)
            await self.vsock.start()
        self.registry = Registry(
            cfg,
            signer=self.signer,
            policy=make_policy(cfg, self.signer),
            publisher=self.publisher,
            vsock=self.vsock,
        )
        for spec in cfg.cells:
            await self.registry.register(spec)
        self.registry.start_ticker()
        log.info(
            "producer_started",
            extra={
                "fields": {
                    "host_id": cfg.host_id,
                    "nats": self.nats_url,
                    "stream": cfg.nats.stream,
                    "cells": len(cfg.cells),
                    "signing": cfg.signing.mode,
                    "kid": self.signer.kid,
                }
            },
        )

    def _on_acked(self, msg: OutMsg, _ack: PubAck) -> None:
        if msg.head is not None and self.heads is not None:
            self.heads.note(msg.head)

    def request_shutdown(self) -> None:
        self._stop.set()

    async def serve(self, *, install_signals: bool = True) -> bool:
        """Run until SIGTERM/SIGINT (or ``request_shutdown``), then shut down gracefully.

        Returns whether every event was acknowledged before the grace period ran out.
        """
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_shutdown)
        try:
            # A signal during startup (e.g. while the broker is still unreachable) must stop
            # us too, not wait for startup to finish first.
            starting = asyncio.create_task(self.startup())
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()
                await stopping
            else:
                await cancel_and_wait(starting)
                log.info("startup_interrupted")
        finally:
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            drained = await self.shutdown()
        return drained

    async def shutdown(self, grace_s: float = 10.0) -> bool:
        """Seal every chain and wait up to ``grace_s`` for their PubAcks. Idempotent.

        Returns whether everything queued was acknowledged in time.
        """
        if self._shutdown_done:
            return True
        self._shutdown_done = True
        drained = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        if self.registry is not None:
            await self.registry.stop_ticker()
            await self.registry.deregister_all("producer_shutdown", grace_s=grace_s / 2)
        if self.vsock is not None:
            await self.vsock.close()
        if self.publisher is not None:
            drained = await self.publisher.drain(max(0.0, deadline - loop.time()))
            if not drained:
                log.error(
                    "shutdown_unacked_events",
                    extra={"fields": {"backlog": self.publisher.backlog}},
                )
            if self.heads is not None:
                drained = await self.heads.flush(max(0.1, deadline - loop.time())) and drained
                await self.heads.close()
            await self.publisher.close()
        if self.embedded is not None:
            with contextlib.suppress(BrokerError):
                await self.embedded.stop()
        log.info("producer_stopped", extra={"fields": {"drained": drained}})
        return drained
