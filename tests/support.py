"""Helpers for tests that run the real pipeline against a real nats-server."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import inspect
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import termios
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import jsonschema
import msgspec
import nats
import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from audit.consumer import Scope, replay
from audit.message import structured_bytes
from audit.source import Broker, ConnectOptions
from audit.verify import ChainReport, verify_chain
from producer.aio import cancel_and_wait
from producer.chain.signing import Signer, generate_key_file
from producer.guest.simulator import run_guest
from producer.guest.wire import encode_frame
from producer.ops.config import CellSpec, Config
from producer.ops.daemon import Producer
from schemas.events import CHAIN_TYPE, GUEST_TYPE
from schemas.generate import HERE as SCHEMA_DIR
from schemas.heads import ChainHead
from schemas.wire import Declaration

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


def config_raw(
    url: str, key_file: str, cells: tuple[CellSpec, ...] = (), **sections: Any
) -> dict[str, Any]:
    """A config as the TOML file would hold it; ``data_dir`` defaults to the key's dir."""
    return {
        "host_id": "test-host",
        "data_dir": os.path.dirname(key_file),
        "nats": {"url": url, **sections.pop("nats", {})},
        "signing": {"key_file": key_file, **sections.pop("signing", {})},
        # Tests run side by side: never the fixed default port.
        "metrics": {"listen": "127.0.0.1:0", **sections.pop("metrics", {})},
        "cells": [msgspec.to_builtins(c) for c in cells],
        **sections,
    }


def make_config(
    url: str, key_file: str, cells: tuple[CellSpec, ...] = (), **sections: Any
) -> Config:
    return msgspec.convert(config_raw(url, key_file, cells, **sections), Config)


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


class LoopLag:
    """The event loop's worst lateness while it runs: how long past its time a timer fired.

    A bound the producer keeps with the loop's own timers (SPEC 5.1's ``max_unsigned_ms``)
    moves with it when a busy host starves the loop, so a test judging such a bound from
    timestamps allows this much on top (never a guess at how busy CI is)."""

    def __init__(self, period_s: float = 0.05) -> None:
        self.period_s = period_s
        self.worst_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.period_s
            await asyncio.sleep(self.period_s)
            self.worst_s = max(self.worst_s, loop.time() - due)

    @property
    def allowance(self) -> timedelta:
        """Lateness to allow a timer-kept bound: the worst seen plus one watch period."""
        return timedelta(seconds=self.worst_s + self.period_s)


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


SOAK: Final = (pytest.mark.soak, pytest.mark.timeout(1800))
"""Marks of a scenario's long variant: ``make soak`` runs it, ``make test`` does not."""


# -- numbered guests ---------------------------------------------------------------------------

GUEST_KINDS: Final = ("process.spawned", "process.exited", "net.connect_attempted")
GUEST_RETRY_S: Final = 0.02
GUEST_BATCH: Final = 256


@dataclass
class Connection:
    """One guest connection's frames: frame ``k`` ends at byte ``ends[k]`` of the stream."""

    number: int
    ends: list[int] = field(default_factory=list)
    accepted: int = 0
    """Bytes the kernel took from us (written into the socket)."""
    read_floor: int | None = None
    """Frames the producer had surely read when :meth:`NumberedGuest.mark_read` ran."""

    def frames_accepted(self) -> int:
        return bisect.bisect_right(self.ends, self.accepted)


