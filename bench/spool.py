"""What the write-ahead spool costs, and how fast a backlog it kept drains.

1. Append rate per fsync policy: pre-sealed guest events (real payloads, adaptive-mode
   sizes) are appended to a fresh spool in batches of one socket read (128 events per
   event-loop turn), and the clock stops when the last one is durable (handed on for
   publishing). The baseline, timed the same way in the same run, writes the very same
   record bytes with one plain ``os.write`` per batch and no fsync.

2. Backlog drain against the live rate: the producer (16 cells, adaptive signing) runs
   against a private nats-server, the server is killed, guest processes write the backlog
   (200,000 events by default) while it is down, and the server is started again; the
   clock runs from the reconnect until the spool is empty (every event PubAcked). The
   live end-to-end rate is ``bench/e2e.py``'s adaptive run with the same cells and event
   count, measured in the same run.

A benchmark, not a test: it prints figures and ratios and never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import islice

import e2e  # bench/e2e.py, beside this file

from producer.chain.events import ChainContext, Rfc3339Clock, guest_event
from producer.chain.sealer import ChainSealer, Sealed
from producer.chain.signing import Signer, generate_key_file
from producer.delivery import records as rec
from producer.delivery.spool import FsyncPolicy, Spool, SpooledEvent, SpoolOptions
from producer.guest.simulator import frames
from producer.ops.daemon import Producer
from producer.ops.embedded import EmbeddedNats
from producer.ops.logs import setup_logging

POLICIES: tuple[FsyncPolicy, ...] = ("never", "interval", "always")
BATCH = 128
"""Events appended per event-loop turn: about one 16 KiB socket read of guest frames."""
SIGN_EVERY = 50
"""Adaptive mode under load signs about 2 % of guest events; payload sizes follow."""


# --------------------------------------------------------------------------- appends


def sealed_events(signer: Signer, n: int) -> tuple[ChainContext, list[Sealed], list[str]]:
    """``n`` guest events sealed into one chain, and their subjects."""
    ctx = ChainContext(
        host_id=e2e.HOST_ID,
        cell_id="bench-00",
        run_id="run-spool",
        spec_signature_hash="sha256:" + secrets.token_hex(32),
        chain_id=secrets.token_hex(8),
        subject_prefix=e2e.SUBJECT_PREFIX,
    )
    clock = Rfc3339Clock()
    sealer = ChainSealer(signer)
    out, subjects = [], []
    for decl in islice(frames(11, interval_ns=10_000), n):
        pending = guest_event(ctx, decl, clock.now())
        pending.event["id"] = f"{ctx.chain_id}-{sealer.sequence + 1}"
        out.append(sealer.seal(pending.event, sign=sealer.sequence % SIGN_EVERY == 0))
        subjects.append(pending.subject)
    return ctx, out, subjects


Timing = tuple[float, float]
"""Wall-clock and CPU seconds (this process, every thread)."""


def clocks() -> Timing:
    return time.perf_counter(), time.process_time()


def since(start: Timing) -> Timing:
    wall, cpu = clocks()
    return wall - start[0], cpu - start[1]


async def time_spool(
    directory: str,
    policy: FsyncPolicy,
    ctx: ChainContext,
    events: list[Sealed],
    subjects: list[str],
) -> Timing:
    """From the first append until the last event is durable and handed on."""
    spool = Spool(SpoolOptions(directory=directory, fsync=policy, min_free_bytes=0))
    spool.open()
    chain = spool.open_chain(
        chain_id=ctx.chain_id,
        cell_id=ctx.cell_id,
        run_id=ctx.run_id,
        spec_signature_hash=ctx.spec_signature_hash,
        opened_at=Rfc3339Clock().now(),
        spec={},
        source="config",
    )
    done = asyncio.Event()
    handed = 0

    def deliver(_: SpooledEvent) -> bool:
        nonlocal handed
        handed += 1
        if handed == len(events):
            done.set()
        return True

    spool.start_delivery(deliver, done.wait)
    await asyncio.sleep(0.1)  # the feeder catches up with the (empty) log; not timed
    at = Rfc3339Clock().now()
    start = clocks()
    for i in range(0, len(events), BATCH):
        for sealed, subject in zip(events[i : i + BATCH], subjects[i : i + BATCH], strict=True):
            spool.append_event(chain, sealed, rec.SIGNED if sealed.signed else 0, subject, at)
        await asyncio.sleep(0)  # end of the loop turn: the group commit
    await done.wait()
    taken = since(start)
    await spool.close(clean=True)
    return taken


async def time_raw(
    directory: str, events: list[Sealed], subjects: list[str], *, sync: bool
) -> Timing:
    """The same record bytes, one ``os.write`` per batch (and ``fsync`` if ``sync``)."""
    records = [
        rec.encode_event(1, s.sequence, 0, subject, s.payload)
        for s, subject in zip(events, subjects, strict=True)
    ]
    fd = os.open(os.path.join(directory, "raw.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        start = clocks()
        for i in range(0, len(records), BATCH):
            os.write(fd, b"".join(records[i : i + BATCH]))
            if sync:
                os.fsync(fd)
            await asyncio.sleep(0)
        return since(start)
    finally:
        os.close(fd)


async def append_rates(root: str, signer: Signer, n: int, repeat: int) -> None:
    ctx, events, subjects = sealed_events(signer, n)
    size = sum(len(s.payload) for s in events) / n
    print(f"\n== spool appends: {n:,} guest events of {size:.0f} B, {BATCH} per loop turn")
    runs: dict[str, list[Timing]] = {}

    def fresh() -> str:
        return tempfile.mkdtemp(dir=root)

    timed: list[tuple[str, Callable[[], object]]] = [
        ("raw os.write", lambda: time_raw(fresh(), events, subjects, sync=False)),
        ("raw os.write+fsync", lambda: time_raw(fresh(), events, subjects, sync=True)),
        *[
            (f"spool fsync={p}", lambda p=p: time_spool(fresh(), p, ctx, events, subjects))
            for p in POLICIES
        ],
    ]
    for _ in range(repeat):  # interleaved, so a drifting machine affects all alike
        for name, run in timed:
            runs.setdefault(name, []).append(await run())  # type: ignore[misc]
    best = {name: min(timings) for name, timings in runs.items()}
    raw = best["raw os.write"][0]
    print(f"{'writer':<22} {'events/s':>12} {'us/event':>9} {'CPU us/event':>13} {'vs raw':>7}")
    for name, (wall, cpu) in best.items():
        print(
            f"{name:<22} {n / wall:>12,.0f} {wall / n * 1e6:>9.2f} {cpu / n * 1e6:>13.2f} "
            f"{raw / wall:>6.3f}x"
        )
    load = os.getloadavg()[0]
    print(f"(best wall time of {repeat} interleaved runs each; load average {load:.1f})")


# --------------------------------------------------------------------------- backlog


async def until(condition: Callable[[], bool]) -> None:
    while True:
        if condition():
            return
        await asyncio.sleep(0.01)


async def backlog_drain(
    args: argparse.Namespace, root: str, signer: Signer, key_file: str
) -> float:
    """Build a backlog while the broker is down, then time its drain; returns events/s."""
    run_dir = os.path.join(root, "backlog")
    os.makedirs(run_dir)
    per_cell = [
        args.backlog // args.cells + (i < args.backlog % args.cells) for i in range(args.cells)
    ]
    async with EmbeddedNats(store_dir=os.path.join(run_dir, "nats")) as server:
        config = e2e.bench_config(
            mode="adaptive",
            data_dir=run_dir,
            url=server.url,
            key_file=key_file,
            cells=args.cells,
            inflight=args.inflight,
            queue=args.queue,
        )
        producer = Producer(config, signer=signer)
        guests = None
        try:
            await producer.startup()
            registry, publisher, spool = producer.registry, producer.publisher, producer.spool
            assert registry is not None and publisher is not None and spool is not None
            cells = list(registry.cells.values())
            await producer.drain(30)  # the `opened` events: start from an idle pipeline
            server.kill()
            guests = e2e.start_guests(
                mp.get_context("spawn"), [c.socket_path for c in cells], per_cell, 4
            )
            for _ in guests.procs:
                msg = await e2e.queue_get(guests.ready, 120)
                if msg[0] != "ready":
                    raise RuntimeError(f"guest process {msg[1]} failed: {msg[2]}")
            start = time.monotonic()
            guests.go.set()
            await until(lambda: sum(c.counters.accepted for c in cells) >= sum(per_cell))
            spooled_s = time.monotonic() - start
            depth = spool.depth()
            print(
                f"backlog: {depth:,} events spooled with the broker down in {spooled_s:.1f} s "
                f"({depth / spooled_s:,.0f} events/s), {spool.live_bytes() / 1e6:.0f} MB on disk, "
                f"{spool.stats.spills:,} spills"
            )
            await server.start()
            await until(lambda: publisher.connected)
            reconnected = time.monotonic()
            if not await producer.drain(args.timeout):
                raise RuntimeError(f"backlog not drained in {args.timeout:.0f}s")
            drain_s = time.monotonic() - reconnected
            rate = depth / drain_s
            print(
                f"drain: {depth:,} events PubAcked {drain_s:.1f} s after the reconnect: "
                f"{rate:,.0f} events/s ({publisher.stats.duplicates:,} duplicates acked)"
            )
            return rate
        finally:
            if guests is not None:
                guests.go.set()
                e2e.stop_guests(guests)
            await producer.shutdown()


async def live_rate(args: argparse.Namespace, root: str, signer: Signer, key_file: str) -> float:
    e2e_args = e2e.parse_args(
        ["--cells", str(args.cells), "--events", str(args.backlog), "--modes", "adaptive"]
    )
    result = await e2e.run_producer(
        mode="adaptive",
        args=e2e_args,
        root=root,
        signer=signer,
        key_file=key_file,
        mpctx=mp.get_context("spawn"),
    )
    print(f"live end-to-end (bench/e2e.py, adaptive): {result.rate:,.0f} events/s")
    return result.rate


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=100_000, help="events per append run")
    p.add_argument("--repeat", type=int, default=3, help="append runs per writer (best counts)")
    p.add_argument("--backlog", type=int, default=200_000, help="events built up in the outage")
    p.add_argument("--cells", type=int, default=16)
    p.add_argument("--inflight", type=int, default=4096)
    p.add_argument("--queue", type=int, default=65536, help="producer queue.max_events")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--appends-only", action="store_true", help="skip the backlog part")
    return p.parse_args(argv)


async def main_async(args: argparse.Namespace) -> None:
    setup_logging("warning", "text")
    root = tempfile.mkdtemp(prefix="cellos-bench-spool-")
    try:
        key_file = os.path.join(root, "signing.key")
        signer = generate_key_file(key_file)
        print(f"cpus={os.cpu_count()} python={sys.version.split()[0]}")
        await append_rates(root, signer, args.events, args.repeat)
        if args.appends_only:
            return
        print(f"\n== backlog of {args.backlog:,} events over {args.cells} cells")
        live = await live_rate(args, root, signer, key_file)
        drain = await backlog_drain(args, root, signer, key_file)
        print(f"drain / live = {drain / live:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(parse_args()))


if __name__ == "__main__":
    main()
