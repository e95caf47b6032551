"""Per-cell guest listeners (SPEC 2): the Firecracker vsock Unix socket and native AF_VSOCK.

Attribution is decided here and only here: a connection is tied to the cell whose socket
accepted it (or, for AF_VSOCK, whose CID the kernel reports for the peer), and every frame
read from it is handed to that cell's :class:`FrameHandler`. Nothing in the bytes can move
a frame to another cell.

Each connection owns one :class:`~producer.wire.FrameReader`, so its memory is bounded by
one frame plus the transport's read buffer; a framing error closes that connection only.
Backpressure is explicit: a handler that cannot take more frames pauses reading on every
connection of its cell until it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import Final, Protocol, cast

from producer.errors import RegistrationError
from producer.guest.wire import BodyError, FrameReader, FramingError
from schemas.wire import Declaration

log = logging.getLogger(__name__)

READ_SIZE: Final = 8 * 1024
"""Bytes read from one guest connection per event-loop turn (about 75 frames). With 16 KiB
a turn over 16 busy cells sealed some 2,000 frames (about 45 ms) while PubAcks, sends and
fsync completions waited for the next turn, so reading and publishing ran in alternating
bursts; 8 KiB measured best in make bench (4 KiB spent more on turns)."""


class FrameHandler(Protocol):
    """What a listener feeds: one cell's frame outcomes and connection accounting."""

    cell_id: str

    def on_outcomes(self, outcomes: list[Declaration | BodyError]) -> bool:
        """Take decoded frames and body errors; False asks the listener to pause reading."""
        ...

    def on_framing_error(self, error: FramingError) -> None: ...

    def on_connection(self, opened: bool) -> None: ...


class GuestConnection(asyncio.Protocol):
    """One guest connection: bytes in, frame outcomes out, closed on a framing error."""

    def __init__(self, listener: CellListener) -> None:
        self._listener = listener
        self._handler = listener.handler
        self._reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self._dead = False
        self.partial_since: float | None = None
        """Loop time the incomplete frame now buffered began (None: between frames)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = self.transport = cast(asyncio.Transport, transport)
        if hasattr(transport, "max_size"):
            # asyncio's selector transport reads up to 256 KiB per turn: ~2,000 frames sealed
            # in one go, a loop turn of tens of ms per busy connection. Smaller reads keep
            # every turn short, so acks, timers and other cells are served in between.
            transport.max_size = READ_SIZE
        if not self._listener.admit(self):
            self._dead = True
            transport.abort()
            return
        self._handler.on_connection(True)
        if self._listener.paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self._dead:
            return
        try:
            outcomes = self._reader.feed(data)
        except FramingError as exc:
            self._fail(exc)
            return
        if not self._reader.buffered:
            self.partial_since = None
        elif outcomes or self.partial_since is None:
            self.partial_since = self._listener.now()
        if outcomes and not self._handler.on_outcomes(outcomes):
            self._listener.pause()

    def expire(self) -> None:
        """The incomplete frame outlived the frame deadline: close this connection."""
        self._dead = True
        self.partial_since = None
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool | None:
        if not self._dead:
            try:
                self._reader.eof()
            except FramingError as exc:
                self._fail(exc)
        return None  # let the transport close itself

    def _fail(self, exc: FramingError) -> None:
        self._dead = True
        pending = getattr(exc, "outcomes", None)
        if pending:
            self._handler.on_outcomes(pending)
        self._handler.on_framing_error(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._listener.forget(self):
            self._handler.on_connection(False)


class CellListener:
    """Owns one cell's accepted connections, their limit and their pause state."""

    def __init__(self, handler: FrameHandler, *, max_connections: int) -> None:
        self.handler = handler
        self.max_connections = max_connections
        self.connections: set[GuestConnection] = set()
        self.refused = 0
        self.expired = 0
        self.paused = False
        self.closed = False
        self._server: asyncio.AbstractServer | None = None

    def admit(self, conn: GuestConnection) -> bool:
        if self.closed:
            return False  # accepted in the instant before close(): the cell is sealing
        if len(self.connections) >= self.max_connections:
            self.refused += 1  # logged with counts by the cell, not once per connection
            return False
        self.connections.add(conn)
        return True

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def expire_slow(self, timeout_s: float) -> int:
        """Close every connection whose incomplete frame began more than ``timeout_s``
        ago (a guest trickling bytes to hold a slot); how many were closed. Not while
        reading is paused: a frame we hold unread is our delay, not the guest's."""
        if self.paused:
            return 0
        cutoff = self.now() - timeout_s
        slow = [
            c for c in self.connections if c.partial_since is not None and c.partial_since < cutoff
        ]
        for conn in slow:
            conn.expire()
        self.expired += len(slow)
        return len(slow)

    def forget(self, conn: GuestConnection) -> bool:
        if conn in self.connections:
            self.connections.discard(conn)
            return True
        return False

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            for conn in self.connections:
                if conn.transport is not None:
                    conn.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            now = self.now()
            for conn in self.connections:
                if conn.partial_since is not None:
                    conn.partial_since = now  # its deadline runs from when we read again
                if conn.transport is not None and not conn.transport.is_closing():
                    conn.transport.resume_reading()

    def protocol_factory(self) -> Callable[[], GuestConnection]:
        return lambda: GuestConnection(self)

    def attach(self, server: asyncio.AbstractServer) -> None:
        self._server = server

    async def close(self) -> None:
        """Stop accepting, close open connections (their frames already delivered)."""
        self.closed = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None


