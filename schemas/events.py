"""msgspec types for every event this producer publishes (SPEC 3-5).

The hot path builds events as plain dicts for speed; these types are the contract: JSON
Schemas in this folder are generated from them and every published event is checked
against those schemas by the tests.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

TYPE_PREFIX: Final = "dev.cellos.events.cell.observability"
GUEST_TYPE: Final = f"{TYPE_PREFIX}.guest.v1."
HOST_TYPE: Final = f"{TYPE_PREFIX}.host.v1."
CHAIN_TYPE: Final = f"{TYPE_PREFIX}.chain.v1."
HOST_PROBES: Final = ("nftables", "cgroup", "fc_metrics", "tap_link")
CHAIN_KINDS: Final = ("opened", "checkpoint", "gap", "sealed")


Id = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^sha256:[0-9a-f]{64}$")]
Timestamp = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$",
        description="RFC 3339 UTC, microseconds, Z",
    ),
]
Sequence = Annotated[str, msgspec.Meta(pattern=r"^\d{20}$")]
U16 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
U64 = Annotated[int, msgspec.Meta(ge=0, description="unsigned 64-bit (up to 18446744073709551615)")]
GuestSource = Literal[
    "process.spawned",
    "process.exited",
    "capability.denied",
    "net.connect_attempted",
    "fs.inotify_fired",
]
HostSource = Literal["host.nftables", "host.cgroup", "host.fc_metrics", "host.tap_link"]


class _Data(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    """The stamped fields every ``data`` carries (SPEC 3): from the registration and the host
    clock only, never from the guest."""

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
    guest_monotonic_ns: U64


class AgentSilencedData(_Data, kw_only=True):
    """``guest.v1.agent_silenced``: the agent said nothing for longer than the window."""

    window_ms: U64
    silent_for_ms: U64
    last_frame_at: Timestamp | None


class HostProbeData(_Data, kw_only=True):
    """``host.v1.<probe>``: one host-side reading of the cell."""

    probe_source: HostSource
    inputs: dict[str, Any]
    output: dict[str, Any]


class ChainOpenedData(_Data, kw_only=True):
    """``chain.v1.opened`` (sequence 1): who signs this chain and what was registered."""

    host_id: str
    producer_version: str
    signkid: Annotated[str, msgspec.Meta(min_length=1)]
    public_key: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{43}$")]
    chain_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]
    socket_path: str
    probe_targets: dict[str, Any]
    signing_mode: Literal["adaptive", "strict"]


class CheckpointData(_Data, kw_only=True):
    """``chain.v1.checkpoint``: names the event just before it, so a verifier can anchor."""

    head_sequence: Sequence
    head_hash: Sha256


class GapData(_Data, kw_only=True):
    """``chain.v1.gap``: the producer knowingly lost events; losses are never silent."""

    reason: str
    lost_count: U64
    first_lost_at: Timestamp | None = None
    last_lost_at: Timestamp | None = None


class SealedData(_Data, kw_only=True):
    """``chain.v1.sealed``: always the last event of a chain."""

    reason: str
    final_sequence: Sequence


class CloudEvent(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """The CloudEvents 1.0 envelope with this producer's extension attributes (SPEC 4)."""

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
    signkid: str | None = None
    signature: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{86}$")] | None = None


DATA_TYPES: Final[dict[str, type[_Data]]] = {
    "guest": GuestData,
    "agent_silenced": AgentSilencedData,
    "host_probe": HostProbeData,
    "chain_opened": ChainOpenedData,
    "chain_checkpoint": CheckpointData,
    "chain_gap": GapData,
    "chain_sealed": SealedData,
}
"""Schema name -> type; ``schemas.generate`` writes one JSON Schema per entry."""
