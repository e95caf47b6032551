"""Helpers for tests that run the real pipeline against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jsonschema
import msgspec

from audit.consumer import Scope, replay
from audit.source import Broker, ConnectOptions
from audit.verify import ChainReport, verify_chain
from producer.chain.signing import Signer, generate_key_file
from producer.guest.simulator import run_guest
from producer.ops.config import CellSpec, Config
from producer.ops.daemon import Producer
from schemas.generate import HERE as SCHEMA_DIR

REPO = Path(__file__).resolve().parents[1]
VECTORS_DIR = REPO / "tests" / "vectors"
VECTORS_PATH = VECTORS_DIR / "guest-frames" / "vectors.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text())["vectors"]


def short_dir() -> str:
    """Unix socket paths must fit in 107 bytes; pytest's tmp_path can be longer."""
    return tempfile.mkdtemp(prefix="cp", dir="/tmp")


def cell_spec(base_dir: str, n: int = 1, **extra: Any) -> CellSpec:
    return CellSpec(
        cell_id=f"cell-{n}",
        run_id="run-1",
        spec_signature_hash="sha256:" + secrets.token_hex(32),
        vsock_uds_base=f"{base_dir}/c{n}",
        **extra,
    )


def make_config(
    url: str, key_file: str, cells: tuple[CellSpec, ...] = (), **sections: Any
) -> Config:
    raw: dict[str, Any] = {
        "host_id": "test-host",
        "data_dir": os.path.dirname(key_file),
        "nats": {"url": url, **sections.pop("nats", {})},
        "signing": {"key_file": key_file, **sections.pop("signing", {})},
        # Tests run side by side: never the fixed default port.
        "metrics": {"listen": "127.0.0.1:0", **sections.pop("metrics", {})},
        "cells": [msgspec.to_builtins(c) for c in cells],
        **sections,
    }
    return msgspec.convert(raw, Config)


def trust_of(signer: Signer) -> dict[str, bytes]:
    return {signer.kid: signer.public_raw}


@contextlib.asynccontextmanager
async def running_producer(
    url: str, *, cells: int = 1, **sections: Any
) -> AsyncIterator[tuple[Producer, Signer, str]]:
    """A started Producer with ``cells`` cells (ids cell-1..N); shut down on exit."""
    base = short_dir()
    signer = generate_key_file(f"{base}/signing.key")
    specs = tuple(cell_spec(base, i) for i in range(1, cells + 1))
    producer = Producer(make_config(url, f"{base}/signing.key", specs, **sections), signer=signer)
    try:
        await producer.startup()
        yield producer, signer, base
    finally:
        await producer.shutdown()
        shutil.rmtree(base, ignore_errors=True)


ENVELOPE_VALIDATOR = jsonschema.Draft202012Validator(
    json.loads((SCHEMA_DIR / "envelope.schema.json").read_text(encoding="utf-8"))
)


def assert_valid_event(payload: bytes) -> None:
    """Every event the suite reads back must satisfy the published envelope schema."""
    ENVELOPE_VALIDATOR.validate(json.loads(payload))


async def history(url: str, cell_id: str, *, stream: str = "CELLOS_TELEMETRY") -> list[bytes]:
    """A cell's events as published, each checked against the envelope schema."""
    async with await Broker.connect(ConnectOptions(url=url)) as broker:
        payloads = [m.raw async for m in replay(broker, Scope(stream=stream, cell=cell_id))]
    for payload in payloads:
        assert_valid_event(payload)
    return payloads


async def verified(
    url: str, cell_id: str, signer: Signer
) -> tuple[ChainReport, list[dict[str, Any]]]:
    payloads = await history(url, cell_id)
    report = verify_chain(payloads, trust_of(signer))
    events = sorted((msgspec.json.decode(p) for p in payloads), key=lambda e: e["sequence"])
    return report, events


def send_stream(path: str, data: bytes, *, half_close: bool, wait_close_s: float = 5.0) -> bool:
    """Write ``data`` to the cell socket like a guest; True if the producer closed on us
    within ``wait_close_s``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(path)
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        sock.settimeout(wait_close_s)
        try:
            return sock.recv(1) == b""
        except TimeoutError:
            return False


async def eventually(cond: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait until ``cond()`` (or the awaitable it returns) is truthy, polling; fail after
    ``timeout`` seconds, a bound for a broken build rather than a measurement."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        met = cond()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def seal_and_verify(
    producer: Producer, url: str, signer: Signer, cell_id: str = "cell-1"
) -> tuple[ChainReport, list[dict[str, Any]]]:
    """Deregister (seal) the cell, wait for every PubAck, read its chain back and verify."""
    assert producer.registry is not None and producer.publisher is not None
    await producer.registry.deregister(cell_id)
    assert await producer.drain(10)
    return await verified(url, cell_id, signer)


async def feed_seal_verify(
    producer: Producer, url: str, signer: Signer, *, count: int, seed: int, rate: float = 0
) -> tuple[ChainReport, list[dict[str, Any]]]:
    """Run a simulated guest on cell-1 for ``count`` frames, then :func:`seal_and_verify`."""
    assert producer.registry is not None
    cell = producer.registry.cells["cell-1"]
    await run_guest(cell.socket_path, rate=rate, count=count, seed=seed)
    await eventually(lambda: cell.counters.accepted == count)
    return await seal_and_verify(producer, url, signer)


class HeldPort:
    """A loopback TCP port this test owns from start to end, so no other process can take it.

    Bound but not listening, it refuses connections exactly as a port nobody serves does.
    :meth:`relay_to` then starts listening and relays every connection to a real server:
    a broker that comes up late at an address handed out in advance, with no moment in
    which the port is free (a probed "free port" can be taken by anyone before it is used).
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def relay_to(self, port: int) -> None:
        """From now on, connections are accepted and relayed to ``127.0.0.1:port``."""

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                writer.close()
                return
            self._writers |= {writer, up_writer}
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        self._server = await asyncio.start_server(relay, sock=self._sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()
        self._sock.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either side ends, then end the other."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()
