"""The NATS binding codec: header percent-encoding and rebuilding binary-mode events."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audit.canonical import canonical
from audit.errors import MessageError
from audit.message import (
    binary_headers,
    binary_payload,
    decode_header_value,
    encode_header_value,
    event_from_binary,
    is_binary,
    structured_bytes,
)

EVENT = {
    "specversion": "1.0",
    "id": "00c0ffee00c0ffee-1",
    "source": "urn:cellos:host:hv 01%",
    "subject": "cell-7",
    "type": "dev.cellos.events.cell.observability.guest.v1.process_spawned",
    "time": "2026-12-01T10:00:00.000000Z",
    "datacontenttype": "application/json",
    "sequence": "00000000000000000001",
    "prevhash": "",
    "data": {"cellId": "cell-7", "guestComm": 'zé✓"', "guestMonotonicNs": "18446744073709551615"},
}


@given(st.text())
def test_header_values_round_trip(value: str) -> None:
    encoded = encode_header_value(value)
    assert encoded.isascii() and " " not in encoded and '"' not in encoded
    assert all(c.isprintable() for c in encoded)
    assert decode_header_value(encoded) == value


def test_only_space_quote_percent_and_non_ascii_are_encoded() -> None:
    assert encode_header_value("urn:cellos:host:hv-01") == "urn:cellos:host:hv-01"
    assert encode_header_value('a b"c%dé') == "a%20b%22c%25d%C3%A9"


def test_malformed_utf8_is_refused() -> None:
    with pytest.raises(MessageError, match="percent-encoded UTF-8"):
        decode_header_value("%C3%28")


def test_binary_message_rebuilds_the_structured_event() -> None:
    headers = binary_headers(EVENT)
    assert headers["ce-datacontenttype"] == headers["Content-Type"] == "application/json"
    assert headers["ce-source"] == "urn:cellos:host:hv%2001%25"
    assert "ce-data" not in headers and headers["Nats-Msg-Id"] == EVENT["id"]
    payload = binary_payload(EVENT)
    assert is_binary(headers)
    assert event_from_binary(headers, payload) == EVENT
    assert structured_bytes(payload, headers) == canonical(EVENT)


def test_structured_payload_is_returned_as_received() -> None:
    raw = b'{"b":1, "a":2}'  # not canonical: a verifier hashes what was published
    structured = {"Content-Type": "application/cloudevents+json", "Nats-Msg-Id": "x"}
    assert not is_binary(structured)
    assert structured_bytes(raw, structured) == raw
    assert structured_bytes(raw, None) == raw


def test_binary_message_without_datacontenttype_or_json_is_refused() -> None:
    headers = binary_headers(EVENT)
    del headers["ce-datacontenttype"]
    with pytest.raises(MessageError, match="ce-datacontenttype"):
        event_from_binary(headers, binary_payload(EVENT))
    with pytest.raises(MessageError, match="not JSON"):
        event_from_binary(binary_headers(EVENT), b"{")
