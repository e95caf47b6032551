"""msgspec types for every event this producer publishes (SPEC 3-5).

The hot path builds events as plain dicts for speed; these types are the contract: JSON
Schemas in this folder are generated from them and every published event is checked
against those schemas by the tests.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

TYPE_PREFIX: Final = "dev.cellos.events.cell.observability"
GUEST_TYPE: Final = f"{TYPE_PREFIX}.guest.v1."
HOST_TYPE: Final = f"{TYPE_PREFIX}.host.v1."
CHAIN_TYPE: Final = f"{TYPE_PREFIX}.chain.v1."
HOST_PROBES: Final = ("nftables", "cgroup", "fc_metrics", "tap_link")
CHAIN_KINDS: Final = ("opened", "checkpoint", "gap", "sealed")


class _Data(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    """The stamped fields every ``data`` carries (SPEC 3): from the registration and the host
    clock only, never from the guest."""

    cell_id: str
    run_id: str
    spec_signature_hash: str
    host_received_at: str


class GuestData(_Data, kw_only=True):
    """``guest.v1.<kind>``: one guest declaration, stamped."""

    probe_source: str
    content_version: int
    guest_pid: int
    guest_comm: str
    guest_monotonic_ns: int


class AgentSilencedData(_Data, kw_only=True):
    """``guest.v1.agent_silenced``: the agent said nothing for longer than the window."""

    window_ms: int
    silent_for_ms: int
    last_frame_at: str | None


class HostProbeData(_Data, kw_only=True):
    """``host.v1.<probe>``: one host-side reading of the cell."""

    probe_source: str
    inputs: dict[str, Any]
    output: dict[str, Any]


class ChainOpenedData(_Data, kw_only=True):
    """``chain.v1.opened`` (sequence 1): who signs this chain and what was registered."""

    host_id: str
    producer_version: str
    signkid: str
    public_key: str
    chain_id: str
    socket_path: str
    probe_targets: dict[str, Any]
    signing_mode: str


class CheckpointData(_Data, kw_only=True):
    """``chain.v1.checkpoint``: names the event just before it, so a verifier can anchor."""

    head_sequence: str
    head_hash: str


class GapData(_Data, kw_only=True):
    """``chain.v1.gap``: the producer knowingly lost events; losses are never silent."""

    reason: str
    lost_count: int
    first_lost_at: str | None = None
    last_lost_at: str | None = None


class SealedData(_Data, kw_only=True):
    """``chain.v1.sealed``: always the last event of a chain."""

    reason: str
    final_sequence: str


class CloudEvent(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """The CloudEvents 1.0 envelope with this producer's extension attributes (SPEC 4)."""

    specversion: str
    id: str
    source: str
    subject: str
    type: str
    time: str
    datacontenttype: str
    sequence: str
    prevhash: str
    data: dict[str, Any]
    signkid: str | None = None
    signature: str | None = None


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
