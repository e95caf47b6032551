"""Event vectors: one chain of every event kind, sealed by the production code with a fixed
key, so another implementation can check its canonical bytes, digests, signatures and
binary-mode headers byte for byte (docs/protocol.md).

``python -m tests.vectors.events`` rewrites ``tests/vectors/events/vectors.json``;
``tests/vectors/test_event_vectors.py`` regenerates it and fails on any difference, and
checks every vector with libraries independent of ours (``rfc8785``, ``cryptography``).

The key is a published test key (its seed is in the file): never trust it for anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit.canonical import canonical
from audit.digest import format_sequence
from audit.message import binary_headers, binary_payload
from producer.chain.events import (
    ChainContext,
    Pending,
    chain_event,
    guest_event,
    host_event,
    silenced_event,
)
from producer.chain.sealer import ChainSealer
from producer.chain.signing import Signer
from schemas.wire import Declaration

OUT: Final = Path(__file__).resolve().parent / "events" / "vectors.json"
SEED: Final = hashlib.sha256(b"cellos-producer event vectors, protocol 1.1").digest()
CHAIN_ID: Final = "00c0ffee00c0ffee"
SUPERSEDING_CHAIN_ID: Final = "5eed5eed5eed5eed"


def _ctx(chain_id: str) -> ChainContext:
    return ChainContext(
        host_id="hv-01",
        cell_id="cell-7",
        run_id="run-2026-12-01",
        spec_signature_hash="sha256:" + hashlib.sha256(b"cell-7 spec").hexdigest(),
        chain_id=chain_id,
        subject_prefix="cellos.telemetry",
    )


def _at(n: int) -> str:
    return f"2026-12-01T10:00:{n:02d}.{n * 1111:06d}Z"


def _opened(ctx: ChainContext, signer: Signer, supersedes: dict[str, Any] | None) -> Pending:
    return chain_event(
        ctx,
        "opened",
        _at(0 if supersedes is None else 40),
        {
            "hostId": ctx.host_id,
            "producerVersion": "1.1.0",
            "signkid": signer.kid,
            "publicKey": signer.public_key_b64,
            "chainId": ctx.chain_id,
            "socketPath": "/run/cellos/cell-7/vsock_9001",
            "probeTargets": {"nftFamily": "inet", "nftTable": "cell_7", "tapIface": "tap7"},
            "signingMode": "adaptive",
            "supersedes": supersedes,
        },
    )


def _main_chain(ctx: ChainContext, signer: Signer) -> list[tuple[str, Pending, bool]]:
    """(vector name, event, signed) in chain order; checkpoint fields are filled in later."""
    spawn = Declaration(1, "process.spawned", 4242, "bash", 1_000_000_000)
    exited = Declaration(1, "process.exited", 4243, 'zé✓"\\', 1_000_000_500)
    hostile = Declaration(1, "net.connect_attempted", 0xFFFF_FFFF, "curl", 2**64 - 1)
    nft_row = {"family": "inet", "table": "cell_7", "chain": "egress", "handle": 4}
    return [
        ("opened", _opened(ctx, signer, None), True),
        ("guest-signed", guest_event(ctx, spawn, _at(1)), True),
        ("guest-unsigned", guest_event(ctx, exited, _at(2)), False),
        ("guest-u64-max", guest_event(ctx, hostile, _at(3)), True),
        (
            "host-nftables",
            host_event(
                ctx,
                "nftables",
                _at(4),
                {"family": "inet", "table": "cell_7", "netns": None, "command": "nft"},
                {
                    "rows": [
                        {
                            **nft_row,
                            "packets": "18446744073709551615",
                            "bytes": "0",
                            "ruleRepr": ("ip daddr 10.0.0.1 counter drop"),
                        }
                    ]
                },
            ),
            True,
        ),
        (
            "agent-silenced",
            silenced_event(
                ctx, _at(20), window_ms=10_000, silent_for_ms=10_500, last_frame_at=_at(3)
            ),
            True,
        ),
        ("checkpoint", chain_event(ctx, "checkpoint", _at(21), {}), True),
        (
            "gap",
            chain_event(
                ctx,
                "gap",
                _at(22),
                {
                    "reason": "spool_full",
                    "lostCount": 3,
                    "firstLostAt": _at(21),
                    "lastLostAt": _at(22),
                },
            ),
            True,
        ),
        (
            "resumed",
            chain_event(
                ctx,
                "resumed",
                _at(30),
                {
                    "previousStopAt": _at(22),
                    "clean": True,
                    "hostId": ctx.host_id,
                    "producerVersion": "1.1.0",
                    "signkid": signer.kid,
                    "publicKey": signer.public_key_b64,
                },
            ),
            True,
        ),
        ("sealed", chain_event(ctx, "sealed", _at(31), {"reason": "deregistered"}), True),
    ]


def _vector(name: str, pending: Pending, payload: bytes, signed: bool) -> dict[str, Any]:
    event = json.loads(payload)
    vector: dict[str, Any] = {
        "name": name,
        "subject": pending.subject,
        "event": event,
        "canonical": payload.decode("utf-8"),
        "digest": "sha256:" + hashlib.sha256(payload).hexdigest(),
    }
    if signed:
        unsigned = {k: v for k, v in event.items() if k != "signature"}
        vector["signed_bytes"] = canonical(unsigned).decode("utf-8")
        vector["signature"] = event["signature"]
    vector["binary"] = {
        "headers": binary_headers(event),
        "payload": binary_payload(event).decode("utf-8"),
    }
    return vector


def _seal(sealer: ChainSealer, steps: list[tuple[str, Pending, bool]]) -> list[dict[str, Any]]:
    vectors = []
    for name, pending, signed in steps:
        event = pending.event
        kind = event["type"].rsplit(".", 1)[1]
        if kind == "checkpoint":
            event["data"]["headSequence"] = format_sequence(sealer.sequence)
            event["data"]["headHash"] = sealer.head_hash
        elif kind == "sealed":
            event["data"]["finalSequence"] = format_sequence(sealer.sequence + 1)
        chain_id = event["data"].get("chainId") or CHAIN_ID
        event["id"] = f"{chain_id}-{sealer.sequence + 1}"
        sealed = sealer.seal(event, sign=signed)
        vectors.append(_vector(name, pending, sealed.payload, signed))
    return vectors


def build() -> dict[str, Any]:
    signer = Signer(Ed25519PrivateKey.from_private_bytes(SEED))
    main = _seal(ChainSealer(signer), _main_chain(_ctx(CHAIN_ID), signer))
    superseding_ctx = _ctx(SUPERSEDING_CHAIN_ID)
    opened = _opened(
        superseding_ctx,
        signer,
        {
            "chainId": CHAIN_ID,
            "lastKnownSequence": main[-1]["event"]["sequence"],
            "lastKnownDigest": main[-1]["digest"],
            "reason": "state_lost",
        },
    )
    superseding = _seal(ChainSealer(signer), [("opened-superseding", opened, True)])
    return {
        "format": "see docs/protocol.md, 'Test vectors'",
        "key": {
            "warning": "published test key: never trust it outside these vectors",
            "seed_hex": SEED.hex(),
            "kid": signer.kid,
            "public_key": signer.public_key_b64,
        },
        "trust": {signer.kid: signer.public_key_b64},
        "chains": [
            {"chain_id": CHAIN_ID, "events": main},
            {"chain_id": SUPERSEDING_CHAIN_ID, "events": superseding},
        ],
    }


def render(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render(build()), encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
