"""Configuration: read once at startup, validated completely, then immutable.

The daemon runs unattended on hypervisor hosts, so a typo must stop it at startup with the
offending key named (``nats.url``, ``cells[2].cell_id``) instead of surfacing hours later
as a cell that never reports. Sources are layered in the order an operator expects to
override them: the TOML file, then ``CELLOS_PRODUCER_*`` environment variables, then CLI
flags. Every value passes through msgspec (types) and then through the checks below
(meaning), and the result is a tree of frozen structs that components can share freely.

Loading reads only the TOML file: whether the key file, credentials or sockets exist is
for the component that uses them to judge, at the moment it uses them.

Field meanings live in ``msgspec.Meta(description=...)`` on each field, so that
:func:`config_reference` (and hence the README) is generated from the same text the
code carries, and survives ``python -OO``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

import msgspec

from audit.connect import NatsAuth, auth_problem
from producer.errors import ConfigError, RegistrationError

__all__ = [
    "ENV_PREFIX",
    "GUEST_PORT",
    "CellSpec",
    "ChainConfig",
    "Config",
    "ControlConfig",
    "ListenerConfig",
    "LogConfig",
    "MetricsConfig",
    "NatsConfig",
    "ProbesConfig",
    "QueueConfig",
    "SigningConfig",
    "SilenceConfig",
    "SpoolConfig",
    "cell_problem",
    "config_reference",
    "field_help",
    "load_config",
    "socket_path",
    "validate_cell",
]

ENV_PREFIX: Final = "CELLOS_PRODUCER_"
"""Environment variables with this prefix are configuration; any other is ignored."""
RESERVED_ENV: Final = frozenset({ENV_PREFIX + "CONFIG"})
"""Prefixed variables that are not keys: ``CELLOS_PRODUCER_CONFIG`` names the file."""

GUEST_PORT: Final = 9001
"""The vsock port the CellOS guest agent sends telemetry to (SPEC 2)."""

_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HASH_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")
_HOST_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_STREAM_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,255}")
_SUBJECT_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_KID_RE: Final = re.compile(r"[\x21-\x7e]{1,128}")
_OCTAL_RE: Final = re.compile(r"(?:0[oO])?[0-7]{1,4}")
_NFT_TABLE_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]{0,254}")
_IFACE_RE: Final = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
_NFT_FAMILIES: Final = frozenset({"ip", "ip6", "inet", "arp", "bridge", "netdev"})
_NATS_SCHEMES: Final = frozenset({"nats", "tls", "ws", "wss"})
# sun_path is 108 bytes on Linux and a pathname socket needs its terminating NUL.
_SUN_PATH_MAX: Final = 107
# vsock ports and CIDs are u32; 0xFFFFFFFF is the "any" wildcard, CIDs 0-2 are reserved.
_VSOCK_ANY: Final = 0xFFFFFFFF
_FIRST_GUEST_CID: Final = 3
_MODE_MAX: Final = 0o777
_OCTAL_SECTIONS: Final = ("listener", "control")
_OCTAL_KEYS: Final = frozenset(f"{section}.socket_mode" for section in _OCTAL_SECTIONS)
_MIN_SEGMENT: Final = 64 * 1024
_MAX_REPLICAS: Final = 5
_OTHER_WRITE: Final = 0o002


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class NatsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where events go (SPEC 6)."""

    url: Annotated[
        str | None,
        _doc(
            "NATS server URL (`nats://`, `tls://`, `ws://`, `wss://`), or several separated "
            "by commas. Unset: start the embedded nats-server under `data_dir`."
        ),
    ] = None
    stream: Annotated[
        str, _doc("JetStream stream name; created or verified at startup (SPEC 6).")
    ] = "CELLOS_TELEMETRY"
    subject_prefix: Annotated[
        str,
        _doc(
            "Subject prefix; events go to `<prefix>.<cell_id>.<family>.<kind>`. Dot-separated "
            "tokens of `A-Z a-z 0-9 _ -`, no wildcards."
        ),
    ] = "cellos.telemetry"
    create_stream: Annotated[
        bool,
        _doc(
            "Create the stream if it is missing, at startup and whenever it disappears (a "
            "broker whose store was wiped); otherwise a missing stream is fatal at startup and "
            "publishing waits for an operator to create it."
        ),
    ] = True
    stream_replicas: Annotated[
        int,
        _doc(
            "Replicas of the stream (and of the heads bucket) when the producer creates them; "
            "3 on a three-node cluster. An existing stream is used as it is."
        ),
    ] = 1
    heads_bucket: Annotated[
        str,
        _doc(
            "JetStream key-value bucket holding each chain's latest signed head (SPEC 5.3), "
            "so a verifier can tell a truncated tail from a quiet cell. Created if missing."
        ),
    ] = "CELLOS_CHAIN_HEADS"
    mode: Annotated[
        Literal["structured", "binary"],
        _doc("CloudEvents NATS binding: JSON event in the payload, or `ce-*` headers + data."),
    ] = "structured"
    duplicate_window_s: Annotated[
        float,
        _doc(
            "Stream duplicate window, seconds; must cover the longest publish retry so a "
            "retried event is deduplicated by `Nats-Msg-Id`."
        ),
    ] = 600.0
    connect_timeout_s: Annotated[float, _doc("Timeout for one connection attempt, seconds.")] = 5.0
    ack_timeout_s: Annotated[float, _doc("How long to wait for one PubAck, seconds.")] = 5.0
    max_inflight: Annotated[
        int, _doc("Published events awaiting their PubAck at once (pipelining bound).")
    ] = 4096
    user: Annotated[
        str | None,
        _doc(
            "User name for user/password authentication; the password is read from "
            "`password_file`. One of `user`, `token_file`, `nkey_seed_file`, `credentials`."
        ),
    ] = None
    password_file: Annotated[
        str | None,
        _doc(
            "Absolute path of a file holding `user`'s password (one line). Read at every "
            "connection attempt, never logged."
        ),
    ] = None
    token_file: Annotated[
        str | None,
        _doc("Absolute path of a file holding an authentication token (one line)."),
    ] = None
    nkey_seed_file: Annotated[
        str | None,
        _doc("Absolute path of a file holding an NKey user seed (`SU...`)."),
    ] = None
    credentials: Annotated[
        str | None,
        _doc(
            "Absolute path of a NATS `.creds` file (user JWT and NKey seed; operator/JWT "
            "mode). Unset, like the other three: no authentication."
        ),
    ] = None
    tls_ca_file: Annotated[
        str | None,
        _doc(
            "Absolute path of the PEM CA bundle that verifies the server's certificate. "
            "Unset: the system's CAs (used when the server requires TLS or the URL is "
            "`tls://`)."
        ),
    ] = None
    tls_cert_file: Annotated[
        str | None,
        _doc("Absolute path of the PEM client certificate (mutual TLS); needs `tls_key_file`."),
    ] = None
    tls_key_file: Annotated[
        str | None,
        _doc("Absolute path of the client certificate's PEM private key; never logged."),
    ] = None
    tls_hostname: Annotated[
        str | None,
        _doc(
            "Name the server's certificate must carry when it is not the URL's host (e.g. "
            "servers reached by IP address)."
        ),
    ] = None

    @property
    def servers(self) -> list[str]:
        """The URLs to try, because ``url`` may hold a comma-separated seed list."""
        if self.url is None:
            return []
        return [part.strip() for part in self.url.split(",")]

    @property
    def auth(self) -> NatsAuth:
        """The security settings as the connection helper shared with ``audit`` takes them."""
        return NatsAuth(**{f.name: getattr(self, f.name) for f in dataclasses.fields(NatsAuth)})


class SigningConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How events are signed (SPEC 5.1)."""

    key_file: Annotated[str, _doc("Absolute path of the Ed25519 private key file.")] = (
        "/etc/cellos-producer/signing.key"
    )
    mode: Annotated[
        Literal["adaptive", "strict"],
        _doc(
            "`strict`: sign every event. `adaptive`: under bursts some events may go out "
            "unsigned, bounded by `max_unsigned` and `max_unsigned_ms`."
        ),
    ] = "adaptive"
    kid: Annotated[
        str | None,
        _doc(
            "Key id placed in `signkid`. Unset: `ed25519:` + first 16 hex chars of "
            "SHA-256 of the public key."
        ),
    ] = None
    max_unsigned: Annotated[
        int, _doc("Adaptive mode: most consecutive unsigned events in one chain.")
    ] = 64
    max_unsigned_ms: Annotated[
        int, _doc("Adaptive mode: longest an unsigned event waits for a covering signature, ms.")
    ] = 100


class ListenerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How guest agents reach us (SPEC 2)."""

    socket_mode: Annotated[
        int,
        _doc(
            "Permission bits of each cell's Unix socket. A TOML integer (write `0o600`) or an "
            'octal string (`"0600"`); strings are always read as octal. World-writable modes '
            "are refused: any local user could then forge a cell's guest frames."
        ),
    ] = 0o600
    port: Annotated[
        int, _doc("vsock port of the guest agent; the socket is `<vsock_uds_base>_<port>`.")
    ] = GUEST_PORT
    max_connections_per_cell: Annotated[
        int, _doc("Concurrent guest connections accepted per cell; more are closed.")
    ] = 16
    vsock: Annotated[
        bool,
        _doc(
            "Also listen on native AF_VSOCK (QEMU/vhost-vsock hosts); the peer CID picks the "
            "cell via `cells[].vsock_cid`."
        ),
    ] = False
    frame_timeout_s: Annotated[
        float,
        _doc(
            "A frame must be complete this many seconds after its first byte arrived, or "
            "its connection is closed and counted: a guest sending one byte a second cannot "
            "hold a connection slot."
        ),
    ] = 5.0
    log_interval_s: Annotated[
        float,
        _doc(
            "Refused connections, framing errors and frame deadlines are logged once per "
            "cell per interval, with counts, not once per connection."
        ),
    ] = 10.0
    vsock_port: Annotated[int, _doc("AF_VSOCK port to listen on when `vsock` is true.")] = (
        GUEST_PORT
    )


class ChainConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """When checkpoints are written (SPEC 5.3)."""

    checkpoint_every: Annotated[
        int, _doc("Write a `checkpoint` event after this many events of a chain.")
    ] = 1000
    checkpoint_interval_s: Annotated[
        float,
        _doc("Also write one when this many seconds passed since the last, if that is sooner."),
    ] = 30.0


class SilenceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Guest agent silence detection (SPEC 8)."""

    window_ms: Annotated[
        int,
        _doc("A cell is silent after strictly more than this many ms without a good frame."),
    ] = 10000


class ProbesConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Host-side probes (SPEC 8): how often each cell's probes read, and how long one may
    take. Each probe of each cell runs on its own jittered phase; see docs/probes.md."""

    interval_s: Annotated[
        float,
        _doc(
            "Seconds between two readings of one probe of one cell. Each probe starts at a "
            "random phase within the first interval, so cells do not all read at once."
        ),
    ] = 10.0
    timeout_s: Annotated[
        float,
        _doc(
            "A reading still running after this many seconds is cut off and counted as "
            "failed; at most `interval_s`."
        ),
    ] = 5.0
    max_concurrency: Annotated[
        int, _doc("Readings in progress at once, over all cells and probes.")
    ] = 16
    enabled: Annotated[bool, _doc("Run host probes at all.")] = True


class QueueConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The in-memory publish window between the spool and the broker (SPEC 7)."""

    max_events: Annotated[
        int,
        _doc(
            "Events held in memory on their way to JetStream (queued, in flight or waiting "
            "to retry). Beyond it the spool keeps them on disk and feeds them back later."
        ),
    ] = 65536


class SpoolConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The write-ahead spool under `data_dir` (SPEC 7): every event is on disk before it is
    published and leaves after its PubAck."""

    fsync: Annotated[
        Literal["always", "interval", "never"],
        _doc(
            "When spooled events are forced to disk before they may be published: after "
            "every write, every `fsync_interval_ms`, or `never` (the kernel decides; a power "
            "loss may then lose events; for tests)."
        ),
    ] = "interval"
    fsync_interval_ms: Annotated[
        int, _doc('Group-commit interval for `fsync = "interval"`, ms.')
    ] = 5
    max_bytes: Annotated[
        int, _doc("Most bytes the spool may hold; when reached, `full_policy` applies.")
    ] = 1 << 30
    min_free_bytes: Annotated[
        int,
        _doc("Free space to leave on the spool's filesystem; below it the spool counts as full."),
    ] = 256 << 20
    segment_bytes: Annotated[
        int, _doc("Size at which a spool segment file is closed and a new one started.")
    ] = 64 << 20
    full_policy: Annotated[
        Literal["block", "drop_newest"],
        _doc(
            "When the spool is full: `block` stops reading guest sockets (the guest agent "
            "drops and counts) and probes skip their tick; `drop_newest` drops new frames "
            "and declares them in a `gap` event."
        ),
    ] = "block"
    stop_grace_s: Annotated[
        float,
        _doc(
            "On SIGTERM, how long to wait for PubAcks before exiting; what is still "
            "unacknowledged stays in the spool for the next start."
        ),
    ] = 10.0


class ControlConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The control API a supervisor uses to register cells (HTTP/JSON on a Unix socket)."""

    socket: Annotated[
        str | None,
        _doc(
            'Absolute path of the control socket. Unset: `<data_dir>/control.sock`; `""` '
            "turns the control API off."
        ),
    ] = None
    socket_mode: Annotated[
        int,
        _doc(
            "Permission bits of the control socket (as `listener.socket_mode`): whoever "
            "can write to it can register and deregister cells."
        ),
    ] = 0o600
    owner: Annotated[
        str | None, _doc("User (name or uid) to own the control socket. Unset: unchanged.")
    ] = None
    group: Annotated[
        str | None,
        _doc("Group (name or gid) of the control socket, e.g. the supervisor's. Unset: unchanged."),
    ] = None


class MetricsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Prometheus metrics and health endpoints."""

    listen: Annotated[
        str,
        _doc(
            "`host:port` serving `/metrics` (Prometheus text format), `/healthz` and "
            '`/readyz`; `""` turns the listener off; port 0 lets the system choose.'
        ),
    ] = "127.0.0.1:9464"
    max_cell_labels: Annotated[
        int,
        _doc(
            "Cells exported with their own `cell` label (in cell id order); the counts of "
            'any further cells are summed under `cell="_other"`, so series stay bounded.'
        ),
    ] = 1000


class LogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Operational logs (not telemetry)."""

    level: Annotated[
        Literal["debug", "info", "warning", "error"], _doc("Least severe level written.")
    ] = "info"
    format: Annotated[
        Literal["auto", "json", "text"],
        _doc("`auto`: text on a terminal, JSON lines otherwise."),
    ] = "auto"


class CellSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One cell registration (SPEC 3).

    Built by the config loader and by the Python registration API alike, so construction
    does not validate (msgspec structs only check types when decoding); call
    :func:`validate_cell` before trusting one.
    """

    cell_id: Annotated[str, _doc("Cell id, `^[A-Za-z0-9_-]{1,64}$` (it becomes a subject token).")]
    run_id: Annotated[str, _doc("Run id, same alphabet as `cell_id`.")]
    spec_signature_hash: Annotated[str, _doc("`sha256:` + 64 lowercase hex digits.")]
    vsock_uds_base: Annotated[
        str,
        _doc(
            "Absolute path Firecracker forwards vsock connections under; we bind "
            "`<vsock_uds_base>_<listener.port>`."
        ),
    ]
    nft_family: Annotated[
        str | None,
        _doc("nftables family to probe (`ip`, `ip6`, `inet`, `arp`, `bridge`, `netdev`)."),
    ] = None
    nft_table: Annotated[str | None, _doc("nftables table to probe; needs `nft_family`.")] = None
    netns: Annotated[
        str | None, _doc("Absolute path of the network namespace to run `nft` in.")
    ] = None
    cgroup_path: Annotated[str | None, _doc("Absolute path of the cell's cgroup v2 directory.")] = (
        None
    )
    fc_api_socket: Annotated[str | None, _doc("Absolute path of the Firecracker API socket.")] = (
        None
    )
    fc_metrics_path: Annotated[
        str | None, _doc("Absolute path of the Firecracker metrics file/FIFO.")
    ] = None
    tap_iface: Annotated[str | None, _doc("Host TAP interface name of the cell.")] = None
    vsock_cid: Annotated[
        int | None, _doc("Guest CID, for attributing native AF_VSOCK connections.")
    ] = None


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The whole configuration; see :func:`load_config`."""

    host_id: Annotated[
        str,
        _doc(
            "This host's id, used in every event's `source` (`urn:cellos:host:<host_id>`). "
            "Letters, digits, `.`, `_`, `-`."
        ),
    ] = msgspec.field(default_factory=socket.gethostname)
    data_dir: Annotated[
        str,
        _doc(
            "Absolute path for local state: the write-ahead spool (`spool/`) and the "
            "embedded broker's store (`nats/`)."
        ),
    ] = "/var/lib/cellos-producer"
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    signing: SigningConfig = msgspec.field(default_factory=SigningConfig)
    listener: ListenerConfig = msgspec.field(default_factory=ListenerConfig)
    chain: ChainConfig = msgspec.field(default_factory=ChainConfig)
    silence: SilenceConfig = msgspec.field(default_factory=SilenceConfig)
    probes: ProbesConfig = msgspec.field(default_factory=ProbesConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    control: ControlConfig = msgspec.field(default_factory=ControlConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    cells: Annotated[
        tuple[CellSpec, ...],
        _doc("Cells registered at startup (`[[cells]]` tables); more can register at runtime."),
    ] = ()


# --------------------------------------------------------------------------- cells


def socket_path(spec: CellSpec, port: int = GUEST_PORT) -> str:
    """The Unix socket Firecracker connects to for guest vsock port ``port`` (SPEC 2)."""
    return f"{spec.vsock_uds_base}_{port}"


def _abs_path_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected a string path, got {type(value).__name__}"
    if "\x00" in value:
        return "contains a NUL byte"
    if not os.path.isabs(value):
        return f"{value!r} is not an absolute path"
    return None


def _optional_str(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return None
    return f"expected a string or unset, got {type(value).__name__}"


def cell_problem(spec: CellSpec, port: int = GUEST_PORT) -> tuple[str, str] | None:
    """The first thing wrong with ``spec`` as ``(field, reason)``, or None.

    Split from :func:`validate_cell` so the config loader can name the key
    (``cells[3].run_id``) while the registry reports the cell.
    """
    for name in ("cell_id", "run_id"):
        value = getattr(spec, name)
        if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
            return name, (
                f"{value!r} must be 1-64 characters of A-Z a-z 0-9 _ - "
                "(it becomes a NATS subject token)"
            )
    if not isinstance(spec.spec_signature_hash, str) or not _HASH_RE.fullmatch(
        spec.spec_signature_hash
    ):
        return "spec_signature_hash", (
            f"{spec.spec_signature_hash!r} must be 'sha256:' followed by 64 lowercase hex digits"
        )
    if (reason := _abs_path_problem(spec.vsock_uds_base)) is not None:
        return "vsock_uds_base", reason
    if spec.vsock_uds_base.endswith("/"):
        return "vsock_uds_base", "names a directory; it must be a socket path prefix"
    sock = socket_path(spec, port)
    if len(os.fsencode(sock)) > _SUN_PATH_MAX:
        return "vsock_uds_base", (
            f"socket path {sock!r} is longer than the {_SUN_PATH_MAX}-byte Unix socket limit"
        )
    for name in ("nft_family", "nft_table", "tap_iface"):
        if (reason := _optional_str(getattr(spec, name))) is not None:
            return name, reason
    if spec.nft_family is not None and spec.nft_family not in _NFT_FAMILIES:
        return "nft_family", (
            f"{spec.nft_family!r} is not one of {', '.join(sorted(_NFT_FAMILIES))}"
        )
    if spec.nft_table is not None and not _NFT_TABLE_RE.fullmatch(spec.nft_table):
        return "nft_table", f"{spec.nft_table!r} is not a valid nftables table name"
    if (spec.nft_family is None) != (spec.nft_table is None):
        missing = "nft_table" if spec.nft_table is None else "nft_family"
        return missing, "nft_family and nft_table must be given together"
    for name in ("netns", "cgroup_path", "fc_api_socket", "fc_metrics_path"):
        value = getattr(spec, name)
        if value is not None and (reason := _abs_path_problem(value)) is not None:
            return name, reason
    if spec.tap_iface is not None and (
        not _IFACE_RE.fullmatch(spec.tap_iface) or spec.tap_iface in {".", ".."}
    ):
        return "tap_iface", f"{spec.tap_iface!r} is not a valid interface name (1-15 chars)"
    cid = spec.vsock_cid
    if cid is not None and (
        not isinstance(cid, int)
        or isinstance(cid, bool)
        or not _FIRST_GUEST_CID <= cid < _VSOCK_ANY
    ):
        return "vsock_cid", f"{cid!r} is not a guest CID (an integer from 3 to 4294967294)"
    return None


def validate_cell(spec: CellSpec, *, port: int = GUEST_PORT) -> None:
    """Refuse a registration that could mis-attribute or break subjects (SPEC 3).

    ``port`` is the listener port, needed to check the socket path fits ``sun_path``.
    Raises :class:`RegistrationError` whose reason starts with the offending field.
    """
    problem = cell_problem(spec, port)
    if problem is not None:
        field, reason = problem
        raise RegistrationError(str(spec.cell_id), f"{field}: {reason}", field=field)


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration from the file, then ``env``, then ``overrides``.

    ``path`` None means no file (all defaults). ``env`` defaults to ``os.environ``; only
    ``CELLOS_PRODUCER_*`` variables are read: ``CELLOS_PRODUCER_HOST_ID`` for a top-level
    key, ``CELLOS_PRODUCER_NATS__URL`` for a section key. Their string values are converted
    to the key's type; an empty string unsets an optional key. ``overrides`` maps dotted
    keys (``"nats.url"``) to values, typically from CLI flags; strings are converted the
    same way and None values are skipped, so a CLI can pass every flag unfiltered. Cells
    come only from the file.

    Raises :class:`ConfigError` naming the first bad key.
    """
    raw = _read_toml(path) if path is not None else {}
    for section in _OCTAL_SECTIONS:
        table = raw.get(section)
        if isinstance(table, dict) and isinstance(table.get("socket_mode"), str):
            table["socket_mode"] = _parse_octal(f"{section}.socket_mode", table["socket_mode"])
    environ: Mapping[str, str] = os.environ if env is None else env
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in RESERVED_ENV:
            dotted = ".".join(name[len(ENV_PREFIX) :].lower().split("__"))
            _apply(raw, dotted, environ[name], source=name)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _apply(raw, dotted, value, source=None)
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise _translate(exc) from exc
    _check(config)
    return config


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError("config", f"{path}: no such file") from exc
    except OSError as exc:
        raise ConfigError("config", f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path}: invalid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"{path}: not UTF-8: {exc}") from exc


