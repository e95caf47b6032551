"""Real chains for tests: built with the production ChainSealer and Signer."""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit.digest import digest_of, format_sequence
from audit.verify import ChainReport, StreamVerifier, prepare
from producer.chain.sealer import ChainSealer
from producer.chain.signing import Signer
from schemas.events import CHAIN_TYPE, GUEST_TYPE, HOST_TYPE
from schemas.heads import ChainHead

AT = "2024-05-01T12:00:00.123456Z"


def new_signer(kid: str | None = None) -> Signer:
    return Signer(Ed25519PrivateKey.generate(), kid)


def envelope(
    cell: str, run: str, type_: str, fields: dict[str, Any], n: int, *, chain_id: str
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"{chain_id}-{n}",
        "source": "urn:cellos:host:hv-01",
        "subject": cell,
        "type": type_,
        "time": AT,
        "datacontenttype": "application/json",
        "data": {
            "cellId": cell,
            "runId": run,
            "specSignatureHash": "sha256:" + "ab" * 32,
            "hostReceivedAt": AT,
            **fields,
        },
    }


class ChainBuilder:
    """Seals events of one chain, one method per event family."""

    def __init__(self, signer: Signer, cell: str = "cell-7", run: str = "run-1") -> None:
        self.signer = signer
        self.cell = cell
        self.run = run
        self.chain_id = hashlib.sha256(f"{cell}.{run}".encode()).hexdigest()[:16]
        self.sealer = ChainSealer(signer)
        self.payloads: list[bytes] = []

    def _add(self, type_: str, fields: dict[str, Any], *, sign: bool) -> bytes:
        event = envelope(
            self.cell, self.run, type_, fields, self.sealer.sequence + 1, chain_id=self.chain_id
        )
        payload = self.sealer.seal(event, sign=sign).payload
        self.payloads.append(payload)
        return payload

    def rotate(self, signer: Signer) -> None:
        """Continue the chain under another key, as a producer reloading its key does."""
        self.signer = signer
        self.sealer = ChainSealer(
            signer, sequence=self.sealer.sequence, head_hash=self.sealer.head_hash
        )

    def opened(
        self,
        *,
        sign: bool = True,
        announce: Signer | None = None,
        supersedes: dict[str, Any] | None = None,
    ) -> bytes:
        """``announce``: the key opened names, if not the one that signs it."""
        named = announce or self.signer
        return self._add(
            CHAIN_TYPE + "opened",
            {
                "hostId": "hv-01",
                "producerVersion": "0.1.0",
                "signkid": named.kid,
                "publicKey": named.public_key_b64,
                "chainId": self.chain_id,
                "socketPath": f"/run/cellos/{self.cell}.vsock_9001",
                "probeTargets": {"nft": {"family": "inet", "table": "cell_7"}},
                "signingMode": "adaptive",
                "supersedes": supersedes,
            },
            sign=sign,
        )

    def resumed(self, *, clean: bool = True) -> bytes:
        """A restarted producer continuing the chain, under the builder's current key."""
        fields = {
            "previousStopAt": AT,
            "clean": clean,
            "hostId": "hv-01",
            "producerVersion": "0.1.1",
            "signkid": self.signer.kid,
            "publicKey": self.signer.public_key_b64,
        }
        return self._add(CHAIN_TYPE + "resumed", fields, sign=True)

    def guest(self, pid: int = 4242, *, sign: bool = True, monotonic_ns: int = 10**12) -> bytes:
        """A guest event; ``monotonic_ns`` is written as the decimal string events carry."""
        return self._add(
            GUEST_TYPE + "process_spawned",
            {
                "probeSource": "process.spawned",
                "contentVersion": 1,
                "guestPid": pid,
                "guestComm": "bash",
                "guestMonotonicNs": str(monotonic_ns),
            },
            sign=sign,
        )

    def host(self, *, sign: bool = True) -> bytes:
        return self._add(
            HOST_TYPE + "cgroup",
            {
                "probeSource": "host.cgroup",
                "inputs": {"path": "/sys/fs/cgroup/cell-7"},
                "output": {"cpu.stat": {"usage_usec": "123456", "nr_periods": "0"}},
            },
            sign=sign,
        )

    def checkpoint(self, *, sign: bool = True) -> bytes:
        head = {
            "headSequence": format_sequence(self.sealer.sequence),
            "headHash": self.sealer.head_hash,
        }
        return self._add(CHAIN_TYPE + "checkpoint", head, sign=sign)

    def gap(
        self, lost: int = 3, *, sign: bool = True, sequences: tuple[Any, Any] | None = None
    ) -> bytes:
        """``sequences``: the first and last lost sequence, as a damaged spool's gap names
        them (written as given, so a test can spell them wrongly)."""
        fields = {"reason": "queue_full", "lostCount": lost, "firstLostAt": AT, "lastLostAt": AT}
        if sequences is not None:
            fields["firstLostSequence"], fields["lastLostSequence"] = sequences
        return self._add(CHAIN_TYPE + "gap", fields, sign=sign)

    def sealed(self, *, sign: bool = True) -> bytes:
        fields = {
            "reason": "deregistered",
            "finalSequence": format_sequence(self.sealer.sequence + 1),
        }
        return self._add(CHAIN_TYPE + "sealed", fields, sign=sign)


def full_chain(signer: Signer, cell: str = "cell-7", run: str = "run-1") -> ChainBuilder:
    """opened, a mix of signed and unsigned guest/host events, checkpoint, gap, sealed."""
    b = ChainBuilder(signer, cell, run)
    b.opened()
    b.guest(100, sign=False)
    b.guest(101, sign=False)
    b.guest(102)
    b.host(sign=False)
    b.checkpoint()
    b.guest(103, sign=False, monotonic_ns=2**64 - 1)
    b.gap()
    b.guest(104)
    b.sealed()
    return b


def verify_stream_of(
    payloads: list[bytes], trust: dict[str, bytes], **kw: Any
) -> list[ChainReport]:
    """Every chain of a stream (the payloads in stream order), through the streaming
    verifier as ``cellos-audit verify`` runs it, without a broker."""
    verifier = StreamVerifier(trust, **kw)
    for index, payload in enumerate(payloads):
        verifier.add(prepare(payload, index, trust))
    return verifier.finish()


def recorded_head(b: ChainBuilder, sequence: int, *, sealed: bool = False) -> dict[str, ChainHead]:
    """The recorded head of ``b``'s chain at ``sequence`` (an event it sealed, its real
    digest), as the heads bucket would hold it."""
    head = ChainHead(
        cell_id=b.cell,
        run_id=b.run,
        chain_id=b.chain_id,
        sequence=sequence,
        digest=digest_of(b.payloads[sequence - 1]),
        event_id=f"{b.chain_id}-{sequence}",
        type="sealed" if sealed else "checkpoint",
        sealed=sealed,
    )
    return {b.chain_id: head}
