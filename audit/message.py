"""The CloudEvents NATS binding both ways (docs/protocol.md, "On NATS").

Structured mode: the payload is the event's JSON (the producer publishes its canonical
bytes) and ``Content-Type`` is ``application/cloudevents+json``. Binary mode: every
attribute is a ``ce-<name>`` header, ``ce-datacontenttype`` included, the payload is
``data`` alone, and ``Content-Type`` repeats ``datacontenttype``. Header values are
percent-encoded as the HTTP binding (3.1.3.2) prescribes: space, ``"``, ``%`` and
everything outside printable ASCII, as UTF-8 bytes.

An event rebuilt from a binary message's headers and payload is the same JSON object the
producer signed, so its canonical bytes (:func:`structured_bytes`) verify like a
structured message's payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote, unquote

import msgspec

from audit.canonical import canonical
from audit.errors import MessageError

STRUCTURED_CONTENT_TYPE: Final = "application/cloudevents+json"
CE_PREFIX: Final = "ce-"
# Printable ASCII except space, '"' and '%' passes through unencoded.
_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


def encode_header_value(value: str) -> str:
    """Percent-encode an attribute value for a ``ce-`` header."""
    return quote(value, safe=_SAFE, encoding="utf-8", errors="strict")


def decode_header_value(value: str) -> str:
    """Undo :func:`encode_header_value`; malformed UTF-8 is an error, not a guess."""
    try:
        return unquote(value, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise MessageError(f"header value {value!r} is not percent-encoded UTF-8") from exc


def binary_headers(event: Mapping[str, Any]) -> dict[str, str]:
    """Binary-mode headers of a sealed event: ``Nats-Msg-Id``, ``Content-Type`` and every
    attribute except ``data`` as ``ce-<name>``."""
    headers = {"Nats-Msg-Id": str(event["id"]), "Content-Type": str(event["datacontenttype"])}
    for name, value in event.items():
        if name != "data":
            headers[CE_PREFIX + name] = encode_header_value(str(value))
    return headers


def binary_payload(event: Mapping[str, Any]) -> bytes:
    """Binary-mode payload: the canonical JSON of ``data`` alone."""
    return canonical(event["data"])


def is_binary(headers: Mapping[str, str]) -> bool:
    """A message is binary-mode when it carries ``ce-specversion`` (the binding's marker);
    otherwise its payload is the structured event."""
    return CE_PREFIX + "specversion" in headers


def event_from_binary(headers: Mapping[str, str], payload: bytes) -> dict[str, Any]:
    """Rebuild the event object from a binary-mode message."""
    event: dict[str, Any] = {
        name[len(CE_PREFIX) :]: decode_header_value(value)
        for name, value in headers.items()
        if name.startswith(CE_PREFIX)
    }
    if "datacontenttype" not in event:
        raise MessageError("binary-mode message has no ce-datacontenttype header")
    try:
        event["data"] = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        raise MessageError(f"binary-mode payload is not JSON: {exc}") from exc
    return event


def structured_bytes(payload: bytes, headers: Mapping[str, str] | None) -> bytes:
    """The event as structured-mode JSON bytes, whichever mode it was published in.

    Structured payloads are returned as received (verifiers hash what was published);
    binary messages are rebuilt and canonicalized.
    """
    if headers is not None and is_binary(headers):
        return canonical(event_from_binary(headers, payload))
    return payload
