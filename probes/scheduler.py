"""Runs every cell's probes on a tick and hands each reading to the daemon (SPEC 8).

Isolation is the point of the design: each probe of each cell is its own task on its own
phase, so a probe that is slow or hangs holds up nothing but itself.

- **Phase.** A probe's first reading is at a random offset within the first interval,
  then every ``interval_s`` on that phase (fixed rate, no drift), so 200 cells do not
  all read at the same instant.
- **Timeout.** A reading still running after ``timeout_s`` is cancelled and counted as a
  ``timeout`` failure; the probe's next reading is at its next tick as usual. Ticks
  that passed while a reading ran late are skipped and counted as ``missed``, never
  run in a burst to catch up.
- **Concurrency.** At most ``max_concurrency`` readings are in progress at once over
  all cells (a semaphore); a reading waits for a slot, not for another probe. Since
  every reading ends by its timeout, a slot is never held longer than ``timeout_s``.
- **Dispatch.** A reading is handed to ``dispatch(cell_id, reading)`` as soon as it
  completes: the daemon stamps ``hostReceivedAt`` there (SPEC 8). ``False`` is
  backpressure: the reading is dropped and counted as ``skipped``.
- **Failures** are counted per cell and probe by kind (``timeout``, ``io``, ``parse``,
  ``unsupported``, ``error`` for an unexpected exception, ``dispatch`` when the
  callback raised) and logged once per change of state: ``probe_failing`` on the first
  failure after success, ``probe_recovered`` on the first success after failures.
  Nothing a probe does stops the scheduler or the cell.

- **Pause.** While paused (:meth:`ProbeScheduler.pause`), a tick that comes due reads
  nothing and counts as ``missed``; readings in progress finish. For a maintenance window,
  or to measure what probing costs by toggling it under load (``bench/e2e.py
  --probe-ab``).

Clock and sleep are injected so tests drive ticks and timeouts without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

from probes.base import (
    Io,
    Parse,
    PlatformUnsupported,
    Probe,
    ProbeContext,
    ProbeError,
    ProbeName,
    ProbeReading,
)
from probes.cgroup import CgroupProbe
from probes.fc_metrics import FcMetricsProbe
from probes.nftables import NftablesProbe
from probes.tap_link import TapLinkProbe
from producer.aio import cancel_and_wait
from producer.ops.logs import event, get_logger
from producer.stats import Histogram

__all__ = ["Dispatch", "ProbeScheduler", "ProbeStats", "ProbeTargets", "probes_for"]

Dispatch = Callable[[str, ProbeReading], Awaitable[bool]]
"""``dispatch(cell_id, reading) -> accepted``; False means backpressure."""

_LOG: Final = get_logger(__name__)
DURATION_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_KINDS: Final[tuple[tuple[type[ProbeError], str], ...]] = (
    (PlatformUnsupported, "unsupported"),
    (Io, "io"),
    (Parse, "parse"),
)


class ProbeTargets(Protocol):
    """What a cell registration says about where to probe (``CellSpec`` is one)."""

    @property
    def nft_family(self) -> str | None: ...
    @property
    def nft_table(self) -> str | None: ...
    @property
    def netns(self) -> str | None: ...
    @property
    def cgroup_path(self) -> str | None: ...
    @property
    def fc_api_socket(self) -> str | None: ...
    @property
    def fc_metrics_path(self) -> str | None: ...
    @property
    def tap_iface(self) -> str | None: ...


def probes_for(targets: ProbeTargets) -> list[Probe]:
    """Every probe the cell names a target for.

    An API socket without a metrics path yields no Firecracker probe: flushing metrics
    nobody reads would only lose them.
    """
    found: list[Probe] = []
    if targets.nft_family is not None and targets.nft_table is not None:
        found.append(NftablesProbe(targets.nft_family, targets.nft_table, targets.netns))
    if targets.cgroup_path is not None:
        found.append(CgroupProbe(targets.cgroup_path))
    if targets.fc_metrics_path is not None:
        found.append(FcMetricsProbe(targets.fc_metrics_path, targets.fc_api_socket))
    if targets.tap_iface is not None:
        found.append(TapLinkProbe(targets.tap_iface))
    return found


@dataclass(slots=True)
class ProbeStats:
    """Counters of one probe of one cell since it was added."""

    readings: int = 0
    """Readings taken and accepted by dispatch."""
    skipped: int = 0
    """Readings taken but refused by dispatch (backpressure)."""
    missed: int = 0
    """Ticks that passed while a reading ran late; not run."""
    failures: dict[str, int] = field(default_factory=dict)
    """Failed readings by kind."""
    consecutive_failures: int = 0
    """Failed readings since the last success; non-zero while the probe is failing."""
    duration: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS_S))
    """How long readings took, whatever their outcome (a timeout counts its full wait)."""


class _ReadTimedOutError(Exception):
    """A reading outlived ``timeout_s`` (distinct from any TimeoutError a probe raises)."""


class ProbeScheduler:
    """Owns the probes of every cell added to it; see the module docstring."""

    def __init__(
        self,
        dispatch: Dispatch,
        *,
        interval_s: float = 10.0,
        timeout_s: float = 5.0,
        max_concurrency: int = 16,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        logger: logging.Logger = _LOG,
    ) -> None:
        if not 0 < timeout_s <= interval_s or max_concurrency < 1:
            raise ValueError("need 0 < timeout_s <= interval_s and max_concurrency >= 1")
        self._dispatch = dispatch
        self._interval = interval_s
        self._timeout = timeout_s
        self._slots = asyncio.Semaphore(max_concurrency)
        self._clock = clock
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._log = logger
        self._cells: dict[str, list[Probe]] = {}
        self._stats: dict[tuple[str, ProbeName], ProbeStats] = {}
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._started = False
        self._closed = False
        self._paused = False

    # ------------------------------------------------------------------ lifecycle

    def add_cell(self, cell_id: str, probes: Sequence[Probe]) -> None:
        """Start probing ``cell_id`` (at :meth:`start`, or now if started)."""
        if self._closed:
            raise RuntimeError("the probe scheduler is closed")
        if cell_id in self._cells:
            raise ValueError(f"cell {cell_id!r} is already probed")
        names = [probe.name for probe in probes]
        if len(set(names)) != len(names):
            raise ValueError(f"cell {cell_id!r}: one probe of each kind, got {names}")
        self._cells[cell_id] = list(probes)
        for probe in probes:
            self._stats[(cell_id, probe.name)] = ProbeStats()
        if self._started:
            self._spawn(cell_id)

    async def remove_cell(self, cell_id: str) -> None:
        """Stop probing ``cell_id`` and release its probes; unknown ids are ignored."""
        probes = self._cells.pop(cell_id, None)
        if probes is None:
            return
        await cancel_and_wait(*self._tasks.pop(cell_id, []))
        for probe in probes:
            del self._stats[(cell_id, probe.name)]
            probe.close()

    def start(self) -> None:
        """Start every added cell's probes; call from the running loop. Idempotent."""
        if self._closed:
            raise RuntimeError("the probe scheduler is closed")
        if not self._started:
            self._started = True
            for cell_id in self._cells:
                self._spawn(cell_id)

    async def close(self) -> None:
        """Stop everything and release every probe. Idempotent; final."""
        self._closed = True
        for cell_id in list(self._cells):
            await self.remove_cell(cell_id)

    def pause(self) -> None:
        """Take no reading until :meth:`resume`; the ticks keep their phases."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def stats(self) -> dict[tuple[str, ProbeName], ProbeStats]:
        """A copy of every (cell, probe)'s counters, for periodic stats logging."""
        return {
            key: replace(value, failures=dict(value.failures)) for key, value in self._stats.items()
        }

    # ------------------------------------------------------------------ per probe

    def _spawn(self, cell_id: str) -> None:
        self._tasks[cell_id] = [
            asyncio.create_task(self._run(cell_id, probe), name=f"probe:{cell_id}:{probe.name}")
            for probe in self._cells[cell_id]
        ]

    async def _run(self, cell_id: str, probe: Probe) -> None:
        ctx = ProbeContext(cell_id=cell_id)
        stats = self._stats[(cell_id, probe.name)]
        first = self._clock() + self._rng.uniform(0.0, self._interval)
        tick = 0
        while True:
            delay = first + tick * self._interval - self._clock()
            if delay > 0:
                await self._sleep(delay)
            await self._take(ctx, probe, stats)
            # The next tick still ahead of us; any that already passed are missed.
            ahead = math.floor((self._clock() - first) / self._interval) + 1
            stats.missed += max(ahead - tick - 1, 0)
            tick = max(ahead, tick + 1)

    async def _take(self, ctx: ProbeContext, probe: Probe, stats: ProbeStats) -> None:
        if self._paused:
            stats.missed += 1
            return
        async with self._slots:
            started = self._clock()
            try:
                reading = await self._bounded(probe.read(ctx))
            except _ReadTimedOutError:
                self._failed(ctx, probe, stats, "timeout", {"timeout_s": self._timeout})
                return
            except ProbeError as exc:
                kind = next((k for cls, k in _KINDS if isinstance(exc, cls)), "error")
                self._failed(ctx, probe, stats, kind, exc.fields())
                return
            except Exception as exc:
                self._failed(ctx, probe, stats, "error", {"error": repr(exc)})
                return
            finally:
                stats.duration.observe(self._clock() - started)
        try:
            accepted = await self._dispatch(ctx.cell_id, reading)
        except Exception as exc:
            self._failed(ctx, probe, stats, "dispatch", {"error": repr(exc)})
            return
        self._succeeded(ctx, probe, stats)
        if accepted:
            stats.readings += 1
        else:
            stats.skipped += 1

    async def _bounded(self, read: Coroutine[Any, Any, ProbeReading]) -> ProbeReading:
        """``read``'s result, or :class:`_ReadTimedOutError` once the injected sleep of
        ``timeout_s`` ends first; either way ``read`` has finished when this returns.

        ``asyncio.wait`` is used to wait for the cancelled reading to unwind because it
        does not raise that reading's CancelledError: a cancellation of *this* task
        arriving meanwhile still propagates instead of being swallowed.
        """
        reading = asyncio.ensure_future(read)
        timer = asyncio.ensure_future(self._sleep(self._timeout))
        try:
            await asyncio.wait((reading, timer), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            reading.cancel()
            timer.cancel()
            await asyncio.wait((reading, timer))
            raise
        timer.cancel()
        if not reading.done():
            reading.cancel()
            await asyncio.wait((reading,))
        if reading.cancelled():
            raise _ReadTimedOutError
        return reading.result()

    def _failed(
        self,
        ctx: ProbeContext,
        probe: Probe,
        stats: ProbeStats,
        kind: str,
        fields: dict[str, object],
    ) -> None:
        stats.failures[kind] = stats.failures.get(kind, 0) + 1
        stats.consecutive_failures += 1
        if stats.consecutive_failures == 1:
            details = {k: v for k, v in fields.items() if k != "probe"}
            event(
                self._log,
                logging.WARNING,
                "probe_failing",
                cell_id=ctx.cell_id,
                probe=probe.name,
                kind=kind,
                **details,
            )

    def _succeeded(self, ctx: ProbeContext, probe: Probe, stats: ProbeStats) -> None:
        if stats.consecutive_failures:
            event(
                self._log,
                logging.INFO,
                "probe_recovered",
                cell_id=ctx.cell_id,
                probe=probe.name,
                failed_readings=stats.consecutive_failures,
            )
            stats.consecutive_failures = 0
