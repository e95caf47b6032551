"""Guest simulator: plausible frames, pacing, and the agent's reconnect behaviour, checked
against a real Unix socket listener that decodes with FrameReader."""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.guest.simulator import frames, run_guest
from producer.guest.wire import BodyError, FrameReader, FramingError, decode_body, encode_frame
from schemas.wire import MAX_BODY, PROBE_SOURCES, Declaration


class Host:
    """A bare listener: one FrameReader per connection, optionally hanging up early."""

    def __init__(self, close_first_after: int | None = None) -> None:
        self.close_first_after = close_first_after
        self.connections: list[list[Declaration | BodyError]] = []
        self.framing_errors: list[str] = []
        self.ended: asyncio.Queue[int] = asyncio.Queue()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got: list[Declaration | BodyError] = []
        self.connections.append(got)
        hang_up = self.close_first_after if len(self.connections) == 1 else None
        frame_reader = FrameReader()
        try:
            while data := await reader.read(65536):
                got += frame_reader.feed(data)
                if hang_up is not None and len(got) >= hang_up:
                    break
            else:
                frame_reader.eof()
        except FramingError as err:
            self.framing_errors.append(err.reason)
        finally:
            writer.close()
            self.ended.put_nowait(len(got))

    @property
    def received(self) -> list[Declaration]:
        return [d for conn in self.connections for d in conn if isinstance(d, Declaration)]

    async def wait_ended(self, connections: int) -> None:
        for _ in range(connections):
            await asyncio.wait_for(self.ended.get(), 10)


class FakeTime:
    """Simulated clock; sleeping advances it, never by less than ``granularity``."""

    def __init__(self, granularity: float = 0.0) -> None:
        self.now = 1000.0
        self.granularity = granularity
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        if delay > 0:
            self.now += max(delay, self.granularity)
        await asyncio.sleep(0)


@pytest.fixture
def sock_path() -> Iterator[str]:
    # pytest's tmp_path can exceed the 108-byte AF_UNIX limit; /tmp/<short> cannot.
    with tempfile.TemporaryDirectory(prefix="sim") as tmp:
        yield str(Path(tmp) / "cell_9001")


async def _serve(host: Host, path: str) -> asyncio.Server:
    return await asyncio.start_unix_server(host.handle, path)


def _assert_clean_stream(decls: list[Declaration]) -> None:
    ns = [d.guest_monotonic_ns for d in decls]
    assert all(a < b for a, b in itertools.pairwise(ns)), "guest clock must strictly grow"


# frames() ---------------------------------------------------------------------------------


def test_frames_are_deterministic_per_seed() -> None:
    first = list(itertools.islice(frames(7), 300))
    assert first == list(itertools.islice(frames(7), 300))
    assert first != list(itertools.islice(frames(8), 300))


def test_frames_are_plausible_and_cover_every_kind() -> None:
    decls = list(itertools.islice(frames(3), 2000))
    assert {d.probe_source for d in decls} == PROBE_SOURCES
    _assert_clean_stream(decls)
    exited: set[int] = set()
    for d in decls:
        assert 0 < d.guest_pid < 2**22
        assert 0 < len(d.guest_comm) <= 15
        assert d.guest_comm.isprintable()
        if d.probe_source == "process.spawned":
            exited.discard(d.guest_pid)
        else:
            assert d.guest_pid not in exited, "a process acts after it exited"
        if d.probe_source == "process.exited":
            exited.add(d.guest_pid)
        frame = encode_frame(d)
        assert len(frame) <= 4 + MAX_BODY
        assert decode_body(frame[4:]) == d
    assert len({d.guest_comm for d in decls}) >= 8


def test_guest_clock_strictly_grows_even_at_nanosecond_spacing() -> None:
    _assert_clean_stream(list(itertools.islice(frames(6, interval_ns=1), 3000)))


def test_frame_spacing_follows_the_interval() -> None:
    decls = list(itertools.islice(frames(5, interval_ns=20_000_000), 4000))
    span = decls[-1].guest_monotonic_ns - decls[0].guest_monotonic_ns
    assert span / (len(decls) - 1) == pytest.approx(20_000_000, rel=0.1)


# run_guest() against a real listener ------------------------------------------------------


async def test_sends_count_frames_as_fast_as_possible(sock_path: str) -> None:
    host = Host()
    server = await _serve(host, sock_path)
    batches: list[int] = []
    async with server:
        sent = await asyncio.wait_for(
            run_guest(sock_path, rate=0, count=1000, seed=1, on_sent=batches.append), 30
        )
        await host.wait_ended(1)
    assert sent == 1000
    assert sum(batches) == 1000
    assert len(batches) > 1
    assert len(host.connections) == 1
    assert host.framing_errors == []
    assert all(isinstance(o, Declaration) for o in host.connections[0])
    assert len(host.received) == 1000
    assert {d.probe_source for d in host.received} == PROBE_SOURCES
    _assert_clean_stream(host.received)


