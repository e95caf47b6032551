"""The committed event vectors are what the production code seals today, and each one
checks out with libraries independent of ours: another implementation relying on them is
relying on RFC 8785, SHA-256 and Ed25519, not on this code base."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.message import event_from_binary
from audit.verify import verify_chain
from tests.support import assert_valid_event
from tests.vectors import events as generator

COMMITTED: dict[str, Any] = json.loads(generator.OUT.read_text(encoding="utf-8"))
VECTORS = [v for chain in COMMITTED["chains"] for v in chain["events"]]


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_committed_vectors_are_what_the_code_seals() -> None:
    assert generator.OUT.read_text(encoding="utf-8") == generator.render(generator.build()), (
        "run `python -m tests.vectors.events` and review the diff"
    )


def test_vectors_cover_every_kind_and_the_u64_edge() -> None:
    types = {v["event"]["type"].rsplit(".", 1)[1] for v in VECTORS}
    assert {"opened", "checkpoint", "gap", "resumed", "sealed", "agent_silenced"} <= types
    assert "nftables" in types and "process_spawned" in types
    assert any("signature" not in v["event"] for v in VECTORS)
    assert any(v["event"]["data"].get("guestMonotonicNs") == str(2**64 - 1) for v in VECTORS)
    assert any(v["event"]["data"].get("supersedes") for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_is_plain_rfc8785_sha256_ed25519(vector: dict[str, Any]) -> None:
    payload = vector["canonical"].encode("utf-8")
    event = vector["event"]
    assert json.loads(payload) == event
    assert rfc8785.dumps(event) == payload  # the standard package, no extension needed
    assert vector["digest"] == "sha256:" + hashlib.sha256(payload).hexdigest()
    assert_valid_event(payload)
    if "signature" not in event:
        assert "signkid" not in event and "signed_bytes" not in vector
        return
    unsigned = {k: v for k, v in event.items() if k != "signature"}
    assert rfc8785.dumps(unsigned) == vector["signed_bytes"].encode("utf-8")
    key = Ed25519PublicKey.from_public_bytes(_b64url(COMMITTED["trust"][event["signkid"]]))
    key.verify(_b64url(vector["signature"]), vector["signed_bytes"].encode("utf-8"))


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_binary_mode_rebuilds_the_same_event(vector: dict[str, Any]) -> None:
    binary = vector["binary"]
    headers = binary["headers"]
    assert headers["ce-datacontenttype"] == headers["Content-Type"] == "application/json"
    assert headers["Nats-Msg-Id"] == vector["event"]["id"]
    rebuilt = event_from_binary(headers, binary["payload"].encode("utf-8"))
    assert rfc8785.dumps(rebuilt) == vector["canonical"].encode("utf-8")


def test_the_vector_chains_verify() -> None:
    trust = {kid: _b64url(key) for kid, key in COMMITTED["trust"].items()}
    for chain in COMMITTED["chains"]:
        payloads = [v["canonical"].encode("utf-8") for v in chain["events"]]
        report = verify_chain(payloads, trust)
        assert report.ok, report.problems
        assert report.signed == sum("signature" in v["event"] for v in chain["events"])


def test_a_changed_byte_breaks_digest_and_signature() -> None:
    vector = next(v for v in VECTORS if v["name"] == "guest-u64-max")
    tampered = vector["signed_bytes"].replace("18446744073709551615", "18446744073709551614")
    key = Ed25519PublicKey.from_public_bytes(_b64url(COMMITTED["key"]["public_key"]))
    with pytest.raises(InvalidSignature):
        key.verify(_b64url(vector["signature"]), tampered.encode("utf-8"))
