"""A stand-in for the in-guest cellos-telemetry agent, for tests, demos and benchmarks.

Firecracker turns the guest's vsock connection to port 9001 into a plain connection to the
Unix socket ``<vsock_uds_base>_9001``, so a process that connects there and writes frames is,
to the producer, indistinguishable from a booted cell. Like the real agent it tolerates a
socket that is not there yet and a host that drops it, reconnecting with a short backoff;
frames written into a connection that then fails are lost, as they would be from the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

from producer.guest.wire import encode_frame
from schemas.wire import CONTENT_VERSION, Declaration

# Comms as the kernel reports them (TASK_COMM_LEN: at most 15 characters).
_DAEMONS: Final = ("nginx", "sshd", "cron", "systemd-journal", "postgres")
_COMMANDS: Final = (
    "sh",
    "bash",
    "python3",
    "curl",
    "wget",
    "node",
    "git",
    "apt-get",
    "cat",
    "grep",
    "tar",
    "ssh",
    "nginx",
    "gunicorn",
)
# Roughly a busy workload: exec/exit pairs dominate, denials are rare but present.
_KINDS: Final = (
    "process.spawned",
    "process.exited",
    "capability.denied",
    "net.connect_attempted",
    "fs.inotify_fired",
)
_WEIGHTS: Final = (30, 27, 5, 18, 20)
_PID_MAX: Final = 4_194_304  # Linux default on 64-bit
_PID_FLOOR: Final = 300  # where the kernel restarts allocation after wrapping
_MAX_LIVE: Final = 64
_BATCH: Final = 256  # frames per write: large enough for throughput, small enough to pace


def frames(seed: int | None = None, *, interval_ns: int = 10_000_000) -> Iterator[Declaration]:
    """Endless, plausible declarations from one simulated guest.

    Keeps a small process table so exits and per-process events name pids that were
    spawned, and a boot clock that starts seconds after boot and advances by exponentially
    distributed gaps averaging ``interval_ns`` (always at least 1 ns, so it strictly grows).
    The same seed always yields the same sequence.
    """
    rng = random.Random(seed)
    now_ns = rng.randrange(2_000_000_000, 30_000_000_000)
    next_pid = rng.randrange(_PID_FLOOR, 2_000)
    live: list[tuple[int, str]] = []
    for comm in _DAEMONS:
        live.append((next_pid, comm))
        next_pid += rng.randint(1, 40)
    while True:
        now_ns += max(1, round(rng.expovariate(1.0 / interval_ns)))
        kind = rng.choices(_KINDS, _WEIGHTS)[0]
        if kind == "process.spawned" and len(live) >= _MAX_LIVE:
            kind = "process.exited"
        elif kind != "process.spawned" and not live:
            kind = "process.spawned"
        if kind == "process.spawned":
            pid, comm = next_pid, rng.choice(_COMMANDS)
            live.append((pid, comm))
            next_pid += rng.randint(1, 3)
            if next_pid >= _PID_MAX:
                next_pid = _PID_FLOOR
        elif kind == "process.exited":
            pid, comm = live.pop(rng.randrange(len(live)))
        else:
            pid, comm = rng.choice(live)
        yield Declaration(CONTENT_VERSION, kind, pid, comm, now_ns)


class _Guest:
    """One guest's sending state, which survives the connections it is sent over."""

    def __init__(
        self,
        *,
        rate: float,
        count: int | None,
        seed: int | None,
        on_sent: Callable[[int], None] | None,
        sleep: Callable[[float], Awaitable[None]],
        clock: Callable[[], float],
    ) -> None:
        self.rate = rate
        self.count = count
        self.on_sent = on_sent
        self.sleep = sleep
        self.clock = clock
        # The guest clock advances as fast as frames are paced; unpaced, like a busy guest.
        self.source = frames(seed, interval_ns=round(1e9 / rate) if rate else 10_000)
        self.sent = 0

    def done(self) -> bool:
        return self.count is not None and self.sent >= self.count

    async def pump(self, writer: asyncio.StreamWriter) -> None:
        """Write over one connection until done; an OSError means the host dropped it."""
        rate = self.rate
        # Pace from now on: frames the guest could not send while disconnected are gone.
        start = self.clock() - self.sent / rate if rate else 0.0
        while not self.done():
            if rate:
                wait = start + self.sent / rate - self.clock()
                if wait > 0:
                    await self.sleep(wait)
                # Every frame due by now goes out in one write, so a coarse sleep
                # granularity does not cap the rate.
                n = min(_BATCH, max(1, int((self.clock() - start) * rate) + 1 - self.sent))
            else:
                n = _BATCH
            if self.count is not None:
                n = min(n, self.count - self.sent)
            writer.write(b"".join([encode_frame(next(self.source)) for _ in range(n)]))
            await writer.drain()
            self.sent += n
            if self.on_sent is not None:
                self.on_sent(n)
            if not rate:
                await self.sleep(0)  # drain() need not yield; let the loop breathe


async def run_guest(
    socket_path: str,
    *,
    rate: float,
    count: int | None,
    seed: int | None = None,
    on_sent: Callable[[int], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    retry_initial: float = 0.05,
    retry_max: float = 1.0,
    on_connect_error: Callable[[OSError], None] | None = None,
) -> int:
    """Connect to ``socket_path`` and write frames until ``count`` are sent; return it.

    ``rate`` is frames per second (0: as fast as the socket takes them, in batches);
    ``count`` None runs until cancelled. A frame counts as sent once the kernel has taken
    it (the write drained); ``on_sent`` is told how many each time a batch is. ``sleep``
    and ``clock`` drive all pacing and retry waits, so tests can run it in simulated time.
    Connecting is retried with a backoff doubling from ``retry_initial`` to ``retry_max``;
    ``on_connect_error`` hears of every failed attempt.
    """
    if rate < 0:
        raise ValueError(f"rate must be >= 0, got {rate}")
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    guest = _Guest(rate=rate, count=count, seed=seed, on_sent=on_sent, sleep=sleep, clock=clock)
    backoff = retry_initial
    while not guest.done():
        try:
            _, writer = await asyncio.open_unix_connection(socket_path)
        except OSError as exc:
            if on_connect_error is not None:
                on_connect_error(exc)
            await sleep(backoff)
            backoff = min(2 * backoff, retry_max)
            continue
        backoff = retry_initial
        with contextlib.suppress(OSError):  # the host dropped us: reconnect below
            try:
                await guest.pump(writer)
            finally:
                writer.close()
                await writer.wait_closed()
        if not guest.done():
            await sleep(backoff)
    return guest.sent
