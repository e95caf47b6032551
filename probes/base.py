"""The one small interface every host probe implements (SPEC 8).

A probe reads one source about one cell (nftables counters, cgroup files, Firecracker
metrics, TAP link state) and returns what it read as ``inputs`` (what was asked) and
``output`` (what came back). Probes know nothing of chains, signing or NATS: the daemon
stamps and seals their readings, so each probe is usable and testable alone.

This release ships the interface only; no probe is wired into the daemon yet, and the
daemon does not claim to run any.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class ProbeError(Exception):
    """Root of probe errors: a failing or missing source is counted, never fatal to a cell."""

    def __init__(self, probe: str, reason: str) -> None:
        self.probe = probe
        self.reason = reason
        super().__init__(f"probe {probe}: {reason}")


class SourceMissingError(ProbeError):
    """The thing to read does not exist (no such table, cgroup, socket or interface)."""


class SourceFailedError(ProbeError):
    """The source exists but reading or parsing it failed."""


@dataclass(frozen=True, slots=True)
class ProbeReading:
    probe: str
    """``nftables`` | ``cgroup`` | ``fc_metrics`` | ``tap_link``: the event kind."""
    inputs: dict[str, Any]
    output: dict[str, Any]


class HostProbe(Protocol):
    name: str

    async def read(self) -> ProbeReading:
        """Take one reading; raise a :class:`ProbeError` subclass on failure."""
        ...
