"""A stand-in for Firecracker's API socket and metrics output, for the fc_metrics probe.

It answers ``PUT /actions {"action_type": "FlushMetrics"}`` the way Firecracker's
micro_http server does (``HTTP/1.1 204``, or ``400`` with a ``fault_message``) and, on a
flush, writes one metrics line to the metrics path, which it holds open the way
Firecracker does (read-write and non-blocking for a FIFO, so it never waits for a reader;
appending for a file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

METRICS_LINE = (Path(__file__).parents[1] / "fixtures" / "fc" / "metrics.json").read_bytes()
NO_CONTENT = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n"


class FakeVmm:
    def __init__(self, api_socket: str, metrics_path: str) -> None:
        self.api_socket = api_socket
        self.metrics_path = metrics_path
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.fault: str | None = None
        """When set, every call is answered 400 with this fault message."""
        self.hang = False
        """When set, requests are read and never answered."""
        self.closed_unanswered = asyncio.Event()
        """Set when a client hangs up on a request that was not answered."""
        self.flushes = 0
        self._server: asyncio.Server | None = None
        self._fd: int | None = None

    def write_metrics(self, line: bytes | None = None) -> None:
        """Write one metrics line, as a flush (or the 60-second timer) does."""
        if self._fd is None:
            mode = os.stat(self.metrics_path).st_mode
            flags = os.O_RDWR | os.O_NONBLOCK if stat.S_ISFIFO(mode) else os.O_WRONLY | os.O_APPEND
            self._fd = os.open(self.metrics_path, flags)
        self.flushes += 1
        if line is None:
            metrics = json.loads(METRICS_LINE)
            metrics["utc_timestamp_ms"] += self.flushes
            line = json.dumps(metrics, separators=(",", ":")).encode() + b"\n"
        os.write(self._fd, line)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                length = 0
                for line in head.decode().split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = json.loads(await reader.readexactly(length)) if length else {}
                self.requests.append((method, target, body))
                if self.hang:
                    await reader.read()  # until the client gives up
                    self.closed_unanswered.set()
                    return
                if self.fault is not None:
                    payload = json.dumps({"fault_message": self.fault}).encode()
                    writer.write(
                        b"HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n"
                        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(payload), payload)
                    )
                else:
                    if body.get("action_type") == "FlushMetrics":
                        self.write_metrics()
                    writer.write(NO_CONTENT)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> FakeVmm:
        self._server = await asyncio.start_unix_server(self._serve, path=self.api_socket)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        if self._fd is not None:
            os.close(self._fd)


@contextlib.asynccontextmanager
async def fake_vmm(directory: str, *, fifo: bool = True) -> AsyncIterator[FakeVmm]:
    """A fake VMM with its API socket and metrics FIFO (or file) under ``directory``."""
    metrics = f"{directory}/metrics.fifo" if fifo else f"{directory}/metrics.json"
    if fifo:
        os.mkfifo(metrics)
    else:
        Path(metrics).touch()
    async with FakeVmm(f"{directory}/api.sock", metrics) as vmm:
        yield vmm
