"""Probe scheduler: phases, timeouts, the concurrency bound, dispatch and backpressure,
failure logging, runtime add/remove; on virtual time where the behaviour is about time,
and on a real hanging Firecracker API socket for the isolation that matters most.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from probes.base import Io, Parse, ProbeContext, ProbeName, ProbeReading
from probes.cgroup import CgroupProbe
from probes.fc_metrics import FcMetricsProbe
from probes.nftables import NftablesProbe
from probes.scheduler import ProbeScheduler, probes_for
from probes.tap_link import TapLinkProbe
from producer.ops.config import CellSpec
from tests.probes.fake_vmm import fake_vmm
from tests.probes.kernel import until


class VirtualTime:
    """A clock and a sleep that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self.requested: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.requested.append(delay)
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + delay, next(self._order), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its own time, in order."""
        end = self.now + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= end:
            wake, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, wake)
            if not future.done():
                future.set_result(None)
            await settle()
        self.now = end


async def settle() -> None:
    """Let every task that can run, run, until all wait on virtual time or the test.

    The probes here never touch threads or sockets, so a bounded number of loop turns
    reaches that point: it depends on how deep their await chains are, not on timing.
    """
    for _ in range(50):
        await asyncio.sleep(0)


@dataclass
class FakeProbe:
    """A probe whose readings the test scripts: a value, an error, or a hang."""

    name: ProbeName = "cgroup"
    script: list[object] = field(default_factory=list)
    gate: asyncio.Event | None = None
    duration: float = 0.0
    sleep: Callable[[float], Awaitable[None]] | None = None
    active: int = 0
    reads: int = 0
    cancelled: int = 0
    closed: bool = False

    async def read(self, ctx: ProbeContext) -> ProbeReading:
        self.reads += 1
        self.active += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.sleep is not None:
                await self.sleep(self.duration)
            outcome = self.script.pop(0) if self.script else "ok"
            if isinstance(outcome, BaseException):
                raise outcome
            return ProbeReading(self.name, {"cell": ctx.cell_id}, {"n": str(self.reads)})
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    def close(self) -> None:
        self.closed = True


@dataclass
class Dispatched:
    readings: list[tuple[str, ProbeReading]] = field(default_factory=list)
    accept: bool = True

    async def __call__(self, cell_id: str, reading: ProbeReading) -> bool:
        self.readings.append((cell_id, reading))
        return self.accept

    def cells(self) -> list[str]:
        return [cell for cell, _ in self.readings]


@pytest.fixture
def vt() -> VirtualTime:
    return VirtualTime()


@pytest.fixture
async def make(vt: VirtualTime) -> AsyncIterator[object]:
    made: list[ProbeScheduler] = []

    def build(dispatch: Dispatched, **kwargs: object) -> ProbeScheduler:
        options: dict[str, object] = {
            "interval_s": 10.0,
            "timeout_s": 2.0,
            "clock": vt.clock,
            "sleep": vt.sleep,
            "rng": random.Random(7),
        }
        options.update(kwargs)
        scheduler = ProbeScheduler(dispatch, **options)  # type: ignore[arg-type]
        made.append(scheduler)
        return scheduler

    yield build
    for scheduler in made:
        await scheduler.close()


class FixedPhases(random.Random):
    """Phases chosen by the test instead of at random."""

    def __init__(self, *phases: float) -> None:
        super().__init__()
        self._phases = list(phases)

    def uniform(self, a: float, b: float) -> float:
        return self._phases.pop(0)


# --------------------------------------------------------------------------- ticks


async def test_each_probe_reads_on_its_own_random_phase(vt: VirtualTime, make: object) -> None:
    dispatch = Dispatched()
    scheduler = make(dispatch)  # type: ignore[operator]
    for n in range(20):
        scheduler.add_cell(f"cell-{n}", [FakeProbe()])
    scheduler.start()
    await settle()
    phases = vt.requested[:20]
    assert len(phases) == 20 and all(0.0 <= p < 10.0 for p in phases)
    assert len(set(phases)) == 20  # nobody fires together
    await vt.advance(10.0)
    assert sorted(dispatch.cells()) == sorted(f"cell-{n}" for n in range(20))
    # and in phase order, not registration order
    order = sorted(range(20), key=lambda n: phases[n])
    assert dispatch.cells() == [f"cell-{n}" for n in order]


async def test_readings_follow_the_interval_without_drift(vt: VirtualTime, make: object) -> None:
    """Each reading takes 1.5 s; the next one is still due on the phase (3, 13, 23, ...),
    not 10 s after the previous one ended."""
    dispatch = Dispatched()
    scheduler = make(dispatch, rng=FixedPhases(3.0))  # type: ignore[operator]
    probe = FakeProbe(duration=1.5, sleep=vt.sleep)
    scheduler.add_cell("cell-1", [probe])
    scheduler.start()
    started = []
    for tick in range(5):
        await vt.advance(3.0 + 10.0 * tick - vt.now - 0.01)
        assert probe.reads == tick
        await vt.advance(0.01)
        assert probe.reads == tick + 1
        started.append(vt.now)
    assert started == pytest.approx([3.0, 13.0, 23.0, 33.0, 43.0])
    await vt.advance(1.5)
    assert scheduler.stats()[("cell-1", "cgroup")].readings == 5


async def test_readings_go_to_dispatch_as_they_complete(vt: VirtualTime, make: object) -> None:
    dispatch = Dispatched()
    scheduler = make(dispatch, rng=FixedPhases(0.0, 0.0))  # type: ignore[operator]
    slow, fast = FakeProbe(gate=asyncio.Event()), FakeProbe()
    scheduler.add_cell("slow", [slow])
    scheduler.add_cell("fast", [fast])
    scheduler.start()
    await vt.advance(0.0)
    assert dispatch.cells() == ["fast"]  # not held back until the round is over
    assert slow.gate is not None
    slow.gate.set()
    await settle()
    assert dispatch.cells() == ["fast", "slow"]


# --------------------------------------------------------------------------- isolation


async def test_a_hanging_probe_is_cut_off_and_delays_no_other(
    vt: VirtualTime, make: object, caplog: pytest.LogCaptureFixture
) -> None:
    dispatch = Dispatched()
    scheduler = make(dispatch, rng=FixedPhases(0.0, 0.0, 0.5))  # type: ignore[operator]
    hanging = FakeProbe(name="fc_metrics", gate=asyncio.Event())  # never set
    neighbour = FakeProbe(name="tap_link")
    other_cell = FakeProbe()
    scheduler.add_cell("stuck", [hanging, neighbour])
    scheduler.add_cell("other", [other_cell])
    scheduler.start()
    await vt.advance(1.0)
    # The hanging read is still in progress; everyone else already read.
    assert (hanging.active, neighbour.reads, other_cell.reads) == (1, 1, 1)
    await vt.advance(1.0)  # timeout_s = 2
    assert (hanging.active, hanging.cancelled) == (0, 1)
    await vt.advance(27.0)  # to t=29: ticks at 0, 10, 20 (and 0.5, 10.5, 20.5)
    stats = scheduler.stats()
    assert stats[("stuck", "fc_metrics")].failures == {"timeout": 3}
    assert stats[("stuck", "fc_metrics")].readings == 0
    assert stats[("stuck", "tap_link")].readings == stats[("other", "cgroup")].readings == 3
    failing = [r for r in caplog.records if r.getMessage() == "probe_failing"]
    assert len(failing) == 1  # once per state change, not per failure
    assert failing[0].fields == {  # type: ignore[attr-defined]
        "cell_id": "stuck",
        "probe": "fc_metrics",
        "kind": "timeout",
        "timeout_s": 2.0,
    }


async def test_concurrency_is_bounded(vt: VirtualTime, make: object) -> None:
    dispatch = Dispatched()
    gate = asyncio.Event()
    scheduler = make(dispatch, max_concurrency=3, timeout_s=10.0)  # type: ignore[operator]
    probes = [FakeProbe(gate=gate) for _ in range(8)]
    for n, probe in enumerate(probes):
        scheduler.add_cell(f"cell-{n}", [probe])
    scheduler.start()
    await vt.advance(9.99)  # every first phase has passed
    assert sum(p.active for p in probes) == 3
    gate.set()
    await settle()
    assert len(dispatch.readings) == 8


async def test_waiting_for_a_slot_past_a_tick_counts_missed_ticks(
    vt: VirtualTime, make: object
) -> None:
    """One slot, two hanging cells ahead of a third: the third waits 20 s for its first
    reading, by when its second tick has passed too."""
    dispatch = Dispatched()
    scheduler = make(  # type: ignore[operator]
        dispatch, max_concurrency=1, timeout_s=10.0, rng=FixedPhases(0.0, 0.05, 0.1)
    )
    scheduler.add_cell("a", [FakeProbe(gate=asyncio.Event())])
    scheduler.add_cell("b", [FakeProbe(gate=asyncio.Event())])
    late = FakeProbe()
    scheduler.add_cell("c", [late])
    scheduler.start()
    await vt.advance(20.0)
    assert late.reads == 1
    assert scheduler.stats()[("c", "cgroup")].missed == 1


async def test_ticks_while_paused_read_nothing_and_count_as_missed(
    vt: VirtualTime, make: object
) -> None:
    dispatch = Dispatched()
    scheduler = make(dispatch, rng=FixedPhases(1.0))  # type: ignore[operator]
    probe = FakeProbe()
    scheduler.add_cell("cell-1", [probe])
    scheduler.start()
    await vt.advance(2.0)
    assert not scheduler.paused
    scheduler.pause()
    assert scheduler.paused
    await vt.advance(20.0)  # the ticks at 11 and 21
    assert (probe.reads, scheduler.stats()[("cell-1", "cgroup")].missed) == (1, 2)
    scheduler.resume()
    assert not scheduler.paused
    await vt.advance(10.0)  # 31, on the same phase
    assert probe.reads == 2 and len(dispatch.readings) == 2
    assert scheduler.stats()[("cell-1", "cgroup")].missed == 2


# --------------------------------------------------------------------------- outcomes


async def test_backpressure_skips_the_reading_and_counts_it(vt: VirtualTime, make: object) -> None:
    dispatch = Dispatched(accept=False)
    scheduler = make(dispatch, rng=FixedPhases(1.0))  # type: ignore[operator]
    probe = FakeProbe()
    scheduler.add_cell("cell-1", [probe])
    scheduler.start()
    await vt.advance(20.0)
    dispatch.accept = True
    await vt.advance(10.0)
    stats = scheduler.stats()[("cell-1", "cgroup")]
    assert (stats.skipped, stats.readings, stats.failures) == (2, 1, {})
    assert probe.reads == 3  # the next tick reads again as usual


async def test_failures_are_counted_by_kind_and_logged_per_state_change(
    vt: VirtualTime, make: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="probes.scheduler")
    dispatch = Dispatched()
    scheduler = make(dispatch, rng=FixedPhases(1.0))  # type: ignore[operator]
    probe = FakeProbe(
        script=[
            Io("cgroup", "cgroup directory: No such file or directory", path="/sys/x"),
            Parse("cgroup", "not a number"),
            "ok",
            RuntimeError("bug"),
            "ok",
        ]
    )
    scheduler.add_cell("cell-1", [probe])
    scheduler.start()
    await vt.advance(50.0)
    stats = scheduler.stats()[("cell-1", "cgroup")]
    assert stats.failures == {"io": 1, "parse": 1, "error": 1}
    assert (stats.readings, stats.consecutive_failures) == (2, 0)
    events = [
        (r.getMessage(), r.fields)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage().startswith("probe_")
    ]
    assert events == [
        (
            "probe_failing",
            {
                "cell_id": "cell-1",
                "probe": "cgroup",
                "kind": "io",
                "reason": "cgroup directory: No such file or directory",
                "path": "/sys/x",
            },
        ),
        ("probe_recovered", {"cell_id": "cell-1", "probe": "cgroup", "failed_readings": 2}),
        (
            "probe_failing",
            {
                "cell_id": "cell-1",
                "probe": "cgroup",
                "kind": "error",
                "error": "RuntimeError('bug')",
            },
        ),
        ("probe_recovered", {"cell_id": "cell-1", "probe": "cgroup", "failed_readings": 1}),
    ]
    assert [r.levelno for r in caplog.records if r.getMessage() == "probe_failing"] == [
        logging.WARNING
    ] * 2


async def test_a_dispatch_that_raises_is_a_counted_failure(vt: VirtualTime, make: object) -> None:
    async def broken(cell_id: str, reading: ProbeReading) -> bool:
        raise ValueError("queue closed")

    scheduler = make(broken, rng=FixedPhases(1.0))  # type: ignore[operator]
    scheduler.add_cell("cell-1", [FakeProbe()])
    scheduler.start()
    await vt.advance(20.0)
    assert scheduler.stats()[("cell-1", "cgroup")].failures == {"dispatch": 2}


# --------------------------------------------------------------------------- lifecycle


async def test_cells_come_and_go_at_run_time(vt: VirtualTime, make: object) -> None:
    dispatch = Dispatched()
    scheduler = make(dispatch, rng=FixedPhases(1.0, 2.0))  # type: ignore[operator]
    scheduler.start()
    scheduler.start()  # idempotent
    first, second = FakeProbe(), FakeProbe()
    scheduler.add_cell("a", [first])
    await vt.advance(10.0)
    scheduler.add_cell("b", [second])
    await vt.advance(10.0)
    assert (first.reads, second.reads) == (2, 1)
    with pytest.raises(ValueError, match="already probed"):
        scheduler.add_cell("a", [FakeProbe()])
    await scheduler.remove_cell("a")
    await scheduler.remove_cell("a")  # unknown now: ignored
    assert first.closed and not second.closed
    await vt.advance(30.0)
    assert (first.reads, second.reads) == (2, 4)
    assert list(scheduler.stats()) == [("b", "cgroup")]
    await scheduler.close()
    await scheduler.close()
    assert second.closed
    with pytest.raises(RuntimeError):
        scheduler.add_cell("c", [])


async def test_removing_a_cell_cancels_its_reading_in_progress(
    vt: VirtualTime, make: object
) -> None:
    dispatch = Dispatched()
    scheduler = make(dispatch, rng=FixedPhases(0.0))  # type: ignore[operator]
    hanging = FakeProbe(gate=asyncio.Event())
    scheduler.add_cell("a", [hanging])
    scheduler.start()
    await vt.advance(0.5)
    assert hanging.active == 1
    await scheduler.remove_cell("a")
    assert (hanging.active, hanging.cancelled, hanging.closed) == (0, 1, True)


def test_bad_settings_are_refused() -> None:
    for kwargs in ({"timeout_s": 11.0}, {"timeout_s": 0.0}, {"max_concurrency": 0}):
        with pytest.raises(ValueError):
            ProbeScheduler(Dispatched(), interval_s=10.0, **kwargs)  # type: ignore[arg-type]


def test_probes_for_builds_every_probe_the_cell_names() -> None:
    base = CellSpec(
        cell_id="c", run_id="r", spec_signature_hash="sha256:" + "0" * 64, vsock_uds_base="/x"
    )
    assert probes_for(base) == []
    full = CellSpec(
        cell_id="c",
        run_id="r",
        spec_signature_hash="sha256:" + "0" * 64,
        vsock_uds_base="/x",
        nft_family="inet",
        nft_table="cell_c",
        netns="/run/netns/c",
        cgroup_path="/sys/fs/cgroup/c",
        fc_api_socket="/run/fc.sock",
        fc_metrics_path="/run/fc.metrics",
        tap_iface="tap-c",
    )
    nft, cg, fc, tap = probes_for(full)
    assert isinstance(nft, NftablesProbe) and (nft.family, nft.table, nft.netns) == (
        "inet",
        "cell_c",
        "/run/netns/c",
    )
    assert isinstance(cg, CgroupProbe) and cg.path == "/sys/fs/cgroup/c"
    assert isinstance(fc, FcMetricsProbe)
    assert (fc.metrics_path, fc.api_socket) == ("/run/fc.metrics", "/run/fc.sock")
    assert isinstance(tap, TapLinkProbe) and tap.iface == "tap-c"
    # A socket without a metrics path, or a table without a family, is not enough.
    partial = CellSpec(
        cell_id="c",
        run_id="r",
        spec_signature_hash="sha256:" + "0" * 64,
        vsock_uds_base="/x",
        nft_table="t",
        fc_api_socket="/run/fc.sock",
    )
    assert probes_for(partial) == []


# --------------------------------------------------------------------------- real time


async def test_a_real_vmm_that_never_answers_is_cut_off(directory: str) -> None:
    """Real sockets, real time: a Firecracker API that accepts the flush and never
    answers; the reading is cut off (its connection closed) while another cell's probe
    keeps reading. Nothing here asserts how long anything took."""
    async with fake_vmm(directory) as stuck:
        stuck.hang = True
        dispatch = Dispatched()
        scheduler = ProbeScheduler(dispatch, interval_s=0.2, timeout_s=0.1)
        healthy = FakeProbe(name="tap_link")
        scheduler.add_cell("stuck", [FcMetricsProbe(stuck.metrics_path, stuck.api_socket)])
        scheduler.add_cell("healthy", [healthy])
        scheduler.start()
        try:

            async def cut_off() -> bool:
                return stuck.closed_unanswered.is_set()

            async def others_kept_reading() -> bool:
                return dispatch.cells().count("healthy") >= 3

            await until(cut_off, "the hanging API call to be abandoned")
            await until(others_kept_reading, "the healthy cell's readings")
            stats = scheduler.stats()
            assert stats[("stuck", "fc_metrics")].failures.get("timeout", 0) >= 1
            assert "stuck" not in dispatch.cells()
        finally:
            await scheduler.close()
