"""End-to-end throughput of the producer pipeline, against raw nats-py publish_async.

What is timed, per signing mode (each on a fresh nats-server with an empty file store):

    guest processes write pre-encoded frames to every cell's Unix socket
    -> decode -> stamp -> seal (hash chain, Ed25519) -> pipelined publish -> PubAck

from the first frame written until every guest event is acknowledged by JetStream. The
producer (``producer.daemon.Producer``, configured in code) runs in this process; the
simulated guests run in separate processes and only ``sendall`` buffers they encoded before
the clock started, so they cost the producer's cores little. The baseline publishes
pre-encoded payloads of a real sealed event's size, with the same headers, into the same
kind of stream with ``js.publish_async``, and waits for ``publish_async_completed()``.

This is a benchmark, not a test: it prints figures and never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import faulthandler
import io
import multiprocessing as mp
import os
import pstats
import random
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

import nats

from probes.scheduler import ProbeScheduler
from producer.chain.events import STRUCTURED_CONTENT_TYPE, ChainContext, Rfc3339Clock, guest_event
from producer.chain.sealer import ChainSealer
from producer.chain.signing import Signer, generate_key_file
from producer.delivery.stream import ensure_stream
from producer.guest.simulator import frames
from producer.guest.wire import encode_frame
from producer.ops.config import (
    CellSpec,
    Config,
    LogConfig,
    MetricsConfig,
    NatsConfig,
    ProbesConfig,
    QueueConfig,
    SigningConfig,
)
from producer.ops.daemon import Producer
from producer.ops.demo_host import DemoHost
from producer.ops.embedded import EmbeddedNats
from producer.ops.logs import setup_logging

MODES = ("adaptive", "strict")
HOST_ID = "bench-host"
SUBJECT_PREFIX = "cellos.telemetry"
STREAM = "CELLOS_TELEMETRY"
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL_S = 0.01  # how often the timed run checks whether every frame was read
HEARTBEAT_S = 0.05


# --------------------------------------------------------------------------- guests


def _guest_worker(
    jobs: list[tuple[str, int, int]],
    ready: Any,
    go: MpEvent,
    results: Any,
) -> None:
    """One guest process serving several cells: encode everything, connect, wait, blast.

    ``jobs`` holds ``(socket path, frame count, seed)``. Each cell's frames are written
    by its own thread with a single ``sendall`` of the whole buffer (the kernel splits it
    into socket-buffer-sized writes with the GIL released), so cells send concurrently and
    the guest side spends almost no CPU once the clock runs.
    """
    try:
        buffers = [
            b"".join(encode_frame(d) for d in islice(frames(seed, interval_ns=10_000), count))
            for _, count, seed in jobs
        ]
        socks = []
        for path, _, _ in jobs:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            socks.append(s)
    except BaseException as exc:
        ready.put(("error", os.getpid(), repr(exc)))
        raise
    ready.put(("ready", os.getpid(), sum(len(b) for b in buffers)))
    go.wait()
    cpu0 = time.process_time()
    start = time.monotonic()
    dones: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def send(sock: socket.socket, buf: bytes) -> None:
        try:
            sock.sendall(buf)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            with lock:
                errors.append(repr(exc))
        with lock:
            dones.append(time.monotonic())

    threads = [
        threading.Thread(target=send, args=(s, b), daemon=True)
        for s, b in zip(socks, buffers, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = time.process_time() - cpu0
    for s in socks:
        s.close()
    results.put((os.getpid(), start, max(dones), cpu, errors))


@dataclass
class Guests:
    """The guest processes of one run and the queues that report back from them."""

    procs: Sequence[mp.process.BaseProcess]
    ready: Any
    go: MpEvent
    results: Any


def start_guests(
    ctx: mp.context.SpawnContext, paths: list[str], per_cell: list[int], n_procs: int
) -> Guests:
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    jobs: list[list[tuple[str, int, int]]] = [[] for _ in range(n_procs)]
    for i, (path, count) in enumerate(zip(paths, per_cell, strict=True)):
        jobs[i % n_procs].append((path, count, 1000 + i))
    procs = [
        ctx.Process(target=_guest_worker, args=(j, ready, go, results), daemon=True)
        for j in jobs
        if j
    ]
    for p in procs:
        p.start()
    return Guests(procs, ready, go, results)


def stop_guests(guests: Guests) -> None:
    for p in guests.procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
    for q in (guests.ready, guests.results):
        q.close()
        q.join_thread()


async def queue_get(q: Any, wait_s: float) -> Any:
    """A multiprocessing queue read that does not block the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, q.get, True, wait_s)


