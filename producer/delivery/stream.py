"""The JetStream stream that holds every event, and the startup check that it can keep the
delivery promise (SPEC 6, 7).

The producer deletes an event from its spool once JetStream acknowledges it, so from then
on the stream is the only copy. A stream that can lose, rewrite or silently deduplicate
wrongly would turn "acknowledged" into "maybe kept", and no chain can repair that after the
fact. The producer therefore refuses to run on such a stream rather than warn and carry on.

It never *changes* an existing stream: loosening or tightening an operator's stream is the
operator's decision (and the server refuses to revoke ``deny_delete``/``deny_purge`` by
update anyway). It only creates one when asked to and none exists.

Retention limits are a deliberate exception to refusing. ``max_age``, ``max_msgs``,
``max_bytes`` and ``max_msgs_per_subject`` with ``discard: old`` do delete events, but that
is retention the operator chose, it removes the oldest end of a chain (which a verifier
sees as a chain starting after sequence 1, not as a hole), and it cannot be told apart from
an operator who later deletes the whole stream, which ``deny_delete`` does not prevent
either. Such limits, and ``discard: new`` limits that will stall publishing once reached,
are returned as warnings (and logged), not refused.

Server differences this module relies on: nats-server 2.9 silently ignores stream
configuration fields it does not know, whereas 2.10+ rejects unknown fields. A created
stream is therefore re-checked from the server's own answer, never assumed to have taken
the requested settings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import Enum

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import APIError, NotFoundError

from producer.errors import BrokerError, StreamConfigError

__all__ = [
    "DEFAULT_DUPLICATE_WINDOW_S",
    "DEFAULT_STREAM_NAME",
    "DEFAULT_SUBJECT_PREFIX",
    "StreamCheck",
    "check_stream_config",
    "ensure_stream",
    "stream_config",
    "stream_config_json",
    "validate_stream_name",
    "validate_subject_prefix",
]

_log = logging.getLogger(__name__)

DEFAULT_STREAM_NAME = "CELLOS_TELEMETRY"
DEFAULT_SUBJECT_PREFIX = "cellos.telemetry"
# Must be at least the producer's retry span (SPEC 6). The server keeps every message id
# of the window in memory, so this is bounded rather than "as long as possible".
DEFAULT_DUPLICATE_WINDOW_S = 600.0

_NS = 1_000_000_000
# JetStream API error codes (nats-server/server/errors.json), stable across 2.9 .. 2.1x.
_ERR_STREAM_NAME_IN_USE = 10058
_ERR_SUBJECTS_OVERLAP = 10065
_ERR_NOT_YET = frozenset({10005, 10008, 10023})
"""No suitable peers for placement, JetStream temporarily unavailable, insufficient
resources: a cluster still forming or electing, or short of room; worth asking again."""


@dataclass(frozen=True)
class StreamCheck:
    """What ``ensure_stream`` found: the live stream, whether it made it, and what to tell
    the operator about retention limits that are allowed but worth knowing."""

    info: StreamInfo
    created: bool
    warnings: tuple[str, ...]


def validate_stream_name(name: str) -> None:
    """Raise ValueError if ``name`` cannot be a JetStream stream name.

    Exposed so configuration loading can reject a bad name before any broker is involved.
    """
    if not name:
        raise ValueError("stream name is empty")
    bad = sorted({c for c in name if c in ".*>/\\" or c.isspace() or not c.isprintable()})
    if bad:
        raise ValueError(f"stream name {name!r} contains forbidden characters {bad}")


def validate_subject_prefix(prefix: str) -> None:
    """Raise ValueError unless ``prefix`` is a literal subject (no wildcards, no empty token).

    A wildcard prefix would make the stream's subject filter and each cell's subscription
    (``<prefix>.<cell_id>.>``) mean something other than SPEC 6 says.
    """
    if not prefix:
        raise ValueError("subject prefix is empty")
    for token in prefix.split("."):
        if not token:
            raise ValueError(f"subject prefix {prefix!r} has an empty token")
        if token in ("*", ">") or any(c.isspace() or c in "*>" for c in token):
            raise ValueError(f"subject prefix {prefix!r} must be literal, got token {token!r}")


def stream_config(
    *,
    name: str = DEFAULT_STREAM_NAME,
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
    duplicate_window_s: float = DEFAULT_DUPLICATE_WINDOW_S,
    replicas: int = 1,
) -> StreamConfig:
    """The stream the producer creates, and the one ``deploy/stream.json`` describes.

    Every limit is spelled out (unlimited, ``-1``/``0``) rather than left to server
    defaults, so the operator file states the full policy and the NATS CLI's schema check,
    which requires the limit fields, accepts it. Only fields nats-server 2.9 understands
    carry meaning here, because 2.9 would drop the others without a word.
    """
    validate_stream_name(name)
    validate_subject_prefix(subject_prefix)
    if not duplicate_window_s > 0:
        raise ValueError(f"duplicate window must be positive, got {duplicate_window_s!r}")
    return StreamConfig(
        name=name,
        description="CellOS telemetry: hash-chained, signed CloudEvents from cellos-producer",
        subjects=[f"{subject_prefix}.>"],
        retention=RetentionPolicy.LIMITS,
        max_consumers=-1,
        max_msgs=-1,
        max_bytes=-1,
        max_age=0,
        max_msgs_per_subject=-1,
        max_msg_size=-1,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=duplicate_window_s,
        deny_delete=True,
        deny_purge=True,
        allow_rollup_hdrs=False,
        allow_direct=True,
    )


def stream_config_json(
    *,
    name: str = DEFAULT_STREAM_NAME,
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
    duplicate_window_s: float = DEFAULT_DUPLICATE_WINDOW_S,
) -> str:
    """The stream definition as NATS CLI / JetStream API JSON (durations in nanoseconds).

    ``python -m producer.delivery.stream > deploy/stream.json`` regenerates the operator file, so
    the file and what the producer creates cannot drift apart unnoticed (a test compares
    them).
    """
    config = stream_config(
        name=name, subject_prefix=subject_prefix, duplicate_window_s=duplicate_window_s
    )
    return json.dumps(config.as_dict(), indent=2, sort_keys=True) + "\n"


def check_stream_config(
    config: StreamConfig, *, subject_prefix: str, duplicate_window_s: float
) -> tuple[list[str], list[str]]:
    """Return ``(problems, warnings)`` for a stream's configuration as the server reports it.

    Problems are settings under which an acknowledged event may be lost, altered or never
    stored; every one is listed so the operator fixes them in one round. Warnings are
    operator-chosen retention and limits (see the module docstring). Fields a server
    version does not report are absent (``None``) and count as off, which is what such a
    server does.
    """
    problems: list[str] = []
    warnings: list[str] = []
    wanted_subject = f"{subject_prefix}.>"

    if config.storage != StorageType.FILE:
        problems.append(
            f"storage is {_text(config.storage)}, not file: events would not survive a "
            "server restart"
        )
    if not config.deny_delete:
        problems.append("deny_delete is off: individual events could be deleted")
    if not config.deny_purge:
        problems.append("deny_purge is off: the stream or a cell's subjects could be purged")
    if config.allow_rollup_hdrs:
        problems.append(
            "allow_rollup_hdrs is on: a Nats-Rollup header could erase a subject's history"
        )
    window_ns = round((config.duplicate_window or 0) * _NS)
    if window_ns < round(duplicate_window_s * _NS):
        problems.append(
            f"duplicate_window is {window_ns / _NS:g}s, shorter than the producer's retry "
            f"span of {duplicate_window_s:g}s: a retried event could be stored twice"
        )
    if config.retention not in (None, RetentionPolicy.LIMITS):
        problems.append(
            f"retention is {_text(config.retention)}, not limits: events would be removed "
            "once consumed, so history could not be replayed"
        )
    if config.no_ack:
        problems.append("no_ack is on: publishes get no PubAck, so delivery cannot be confirmed")
    if config.sealed:
        problems.append("the stream is sealed: it accepts no new events")
    if config.mirror is not None:
        problems.append(
            f"the stream is a mirror of {config.mirror.name!r}: it accepts no publishes"
        )
    if config.allow_msg_counter:
        problems.append("allow_msg_counter is on: a counter stream refuses ordinary messages")
    subjects = list(config.subjects or [])
    if config.mirror is None and not any(_covers(s, wanted_subject) for s in subjects):
        problems.append(f"subjects {subjects} do not cover {wanted_subject!r}")
    transform = config.subject_transform
    if transform is not None and (not transform.src or _intersects(transform.src, wanted_subject)):
        problems.append(
            f"subject_transform {transform.src or '>'!r} -> {transform.dest!r} rewrites "
            "event subjects, so per-cell subscriptions would miss them"
        )

    warnings.extend(_limit_warnings(config))
    if config.max_msg_size is not None and config.max_msg_size > 0:
        warnings.append(
            f"max_msg_size is {config.max_msg_size} bytes: larger events will be refused"
        )
    if not config.allow_direct:
        warnings.append(
            "allow_direct is off: auditors cannot read a cell's latest event with a direct "
            "get (cellos-audit cells falls back to a consumer)"
        )
    if config.allow_msg_ttl:
        warnings.append(
            "allow_msg_ttl is on: a message carrying a Nats-TTL header expires despite "
            "deny_delete (the producer never sets one)"
        )
    if _text(config.persist_mode) == "async":
        warnings.append(
            "persist_mode is async: the server acknowledges before writing to disk, so a "
            "broker crash can lose events the producer already removed from its spool"
        )
    return problems, warnings


def _limit_warnings(config: StreamConfig) -> list[str]:
    limits: list[str] = []
    if config.max_age:
        limits.append(f"max_age {config.max_age:g}s")
    if config.max_msgs is not None and config.max_msgs > 0:
        limits.append(f"max_msgs {config.max_msgs}")
    if config.max_bytes is not None and config.max_bytes > 0:
        limits.append(f"max_bytes {config.max_bytes}")
    if config.max_msgs_per_subject is not None and config.max_msgs_per_subject > 0:
        limits.append(f"max_msgs_per_subject {config.max_msgs_per_subject}")
    if not limits:
        return []
    listed = ", ".join(limits)
    if config.discard == DiscardPolicy.NEW:
        # max_age still expires old events whatever the discard policy says.
        note = (
            f"limits {listed} with discard new: once reached, publishes are refused and "
            "events wait in the spool until an operator makes room"
        )
        if config.max_age:
            note += f"; events older than {config.max_age:g}s are deleted"
        return [note]
    return [f"limits {listed} with discard old: the oldest events are deleted when exceeded"]


async def ensure_stream(
    js: JetStreamContext,
    *,
    name: str,
    subject_prefix: str,
    duplicate_window_s: float,
    create: bool,
    replicas: int = 1,
) -> StreamCheck:
    """Make sure the stream exists and can keep the delivery promise, or say why not.

    Raises StreamConfigError (listing every problem) when the stream is unfit, missing with
    ``create`` off, or refused by the server; BrokerError when JetStream cannot be reached
    or cannot place the stream yet (a cluster still forming: the caller retries);
    ValueError for a malformed name, prefix or window, which configuration loading should
    already have rejected (see ``validate_*``).
    Warnings are logged here once and also returned for status reporting.
    """
    wanted = stream_config(
        name=name,
        subject_prefix=subject_prefix,
        duplicate_window_s=duplicate_window_s,
        replicas=replicas,
    )
    info = await _stream_info(js, name)
    created = False
    if info is None:
        if not create:
            raise StreamConfigError(
                name,
                [
                    "stream does not exist and creating it is disabled; create it from "
                    "deploy/stream.json or allow the producer to create it"
                ],
            )
        info, created = await _create(js, wanted, subject_prefix)

    problems, warnings = check_stream_config(
        info.config, subject_prefix=subject_prefix, duplicate_window_s=duplicate_window_s
    )
    if problems:
        if created:
            problems.append("(the server did not apply the configuration the producer sent)")
        raise StreamConfigError(name, problems)
    for warning in warnings:
        _log.warning("stream %s: %s", name, warning)
    return StreamCheck(info=info, created=created, warnings=tuple(warnings))


async def _stream_info(js: JetStreamContext, name: str) -> StreamInfo | None:
    try:
        return await js.stream_info(name)
    except NotFoundError:
        return None
    except (nats.errors.Error, TimeoutError) as exc:
        raise BrokerError(f"cannot read stream {name}: {_describe(exc)}") from exc


async def _create(
    js: JetStreamContext, config: StreamConfig, subject_prefix: str
) -> tuple[StreamInfo, bool]:
    name = config.name or ""
    try:
        return await js.add_stream(config), True
    except APIError as exc:
        if exc.err_code == _ERR_STREAM_NAME_IN_USE:
            # Another producer created it between our lookup and our create; check theirs.
            info = await _stream_info(js, name)
            if info is None:
                raise BrokerError(f"stream {name} reported as existing, then not found") from exc
            return info, False
        if exc.code == 503 or exc.err_code in _ERR_NOT_YET:
            raise BrokerError(f"cannot create stream {name} yet: {_describe(exc)}") from exc
        if exc.err_code == _ERR_SUBJECTS_OVERLAP:
            raise StreamConfigError(
                name,
                [
                    f"cannot create it: subjects {subject_prefix}.> overlap with another "
                    "stream; remove that stream's claim or point the producer at it"
                ],
            ) from exc
        raise StreamConfigError(
            name, [f"the server refused to create it: {_describe(exc)}"]
        ) from exc
    except (nats.errors.Error, TimeoutError) as exc:
        raise BrokerError(f"cannot create stream {name}: {_describe(exc)}") from exc


def _covers(pattern: str, subject: str) -> bool:
    """True if every subject matched by ``subject`` (itself possibly a wildcard) is also
    matched by ``pattern``: ``>`` and ``a.>`` cover ``a.b.>``; ``a.*`` and ``a.b.c.>`` do
    not cover ``a.>``."""
    have, want = pattern.split("."), subject.split(".")
    for i, token in enumerate(have):
        if token == ">":
            return i < len(want)
        if i >= len(want) or want[i] == ">":
            return False
        if token != "*" and token != want[i]:
            return False
    return len(have) == len(want)


def _intersects(a: str, b: str) -> bool:
    """True if some concrete subject matches both wildcard subjects."""
    left, right = a.split("."), b.split(".")
    for i in range(max(len(left), len(right))):
        if i >= len(left) or i >= len(right):
            return False
        x, y = left[i], right[i]
        if ">" in (x, y):
            return True
        if x != y and "*" not in (x, y):
            return False
    return True


def _text(value: object) -> str:
    return str(value.value) if isinstance(value, Enum) else str(value)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        return f"{exc.description or 'error'} (code {exc.code}, err_code {exc.err_code})"
    return str(exc) or type(exc).__name__


if __name__ == "__main__":
    print(stream_config_json(), end="")