def _field_type(dotted: str) -> Any:
    """The annotated type of a settable key, or None when no such key exists."""
    owner: type[msgspec.Struct] = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        info = _fields(owner).get(part)
        if info is None:
            return None
        base = _strip(info.type)
        if i == len(parts) - 1:
            # A whole section or the cells list is not one value.
            return None if _is_struct(base) or part == "cells" else info.type
        if not _is_struct(base):
            return None
        owner = base
    return None


def _apply(raw: dict[str, Any], dotted: str, value: Any, *, source: str | None) -> None:
    """Set one override into the raw tree, converted to the key's type."""
    key = source if source is not None else dotted
    if dotted == "cells" or dotted.startswith(("cells.", "cells[")):
        raise ConfigError(key, "cells can only be set in the config file")
    tp = _field_type(dotted)
    if tp is None:
        raise ConfigError(key, f"{source} names no configuration key" if source else "unknown key")
    origin = f"{source}: " if source is not None else ""
    if dotted in _OCTAL_KEYS and isinstance(value, str):
        converted: Any = _parse_octal(dotted, value, origin)
    elif value == "" and _optional(tp):
        converted = None
    else:
        try:
            converted = msgspec.convert(value, tp, strict=False)
        except msgspec.ValidationError as exc:
            reason = _translate(exc, tp).reason
            raise ConfigError(dotted, f"{origin}{reason} (value {value!r})") from exc
    *sections, leaf = dotted.split(".")
    node = raw
    for i, section in enumerate(sections):
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(sections[: i + 1]), "expected a table")
        node = child
    node[leaf] = converted


def _parse_octal(key: str, value: str, origin: str = "") -> int:
    if not _OCTAL_RE.fullmatch(value):
        raise ConfigError(key, f'{origin}{value!r} is not an octal mode such as "0600"')
    return int(value, 8)


