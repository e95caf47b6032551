"""The one small interface every host probe implements (SPEC 8), and what probes share.

A probe reads one source about one cell (nftables counters, cgroup files, Firecracker
metrics, TAP link state) and returns what it read as ``inputs`` (what was asked) and
``output`` (what came back). Probes know nothing of chains, signing or NATS: the daemon
stamps and seals their readings, so each probe is usable and testable alone::

    probe = TapLinkProbe("tap-cell-1")
    reading = await probe.read(ProbeContext(cell_id="cell-1"))

A probe is bound to its cell's targets when it is built (``probes_for`` in
``probes.scheduler`` builds every probe a cell names a target for), so one instance can
keep what must outlive a reading: the libnftables socket inside the cell's network
namespace, the open Firecracker metrics FIFO. ``close()`` releases it.

Every number a probe puts in ``output`` that the kernel or the VMM counts is a decimal
string (SPEC 4 "Numbers"): a 64-bit counter can exceed the ±(2^53 - 1) that every RFC 8785
implementation can canonicalize, and one rule for all counters is easier on consumers than
"strings only when large". Probes put no floats in ``output``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeVar

__all__ = [
    "FILE_READS",
    "PROBE_NAMES",
    "BlockingReader",
    "Io",
    "Parse",
    "PlatformUnsupported",
    "Probe",
    "ProbeContext",
    "ProbeError",
    "ProbeName",
    "ProbeReading",
    "is_decimal",
    "read_bounded",
]

ProbeName = Literal["nftables", "cgroup", "fc_metrics", "tap_link"]
PROBE_NAMES: Final[tuple[ProbeName, ...]] = ("nftables", "cgroup", "fc_metrics", "tap_link")

_T = TypeVar("_T")


class ProbeError(Exception):
    """Root of probe errors: a failing or missing source is counted, never fatal to a cell.

    The fields say what was being read so an operator can act without parsing the message:
    ``path`` (file, socket or namespace), ``command`` (what was asked of nft or the VMM),
    ``returncode`` (nft's return code or the VMM's HTTP status).
    """

    def __init__(
        self,
        probe: str,
        reason: str,
        *,
        path: str | None = None,
        command: str | None = None,
        returncode: int | None = None,
    ) -> None:
        self.probe = probe
        self.reason = reason
        self.path = path
        self.command = command
        self.returncode = returncode
        where = f" ({path})" if path is not None else ""
        super().__init__(f"probe {probe}{where}: {reason}")

    def fields(self) -> dict[str, object]:
        """The set fields, for a structured log line."""
        found: dict[str, object] = {"probe": self.probe, "reason": self.reason}
        for key in ("path", "command", "returncode"):
            value = getattr(self, key)
            if value is not None:
                found[key] = value
        return found


class PlatformUnsupported(ProbeError):  # noqa: N818 - the issue names the taxonomy
    """This host cannot take the reading at all (not Linux, no libnftables)."""


class Io(ProbeError):  # noqa: N818 - the issue names the taxonomy
    """The source is missing or could not be read (no table, cgroup, interface, socket)."""


class Parse(ProbeError):  # noqa: N818 - the issue names the taxonomy
    """The source answered with something that is not in its documented format."""


@dataclass(frozen=True, slots=True)
class ProbeContext:
    """What a probe is told about the cell at each reading.

    The cell's targets are bound into the probe itself (see the module docstring); the
    context names the cell so errors and logs can say whose reading failed.
    """

    cell_id: str


@dataclass(frozen=True, slots=True)
class ProbeReading:
    probe: ProbeName
    """The event kind: ``host.v1.<probe>``."""
    inputs: dict[str, Any]
    """What was asked (family and table, cgroup path, metrics path, interface)."""
    output: dict[str, Any]
    """What came back; counters as decimal strings."""

    @property
    def probe_source(self) -> str:
        """``probeSource`` of the event (SPEC 4): ``host.<probe>``."""
        return f"host.{self.probe}"


class Probe(Protocol):
    name: ProbeName

    async def read(self, ctx: ProbeContext) -> ProbeReading:
        """Take one reading; raise a :class:`ProbeError` subclass on failure.

        Cancelling the call (the scheduler's timeout) must leave the probe usable.
        """
        ...

    def close(self) -> None:
        """Release what the probe holds between readings; safe to call twice."""
        ...


def is_decimal(text: str) -> bool:
    """Whether ``text`` is an unsigned decimal counter as the kernel prints one.

    ``str.isdigit`` alone would also accept digits such as "²", which no consumer could
    read back as a number.
    """
    return text.isascii() and text.isdigit()


def read_bounded(fd: int, limit: int) -> bytes | None:
    """All of a pseudo-file, or None if it is longer than ``limit`` bytes.

    A seq_file may hand a large file out over several reads; every buffer is bounded.
    """
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
    return b"".join(chunks)


class BlockingReader:
    """Runs a probe's blocking reads on an executor thread, one at a time.

    Kernel pseudo-files (cgroupfs, sysfs) and netlink answer from memory but can wait on
    kernel locks, so the event loop never reads them itself. A thread cannot be
    cancelled: when the scheduler gives up on a reading the thread may still be inside
    the kernel, so the next reading of the same probe fails fast with :class:`Io` until
    the first returns, instead of piling up threads behind it. That is the bound on what
    a stuck source can hold: one worker per probe.
    """

    def __init__(self, probe: str, executor: concurrent.futures.Executor) -> None:
        self._probe = probe
        self._executor = executor
        self._busy = False

    async def run(self, fn: Callable[[], _T]) -> _T:
        if self._busy:
            raise Io(self._probe, "the previous reading has not returned yet")
        loop = asyncio.get_running_loop()
        self._busy = True
        try:
            future = self._executor.submit(fn)
        except RuntimeError as exc:  # executor shut down
            self._busy = False
            raise Io(self._probe, f"cannot start a reading: {exc}") from exc
        future.add_done_callback(lambda _: self._idle(loop))
        return await asyncio.wrap_future(future)

    def _idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the worker thread: hand the flag back to the loop's thread."""
        try:
            loop.call_soon_threadsafe(setattr, self, "_busy", False)
        except RuntimeError:  # the loop is closed: nobody will read the flag again
            self._busy = False


FILE_READS: Final = concurrent.futures.ThreadPoolExecutor(
    max_workers=4, thread_name_prefix="probe-read"
)
"""Shared by the file-reading probes (cgroup, tap_link). Its queue holds at most one job
per probe (see :class:`BlockingReader`); four workers keep one stuck file from stalling
the others."""