class NumberedGuest:
    """A guest agent whose every frame says which it is: ``guest_pid`` is the connection
    number (from 1), ``guest_monotonic_ns`` the frame's index on that connection (from 0).

    So what a stream holds can be held against what was sent: per connection, the frames
    stored must be exactly the first ``n`` sent, in order, each once. It writes with plain
    non-blocking ``send`` calls and counts the bytes the kernel took, and
    :meth:`mark_read` subtracts what the kernel still holds unread (``SIOCOUTQ``, which
    counts whole socket buffers and so errs on the side of "unread"), which gives a lower
    bound of the frames the producer had read by then, without asking the producer.
    When the producer goes away it reconnects, as the real agent does.
    """

    def __init__(self, path: str, *, rate: float, comm: str = "numbered") -> None:
        self.path = path
        self.rate = rate
        self.comm = comm
        """``guest_comm`` of every frame; a long one makes frames (and reads) fewer per KiB."""
        self.connections: list[Connection] = []
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._quiet = False
        self._sending = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.path)

    async def stop(self) -> None:
        """Stop sending and close the connection (a frame cut short is not counted)."""
        await cancel_and_wait(self._task)

    async def read_out(self, timeout: float = 30.0) -> None:
        """Stop sending, keep the connection open, and wait until the producer has read
        every byte sent on it."""
        self._quiet = True
        await eventually(
            lambda: self._sock is not None and not self._sending and not self.unread_bytes(),
            timeout,
        )

    def sent(self) -> int:
        """Frames the kernel took, over every connection."""
        return sum(c.frames_accepted() for c in self.connections)

    def unread_bytes(self) -> int:
        """Bytes written into the open connection the producer has not read yet."""
        if self._sock is None:
            return 0
        out = fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return int.from_bytes(out, sys.byteorder)

    def mark_read(self) -> None:
        """Record, on the open connection, how many frames the producer has read by now."""
        if self._sock is None or not self.connections:
            return
        conn = self.connections[-1]
        conn.read_floor = bisect.bisect_right(conn.ends, conn.accepted - self.unread_bytes())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.path)
            except OSError:
                sock.close()
                await asyncio.sleep(GUEST_RETRY_S)  # a retry backoff, as the agent's
                continue
            conn = Connection(len(self.connections) + 1)
            self.connections.append(conn)
            self._sock = sock
            try:
                await self._pump(sock, conn)
            except OSError:
                pass  # the producer went away: connect again
            finally:
                self._sock = None
                sock.close()

    async def _pump(self, sock: socket.socket, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not self._quiet:
            due = int((loop.time() - start) * self.rate) + 1
            n = min(GUEST_BATCH, due - len(conn.ends))
            if n <= 0:
                await asyncio.sleep((len(conn.ends) + 1) / self.rate - (loop.time() - start))
                continue
            chunk = []
            end = conn.ends[-1] if conn.ends else 0
            for k in range(len(conn.ends), len(conn.ends) + n):
                frame = encode_frame(
                    Declaration(1, GUEST_KINDS[k % len(GUEST_KINDS)], conn.number, self.comm, k)
                )
                end += len(frame)
                conn.ends.append(end)
                chunk.append(frame)
            self._sending = True
            try:
                await self._send(sock, conn, b"".join(chunk))
            finally:
                self._sending = False
        await loop.create_future()  # quiet: hold the connection open until stopped

    async def _send(self, sock: socket.socket, conn: Connection, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = sock.send(view)
            except BlockingIOError:
                await _writable(sock)
                continue
            conn.accepted += n
            view = view[n:]


async def _writable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


def guest_frames(events: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Per connection of a :class:`NumberedGuest`, its frames' indexes in chain order."""
    out: dict[int, list[int]] = {}
    for e in events:
        if e["type"].startswith(GUEST_TYPE) and "guestPid" in e["data"]:
            out.setdefault(e["data"]["guestPid"], []).append(int(e["data"]["guestMonotonicNs"]))
    return out


def assert_all_sent_stored(guest: NumberedGuest, events: list[dict[str, Any]]) -> None:
    """Every frame the guest sent is in the chain once, in order (the producer read all)."""
    frames = guest_frames(events)
    assert sorted(frames) == [c.number for c in guest.connections if c.frames_accepted()]
    for conn in guest.connections:
        got = frames.get(conn.number, [])
        assert got == list(range(conn.frames_accepted())), _prefix_problem(conn, got)


def _prefix_problem(conn: Connection, got: list[int]) -> str:
    doubled = sorted(k for k, n in Counter(got).items() if n > 1)
    missing = sorted(set(range(len(got))) - set(got))
    return (
        f"connection {conn.number}: {len(got)} frames stored of {conn.frames_accepted()} sent; "
        f"doubled {doubled[:10]}, missing {missing[:10]}"
    )


# -- reading the stream back -------------------------------------------------------------------

STREAM: Final = "CELLOS_TELEMETRY"
PREFIX: Final = "cellos.telemetry"


@dataclass
class Stored:
    """Everything in the stream: how many messages carry each ``Nats-Msg-Id``, and each
    cell's events (structured payloads) in stream order."""

    ids: Counter[str]
    by_cell: dict[str, list[bytes]]


async def stored(url: str) -> Stored:
    """Read the whole stream with a throwaway consumer, straight from the server (``url``
    may list several, comma-separated)."""
    nc = await nats.connect(url.split(","), connect_timeout=2, allow_reconnect=False)
    ids: Counter[str] = Counter()
    by_cell: dict[str, list[bytes]] = {}
    try:
        js = nc.jetstream(timeout=10)
        # A cluster that just lost a node may take longer than one request's timeout to
        # place a consumer; the stream is complete, so ask again until it answers.
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            try:
                sub = await js.pull_subscribe(
                    f"{PREFIX}.>",
                    stream=STREAM,
                    config=ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=30.0),
                )
                break
            except nats.errors.TimeoutError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
        try:
            while True:
                try:
                    msgs = await sub.fetch(1000, timeout=2)
                except nats.errors.TimeoutError:
                    break
                for msg in msgs:
                    ids[(msg.headers or {})["Nats-Msg-Id"]] += 1
                    cell = msg.subject[len(PREFIX) + 1 :].split(".", 1)[0]
                    payload = structured_bytes(msg.data, msg.headers)
                    by_cell.setdefault(cell, []).append(payload)
                if msgs[-1].metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()
    return Stored(ids, by_cell)


async def guest_counts(url: str) -> dict[str, int]:
    """Guest events per cell in the stream, from the stream's subject counts (cheap)."""
    nc = await nats.connect(url.split(","), connect_timeout=2, allow_reconnect=False)
    try:
        info = await nc.jetstream(timeout=5).stream_info(STREAM, f"{PREFIX}.*.guest.>")
    finally:
        await nc.close()
    out: dict[str, int] = {}
    for subject, n in (info.state.subjects or {}).items():
        cell = subject[len(PREFIX) + 1 :].split(".", 1)[0]
        out[cell] = out.get(cell, 0) + n
    return out


async def wait_for_guest_events(url: str, minimum: Mapping[str, int], timeout: float) -> None:
    """Until every listed cell has at least that many guest events in the stream."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            counts = await guest_counts(url)
            if all(counts.get(c, 0) >= n for c, n in minimum.items()):
                return
        if loop.time() > deadline:
            raise AssertionError(f"the stream did not reach {dict(minimum)} guest events")
        await asyncio.sleep(0.1)


def delivered_chains(
    found: Stored, trust: Mapping[str, bytes], *, heads: Mapping[str, Any] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The delivery promise, checked on what the stream holds: no ``Nats-Msg-Id`` stored
    twice, one chain per cell, contiguous from ``opened`` and verified (against the
    recorded heads when given). Returns each cell's events in sequence order."""
    doubled = {i: n for i, n in found.ids.items() if n > 1}
    assert not doubled, f"{len(doubled)} events stored more than once, e.g. {list(doubled)[:5]}"
    out: dict[str, list[dict[str, Any]]] = {}
    for cell, payloads in sorted(found.by_cell.items()):
        events = sorted((msgspec.json.decode(p) for p in payloads), key=lambda e: e["sequence"])
        chains = {e["id"].rpartition("-")[0] for e in events}
        assert len(chains) == 1, f"{cell}: {len(chains)} chains"
        (chain_id,) = chains
        head = None
        if heads is not None:
            recorded = heads[f"{cell}.{events[0]['data']['runId']}.{chain_id}"]
            head = (recorded.sequence, recorded.digest)
        report = verify_chain(payloads, trust, head=head)
        assert report.ok, f"{cell}: {report.problems[:5]}"
        assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
        out[cell] = events
    return out


async def recorded_heads(url: str) -> dict[str, ChainHead]:
    """The chain heads the producer recorded in the key-value bucket, by bucket key
    (``<cellId>.<runId>.<chainId>``); ``url`` may list several servers, comma-separated."""
    async with await Broker.connect(ConnectOptions(url=url)) as broker:
        heads = await broker.heads("CELLOS_CHAIN_HEADS")
    return {h.key: h for h in heads.values()}


def damage_event(spool_dir: Path, sequence: int) -> Path:
    """Flip one bit inside the spooled event of ``sequence`` (in the first segment, which
    must hold it); returns the segment."""
    segment = sorted(spool_dir.glob("seg-*.log"))[0]
    data = bytearray(segment.read_bytes())
    at = data.find(b'"sequence":"%020d"' % sequence)
    assert at > 0, f"event {sequence} is not in {segment}"
    data[at + 5] ^= 0x20
    segment.write_bytes(bytes(data))
    return segment


def chain_kinds(events: list[dict[str, Any]]) -> list[str]:
    """The chain events' kinds (``opened``, ``resumed``, ...), in chain order."""
    return [e["type"].rsplit(".", 1)[1] for e in events if e["type"].startswith(CHAIN_TYPE)]


# -- a producer under steady load ------------------------------------------------------------

GUEST_RATE: Final = 200.0
"""Frames per second a numbered guest sends by default: steady load, not a flood."""


@dataclass
class Load:
    """A running producer and the guests sending to its cells, by cell id."""

    producer: Producer
    signer: Signer
    guests: dict[str, NumberedGuest]


@contextlib.asynccontextmanager
async def loaded(
    url: str, *, cells: int, rate: float = GUEST_RATE, **sections: Any
) -> AsyncIterator[Load]:
    """A producer with ``cells`` cells (:func:`running_producer`), a numbered guest sending
    ``rate`` frames a second on each."""
    async with running_producer(url, cells=cells, **sections) as (producer, signer, _):
        assert producer.registry is not None
        guests = {
            cell_id: NumberedGuest(cell.socket_path, rate=rate)
            for cell_id, cell in producer.registry.cells.items()
        }
        for guest in guests.values():
            guest.start()
        try:
            yield Load(producer, signer, guests)
        finally:
            for guest in guests.values():
                await guest.stop()


async def settle(load: Load) -> None:
    """Stop the guests, let the producer read what they sent, seal every chain, and wait
    until every event is acknowledged and every head recorded."""
    producer, registry = load.producer, load.producer.registry
    assert registry is not None and producer.heads is not None
    for guest in load.guests.values():
        await guest.stop()
    cells = registry.cells
    await eventually(
        lambda: all(cells[c].counters.accepted == g.sent() for c, g in load.guests.items()),
        timeout=30,
    )
    for cell_id in list(cells):
        await registry.deregister(cell_id)
    assert await producer.drain(60), f"spool depth {producer.spool and producer.spool.depth()}"
    assert await producer.heads.flush(30)


async def all_delivered(load: Load, url: str) -> dict[str, list[dict[str, Any]]]:
    """:func:`settle`, then the whole promise checked on the stream: every frame sent is
    stored once, in one sealed chain per cell that verifies against its recorded head,
    and no loss was declared."""
    await settle(load)
    chains = delivered_chains(
        await stored(url), trust_of(load.signer), heads=await recorded_heads(url)
    )
    assert sorted(chains) == sorted(load.guests)
    for cell_id, events in chains.items():
        assert_all_sent_stored(load.guests[cell_id], events)
        kinds = chain_kinds(events)
        assert kinds[0] == "opened" and kinds[-1] == "sealed", kinds
        assert "gap" not in kinds, kinds
    return chains


def at_least(counts: Mapping[str, int], more: int) -> dict[str, int]:
    """``counts`` raised by ``more`` each: a progress target for :func:`wait_for_guest_events`."""
    return {cell: n + more for cell, n in counts.items()}


# -- the console script as a child process ---------------------------------------------------

CLI: Final = Path(sys.executable).parent / "cellos-producer"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment minus any CELLOS_PRODUCER_* setting that would leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLOS_PRODUCER_")}
    env.update(extra)
    return env


def cli(*args: str, timeout: float = 20.0, env: dict[str, str] | None = None) -> Result:
    """Run the console script to completion (killed after ``timeout``)."""
    done = subprocess.run(
        [str(CLI), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else clean_env(),
        check=False,
    )
    return Result(args, done.returncode, done.stdout, done.stderr)


async def acli(*args: str, limit_s: float = 30.0, env: dict[str, str] | None = None) -> Result:
    """:func:`cli` for async tests, so the event loop (and the fixtures on it) keep running."""
    proc = await asyncio.create_subprocess_exec(
        str(CLI),
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env if env is not None else clean_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"cellos-producer {' '.join(args)} still running after {limit_s}s")
    assert proc.returncode is not None
    return Result(args, proc.returncode, out.decode(), err.decode())


@dataclass
class Result:
    args: tuple[str, ...]
    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return (
            f"cellos-producer {' '.join(self.args)} -> exit {self.rc}\n"
            f"--- stdout\n{self.out}--- stderr\n{self.err}"
        )


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                lines.append(obj)
    return lines


class Daemon:
    """``cellos-producer run`` as a child process, its output going to files we can poll."""

    def __init__(self, proc: asyncio.subprocess.Process, out: Path, err: Path) -> None:
        self.proc = proc
        self.out_path = out
        self.err_path = err

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        return json_lines(self.stderr)

    def describe(self) -> str:
        return (
            f"daemon pid {self.proc.pid} returncode {self.proc.returncode}\n"
            f"--- stdout\n{self.out_path.read_text(errors='replace')}--- stderr\n{self.stderr}"
        )

    async def wait_until(self, what: str, check: Callable[[], bool], limit_s: float) -> None:
        """Poll ``check`` while the daemon lives; ``limit_s`` only bounds a broken build."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while not check():
            if self.proc.returncode is not None:
                pytest.fail(f"daemon exited before {what}\n{self.describe()}")
            if loop.time() > deadline:
                pytest.fail(f"no {what} within {limit_s}s\n{self.describe()}")
            await asyncio.sleep(0.05)

    def retries_logged(self) -> int:
        return sum(e.get("event") == "nats_connect_retry" for e in self.log_events())

    async def stop(self, sig: int, limit_s: float = 10.0) -> int:
        """Send ``sig`` and return the exit code (failing if there is none in ``limit_s``)."""
        self.proc.send_signal(sig)
        try:
            rc = await asyncio.wait_for(self.proc.wait(), limit_s)
        except TimeoutError:
            pytest.fail(f"daemon still running {limit_s}s after signal {sig}\n{self.describe()}")
        return rc

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