_AT_RE: Final = re.compile(r"(?P<reason>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.DOTALL)
_NAMED_RE: Final = re.compile(r"Object (?:contains unknown|missing required) field `([^`]*)`")


def _translate(exc: msgspec.ValidationError, tp: Any = None) -> ConfigError:
    """Turn msgspec's ``... - at `$.a[0].b``` into a ConfigError keyed ``a[0].b``.

    ``tp`` is the type that was being converted when the error carries no path.
    """
    match = _AT_RE.fullmatch(str(exc))
    assert match is not None  # the pattern matches any string
    reason, key = match["reason"], (match["path"] or "").lstrip(".")
    named = _NAMED_RE.fullmatch(reason)
    if named is not None:
        key = f"{key}.{named[1]}" if key else named[1]
        reason = "unknown key" if "unknown" in reason else "required key is missing"
    elif reason.startswith("Invalid enum value"):
        tp = _field_type(re.sub(r"\[\d+\]", "", key)) if key else tp
        if tp is not None:
            choices = ", ".join(repr(c) for c in typing.get_args(_strip(tp)))
            reason = f"{reason}; expected one of {choices}"
    reason = reason.replace("Expected `object`", "Expected a table")
    return ConfigError(key or "config", reason)


# --------------------------------------------------------------------------- checks


def _check(config: Config) -> None:
    """Checks of meaning that types cannot express; raise on the first failure."""
    if not _HOST_ID_RE.fullmatch(config.host_id):
        raise ConfigError(
            "host_id",
            f"{config.host_id!r} must be letters, digits, '.', '_' or '-' (at most 253, "
            "starting with a letter or digit); set host_id explicitly if the host name is not",
        )
    _need_path(config.data_dir, "data_dir")
    _check_nats(config.nats)
    _check_signing(config.signing)
    _check_listener(config.listener)
    _positive(config.chain.checkpoint_every, "chain.checkpoint_every")
    _positive(config.chain.checkpoint_interval_s, "chain.checkpoint_interval_s")
    _positive(config.silence.window_ms, "silence.window_ms")
    _check_probes(config.probes)
    _positive(config.queue.max_events, "queue.max_events")
    _check_spool(config.spool)
    _check_metrics(config.metrics)
    _check_control(config.control)
    _check_cells(config.cells, config.listener.port)


def _check_nats(nats: NatsConfig) -> None:
    if nats.url is not None:
        for server in nats.servers:
            problem = _url_problem(server)
            if problem is not None:
                raise ConfigError("nats.url", problem)
    if not _STREAM_RE.fullmatch(nats.stream):
        raise ConfigError("nats.stream", f"{nats.stream!r} must be 1-255 of A-Z a-z 0-9 _ -")
    if not _STREAM_RE.fullmatch(nats.heads_bucket):
        raise ConfigError(
            "nats.heads_bucket", f"{nats.heads_bucket!r} must be 1-255 of A-Z a-z 0-9 _ -"
        )
    tokens = nats.subject_prefix.split(".")
    if not all(_SUBJECT_TOKEN_RE.fullmatch(token) for token in tokens):
        raise ConfigError(
            "nats.subject_prefix",
            f"{nats.subject_prefix!r} must be dot-separated tokens of A-Z a-z 0-9 _ - "
            "(no wildcards, no empty tokens)",
        )
    _positive(nats.duplicate_window_s, "nats.duplicate_window_s")
    _positive(nats.connect_timeout_s, "nats.connect_timeout_s")
    _positive(nats.ack_timeout_s, "nats.ack_timeout_s")
    _positive(nats.max_inflight, "nats.max_inflight")
    if not 1 <= nats.stream_replicas <= _MAX_REPLICAS:
        raise ConfigError(
            "nats.stream_replicas", f"{nats.stream_replicas} must be 1 to {_MAX_REPLICAS}"
        )
    _check_nats_auth(nats)


def _check_nats_auth(nats: NatsConfig) -> None:
    auth = nats.auth
    for field, path in auth.paths().items():
        _need_path(path, f"nats.{field}")
    problem = auth_problem(auth)
    if problem is not None:
        raise ConfigError(f"nats.{problem[0]}", problem[1])
    if nats.url is None:
        for info in dataclasses.fields(NatsAuth):
            if getattr(auth, info.name) is not None:
                raise ConfigError(
                    f"nats.{info.name}",
                    "needs nats.url: the embedded server (nats.url unset) has no "
                    "authentication and no TLS",
                )


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            # URLs are logged and quoted in errors; a secret in one would be too.
            return (
                "must not carry credentials: use nats.user with nats.password_file, or "
                "nats.token_file"
            )
        _ = parts.port  # raises on a non-numeric or out-of-range port
    except ValueError as exc:
        return f"{url!r} is not a URL: {exc}"
    if parts.scheme not in _NATS_SCHEMES:
        return f"{url!r} must use one of the schemes {', '.join(sorted(_NATS_SCHEMES))}"
    if not parts.hostname:
        return f"{url!r} has no host"
    return None


def _check_signing(signing: SigningConfig) -> None:
    _need_path(signing.key_file, "signing.key_file")
    if signing.kid is not None and not _KID_RE.fullmatch(signing.kid):
        raise ConfigError("signing.kid", "must be 1-128 printable ASCII characters, no spaces")
    _non_negative(signing.max_unsigned, "signing.max_unsigned")
    _non_negative(signing.max_unsigned_ms, "signing.max_unsigned_ms")


def _check_mode(key: str, mode: int, harm: str) -> None:
    if not 0 <= mode <= _MODE_MAX:
        raise ConfigError(
            key,
            f"{mode} (octal {mode:o}) is not a permission mode; in TOML write 0o600 or "
            '"0600", not 600',
        )
    if mode & _OTHER_WRITE:
        raise ConfigError(key, f"0o{mode:03o} is world-writable: {harm}")


def _check_control(control: ControlConfig) -> None:
    if control.socket:
        _need_path(control.socket, "control.socket")
    _check_mode(
        "control.socket_mode",
        control.socket_mode,
        "any local user could register and deregister cells",
    )


def _check_listener(listener: ListenerConfig) -> None:
    _check_mode(
        "listener.socket_mode",
        listener.socket_mode,
        "any local user could forge guest frames",
    )
    for key, port in (
        ("listener.port", listener.port),
        ("listener.vsock_port", listener.vsock_port),
    ):
        if not 1 <= port < _VSOCK_ANY:
            raise ConfigError(key, f"{port} is not a vsock port (1 to 4294967294)")
    _positive(listener.max_connections_per_cell, "listener.max_connections_per_cell")
    _positive(listener.frame_timeout_s, "listener.frame_timeout_s")
    _positive(listener.log_interval_s, "listener.log_interval_s")


def _check_metrics(metrics: MetricsConfig) -> None:
    if metrics.listen:
        host, sep, port = metrics.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(
                "metrics.listen", f'{metrics.listen!r} is not host:port (or "" for off)'
            )
    _positive(metrics.max_cell_labels, "metrics.max_cell_labels")


def _check_spool(spool: SpoolConfig) -> None:
    _positive(spool.fsync_interval_ms, "spool.fsync_interval_ms")
    _positive(spool.max_bytes, "spool.max_bytes")
    _non_negative(spool.min_free_bytes, "spool.min_free_bytes")
    _positive(spool.stop_grace_s, "spool.stop_grace_s")
    if spool.segment_bytes < _MIN_SEGMENT:
        raise ConfigError(
            "spool.segment_bytes", f"{spool.segment_bytes} is below the minimum of {_MIN_SEGMENT}"
        )
    if spool.max_bytes < 2 * spool.segment_bytes:
        # Space comes back a whole acknowledged segment at a time, never from the one
        # being written: a spool smaller than two segments could fill up for good.
        raise ConfigError(
            "spool.max_bytes",
            f"{spool.max_bytes} must be at least twice spool.segment_bytes ({spool.segment_bytes})",
        )


def _check_probes(probes: ProbesConfig) -> None:
    _positive(probes.interval_s, "probes.interval_s")
    _positive(probes.timeout_s, "probes.timeout_s")
    if probes.timeout_s > probes.interval_s:
        raise ConfigError(
            "probes.timeout_s",
            f"{probes.timeout_s!r} is longer than probes.interval_s ({probes.interval_s!r}): "
            "a reading must end before the next one is due",
        )
    _positive(probes.max_concurrency, "probes.max_concurrency")


def _check_cells(cells: tuple[CellSpec, ...], port: int) -> None:
    seen: dict[tuple[str, object], int] = {}
    for i, spec in enumerate(cells):
        problem = cell_problem(spec, port)
        if problem is not None:
            raise ConfigError(f"cells[{i}].{problem[0]}", problem[1])
        # Each of these picks the cell that incoming bytes are attributed to.
        for field in ("cell_id", "vsock_uds_base", "vsock_cid"):
            value = getattr(spec, field)
            if value is None:
                continue
            first = seen.setdefault((field, value), i)
            if first != i:
                raise ConfigError(
                    f"cells[{i}].{field}", f"{value!r} is already used by cells[{first}]"
                )


def _need_path(value: str, key: str) -> None:
    reason = _abs_path_problem(value)
    if reason is not None:
        raise ConfigError(key, reason)


def _positive(value: float, key: str) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"{value!r} must be a positive number")


