"""Daemon lifecycle details not covered through the CLI."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from typing import Any

import msgspec
import nats
import nats.js.errors
import pytest

from audit.verify import verify_chain
from producer.chain.signing import generate_key_file
from producer.errors import BrokerError
from producer.guest.simulator import run_guest
from producer.ops import daemon as daemon_module
from producer.ops import registry
from producer.ops.config import Config
from producer.ops.daemon import Producer
from producer.ops.embedded import EmbeddedNats
from tests.support import (
    cell_spec,
    eventually,
    feed_seal_verify,
    history,
    make_config,
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
                "metrics": {"listen": ""},
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
            assert await producer.drain(10)
            report, _ = await verified(url, "cell-1", signer)
            assert report.ok and report.sealed and report.events == 2
        finally:
            assert await producer.shutdown()
            assert await producer.shutdown()  # idempotent
        assert not producer.embedded.running
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_shutdown_suspends_and_a_restart_continues_every_chain(
    nats_server: EmbeddedNats,
) -> None:
    base = short_dir()
    try:
        signer = generate_key_file(f"{base}/signing.key")
        specs = (cell_spec(base, 1), cell_spec(base, 2))
        config = make_config(nats_server.url, f"{base}/signing.key", specs)
        first = Producer(config, signer=signer)
        await first.startup()
        assert await first.shutdown(grace_s=10)
        assert first.registry is not None and not first.registry.cells
        for cell in ("cell-1", "cell-2"):
            report, events = await verified(nats_server.url, cell, signer)
            assert report.ok and not report.sealed  # a stop suspends, it does not seal
            assert [e["type"].rsplit(".", 1)[1] for e in events] == ["opened"]

        second = Producer(config, signer=signer)
        await second.startup()
        try:
            assert second.registry is not None
            await second.registry.deregister("cell-1")
            assert await second.drain(10)
        finally:
            assert await second.shutdown(grace_s=10)
        report, events = await verified(nats_server.url, "cell-1", signer)
        assert report.ok and report.sealed, report.problems
        kinds = [e["type"].rsplit(".", 1)[1] for e in events]
        assert kinds == ["opened", "resumed", "sealed"]
        resumed = events[1]["data"]
        assert resumed["clean"] is True
        assert resumed["previousStopAt"] == events[0]["time"]
        assert {e["data"]["cellId"] for e in events} == {"cell-1"}
        assert len({e["id"].rpartition("-")[0] for e in events}) == 1  # one chain
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_counters_are_logged_periodically(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(registry, "STATS_INTERVAL_S", 0.2)
    caplog.set_level(logging.INFO, logger="producer")
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
        assert any(r.msg == "spool_stats" for r in caplog.records)


async def test_sighup_key_reload_continues_every_chain_under_the_new_key(
    nats_server: EmbeddedNats,
) -> None:
    base = short_dir()
    try:
        key_file = f"{base}/signing.key"
        old = generate_key_file(key_file)
        config = make_config(nats_server.url, key_file, (cell_spec(base, 1),))
        producer = Producer(config)  # loads the key file itself, as `run` does
        await producer.startup()
        try:
            assert producer.registry is not None
            cell = producer.registry.cells["cell-1"]
            await run_guest(cell.socket_path, rate=0, count=5, seed=1)
            await eventually(lambda: cell.counters.accepted == 5)
            os.unlink(key_file)
            new = generate_key_file(key_file)
            producer.reload_key()  # what the daemon's SIGHUP handler calls
            await run_guest(cell.socket_path, rate=0, count=5, seed=2)
            await eventually(lambda: cell.counters.accepted == 10)
            await producer.registry.deregister("cell-1")
            assert await producer.drain(10)
        finally:
            await producer.shutdown()
        payloads = await history(nats_server.url, "cell-1")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    events = sorted((msgspec.json.decode(p) for p in payloads), key=lambda e: e["sequence"])
    kids = [e.get("signkid") for e in events if "signkid" in e]
    assert kids[0] == old.kid and kids[-1] == new.kid  # one chain, two keys in turn
    assert kids == sorted(kids, key=lambda k: k == new.kid)
    both = {old.kid: old.public_raw, new.kid: new.public_raw}
    assert verify_chain(payloads, both).ok
    only_old = verify_chain(payloads, {old.kid: old.public_raw})
    assert not only_old.ok and any(new.kid in p for p in only_old.problems)


async def test_stream_replicas_reach_the_first_stream_creation(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    """A single server cannot hold three replicas: the producer must ask for them (and be
    refused) rather than silently create a one-replica stream."""
    async with running_producer(nats_server.url, nats={"stream_replicas": 3}) as (producer, _, _):
        await eventually(lambda: producer.fatal is not None, timeout=30)
    assert "replicas" in str(producer.fatal), producer.fatal
    nc = await nats.connect(nats_server.url)
    try:
        with pytest.raises(nats.js.errors.NotFoundError):
            await nc.jetstream().stream_info("CELLOS_TELEMETRY")
    finally:
        await nc.close()


async def test_a_stream_check_the_broker_could_not_answer_is_tried_again(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster still electing a leader (or a host too busy to answer in time) fails the
    stream check with a timeout: the producer tries again instead of stopping."""
    real = daemon_module.ensure_stream
    calls = 0

    async def slow_cluster(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise BrokerError("cannot read stream CELLOS: nats: timeout")
        return await real(*args, **kwargs)

    monkeypatch.setattr(daemon_module, "ensure_stream", slow_cluster)
    caplog.set_level(logging.INFO, logger="producer")
    async with running_producer(nats_server.url) as (producer, signer, _):
        await eventually(lambda: "broker_ready" in caplog.messages, timeout=30)
        assert producer.fatal is None and calls == 2
        assert "broker_setup_retrying" in caplog.messages
        report, _ = await feed_seal_verify(producer, nats_server.url, signer, count=20, seed=4)
    assert report.ok, report.problems
