"""cgroup v2 accounting of a cell: memory, CPU, pids and I/O files of its cgroup directory.

Each file is parsed in the format the kernel documents for it
(Documentation/admin-guide/cgroup-v2.rst, "Interface Files"): *flat keyed* (``key value``
per line: ``memory.events``, ``cpu.stat``, ``pids.events``), *single value*
(``memory.current``, ``memory.peak``, ``pids.current``) and *nested keyed*
(``MAJ:MIN key=value ...`` per line: ``io.stat``). ``output`` maps each file read to its
value, every number a decimal string::

    {"cpu.stat": {"usage_usec": "1523", "user_usec": "1000", ...},
     "memory.current": "8441856",
     "io.stat": {"254:0": {"rbytes": "4096", "wbytes": "0", ...}},
     "absent": ["memory.peak"]}

A file the kernel does not provide (controller not enabled for the cgroup, or
``memory.peak`` before Linux 5.19) is listed under ``absent`` rather than failing the
reading: the files present are still worth having. A missing cgroup directory is an
:class:`Io` error: the cell's cgroup is gone, which is news.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
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

__all__ = ["FILES", "CgroupProbe", "parse_flat_keyed", "parse_nested_keyed", "parse_single"]

_PROBE: Final = "cgroup"
_MAX_FILE: Final = 64 * 1024
"""io.stat grows with the devices a cgroup touched; a few hundred bytes each."""


def parse_flat_keyed(text: str, name: str = "") -> dict[str, str]:
    """``key value`` lines (``cpu.stat``) to a map; :class:`Parse` on anything else."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not is_decimal(parts[1]):
            raise Parse(_PROBE, f"not a 'key value' line: {line[:80]!r}", path=name or None)
        values[parts[0]] = parts[1]
    return values


def parse_single(text: str, name: str = "") -> str:
    """A one-number file (``memory.current``) to its decimal string."""
    value = text.strip()
    if not is_decimal(value):
        raise Parse(_PROBE, f"not a number: {value[:80]!r}", path=name or None)
    return value


def parse_nested_keyed(text: str, name: str = "") -> dict[str, dict[str, str]]:
    """``MAJ:MIN key=value ...`` lines (``io.stat``) to a map of maps."""
    values: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        fields: dict[str, str] = {}
        for pair in parts[1:]:
            key, sep, value = pair.partition("=")
            if not sep or not is_decimal(value):
                raise Parse(_PROBE, f"not 'key=value': {pair[:80]!r}", path=name or None)
            fields[key] = value
        values[parts[0]] = fields
    return values


FILES: Final[dict[str, Callable[[str, str], Any]]] = {
    "memory.events": parse_flat_keyed,
    "memory.current": parse_single,
    "memory.peak": parse_single,
    "cpu.stat": parse_flat_keyed,
    "pids.events": parse_flat_keyed,
    "pids.current": parse_single,
    "io.stat": parse_nested_keyed,
}
"""What is read, in this order, and how each file is parsed."""


def read_cgroup(path: str) -> dict[str, Any]:
    """The probe's ``output`` for the cgroup directory ``path`` (blocking)."""
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise Io(_PROBE, f"cgroup directory: {exc.strerror}", path=path) from exc
    try:
        output: dict[str, Any] = {}
        absent: list[str] = []
        for name, parse in FILES.items():
            text = _read_at(dir_fd, path, name)
            if text is None:
                absent.append(name)
            else:
                output[name] = parse(text, f"{path}/{name}")
        output["absent"] = absent
        return output
    finally:
        os.close(dir_fd)


def _read_at(dir_fd: int, path: str, name: str) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Io(_PROBE, f"{name}: {exc.strerror}", path=f"{path}/{name}") from exc
    try:
        data = read_bounded(fd, _MAX_FILE)
    except OSError as exc:
        # ENODEV: the cgroup was removed between open and read.
        reason = "cgroup removed" if exc.errno == errno.ENODEV else exc.strerror
        raise Io(_PROBE, f"{name}: {reason}", path=f"{path}/{name}") from exc
    finally:
        os.close(fd)
    if data is None:
        raise Parse(_PROBE, f"{name} is larger than {_MAX_FILE} bytes", path=f"{path}/{name}")
    return data.decode("ascii", errors="replace")


class CgroupProbe:
    """Reads one cell's cgroup v2 directory."""

    name: ProbeName = "cgroup"

    def __init__(self, path: str) -> None:
        self.path = path
        self._reader = BlockingReader(_PROBE, FILE_READS)

    async def read(self, ctx: ProbeContext) -> ProbeReading:
        output = await self._reader.run(lambda: read_cgroup(self.path))
        return ProbeReading(self.name, {"path": self.path, "files": list(FILES)}, output)

    def close(self) -> None:
        """Nothing is held between readings."""
