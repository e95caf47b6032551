"""Daemon lifecycle details not covered through the CLI."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil

import msgspec
import pytest

from producer.chain.signing import generate_key_file
from producer.ops import registry
from producer.ops.config import Config
from producer.ops.daemon import Producer
from producer.ops.embedded import EmbeddedNats
from tests.support import (
    cell_spec,
    eventually,
    running_producer,
    send_stream,
    short_dir,
    verified,
)


async def test_no_nats_url_runs_the_embedded_server_under_data_dir() -> None:
    base = short_dir()
    try:
        signer = generate_key_file(f"{base}/k")
        config = msgspec.convert(
            {
                "host_id": "h",
                "data_dir": f"{base}/data",
                "signing": {"key_file": f"{base}/k"},
                "cells": [msgspec.to_builtins(cell_spec(base, 1))],
            },
            Config,
        )
        producer = Producer(config, signer=signer)
        await producer.startup()
        try:
            assert producer.embedded is not None and producer.embedded.running
            assert os.path.isdir(f"{base}/data/nats")
            url = producer.nats_url
            assert producer.registry is not None
            await producer.registry.deregister("cell-1")
            assert producer.publisher is not None and await producer.publisher.drain(10)
            report, _ = await verified(url, "cell-1", signer)
            assert report.ok and report.sealed and report.events == 2
        finally:
            assert await producer.shutdown()
            assert await producer.shutdown()  # idempotent
        assert not producer.embedded.running
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_shutdown_seals_open_cells_and_drains(nats_server: EmbeddedNats) -> None:
    async with running_producer(nats_server.url, cells=2) as (p, signer, _):
        assert await p.shutdown(grace_s=10)
        assert p.registry is not None and not p.registry.cells
        for cell in ("cell-1", "cell-2"):
            report, events = await verified(nats_server.url, cell, signer)
            assert report.ok and report.sealed
            assert events[-1]["data"]["reason"] == "producer_shutdown"


async def test_counters_are_logged_periodically(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(registry, "STATS_INTERVAL_S", 0.2)
    caplog.set_level(logging.INFO, logger="producer.ops.registry")
    async with running_producer(nats_server.url, silence={"window_ms": 1000}) as (p, _, _base):
        assert p.registry is not None
        cell = p.registry.cells["cell-1"]
        oversize = (5000).to_bytes(4, "little")
        await asyncio.to_thread(send_stream, cell.socket_path, oversize, half_close=False)
        await eventually(
            lambda: any(
                r.msg == "cell_stats" and r.fields.get("rejected") == {"FrameTooLarge": 1}  # type: ignore[attr-defined]
                for r in caplog.records
            ),
            timeout=5,
        )
        assert any(r.msg == "publisher_stats" for r in caplog.records)