def bind_unix_socket(path: str, *, mode: int, cell_id: str) -> socket.socket:
    """Bind and listen on ``path`` synchronously, so the socket exists before the VM boots.

    A stale socket file left by a previous run is replaced; any other kind of file is
    refused rather than deleted. The socket is created under a restrictive umask and then
    set to exactly ``mode``, so it is never reachable more widely than configured.
    """
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise RegistrationError(
            cell_id, f"socket directory {parent} does not exist", field="vsock_uds_base"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise RegistrationError(
                cell_id,
                f"{path} exists and is not a socket; not replacing",
                field="vsock_uds_base",
                conflict=True,
            )
        if _someone_listens(path):
            raise RegistrationError(
                cell_id,
                f"{path} is in use by a live listener",
                field="vsock_uds_base",
                conflict=True,
            )
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise RegistrationError(
            cell_id, f"cannot bind {path}: {exc.strerror}", field="vsock_uds_base"
        ) from exc
    finally:
        os.umask(old_umask)
    return sock


def _someone_listens(path: str) -> bool:
    """A socket file is stale only if nobody accepts on it (its owner died)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


async def serve_unix(listener: CellListener, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(listener.protocol_factory(), sock=sock)
    listener.attach(server)


class VsockRouter:
    """Native AF_VSOCK transport: one host listening socket for all cells, attributed by the
    peer's CID as the kernel reports it (QEMU/vhost-vsock hosts)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.by_cid: dict[int, CellListener] = {}
        self.unknown_peers = 0
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None

    @staticmethod
    def available() -> bool:
        return hasattr(socket, "AF_VSOCK")

    async def start(self) -> None:
        if not self.available():
            raise OSError("AF_VSOCK is not supported by this Python/kernel")
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.bind((socket.VMADDR_CID_ANY, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._route, sock=sock)

    def _route(self) -> asyncio.Protocol:
        return _VsockDispatch(self)

    def listener_for(self, peer_cid: int) -> CellListener | None:
        found = self.by_cid.get(peer_cid)
        if found is None:
            self.unknown_peers += 1
        return found

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None


class _VsockDispatch(asyncio.Protocol):
    """Picks the cell from the peer CID at accept time, then behaves as a GuestConnection."""

    def __init__(self, router: VsockRouter) -> None:
        self._router = router
        self._inner: GuestConnection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        cid = peer[0] if isinstance(peer, tuple) and peer else None
        listener = self._router.listener_for(cid) if isinstance(cid, int) else None
        if listener is None:
            log.warning("vsock_unknown_peer", extra={"fields": {"peer": repr(peer)}})
            cast(asyncio.Transport, transport).abort()
            return
        self._inner = GuestConnection(listener)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._inner.connection_lost(exc)
