"""CPU cost of the host probes per cell-tick, and of all four for 200 cells at a 1 s tick.

Builds real kernel objects for every cell (a network namespace holding a per-cell
``inet`` table, a TAP device, a cgroup v2 directory) plus a fake Firecracker VMM per cell
(API socket and metrics FIFO, served by a child process whose CPU is not counted), then:

1. times each probe alone over ``--ticks`` rounds of every cell, and the baseline: the
   same nftables reading done by fork/exec of ``nsenter --net=<ns> nft -j list table``,
   the way the probe would work without libnftables;
2. runs all four probes of every cell through the ProbeScheduler at ``--interval``
   (default 1 s) for ``--seconds``, which is the figure that must stay under one core.

CPU is this process's user+system time plus that of its reaped children (the nsenter/nft
processes), from ``getrusage``. Needs root; removes everything it created. Results and
their reading: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

# The repository root first: for the tests' fake VMM (tests/probes/fake_vmm.py, not a
# second copy), and so that `probes` is the package, not this file.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes.base import Probe, ProbeContext, ProbeReading
from probes.cgroup import CgroupProbe
from probes.fc_metrics import FcMetricsProbe
from probes.nftables import NftablesProbe
from probes.scheduler import ProbeScheduler
from probes.tap_link import TapLinkProbe
from tests.probes.fake_vmm import FakeVmm

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
TABLE = """
table inet {table} {{
  counter dns {{ }}
  chain input {{
    type filter hook input priority 0; policy accept;
    ct state established,related counter accept
    icmp type echo-request counter accept
    udp dport 53 counter name dns accept
    tcp dport {{ 22, 443 }} counter accept
    iif lo accept
    counter drop
  }}
}}
"""


def cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def sh(*args: str, stdin: str | None = None) -> None:
    subprocess.run(args, input=stdin, text=True, check=True, capture_output=True)


class Fleet:
    """The kernel objects and fake VMMs of ``cells`` cells; removed on exit."""

    def __init__(self, cells: int) -> None:
        self.ids = [f"b{os.getpid() % 1000}x{n}" for n in range(cells)]
        self.dir = tempfile.mkdtemp(prefix="cpbench", dir="/tmp")
        self.cgroup = CGROUP_ROOT / f"cpbench{os.getpid()}"
        self._vmm: mp.Process | None = None
        self._stop = mp.get_context("fork").Event()

    def netns(self, cell: str) -> str:
        return f"/run/netns/{cell}"

    def tap(self, cell: str) -> str:
        return f"t{cell}"

    def api(self, cell: str) -> str:
        return f"{self.dir}/{cell}.sock"

    def fifo(self, cell: str) -> str:
        return f"{self.dir}/{cell}.fifo"

    def __enter__(self) -> Fleet:
        try:
            sh("ip", "-batch", "-", stdin="".join(f"netns add {c}\n" for c in self.ids))
            sh(
                "ip",
                "-batch",
                "-",
                stdin="".join(f"tuntap add {self.tap(c)} mode tap\n" for c in self.ids),
            )
            for cell in self.ids:
                sh("ip", "netns", "exec", cell, "nft", "-f", "-", stdin=TABLE.format(table=cell))
                os.mkfifo(self.fifo(cell))
                (self.cgroup / cell).mkdir(parents=True)
            ready = mp.get_context("fork").Event()
            self._vmm = mp.get_context("fork").Process(
                target=_serve_vmms,
                args=([(self.api(c), self.fifo(c)) for c in self.ids], ready, self._stop),
            )
            self._vmm.start()
            if not ready.wait(60):
                raise RuntimeError("the fake VMMs did not start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def stop_vmm(self) -> None:
        if self._vmm is not None:
            self._stop.set()
            self._vmm.join(30)
            self._vmm = None

    def __exit__(self, *exc: object) -> None:
        self.stop_vmm()
        with contextlib.suppress(subprocess.CalledProcessError):
            sh(
                "ip",
                "-batch",
                "-",
                stdin="".join(f"tuntap del {self.tap(c)} mode tap\n" for c in self.ids),
            )
        for cell in self.ids:
            with contextlib.suppress(subprocess.CalledProcessError):
                sh("ip", "netns", "del", cell)
            with contextlib.suppress(FileNotFoundError):
                (self.cgroup / cell).rmdir()
        with contextlib.suppress(FileNotFoundError):
            self.cgroup.rmdir()
        shutil.rmtree(self.dir, ignore_errors=True)

    def probes(self, cell: str) -> dict[str, Probe]:
        return {
            "nftables": NftablesProbe("inet", cell, self.netns(cell)),
            "cgroup": CgroupProbe(str(self.cgroup / cell)),
            "fc_metrics": FcMetricsProbe(self.fifo(cell), self.api(cell)),
            "tap_link": TapLinkProbe(self.tap(cell)),
        }


def _serve_vmms(targets: list[tuple[str, str]], ready: MpEvent, stop: MpEvent) -> None:
    async def serve() -> None:
        async with contextlib.AsyncExitStack() as stack:
            for api, fifo in targets:
                await stack.enter_async_context(FakeVmm(api, fifo))
            ready.set()
            await asyncio.to_thread(stop.wait)

    asyncio.run(serve())


async def nsenter_nft(fleet: Fleet, cell: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "nsenter",
        f"--net={fleet.netns(cell)}",
        "nft",
        "-j",
        "list",
        "table",
        "inet",
        cell,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0 or not out:
        raise RuntimeError(f"nft failed in {cell}")


async def per_cell_tick(
    cells: list[str], ticks: int, concurrency: int, read: Callable[[str], Awaitable[object]]
) -> float:
    """Microseconds of CPU per cell-tick of ``read``."""
    slots = asyncio.Semaphore(concurrency)

    async def one(cell: str) -> None:
        async with slots:
            await read(cell)

    start = cpu_s()
    for _ in range(ticks):
        await asyncio.gather(*(one(cell) for cell in cells))
    return (cpu_s() - start) / (len(cells) * ticks) * 1e6


async def scheduled(
    fleet: Fleet, sets: dict[str, dict[str, Probe]], args: argparse.Namespace
) -> None:
    readings = 0

    async def dispatch(cell_id: str, reading: ProbeReading) -> bool:
        nonlocal readings
        readings += 1
        return True

    scheduler = ProbeScheduler(
        dispatch,
        interval_s=args.interval,
        timeout_s=args.interval / 2,
        max_concurrency=args.concurrency,
    )
    for cell, probes in sets.items():
        scheduler.add_cell(cell, list(probes.values()))
    # Warm up one interval (every probe's first phase), then measure whole intervals.
    scheduler.start()
    await asyncio.sleep(args.interval)
    cpu0, wall0, read0 = cpu_s(), time.monotonic(), readings
    await asyncio.sleep(args.seconds)
    cpu, wall, done = cpu_s() - cpu0, time.monotonic() - wall0, readings - read0
    failures = sum(sum(s.failures.values()) for s in scheduler.stats().values())
    missed = sum(s.missed for s in scheduler.stats().values())
    await scheduler.close()  # closes every probe
    expected = len(sets) * 4 * args.seconds / args.interval
    print(
        f"\nall four probes, {len(sets)} cells, every {args.interval:g} s, {args.seconds:g} s "
        f"measured: {cpu / wall:.3f} cores ({cpu / max(done, 1) * 1e6:.0f} us per reading), "
        f"{done} readings (expected ~{expected:.0f}), {failures} failures, {missed} missed ticks"
    )


async def run(args: argparse.Namespace) -> None:
    with Fleet(args.cells) as fleet:
        ctx = {cell: ProbeContext(cell_id=cell) for cell in fleet.ids}
        sets = {cell: fleet.probes(cell) for cell in fleet.ids}
        try:
            await measure(fleet, ctx, sets, args)
        finally:
            for probes in sets.values():
                for probe in probes.values():
                    probe.close()


def reader(
    sets: dict[str, dict[str, Probe]], ctx: dict[str, ProbeContext], name: str
) -> Callable[[str], Awaitable[ProbeReading]]:
    return lambda cell: sets[cell][name].read(ctx[cell])


async def measure(
    fleet: Fleet,
    ctx: dict[str, ProbeContext],
    sets: dict[str, dict[str, Probe]],
    args: argparse.Namespace,
) -> None:
    for cell, probes in sets.items():  # first readings: open sockets and FIFOs, warm caches
        for probe in probes.values():
            await probe.read(ctx[cell])
    baseline = await per_cell_tick(
        fleet.ids, args.ticks, args.concurrency, lambda cell: nsenter_nft(fleet, cell)
    )
    scale = len(fleet.ids) / args.interval / 1e6  # us per cell-tick -> cores
    at = f"cores @{len(fleet.ids)}/{args.interval:g}s"
    print(f"{'reading':<34} {'us CPU/cell-tick':>17} {'vs baseline':>12} {at:>16}")
    rows = [("baseline: nsenter + nft -j (exec)", baseline)]
    for name in ("nftables", "cgroup", "fc_metrics", "tap_link"):
        cost = await per_cell_tick(fleet.ids, args.ticks, args.concurrency, reader(sets, ctx, name))
        rows.append((f"{name} probe", cost))
    rows.append(("all four probes (sum)", sum(cost for _, cost in rows[1:])))
    for label, cost in rows:
        print(f"{label:<34} {cost:>17.0f} {cost / baseline:>12.3f} {cost * scale:>16.3f}")
    await scheduled(fleet, sets, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--ticks", type=int, default=5, help="rounds of every cell per probe")
    p.add_argument("--interval", type=float, default=1.0, help="scheduler tick, seconds")
    p.add_argument("--seconds", type=float, default=10.0, help="scheduler run measured")
    p.add_argument("--concurrency", type=int, default=16)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    if os.geteuid() != 0:
        sys.exit("bench/probe_cost.py creates namespaces, TAPs and cgroups: run it as root")
    # SIGTERM unwinds like Ctrl-C, so the fleet's cleanup runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