class Watchdog:
    """Ends the benchmark if the event loop stops turning or a run overstays its timeout.

    A starved loop cannot run its own timeouts, so this is a thread: it dumps every
    thread's stack (the answer to "where is it stuck"), kills the children this process
    started (nats-server, guests) and exits.
    """

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.beat = time.monotonic()
        self.max_lag = 0.0
        self.deadline = float("inf")
        self.servers: list[EmbeddedNats] = []
        self.procs: Sequence[mp.process.BaseProcess] = []
        self.cleanup_dir: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    async def heartbeat(self) -> None:
        """Also measures the worst event-loop stall: how late a short sleep wakes up."""
        while True:
            before = time.monotonic()
            self.beat = before
            await asyncio.sleep(HEARTBEAT_S)
            self.max_lag = max(self.max_lag, time.monotonic() - before - HEARTBEAT_S)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            if now - self.beat > self.stall_s:
                self._abort(f"event loop made no progress for {now - self.beat:.0f}s")
            if now > self.deadline:
                self._abort("run exceeded --timeout by 30s")

    def _abort(self, why: str) -> None:
        print(f"\nWATCHDOG: {why}; stacks follow, then exit", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.kill()
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.kill()
        if self.cleanup_dir is not None:
            shutil.rmtree(self.cleanup_dir, ignore_errors=True)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(3)


WATCHDOG = Watchdog(stall_s=30.0)


# --------------------------------------------------------------------------- measurements


def proc_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of another process, from /proc (0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the comm field: state is fields[0], utime and stime are stat fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


@dataclass
class Result:
    mode: str
    events: int
    seconds: float
    acked: int = 0
    signed: int = 0
    sealed_events: int = 0
    rejected: int = 0
    cpu_user: float = 0.0
    cpu_sys: float = 0.0
    server_cpu: float = 0.0
    guest_cpu: float = 0.0
    complete: bool = True
    max_lag: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def sample_payloads(signer: Signer, n: int = 256) -> tuple[bytes, float, float]:
    """Real sealed guest events built the way a cell builds them: one signed payload to
    publish in the baseline, and the mean signed / unsigned payload sizes."""
    ctx = ChainContext(
        host_id=HOST_ID,
        cell_id="bench-00",
        run_id="run-bench",
        spec_signature_hash="sha256:" + secrets.token_hex(32),
        chain_id=secrets.token_hex(8),
        subject_prefix=SUBJECT_PREFIX,
    )
    clock = Rfc3339Clock()
    sizes: dict[bool, list[int]] = {True: [], False: []}
    payload = b""
    for sign in (True, False):
        sealer = ChainSealer(signer)
        for decl in islice(frames(7, interval_ns=10_000), n):
            event = guest_event(ctx, decl, clock.now()).event
            event["id"] = f"{ctx.chain_id}-{sealer.sequence + 1}"
            sealed = sealer.seal(event, sign=sign)
            sizes[sign].append(len(sealed.payload))
            if sign:
                payload = sealed.payload
    return payload, sum(sizes[True]) / n, sum(sizes[False]) / n


# --------------------------------------------------------------------------- producer run


def cell_ids(cells: int) -> list[str]:
    return [f"bench-{i:02d}" for i in range(cells)]


def bench_config(
    *,
    mode: str,
    data_dir: str,
    url: str,
    key_file: str,
    cells: int,
    inflight: int,
    queue: int,
    targets: dict[str, dict[str, Any]] | None = None,
    probe_interval: float = ProbesConfig().interval_s,
) -> Config:
    specs = []
    for i, cell_id in enumerate(cell_ids(cells)):
        cell_dir = os.path.join(data_dir, f"c{i:02d}")
        os.makedirs(cell_dir, exist_ok=True)
        specs.append(
            CellSpec(
                cell_id=cell_id,
                run_id=f"run-{mode}",
                spec_signature_hash="sha256:" + secrets.token_hex(32),
                vsock_uds_base=os.path.join(cell_dir, "vsock"),
                **(targets or {}).get(cell_id, {}),
            )
        )
    return Config(
        host_id=HOST_ID,
        data_dir=data_dir,
        nats=NatsConfig(
            url=url, stream=STREAM, subject_prefix=SUBJECT_PREFIX, max_inflight=inflight
        ),
        signing=SigningConfig(key_file=key_file, mode=mode),  # type: ignore[arg-type]
        queue=QueueConfig(max_events=queue),
        probes=ProbesConfig(interval_s=probe_interval, timeout_s=min(0.5, probe_interval / 2)),
        metrics=MetricsConfig(listen=""),
        log=LogConfig(level="warning"),
        cells=tuple(specs),
    )


AB_PATTERN = (False, True, True, False)
"""Probes off, on, on, off: a block whose ratio a steady drift of the rate cancels out of."""


async def alternate_probes(
    scheduler: ProbeScheduler,
    guest_acked: Callable[[], int],
    window_s: float,
    busy: Callable[[], bool],
) -> list[float]:
    """Toggle probing every ``window_s`` while ``busy()`` (the guests still sending), and
    return each whole block's ratio of the guest-event ack rate with probes on to the rate
    with them off. The first window (probes off) warms up and is not counted."""
    ratios: list[float] = []
    scheduler.pause()
    await asyncio.sleep(window_s)
    while True:
        rates = {False: 0.0, True: 0.0}
        for on in AB_PATTERN:
            (scheduler.resume if on else scheduler.pause)()
            t0, n0 = time.monotonic(), guest_acked()
            await asyncio.sleep(window_s)
            if not busy():
                scheduler.resume()
                return ratios  # a block cut short by the end of the load is not counted
            rates[on] += (guest_acked() - n0) / (time.monotonic() - t0)
        ratios.append(rates[True] / rates[False])


def probe_readings(scheduler: ProbeScheduler | None) -> int:
    """Probe readings dispatched so far, over every cell and probe (0 without probes)."""
    return sum(st.readings for st in scheduler.stats().values()) if scheduler else 0


SERIES_S = 0.25


async def record_series(
    rows: list[tuple[float, ...]], sample: Callable[[], tuple[float, ...]]
) -> None:
    """Append ``sample()`` to ``rows`` every :data:`SERIES_S` until cancelled: where a run's
    rate is bursty, the series shows which stage stalls first."""
    t0 = time.monotonic()
    while True:
        rows.append((time.monotonic() - t0, *sample()))
        await asyncio.sleep(SERIES_S)


def write_series(path: str, rows: list[tuple[float, ...]]) -> None:
    with open(path, "w") as out:
        out.write("t_s,frames_read,sealed,acked,probe_readings,probes_on,cpu_s\n")
        for row in rows:
            out.write(",".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
            out.write("\n")


def summarize_ab(ratios: list[float], rng: random.Random) -> str:
    """Mean block ratio with a 95 % bootstrap interval (blocks resampled)."""
    if len(ratios) < 2:
        return f"probe A/B: {len(ratios)} block(s), too few to judge"
    means = sorted(statistics.fmean(rng.choices(ratios, k=len(ratios))) for _ in range(10_000))
    low, high = means[249], means[9_749]
    listed = " ".join(f"{r:.3f}" for r in ratios)
    return (
        f"probe A/B: {len(ratios)} blocks, rate with probes / without = "
        f"{statistics.fmean(ratios):.3f} (95% CI {low:.3f}-{high:.3f}, median "
        f"{statistics.median(ratios):.3f}); blocks: {listed}"
    )


async def run_producer(
    *,
    mode: str,
    args: argparse.Namespace,
    root: str,
    signer: Signer,
    key_file: str,
    mpctx: mp.context.SpawnContext,
    probes: bool = False,
) -> Result:
    label = f"{mode}+probes" if probes else mode
    run_dir = os.path.join(root, label)
    os.makedirs(run_dir)
    host = DemoHost(run_dir, workload=False)  # probing, not a simulated tenant, is measured
    targets = host.setup(cell_ids(args.cells)) if probes else {}
    for note in host.notes:
        print(f"probes: {note}")
    base, extra = divmod(args.events, args.cells)
    per_cell = [base + (i < extra) for i in range(args.cells)]
    total = sum(per_cell)
    async with EmbeddedNats(store_dir=os.path.join(run_dir, "nats")) as server:
        WATCHDOG.servers = [server]
        config = bench_config(
            mode=mode,
            data_dir=run_dir,
            url=server.url,
            key_file=key_file,
            cells=args.cells,
            inflight=args.inflight,
            queue=args.queue,
            targets=targets,
            probe_interval=args.probe_interval,
        )
        producer = Producer(config, signer=signer)
        guests: Guests | None = None
        try:
            await producer.startup()
            registry, publisher = producer.registry, producer.publisher
            assert registry is not None and publisher is not None
            cells = list(registry.cells.values())
            guests = start_guests(
                mpctx, [c.socket_path for c in cells], per_cell, min(args.guest_procs, args.cells)
            )
            WATCHDOG.procs = guests.procs
            for _ in guests.procs:
                msg = await queue_get(guests.ready, 120)
                if msg[0] != "ready":
                    raise RuntimeError(f"guest process {msg[1]} failed: {msg[2]}")
            if probes:
                host.start_activity()
            await producer.drain(10)  # the `opened` events: start from an idle pipeline
            acked0 = publisher.stats.acked
            user0, sys0 = self_cpu()
            server0 = proc_cpu_s(server.pid)
            profiler = cProfile.Profile() if args.profile else None

            if profiler is not None:
                profiler.enable()
            WATCHDOG.max_lag = 0.0
            guests.go.set()
            ab: asyncio.Task[list[float]] | None = None
            if probes and args.probe_ab and producer.probes is not None:
                scheduler = producer.probes

                def guest_acked() -> int:
                    return publisher.stats.acked - probe_readings(scheduler)

                def busy() -> bool:
                    read = sum(c.counters.accepted for c in cells)
                    return bool(read < 0.95 * total)

                ab = asyncio.create_task(
                    alternate_probes(scheduler, guest_acked, args.probe_ab, busy)
                )
            series: asyncio.Task[None] | None = None
            rows: list[tuple[float, ...]] = []
            if args.series:

                def sample() -> tuple[float, ...]:
                    return (
                        sum(c.counters.accepted for c in cells),
                        sum(c.counters.events for c in cells),
                        publisher.stats.acked - acked0,
                        probe_readings(producer.probes),
                        int(producer.probes is not None and not producer.probes.paused),
                        sum(self_cpu()),
                    )

                series = asyncio.create_task(record_series(rows, sample))
            deadline = time.monotonic() + args.timeout
            WATCHDOG.deadline = deadline + 30
            complete = True
            while True:
                read = sum(c.counters.accepted + sum(c.counters.rejected.values()) for c in cells)
                if read >= total:
                    break
                if time.monotonic() > deadline:
                    complete = False
                    break
                await asyncio.sleep(POLL_S)
            # Every frame is read; drain() returns when the last queued event is PubAcked.
            complete = await producer.drain(max(1.0, deadline - time.monotonic())) and complete
            t_end = time.monotonic()
            WATCHDOG.deadline = float("inf")
            if profiler is not None:
                profiler.disable()
            if series is not None:
                series.cancel()
                write_series(f"{args.series}.{label}.csv", rows)

            user1, sys1 = self_cpu()
            server1 = proc_cpu_s(server.pid)
            reports = [await queue_get(guests.results, 30) for _ in guests.procs]
            t_first = min(r[1] for r in reports)
            result = Result(
                mode=label,
                events=sum(c.counters.accepted for c in cells),
                seconds=t_end - t_first,
                acked=publisher.stats.acked - acked0,
                signed=sum(c.counters.signed for c in cells),
                sealed_events=sum(c.counters.events for c in cells),
                rejected=sum(sum(c.counters.rejected.values()) for c in cells),
                cpu_user=user1 - user0,
                cpu_sys=sys1 - sys0,
                server_cpu=server1 - server0,
                guest_cpu=sum(r[3] for r in reports),
                complete=complete,
                max_lag=WATCHDOG.max_lag,
            )
            if not complete:
                result.notes.append(f"timed out after {args.timeout:.0f}s")
            if errors := [e for r in reports for e in r[4]]:
                result.notes.append(f"guest send errors: {errors[:3]}")
            if probes and producer.probes is not None:
                result.notes.append(f"probe readings published: {probe_readings(producer.probes)}")
            if ab is not None:
                result.notes.append(summarize_ab(await ab, random.Random(0)))
            if publisher.stats.retries or publisher.stats.timeouts:
                result.notes.append(
                    f"retries={publisher.stats.retries} timeouts={publisher.stats.timeouts}"
                )
            if profiler is not None:
                report_profile(profiler, f"{args.profile}.{mode}.pstats", mode)
            return result
        finally:
            if guests is not None:
                guests.go.set()  # never leave a worker waiting
                stop_guests(guests)
            await producer.shutdown()
            await host.close()


def report_profile(profiler: cProfile.Profile, path: str, mode: str) -> None:
    profiler.dump_stats(path)
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(15)
        print(f"\n--- cProfile {mode}, top 15 by {order} (full stats: {path})")
        print(out.getvalue().split("\n\n", 1)[-1].rstrip())


# --------------------------------------------------------------------------- baseline


async def run_baseline(
    *, events: int, cells: int, payload: bytes, inflight: int, root: str, limit_s: float
) -> Result:
    run_dir = os.path.join(root, "raw")
    async with EmbeddedNats(store_dir=os.path.join(run_dir, "nats")) as server:
        WATCHDOG.servers = [server]
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream(publish_async_max_pending=inflight)
            await ensure_stream(
                js,
                name=STREAM,
                subject_prefix=SUBJECT_PREFIX,
                duplicate_window_s=600.0,
                create=True,
            )
            subjects = [
                f"{SUBJECT_PREFIX}.bench-{i:02d}.guest.process_spawned" for i in range(cells)
            ]
            ids = [f"raw-{i}" for i in range(events)]
            futures = []
            user0, sys0 = self_cpu()
            server0 = proc_cpu_s(server.pid)
            WATCHDOG.max_lag = 0.0
            start = time.monotonic()
            for i, msg_id in enumerate(ids):
                futures.append(
                    await js.publish_async(
                        subjects[i % cells],
                        payload,
                        headers={"Nats-Msg-Id": msg_id, "Content-Type": STRUCTURED_CONTENT_TYPE},
                    )
                )
            await asyncio.wait_for(js.publish_async_completed(), limit_s)
            end = time.monotonic()
            user1, sys1 = self_cpu()
            failed = sum(1 for f in futures if f.exception() is not None)
            result = Result(
                mode="raw publish_async",
                events=events - failed,
                seconds=end - start,
                acked=events - failed,
                cpu_user=user1 - user0,
                cpu_sys=sys1 - sys0,
                server_cpu=proc_cpu_s(server.pid) - server0,
                max_lag=WATCHDOG.max_lag,
            )
            if failed:
                result.notes.append(f"{failed} publishes failed")
            return result
        finally:
            await nc.close()


# --------------------------------------------------------------------------- report


def print_table(results: list[Result], baseline: Result | None) -> None:
    head = (
        f"{'mode':<18}{'events':>9}{'seconds':>9}{'events/s':>10}{'vs raw':>8}{'signed':>8}"
        f"{'prod cpu':>10}{'nats cpu':>10}{'guest cpu':>10}{'max stall':>10}"
    )
    print()
    print(head)
    print("-" * len(head))
    for r in ([baseline] if baseline else []) + results:
        ratio = f"{r.rate / baseline.rate:.2f}" if baseline and baseline.rate else "-"
        signed = f"{r.signed / r.sealed_events:.1%}" if r.sealed_events else "-"
        # CPU columns: seconds of CPU per second of wall clock (1.00 = one core busy).
        prod = (r.cpu_user + r.cpu_sys) / r.seconds if r.seconds else 0.0
        srv = r.server_cpu / r.seconds if r.seconds else 0.0
        gst = r.guest_cpu / r.seconds if r.seconds else 0.0
        print(
            f"{r.mode:<18}{r.events:>9}{r.seconds:>9.2f}{r.rate:>10,.0f}{ratio:>8}{signed:>8}"
            f"{prod:>10.2f}{srv:>10.2f}{gst:>10.2f}{r.max_lag * 1000:>8.0f}ms"
            + (f"  [{'; '.join(r.notes)}]" if r.notes else "")
        )
    print()
    print(
        "cpu columns: CPU seconds per wall second (1.00 = one core) of this process "
        "(producer, or the raw publisher), the nats-server, and the guest processes.\n"
        "max stall: the longest the event loop went without turning (a 50 ms timer's lateness)."
    )
    for r in results:
        guest_signed = r.signed - (r.sealed_events - r.events)
        print(
            f"{r.mode}: {r.acked} messages acked ({r.acked - r.events} chain events), "
            f"signed {r.signed}/{r.sealed_events} events ({guest_signed}/{r.events} guest "
            f"events), producer CPU user {r.cpu_user:.2f}s sys {r.cpu_sys:.2f}s"
            + (f", {r.rejected} frames rejected" if r.rejected else "")
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=16, help="registered cells (default 16)")
    p.add_argument(
        "--events", type=int, default=200_000, help="guest frames in total, split across cells"
    )
    p.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated signing modes (adaptive,strict)"
    )
    p.add_argument("--quick", action="store_true", help="small smoke run (4 cells, 20k events)")
    p.add_argument("--no-baseline", action="store_true", help="skip raw publish_async")
    p.add_argument(
        "--guest-procs", type=int, default=4, help="guest processes (cells are spread over them)"
    )
    p.add_argument(
        "--inflight", type=int, default=4096, help="publishes in flight (both producer and raw)"
    )
    p.add_argument(
        "--queue",
        type=int,
        default=QueueConfig().max_events,
        help="producer queue.max_events (default: the producer's default; a smaller queue "
        "exercises backpressure)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="give up on a run after this")
    p.add_argument(
        "--profile",
        metavar="PREFIX",
        help="cProfile the producer during each timed run; writes PREFIX.<mode>.pstats",
    )
    p.add_argument(
        "--series",
        metavar="PREFIX",
        help=f"write PREFIX.<mode>.csv: counters and producer CPU every {SERIES_S} s of each run",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (stores, key)")
    p.add_argument(
        "--probes",
        action="store_true",
        help="also run each mode with every cell's four host probes on real namespaces, nft "
        "tables, cgroups and TAPs (root), to measure what probing costs",
    )
    p.add_argument(
        "--probe-interval",
        type=float,
        default=ProbesConfig().interval_s,
        metavar="S",
        help="probe tick with --probes (default: the daemon's default, %(default)s s)",
    )
    p.add_argument(
        "--probe-ab",
        type=float,
        metavar="S",
        help="instead of a run without and one with probes, one run with probes that "
        "pauses and resumes them every S seconds (off, on, on, off, ...) and compares the "
        "guest-event ack rates of those windows; give --events enough for a few minutes",
    )
    args = p.parse_args(argv)
    if args.probe_ab is not None:
        args.probes = True
        if args.probe_ab <= 0:
            p.error("--probe-ab must be positive")
    if args.quick:
        args.cells, args.events = min(args.cells, 4), min(args.events, 20_000)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; expected some of {', '.join(MODES)}")
    if args.cells < 1 or args.events < args.cells:
        p.error("need at least one cell and one event per cell")
    if args.queue <= 0:
        p.error("--queue must be positive")
    if args.probe_interval <= 0:
        p.error("--probe-interval must be positive")
    return args


async def main_async(args: argparse.Namespace) -> None:
    setup_logging("warning", "text")
    root = tempfile.mkdtemp(prefix="cellos-bench-")
    WATCHDOG.cleanup_dir = None if args.keep else root
    # One loop turn can seal a whole socket read for every cell (seconds with many cells).
    WATCHDOG.stall_s = max(30.0, 2.0 * args.cells)
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: children stopped, temp dir removed.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    beat = asyncio.create_task(WATCHDOG.heartbeat())
    WATCHDOG.start()
    try:
        key_file = os.path.join(root, "signing.key")
        signer = generate_key_file(key_file)
        payload, signed_size, unsigned_size = sample_payloads(signer)
        nats_version = args.nats_version
        print(
            f"cells={args.cells} events={args.events} modes={','.join(args.modes)} "
            f"inflight={args.inflight} queue={args.queue} "
            f"guest_procs={min(args.guest_procs, args.cells)} "
            f"cpus={os.cpu_count()} nats-server={nats_version}"
        )
        print(
            f"sealed guest event payload: {signed_size:.0f} B signed, {unsigned_size:.0f} B "
            f"unsigned; raw baseline publishes {len(payload)} B + Nats-Msg-Id/Content-Type"
        )
        mpctx = mp.get_context("spawn")
        baseline = None
        if not args.no_baseline:
            baseline = await run_baseline(
                events=args.events,
                cells=args.cells,
                payload=payload,
                inflight=args.inflight,
                root=root,
                limit_s=args.timeout,
            )
            print(f"raw publish_async: {baseline.rate:,.0f} events/s", flush=True)
        results = []
        for mode in args.modes:
            for probes in (False, True) if args.probes and not args.probe_ab else (args.probes,):
                r = await run_producer(
                    mode=mode,
                    args=args,
                    root=root,
                    signer=signer,
                    key_file=key_file,
                    mpctx=mpctx,
                    probes=probes,
                )
                print(f"{r.mode}: {r.rate:,.0f} events/s", flush=True)
                results.append(r)
        print_table(results, baseline)
    finally:
        beat.cancel()
        WATCHDOG.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.nats_version = subprocess.run(
        [EmbeddedNats.find_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(main_async(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
