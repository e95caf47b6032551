"""Real kernel objects for probe tests: namespaces, veth pairs, TAPs, cgroups, packets.

Every object gets a name unique to the test run and is removed in a ``finally``, so a
failing test leaves nothing behind. Packets only ever travel between namespaces these
helpers created (or over a TAP whose other end is the test itself): nothing leaves the
machine, and nothing is sent to the host's own addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import itertools
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

_COUNTER = itertools.count()
_CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")


def unique(prefix: str) -> str:
    """A short name (interfaces allow 15 bytes) unique to this process and call."""
    return f"{prefix}{os.getpid() % 10000}x{next(_COUNTER)}"


def run(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def nft(netns: str, ruleset: str) -> None:
    """Load ``ruleset`` with Debian's nft inside the named namespace."""
    run("ip", "netns", "exec", netns, "nft", "-f", "-", stdin=ruleset)


@contextlib.contextmanager
def netns(prefix: str = "cpt") -> Iterator[str]:
    """A named network namespace with loopback up; yields its name."""
    name = unique(prefix)
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        run("ip", "netns", "del", name)


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


def disable_ipv6(iface: str, ns: str | None = None) -> None:
    """No router solicitations or MLD reports: the only packets are the test's own."""
    key = f"net.ipv6.conf.{iface}.disable_ipv6=1"
    if ns is None:
        run("sysctl", "-qw", key)
    else:
        run("ip", "netns", "exec", ns, "sysctl", "-qw", key)


@contextlib.contextmanager
def veth_between(ns_a: str, ns_b: str, subnet: int) -> Iterator[tuple[str, str, str]]:
    """A veth pair from ``ns_a`` (10.254.<subnet>.1/30) to ``ns_b`` (.2/30), both up,
    IPv6 off; yields both addresses and ``ns_a``'s interface. The addresses exist only
    inside these two test namespaces."""
    a, b = unique("cpa"), unique("cpb")
    run("ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", b, "netns", ns_b)
    try:
        for ns, iface, host in ((ns_a, a, 1), (ns_b, b, 2)):
            disable_ipv6(iface, ns)
            run("ip", "-n", ns, "addr", "add", f"10.254.{subnet}.{host}/30", "dev", iface)
            run("ip", "-n", ns, "link", "set", iface, "up")
        yield f"10.254.{subnet}.1", f"10.254.{subnet}.2", a
    finally:
        with contextlib.suppress(RuntimeError):  # gone with its namespace already
            run("ip", "-n", ns_a, "link", "del", a)


def in_netns(ns: str, fn: Callable[[], socket.socket]) -> socket.socket:
    """Run ``fn`` (which creates a socket) on a thread inside ``ns``.

    A socket stays in the namespace it was created in, so the test can then use it from
    its own thread.
    """
    result: list[socket.socket | BaseException] = []

    def target() -> None:
        try:
            fd = os.open(netns_path(ns), os.O_RDONLY)
            try:
                if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            result.append(exc)

    # A thread that entered another namespace is thrown away with it, never reused.
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    (value,) = result
    if isinstance(value, BaseException):
        raise value
    return value


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    """An ICMP echo request (type 8) with a correct checksum."""
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    checksum = _checksum(header + payload)
    return struct.pack("!BBHHH", 8, 0, checksum, ident, seq) + payload


@contextlib.contextmanager
def tap(name: str | None = None) -> Iterator[str]:
    """A persistent TAP device in our namespace, IPv6 off, admin down; yields its name."""
    name = name or unique("cpt")
    run("ip", "tuntap", "add", "dev", name, "mode", "tap")
    try:
        disable_ipv6(name)
        yield name
    finally:
        with contextlib.suppress(RuntimeError):
            run("ip", "tuntap", "del", "dev", name, "mode", "tap")


_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


def attach_tap(name: str) -> int:
    """Open ``/dev/net/tun`` and attach to TAP ``name``, as Firecracker does: the link
    gets carrier while this descriptor is open. Returns the (non-blocking) descriptor."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def ethernet_frame(size: int) -> bytes:
    """A broadcast frame of the IEEE local experimental EtherType: no stack answers it."""
    header = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5"
    return header + b"\0" * (size - len(header))


@contextlib.contextmanager
def cgroup(prefix: str = "cpt") -> Iterator[Path]:
    """A child of the cgroup v2 root; every process in it is killed before removal."""
    path = CGROUP2_ROOT / unique(prefix)
    path.mkdir()
    try:
        yield path
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        _rmdir_when_empty(path)


def _rmdir_when_empty(path: Path) -> None:
    # A killed process leaves the cgroup only once the kernel has reaped it.
    for _ in range(10_000):
        try:
            path.rmdir()
            return
        except OSError:
            os.sched_yield()
    path.rmdir()


async def until(condition: Callable[[], Awaitable[bool]], what: str, limit_s: float = 30.0) -> None:
    """Wait for ``condition`` by re-checking it; the limit only turns a hang into a failure."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)
