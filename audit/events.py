"""What a consumer receives: one event's bytes, where it was stored, and typed views of it.

The bytes are the structured-mode event exactly as published (binary-mode messages are
rebuilt into their canonical structured form by :mod:`audit.message`); everything else is
derived from them on request. Verification hashes these bytes, never an SDK object; the
typed views (the ``schemas`` types) and the official CloudEvents SDK object are for
consumers that want to read the event.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Final

import msgspec

from audit.errors import EventError
from schemas.events import EVENT_TYPES, CloudEvent

if TYPE_CHECKING:
    from cloudevents.core.base import BaseCloudEvent

_envelope: Final = msgspec.json.Decoder(CloudEvent)


class TypedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event decoded into the contract's types: the envelope and its ``data`` struct
    (``schemas.events.EVENT_TYPES[envelope.type]``)."""

    envelope: CloudEvent
    data: msgspec.Struct


class Received(msgspec.Struct, frozen=True, kw_only=True):
    """One message of the stream."""

    raw: bytes
    """The structured-mode event, byte for byte as published (or rebuilt from a binary
    message); what an export writes and a verifier hashes."""
    subject: str | None = None
    """The NATS subject it was stored under (None when read from a bare event file)."""
    stream_seq: int | None = None
    stored_ns: int | None = None
    """When JetStream stored it, nanoseconds since the epoch."""

    def event(self) -> TypedEvent:
        """The event in the contract's types; :class:`EventError` if it does not fit."""
        try:
            envelope = _envelope.decode(self.raw)
        except msgspec.DecodeError as exc:
            raise EventError(self.stream_seq, f"not a valid event envelope: {exc}") from exc
        known = EVENT_TYPES.get(envelope.type)
        if known is None:
            raise EventError(self.stream_seq, f"unknown event type {envelope.type!r}")
        try:
            data = msgspec.convert(envelope.data, known[0])
        except msgspec.ValidationError as exc:
            raise EventError(self.stream_seq, f"data does not fit {envelope.type}: {exc}") from exc
        return TypedEvent(envelope=envelope, data=data)

    def as_dict(self) -> dict[str, Any]:
        """The event as plain JSON values."""
        try:
            value = msgspec.json.decode(self.raw)
        except msgspec.DecodeError as exc:
            raise EventError(self.stream_seq, f"not JSON: {exc}") from exc
        if type(value) is not dict:
            raise EventError(self.stream_seq, "not a JSON object")
        return value

    def cloudevent(self) -> BaseCloudEvent:
        """The event as the official CloudEvents SDK's object (``cloudevents.core``).

        The SDK is imported only here, so consumers that never ask for it never load it.
        """
        from cloudevents.core.exceptions import BaseCloudEventException  # noqa: PLC0415
        from cloudevents.core.formats.json import JSONFormat  # noqa: PLC0415

        try:
            return JSONFormat().read(None, self.raw)
        except (BaseCloudEventException, ValueError) as exc:
            raise EventError(self.stream_seq, f"not a CloudEvent: {exc}") from exc

    @property
    def stored_at(self) -> str | None:
        """:attr:`stored_ns` as RFC 3339 UTC with microseconds."""
        if self.stored_ns is None:
            return None
        return rfc3339(self.stored_ns)


def rfc3339(ns: int) -> str:
    """Nanoseconds since the epoch as the protocol's timestamp form."""
    seconds, rest = divmod(ns, 1_000_000_000)
    stamp = dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{rest // 1000:06d}Z"
