"""Firecracker VMM metrics of a cell: the latest object the VMM wrote to its metrics path.

Firecracker writes its metrics as one JSON object per line to the file or named pipe
given by ``--metrics-path`` / ``PUT /metrics``, every 60 seconds and whenever it is asked
with ``PUT /actions {"action_type": "FlushMetrics"}`` on its API socket. Most of its
counters are *deltas since the previous flush*. So, when the cell names an API socket,
each reading first asks the VMM to flush: the object that then arrives covers exactly the
time since the previous reading.

The probe keeps the metrics path open between readings and reads it without blocking
(an empty FIFO must not hang a reading): a partial line stays buffered (bounded) until
its newline arrives, and of the complete objects that arrived since the last reading
only the latest is reported. ``discarded`` counts the others, so that a lost delta (the
VMM's own 60-second flush landing between two readings) is visible rather than silent.
A regular file is read from its end as it was when the probe first opened it, and from
the start again if it is truncated.

``output``::

    {"metrics": {"utc_timestamp_ms": "1764583200123",
                 "net_eth0": {"rx_bytes_count": "1284", ...}, ...},
     "discarded": 0}

``metrics`` is the VMM's object with every number as a decimal string (SPEC 4: they are
u64 counters, and timestamps in ms); strings, booleans and nesting are kept. It is null
when the VMM wrote nothing new since the last reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from typing import Any, Final

import msgspec

from probes.base import Io, Parse, ProbeContext, ProbeName, ProbeReading

__all__ = [
    "FcMetricsProbe",
    "LatestLine",
    "flush_metrics",
    "parse_metrics",
    "parse_response_head",
    "stringify_numbers",
]

_PROBE: Final = "fc_metrics"
MAX_LINE: Final = 256 * 1024
"""A Firecracker metrics object is a few KiB; a line longer than this is not one."""
_READ_CHUNK: Final = 64 * 1024
_MAX_READ: Final = 4 * MAX_LINE
"""Most bytes taken from the path per reading; the rest waits for the next one."""
_MAX_HEAD: Final = 16 * 1024
_MAX_BODY: Final = 64 * 1024
_FLUSH_BODY: Final = b'{"action_type": "FlushMetrics"}'


def stringify_numbers(value: Any) -> Any:
    """``value`` with every JSON number as a decimal string (SPEC 4), the rest unchanged."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {key: stringify_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [stringify_numbers(item) for item in value]
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def parse_metrics(line: bytes) -> dict[str, Any]:
    """One metrics line to ``output["metrics"]``; :class:`Parse` if it is not an object."""
    try:
        value = msgspec.json.decode(line)
    except msgspec.DecodeError as exc:
        raise Parse(_PROBE, f"metrics line is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise Parse(_PROBE, f"metrics line is a JSON {type(value).__name__}, not an object")
    converted: dict[str, Any] = stringify_numbers(value)
    return converted


class LatestLine:
    """Splits a byte stream into lines, keeping only the latest complete one (pure).

    Memory is bounded by :data:`MAX_LINE`: a partial line that grows past it is dropped
    up to its next newline and reported once, as :class:`Parse`, by :meth:`take`.
    """

    def __init__(self) -> None:
        self._partial = bytearray()
        self._latest: bytes | None = None
        self._complete = 0
        self._overlong = False
        self._skipping = False

    def feed(self, data: bytes) -> None:
        *lines, tail = data.split(b"\n")
        for line in lines:
            if self._skipping:
                self._skipping = False
                self._partial.clear()
                continue
            self._partial += line
            if len(self._partial) > MAX_LINE:
                self._overlong = True
            elif self._partial.strip():
                self._latest = bytes(self._partial)
                self._complete += 1
            self._partial.clear()
        if not self._skipping:
            self._partial += tail
            if len(self._partial) > MAX_LINE:
                self._overlong = True
                self._skipping = True
                self._partial.clear()

    def take(self) -> tuple[bytes | None, int]:
        """The latest complete line since the last call, and how many others came."""
        latest, complete = self._latest, self._complete
        overlong = self._overlong
        self._latest, self._complete, self._overlong = None, 0, False
        if overlong:
            raise Parse(_PROBE, f"a metrics line is longer than {MAX_LINE} bytes")
        return latest, max(complete - 1, 0)


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """An HTTP/1.x status line and headers (up to the blank line) to (status, headers)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise Parse(_PROBE, f"not an HTTP response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def flush_metrics(api_socket: str) -> None:
    """Ask the Firecracker VMM behind ``api_socket`` to write its metrics now.

    Raises :class:`Io` when the socket cannot be reached or the VMM answers with an
    error (``returncode`` is the HTTP status, ``reason`` its ``fault_message``).
    """
    command = "PUT /actions FlushMetrics"
    try:
        reader, writer = await asyncio.open_unix_connection(api_socket, limit=_MAX_HEAD)
    except OSError as exc:
        raise Io(_PROBE, f"API socket: {exc.strerror or exc}", path=api_socket) from exc
    try:
        writer.write(
            b"PUT /actions HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(_FLUSH_BODY), _FLUSH_BODY)
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers = parse_response_head(head[:-4])
        length = headers.get("content-length", "0")
        size = int(length) if length.isdigit() else 0
        body = await reader.readexactly(min(size, _MAX_BODY)) if size else b""
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise Io(_PROBE, f"API call failed: {exc}", path=api_socket, command=command) from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not 200 <= status < 300:
        raise Io(_PROBE, _fault(body), path=api_socket, command=command, returncode=status)


def _fault(body: bytes) -> str:
    try:
        message = msgspec.json.decode(body).get("fault_message")
    except (msgspec.DecodeError, AttributeError):
        message = None
    return str(message) if message else body[:200].decode(errors="replace") or "HTTP error"


class _MetricsPath:
    """The held-open metrics file or FIFO, read without blocking."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._regular = False
        self.lines = LatestLine()

    def drain(self) -> None:
        """Feed what the VMM wrote since the last call (up to a bound) into :attr:`lines`."""
        fd = self._open()
        if self._regular and os.fstat(fd).st_size < os.lseek(fd, 0, os.SEEK_CUR):
            os.lseek(fd, 0, os.SEEK_SET)  # truncated: the writer started over
        taken = 0
        while taken < _MAX_READ:
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                return  # FIFO empty, writer still attached
            except OSError as exc:
                self.close()
                raise Io(_PROBE, f"metrics: {exc.strerror}", path=self.path) from exc
            if not chunk:
                return  # end of file, or a FIFO with no writer
            taken += len(chunk)
            self.lines.feed(chunk)

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise Io(_PROBE, f"metrics: {exc.strerror}", path=self.path) from exc
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
            os.close(fd)
            raise Io(_PROBE, "metrics path is neither a FIFO nor a file", path=self.path)
        self._regular = stat.S_ISREG(mode)
        if self._regular:
            os.lseek(fd, 0, os.SEEK_END)  # what is already there was written before us
        self._fd = fd
        return fd

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class FcMetricsProbe:
    """Reads one cell's Firecracker metrics, flushing them first when it can."""

    name: ProbeName = "fc_metrics"

    def __init__(self, metrics_path: str, api_socket: str | None = None) -> None:
        self.metrics_path = metrics_path
        self.api_socket = api_socket
        self._source = _MetricsPath(metrics_path)

    async def read(self, ctx: ProbeContext) -> ProbeReading:
        # Drain before the flush: a file is opened (at its end) and a FIFO emptied first,
        # so the VMM's write of the flushed object finds room in the pipe.
        self._source.drain()
        if self.api_socket is not None:
            await flush_metrics(self.api_socket)
            self._source.drain()
        line, discarded = self._source.lines.take()
        inputs = {"metricsPath": self.metrics_path, "apiSocket": self.api_socket}
        output = {
            "metrics": parse_metrics(line) if line is not None else None,
            "discarded": discarded,
        }
        return ProbeReading(self.name, inputs, output)

    def close(self) -> None:
        self._source.close()