async def test_waits_for_the_socket_and_reconnects_when_dropped(sock_path: str) -> None:
    host = Host(close_first_after=100)
    waits: list[float] = []
    retried = asyncio.Event()

    async def sleep(delay: float) -> None:
        waits.append(delay)
        if len(waits) >= 2:
            retried.set()
        await asyncio.sleep(delay)

    guest = asyncio.create_task(
        run_guest(
            sock_path, rate=0, count=3000, seed=2, sleep=sleep, retry_initial=0.01, retry_max=0.02
        )
    )
    await asyncio.wait_for(retried.wait(), 10)  # it tried, waited and tried again
    assert not guest.done()
    server = await _serve(host, sock_path)
    async with server:
        sent = await asyncio.wait_for(guest, 30)
        await host.wait_ended(len(host.connections))
    assert sent == 3000
    assert len(host.connections) >= 2
    assert len(host.connections[0]) >= 100
    assert host.framing_errors == []  # only the first connection was cut, by the host
    assert len(host.connections[-1]) > 0
    _assert_clean_stream(host.received)  # nothing is ever sent twice


async def test_stops_cleanly_when_cancelled(sock_path: str) -> None:
    host = Host()
    seen: list[int] = []
    busy = asyncio.Event()

    def on_sent(n: int) -> None:
        seen.append(n)
        if sum(seen) >= 2000:
            busy.set()

    server = await _serve(host, sock_path)
    async with server:
        guest = asyncio.create_task(run_guest(sock_path, rate=0, count=None, on_sent=on_sent))
        await asyncio.wait_for(busy.wait(), 10)
        guest.cancel()
        with pytest.raises(asyncio.CancelledError):
            await guest
        await host.wait_ended(1)
    assert host.framing_errors == []  # the connection ends on a frame boundary
    assert len(host.received) >= 2000


async def test_paces_to_the_rate(sock_path: str) -> None:
    host = Host()
    fake = FakeTime()
    batches: list[int] = []
    server = await _serve(host, sock_path)
    async with server:
        sent = await run_guest(
            sock_path,
            rate=50,
            count=100,
            seed=4,
            on_sent=batches.append,
            sleep=fake.sleep,
            clock=fake.clock,
        )
        await host.wait_ended(1)
    assert sent == 100
    assert batches == [1] * 100
    assert fake.now - 1000.0 == pytest.approx(99 / 50)
    decls = host.received
    assert len(decls) == 100
    span = decls[-1].guest_monotonic_ns - decls[0].guest_monotonic_ns
    assert span / 99 == pytest.approx(1e9 / 50, rel=0.35)


async def test_pacing_resumes_at_once_after_a_reconnect(sock_path: str) -> None:
    host = Host(close_first_after=20)
    fake = FakeTime()
    server = await _serve(host, sock_path)
    async with server:
        sent = await asyncio.wait_for(
            run_guest(
                sock_path,
                rate=100,
                count=60,
                sleep=fake.sleep,
                clock=fake.clock,
                retry_initial=0.05,
            ),
            30,
        )
        await host.wait_ended(len(host.connections))
    assert sent == 60
    assert len(host.connections) >= 2
    assert len(host.connections[0]) >= 20
    # 0.59 s of pacing plus one short reconnect pause, not a wait to catch up.
    assert fake.now - 1000.0 < 0.59 + 0.05 + 0.05


async def test_a_coarse_sleep_does_not_cap_the_rate(sock_path: str) -> None:
    host = Host()
    fake = FakeTime(granularity=0.05)
    batches: list[int] = []
    server = await _serve(host, sock_path)
    async with server:
        await run_guest(
            sock_path,
            rate=1000,
            count=500,
            on_sent=batches.append,
            sleep=fake.sleep,
            clock=fake.clock,
        )
        await host.wait_ended(1)
    assert sum(batches) == 500
    assert fake.now - 1000.0 == pytest.approx(0.5, abs=0.06)
    assert len(batches) <= 12
    assert len(host.received) == 500


async def test_connect_retries_back_off_exponentially(sock_path: str) -> None:
    host = Host()
    fake = FakeTime()
    servers: list[asyncio.Server] = []

    async def sleep(delay: float) -> None:
        await fake.sleep(delay)
        if len(fake.sleeps) == 8:
            servers.append(await _serve(host, sock_path))

    sent = await run_guest(
        sock_path, rate=0, count=10, sleep=sleep, clock=fake.clock, retry_initial=0.05
    )
    await host.wait_ended(1)
    servers[0].close()
    assert sent == 10
    assert fake.sleeps[:8] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert len(host.received) == 10


async def test_arguments_are_checked(sock_path: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        await run_guest(sock_path, rate=-1, count=1)
    with pytest.raises(ValueError, match="count"):
        await run_guest(sock_path, rate=0, count=-1)
    assert await run_guest(sock_path, rate=0, count=0) == 0
