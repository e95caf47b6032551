"""msgspec types for every event this producer publishes (docs/protocol.md).

The hot path builds events as plain dicts (or straight to bytes) for speed; these types are
the contract: the JSON Schemas in this folder are generated from them, every published
event of the test suite is validated against those schemas, and consumers decode ``data``
with them (:data:`EVENT_TYPES` maps each ``type`` to its data type).

Numbers: every JSON number in an event is an integer within ±(2**53 - 1) so that any
RFC 8785 implementation can canonicalize it; 64-bit quantities that can exceed that
(``guestMonotonicNs``, kernel and VMM counters) are decimal strings (:data:`U64String`).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

TYPE_PREFIX: Final = "dev.cellos.events.cell.observability"
GUEST_TYPE: Final = f"{TYPE_PREFIX}.guest.v1."
HOST_TYPE: Final = f"{TYPE_PREFIX}.host.v1."
CHAIN_TYPE: Final = f"{TYPE_PREFIX}.chain.v1."
GUEST_SOURCES: Final = (
    "process.spawned",
    "process.exited",
    "capability.denied",
    "net.connect_attempted",
    "fs.inotify_fired",
)
HOST_PROBES: Final = ("nftables", "cgroup", "fc_metrics", "tap_link")
CHAIN_KINDS: Final = ("opened", "checkpoint", "gap", "resumed", "sealed")
MAX_SAFE_INTEGER: Final = 2**53 - 1

Id = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
ChainId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^sha256:[0-9a-f]{64}$")]
Timestamp = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$",
        description="RFC 3339 UTC, microseconds, Z",
    ),
]
Sequence = Annotated[
    str,
    msgspec.Meta(pattern=r"^\d{20}$", description="chain sequence, 20 decimal digits"),
]
U16 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
SafeUInt = Annotated[
    int,
    msgspec.Meta(ge=0, le=MAX_SAFE_INTEGER, description="non-negative integer below 2**53"),
]
U64String = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(0|[1-9][0-9]{0,19})$",
        description="unsigned 64-bit integer as decimal digits (0 .. 18446744073709551615)",
    ),
]
PublicKey = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9_-]{43}$",
        description="raw 32-byte Ed25519 public key, base64url without padding",
    ),
]
Kid = Annotated[str, msgspec.Meta(min_length=1)]
GuestSource = Literal[
    "process.spawned",
    "process.exited",
    "capability.denied",
    "net.connect_attempted",
    "fs.inotify_fired",
]
HostSource = Literal["host.nftables", "host.cgroup", "host.fc_metrics", "host.tap_link"]


class _Data(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    """The stamped fields every ``data`` carries: from the registration and the host clock
    only, never from the guest."""

    cell_id: Id
    run_id: Id
    spec_signature_hash: Sha256
    host_received_at: Timestamp


class GuestData(_Data, kw_only=True):
    """``guest.v1.<kind>``: one guest declaration, stamped."""

    probe_source: GuestSource
    content_version: Literal[1]
    guest_pid: U32
    guest_comm: str
    guest_monotonic_ns: U64String


class AgentSilencedData(_Data, kw_only=True):
    """``guest.v1.agent_silenced``: the agent said nothing for longer than the window."""

    window_ms: SafeUInt
    silent_for_ms: SafeUInt
    last_frame_at: Timestamp | None


class HostProbeData(_Data, kw_only=True):
    """``host.v1.<probe>``: one host-side reading of the cell (docs/probes.md)."""

    probe_source: HostSource
    inputs: dict[str, Any]
    output: dict[str, Any]


class Supersedes(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    """The chain an ``opened`` replaces because its state was lost, as far as the recorded
    heads still tell (null where unknown)."""

    chain_id: ChainId
    last_known_sequence: Sequence | None
    last_known_digest: Sha256 | None
    reason: str


class ChainOpenedData(_Data, kw_only=True):
    """``chain.v1.opened`` (sequence 1): who signs this chain and what was registered."""

    host_id: str
    producer_version: str
    signkid: Kid
    public_key: PublicKey
    chain_id: ChainId
    socket_path: str
    probe_targets: dict[str, Any]
    signing_mode: Literal["adaptive", "strict"]
    supersedes: Supersedes | None


class ResumedData(_Data, kw_only=True):
    """``chain.v1.resumed``: a restarted producer continues this chain."""

    previous_stop_at: Timestamp | None
    """Time of the last event written before the stop (null if none was)."""
    clean: bool
    """True after an orderly shutdown; False when recovered after a crash."""
    host_id: str
    producer_version: str
    signkid: Kid
    public_key: PublicKey


class CheckpointData(_Data, kw_only=True):
    """``chain.v1.checkpoint``: names the event just before it, so a verifier can anchor."""

    head_sequence: Sequence
    head_hash: Sha256


class GapData(_Data, kw_only=True):
    """``chain.v1.gap``: the producer knowingly lost events; losses are never silent.

    Events lost before they were sealed leave no hole in the chain. Only sealed events
    lost from a damaged spool do, and then the gap names the hole's sequence range.
    """

    reason: str
    lost_count: SafeUInt
    first_lost_at: Timestamp | None
    last_lost_at: Timestamp | None
    first_lost_sequence: Sequence | msgspec.UnsetType = msgspec.UNSET
    last_lost_sequence: Sequence | msgspec.UnsetType = msgspec.UNSET


class SealedData(_Data, kw_only=True):
    """``chain.v1.sealed``: always the last event of a chain."""

    reason: str
    final_sequence: Sequence


class CloudEvent(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """The CloudEvents 1.0 envelope with this producer's extension attributes.

    ``signkid`` and ``signature`` are absent on an unsigned event, never null.
    """

    specversion: Literal["1.0"]
    id: Annotated[str, msgspec.Meta(min_length=1)]
    source: Annotated[str, msgspec.Meta(pattern=r"^urn:cellos:host:.+$")]
    subject: Id
    type: Annotated[str, msgspec.Meta(pattern=r"^dev\.cellos\.events\.cell\.observability\.")]
    time: Timestamp
    datacontenttype: Literal["application/json"]
    sequence: Sequence
    prevhash: Annotated[str, msgspec.Meta(pattern=r"^(sha256:[0-9a-f]{64})?$")]
    data: dict[str, Any]
    signkid: Kid | msgspec.UnsetType = msgspec.UNSET
    signature: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=r"^[A-Za-z0-9_-]{86}$",
                description="Ed25519 signature, base64url without padding",
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET


def _event_types() -> dict[str, tuple[type[_Data], str | None]]:
    types: dict[str, tuple[type[_Data], str | None]] = {}
    for source in GUEST_SOURCES:
        types[GUEST_TYPE + source.replace(".", "_")] = (GuestData, source)
    types[GUEST_TYPE + "agent_silenced"] = (AgentSilencedData, None)
    for probe in HOST_PROBES:
        types[HOST_TYPE + probe] = (HostProbeData, f"host.{probe}")
    chain_data: tuple[type[_Data], ...] = (
        ChainOpenedData,
        CheckpointData,
        GapData,
        ResumedData,
        SealedData,
    )
    for kind, data_type in zip(CHAIN_KINDS, chain_data, strict=True):
        types[CHAIN_TYPE + kind] = (data_type, None)
    return types


EVENT_TYPES: Final = _event_types()
"""Every event ``type`` -> (its ``data`` type, the ``probeSource`` it must carry or None)."""

DATA_TYPES: Final[dict[str, type[_Data]]] = {
    "guest": GuestData,
    "agent_silenced": AgentSilencedData,
    "host_probe": HostProbeData,
    "chain_opened": ChainOpenedData,
    "chain_checkpoint": CheckpointData,
    "chain_gap": GapData,
    "chain_resumed": ResumedData,
    "chain_sealed": SealedData,
}
"""Schema name -> type; ``schemas.generate`` writes one JSON Schema per entry."""
