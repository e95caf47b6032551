"""Stamping and CloudEvent construction (SPEC 3, 4, 6): pure, no clocks, no I/O.

Everything that attributes an event (cell, run, spec hash, host time) comes from the
:class:`ChainContext` built at registration and from the timestamp the caller passes in,
never from guest bytes: a guest can only choose the values of the five declaration fields.
Events are plain dicts on the hot path; ``schemas.events`` holds their contract.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from audit.message import STRUCTURED_CONTENT_TYPE, binary_headers
from schemas.events import CHAIN_TYPE, GUEST_TYPE, HOST_TYPE
from schemas.wire import PROBE_SOURCES, Declaration


class Rfc3339Clock:
    """Formats host wall-clock readings, caching the per-second prefix: the hot path stamps
    every frame and ``strftime`` per event would be a measurable share of it."""

    __slots__ = ("_prefix", "_second", "_wall_ns")

    def __init__(self, wall_ns: Any = time.time_ns) -> None:
        self._wall_ns = wall_ns
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        secs, ns = divmod(self._wall_ns(), 1_000_000_000)
        if secs != self._second:
            self._second = secs
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(secs))
        return f"{self._prefix}{ns // 1000:06d}Z"


@dataclass(frozen=True, slots=True)
class ChainContext:
    """What the host knows about one chain (one registration of a cell)."""

    host_id: str
    cell_id: str
    run_id: str
    spec_signature_hash: str
    chain_id: str
    subject_prefix: str
    source: str = field(init=False)
    subject_base: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", f"urn:cellos:host:{self.host_id}")
        object.__setattr__(self, "subject_base", f"{self.subject_prefix}.{self.cell_id}")

    def stamped(self, at: str) -> dict[str, Any]:
        """The four fields every ``data`` carries (SPEC 3)."""
        return {
            "cellId": self.cell_id,
            "runId": self.run_id,
            "specSignatureHash": self.spec_signature_hash,
            "hostReceivedAt": at,
        }

    def envelope(self, type_: str, at: str, data: dict[str, Any]) -> dict[str, Any]:
        """A CloudEvent without ``id``/``sequence``/``prevhash``: those belong to the chain."""
        return {
            "specversion": "1.0",
            "source": self.source,
            "subject": self.cell_id,
            "type": type_,
            "time": at,
            "datacontenttype": "application/json",
            "data": data,
        }


@dataclass(slots=True)
class Pending:
    """An event waiting for its place in the chain, with the subject it will go to."""

    subject: str
    event: dict[str, Any]
    control: bool = False
    """Chain events (opened/checkpoint/gap/resumed/sealed) are always signed."""


def guest_kind(probe_source: str) -> str:
    return probe_source.replace(".", "_")


def guest_event(ctx: ChainContext, decl: Declaration, at: str) -> Pending:
    kind = guest_kind(decl.probe_source)
    data = ctx.stamped(at)
    data["probeSource"] = decl.probe_source
    data["contentVersion"] = decl.content_version
    data["guestPid"] = decl.guest_pid
    data["guestComm"] = decl.guest_comm
    data["guestMonotonicNs"] = str(decl.guest_monotonic_ns)
    return Pending(f"{ctx.subject_base}.guest.{kind}", ctx.envelope(GUEST_TYPE + kind, at, data))


_json = msgspec.json.encode


class GuestEncoder:
    """Canonical bytes of a chain's guest events, from a template compiled at registration.

    A guest event differs from the next only in five declaration values, the host time and
    the chain attributes; building the dict, sorting its keys and walking it for the JCS
    fast-path check cost more than the rest of sealing together. Here every constant piece,
    keys in RFC 8785 order included, is encoded once, and per event only the variable
    values are: integers as decimal digits, ``guestComm`` (the one guest-chosen string)
    through msgspec's JSON string encoder, whose escaping is the JCS escaping
    (``tests/producer/test_canonical.py``). Byte equality with ``canonical()`` of
    :func:`guest_event` is property-tested.
    """

    __slots__ = ("_head", "_id_prefix", "_kids", "_kinds", "_run", "_tail")

    def __init__(self, ctx: ChainContext) -> None:
        self._head = b'{"data":{"cellId":' + _json(ctx.cell_id) + b',"contentVersion":'
        self._run = (
            b',"runId":'
            + _json(ctx.run_id)
            + b',"specSignatureHash":'
            + _json(ctx.spec_signature_hash)
            + b'},"datacontenttype":"application/json","id":'
        )
        self._id_prefix = ctx.chain_id + "-"
        self._tail = (
            b',"source":'
            + _json(ctx.source)
            + b',"specversion":"1.0","subject":'
            + _json(ctx.cell_id)
            + b',"time":'
        )
        self._kinds: dict[str, tuple[str, bytes, bytes]] = {}
        for source in PROBE_SOURCES:
            kind = guest_kind(source)
            self._kinds[source] = (
                f"{ctx.subject_base}.guest.{kind}",
                b',"probeSource":' + _json(source),
                b',"type":' + _json(GUEST_TYPE + kind) + b"}",
            )
        self._kids: dict[str, bytes] = {}

    def subject(self, decl: Declaration) -> str:
        return self._kinds[decl.probe_source][0]

    def type_(self, decl: Declaration) -> str:
        return GUEST_TYPE + guest_kind(decl.probe_source)

    def event_id(self, sequence: int) -> str:
        return f"{self._id_prefix}{sequence}"

    def encode(
        self, decl: Declaration, at: str, sequence: int, prevhash: str, signkid: str | None
    ) -> bytes:
        _, source, type_ = self._kinds[decl.probe_source]
        at_json = _json(at)
        if signkid is None:
            kid = b""
        else:
            kid = self._kids.get(signkid) or self._kids.setdefault(
                signkid, b',"signkid":' + _json(signkid)
            )
        return b"".join(
            (
                self._head,
                b"%d" % decl.content_version,
                b',"guestComm":',
                _json(decl.guest_comm),
                b',"guestMonotonicNs":"%d","guestPid":%d,"hostReceivedAt":'
                % (decl.guest_monotonic_ns, decl.guest_pid),
                at_json,
                source,
                self._run,
                _json(f"{self._id_prefix}{sequence}"),
                b',"prevhash":',
                _json(prevhash),
                b',"sequence":"%020d"' % sequence,
                kid,
                self._tail,
                at_json,
                type_,
            )
        )


def silenced_event(
    ctx: ChainContext, at: str, *, window_ms: int, silent_for_ms: int, last_frame_at: str | None
) -> Pending:
    data = ctx.stamped(at)
    data["windowMs"] = window_ms
    data["silentForMs"] = silent_for_ms
    data["lastFrameAt"] = last_frame_at
    kind = "agent_silenced"
    return Pending(f"{ctx.subject_base}.guest.{kind}", ctx.envelope(GUEST_TYPE + kind, at, data))


def host_event(
    ctx: ChainContext, probe: str, at: str, inputs: dict[str, Any], output: dict[str, Any]
) -> Pending:
    """A host probe reading (``nftables``, ``cgroup``, ``fc_metrics``, ``tap_link``), stamped
    with the time it was dispatched."""
    data = ctx.stamped(at)
    data["probeSource"] = f"host.{probe}"
    data["inputs"] = inputs
    data["output"] = output
    return Pending(f"{ctx.subject_base}.host.{probe}", ctx.envelope(HOST_TYPE + probe, at, data))


def chain_event(ctx: ChainContext, kind: str, at: str, fields: dict[str, Any]) -> Pending:
    """``opened``/``checkpoint``/``gap``/``resumed``/``sealed`` with their own fields."""
    data = ctx.stamped(at)
    data.update(fields)
    return Pending(
        f"{ctx.subject_base}.chain.{kind}",
        ctx.envelope(CHAIN_TYPE + kind, at, data),
        control=True,
    )


def nats_headers(event: dict[str, Any], *, binary: bool) -> dict[str, str]:
    """Headers of the CloudEvents NATS binding for a sealed event: structured mode needs
    only the message id and content type; binary mode carries every attribute."""
    if binary:
        return binary_headers(event)
    return {"Nats-Msg-Id": event["id"], "Content-Type": STRUCTURED_CONTENT_TYPE}
