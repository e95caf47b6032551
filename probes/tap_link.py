"""Link state and traffic counters of a cell's host-side TAP interface, from sysfs.

``/sys/class/net/<iface>/operstate`` and ``carrier`` say whether the guest's link is up;
``statistics/{rx,tx}_{packets,bytes,errors,dropped}`` count what crossed it (from the
host's side: ``rx`` is what the guest sent). ``output``::

    {"operstate": "up", "carrier": true,
     "rx": {"packets": "12", "bytes": "1284", "errors": "0", "dropped": "0"},
     "tx": {"packets": "10", "bytes": "980", "errors": "0", "dropped": "0"}}

``carrier`` is null while the interface is administratively down: the kernel refuses to
read it then (EINVAL), which is a state, not a failure. A missing interface is :class:`Io`.

sysfs shows the interfaces of the producer's own network namespace: the TAP must be
there (``cells[].tap_iface`` is the *host* TAP). A TAP moved into the cell's namespace
would need a netlink read from inside it, which this probe does not do.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Final

from probes.base import (
    FILE_READS,
    BlockingReader,
    Io,
    Parse,
    ProbeContext,
    ProbeName,
    ProbeReading,
    is_decimal,
    read_bounded,
)

__all__ = ["COUNTERS", "TapLinkProbe", "parse_carrier", "read_link"]

_PROBE: Final = "tap_link"
_SYS_NET: Final = "/sys/class/net"
_MAX_VALUE: Final = 64
COUNTERS: Final = ("packets", "bytes", "errors", "dropped")


def parse_carrier(text: str | None) -> bool | None:
    """``carrier``'s content (None: unreadable because the link is down) to a boolean."""
    if text is None:
        return None
    value = text.strip()
    if value not in ("0", "1"):
        raise Parse(_PROBE, f"carrier is {value[:20]!r}, not 0 or 1")
    return value == "1"


def parse_counter(text: str, name: str) -> str:
    value = text.strip()
    if not is_decimal(value):
        raise Parse(_PROBE, f"{name} is {value[:20]!r}, not a counter")
    return value


def read_link(iface: str) -> dict[str, Any]:
    """The probe's ``output`` for ``iface`` (blocking)."""
    path = f"{_SYS_NET}/{iface}"
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise Io(_PROBE, f"interface: {exc.strerror}", path=path) from exc
    try:
        operstate = _read(dir_fd, path, "operstate")
        if operstate is None:
            raise Io(_PROBE, "operstate: the link is being torn down", path=path)
        output: dict[str, Any] = {
            "operstate": operstate.strip(),
            "carrier": parse_carrier(_read(dir_fd, path, "carrier")),
        }
        for direction in ("rx", "tx"):
            counters: dict[str, str] = {}
            for counter in COUNTERS:
                name = f"statistics/{direction}_{counter}"
                text = _read(dir_fd, path, name)
                if text is None:
                    raise Io(_PROBE, f"{name}: unreadable", path=path)
                counters[counter] = parse_counter(text, name)
            output[direction] = counters
        return output
    finally:
        os.close(dir_fd)


def _read(dir_fd: int, path: str, name: str) -> str | None:
    """A sysfs attribute, or None where the kernel answers EINVAL (not valid right now)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            data = read_bounded(fd, _MAX_VALUE)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        # ENOENT/ENODEV here: the interface went away while we were reading it.
        raise Io(_PROBE, f"{name}: {exc.strerror}", path=f"{path}/{name}") from exc
    if data is None:
        raise Parse(_PROBE, f"{name} is longer than {_MAX_VALUE} bytes", path=f"{path}/{name}")
    return data.decode("ascii", errors="replace")


class TapLinkProbe:
    """Reads one cell's host-side network interface (a TAP, or a veth in tests)."""

    name: ProbeName = "tap_link"

    def __init__(self, iface: str) -> None:
        self.iface = iface
        self._reader = BlockingReader(_PROBE, FILE_READS)

    async def read(self, ctx: ProbeContext) -> ProbeReading:
        output = await self._reader.run(lambda: read_link(self.iface))
        return ProbeReading(self.name, {"iface": self.iface}, output)

    def close(self) -> None:
        """Nothing is held between readings."""