def _non_negative(value: float, key: str) -> None:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(key, f"{value!r} must not be negative")


# --------------------------------------------------------------------------- reference


def _strip(tp: Any) -> Any:
    """Drop ``Annotated`` metadata, leaving the type msgspec checks."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(_strip(tp))


def _fields(cls: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {info.name: info for info in msgspec.structs.fields(cls)}


def _type_name(key: str, tp: Any) -> str:
    if key in _OCTAL_KEYS:
        return "integer or octal string"
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(f"`{choice}`" for choice in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return " or ".join(_type_name(key, arg) for arg in inner) + ", optional"
    if origin is tuple:
        return "array of tables"
    names = {str: "string", int: "integer", float: "float", bool: "boolean"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _default(key: str, info: msgspec.structs.FieldInfo) -> str:
    if info.default_factory is socket.gethostname:
        return "the host name"
    if info.default is msgspec.NODEFAULT and info.default_factory is msgspec.NODEFAULT:
        return "required"
    value = info.default
    if value is None:
        return "unset"
    if value == ():
        return "none"
    if key in _OCTAL_KEYS:
        return f"`0o{value:o}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def _description(tp: Any) -> str:
    for meta in typing.get_args(tp)[1:] if typing.get_origin(tp) is Annotated else ():
        if isinstance(meta, msgspec.Meta) and meta.description:
            return meta.description
    return ""


def _rows(cls: type[msgspec.Struct], prefix: str) -> Iterator[tuple[str, str, str, str]]:
    for info in msgspec.structs.fields(cls):
        key = prefix + info.name
        base = _strip(info.type)
        if _is_struct(base):
            yield from _rows(base, f"{key}.")
            continue
        yield key, _type_name(key, info.type), _default(key, info), _description(info.type)
        if typing.get_origin(base) is tuple:
            yield from _rows(typing.get_args(base)[0], f"{key}[].")


def field_help(cls: type[msgspec.Struct], name: str) -> str:
    """The description a configuration field carries, for CLI help texts."""
    return _description(_fields(cls)[name].type)


def config_reference() -> str:
    """Every key as a markdown table, generated so the README cannot drift from the code."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, meaning in _rows(Config, ""):
        cells = (f"`{key}`", type_name, default, meaning)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
