"""Native AF_VSOCK transport, as far as a host without a guest can test it.

This machine can create and bind AF_VSOCK sockets but has no loopback transport
(vsock_loopback), so nothing can connect to them from the host itself. What is tested:
the producer really listens on AF_VSOCK when configured, and attribution by peer CID,
driving the accepting protocol with a transport that reports a guest's (cid, port) as its
peer, exactly what the kernel reports for an accepted vsock connection.
"""

from __future__ import annotations

import asyncio
import random
import socket
from typing import Any

import pytest

from producer.guest.listener import VsockRouter
from producer.guest.simulator import frames
from producer.guest.wire import encode_frame
from producer.ops.embedded import EmbeddedNats
from tests.support import cell_spec, eventually, running_producer

pytestmark = pytest.mark.skipif(
    not VsockRouter.available(), reason="this Python has no AF_VSOCK (not a Linux build)"
)


class _PeerTransport(asyncio.Transport):
    """Wraps a real transport but reports a vsock peer address."""

    def __init__(self, inner: asyncio.Transport, peer: tuple[int, int]) -> None:
        super().__init__()
        self._inner = inner
        self._peer = peer
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else self._inner.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self.aborted = True
        self._inner.abort()


async def _transport() -> asyncio.Transport:
    a, b = socket.socketpair()
    b.close()
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, a)
    assert isinstance(transport, asyncio.Transport)
    return transport


async def test_vsock_frames_are_attributed_by_peer_cid(nats_server: EmbeddedNats) -> None:
    port = random.randint(20_000, 60_000)
    async with running_producer(
        nats_server.url, cells=0, listener={"vsock": True, "vsock_port": port}
    ) as (p, _, base):
        assert p.registry is not None and p.vsock is not None
        # The producer really listens: binding the same vsock port again must fail.
        probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        with pytest.raises(OSError):
            probe.bind((socket.VMADDR_CID_ANY, port))
        probe.close()

        cell_a = await p.registry.register(cell_spec(base, 1, vsock_cid=42))
        cell_b = await p.registry.register(cell_spec(base, 2, vsock_cid=43))
        data = b"".join(encode_frame(d) for d, _ in zip(frames(1), range(5), strict=False))

        proto = p.vsock._route()
        proto.connection_made(_PeerTransport(await _transport(), (42, 1025)))
        proto.data_received(data)
        await eventually(lambda: cell_a.counters.accepted == 5)
        assert cell_b.counters.accepted == 0

        stranger = _PeerTransport(await _transport(), (99, 1025))
        other = p.vsock._route()
        other.connection_made(stranger)
        other.data_received(data)
        assert stranger.aborted
        assert p.vsock.unknown_peers == 1
        assert cell_a.counters.accepted == 5 and cell_b.counters.accepted == 0

        await p.registry.deregister("cell-1")
        assert 42 not in p.vsock.by_cid
