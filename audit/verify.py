"""Verification of one chain's events (SPEC 5): the pure half of the verifier.

Nothing is taken on trust from the payloads: each is parsed with exact integers,
re-canonicalized, and its digest recomputed, so a re-encoded but otherwise genuine event
still verifies and a tampered one does not. Every finding goes into the report rather
than stopping at the first, because forensics wants the whole picture of a damaged chain.

Duplicate deliveries of an identical event are reported but not counted as problems: the
broker's deduplication window is finite and a redelivery changes nothing about what the
producer said. Two *different* events under one sequence are tampering.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec

from audit.canonical import canonical
from audit.digest import DIGEST_RE, digest_of, format_sequence
from audit.errors import CanonicalizationError
from audit.keys import PUBLIC_KEY_SIZE, b64url_decode, verify_signature
from schemas.events import CHAIN_TYPE

OPENED: Final = CHAIN_TYPE + "opened"
CHECKPOINT: Final = CHAIN_TYPE + "checkpoint"
GAP: Final = CHAIN_TYPE + "gap"
SEALED: Final = CHAIN_TYPE + "sealed"
MUST_BE_SIGNED: Final = frozenset({OPENED, CHECKPOINT, GAP, SEALED})

UNATTRIBUTED: Final = ("", "")
""":func:`group_chains` key for messages naming no chain; never a real chain, since SPEC 3
ids are non-empty."""


class Gap(msgspec.Struct, frozen=True, kw_only=True):
    """A loss the producer declared (a ``gap`` event); declared losses are not problems."""

    sequence: int
    reason: str | None
    lost_count: int | None
    first_lost_at: str | None
    last_lost_at: str | None


class ChainReport(msgspec.Struct, kw_only=True):
    """What :func:`verify_chain` found. ``ok`` means no problem; the other fields inform."""

    cell_id: str | None
    run_id: str | None
    chain_id: str | None
    events: int
    first_sequence: int | None
    last_sequence: int | None
    signed: int
    sealed: bool
    ok: bool
    problems: list[str]
    gaps: list[Gap]
    duplicates: list[int]
    """Sequences delivered more than once with identical content."""
    noncanonical: list[int]
    """Sequences whose payload was not byte-identical to its canonical form (re-encoded
    in transit; harmless to integrity, since digests are recomputed)."""
    unsigned_tail: int
    """Events after the last validly signed one: not yet authenticated (SPEC 5.1)."""


class _Event(msgspec.Struct, frozen=True, gc=False):
    sequence: int
    body: dict[str, Any]
    digest: str
    was_canonical: bool


class _ChainKeyData(msgspec.Struct):
    cellId: str  # noqa: N815 (wire name)
    runId: str  # noqa: N815 (wire name)


class _ChainKey(msgspec.Struct):
    data: _ChainKeyData


_chain_key_decoder: Final = msgspec.json.Decoder(_ChainKey)


def group_chains(payloads: Iterable[bytes]) -> dict[tuple[str, str], list[bytes]]:
    """Split a replay into chains, keyed by ``(cellId, runId)``, stream order kept.

    Messages that name no chain go under :data:`UNATTRIBUTED` instead of being dropped,
    so verifying every group accounts for every message.
    """
    chains: dict[tuple[str, str], list[bytes]] = {}
    for payload in payloads:
        try:
            data = _chain_key_decoder.decode(payload).data
            key = (data.cellId, data.runId)
        except (msgspec.DecodeError, RecursionError):  # includes ValidationError
            key = UNATTRIBUTED
        chains.setdefault(key, []).append(payload)
    return chains


def verify_chain(
    payloads: Iterable[bytes],
    trust: Mapping[str, bytes],
    *,
    head: tuple[int, str] | None = None,
) -> ChainReport:
    """Check the messages of one chain, in stream order (any order is fine: ``sequence``
    restores it), against SPEC 5 and the keys in ``trust`` (kid -> raw public key).

    ``head`` is the chain's recorded latest signed head (sequence, digest) from the
    producer's key-value bucket (SPEC 5.3): the stream must contain exactly that event, or
    its tail was cut.
    """
    problems: list[str] = []
    duplicates: list[int] = []
    noncanonical: list[int] = []
    by_sequence: dict[int, _Event] = {}
    for index, payload in enumerate(payloads):
        event = _parse(index, payload, problems)
        if event is None:
            continue
        if event.sequence in by_sequence:
            if by_sequence[event.sequence].digest == event.digest:
                duplicates.append(event.sequence)
            else:
                problems.append(f"seq {event.sequence}: two different events carry it")
            continue
        if not event.was_canonical:
            noncanonical.append(event.sequence)
        by_sequence[event.sequence] = event

    order = sorted(by_sequence)
    problems.extend(_holes(order))
    if head is not None:
        recorded = by_sequence.get(head[0])
        if recorded is None:
            last = order[-1] if order else 0
            problems.append(
                f"recorded head is seq {head[0]} but the stream ends at seq {last}: "
                "the tail was cut"
            )
        elif recorded.digest != head[1]:
            problems.append(f"seq {head[0]}: digest differs from the recorded chain head")
    walk = _Walk(trust, problems)
    walk.opened(by_sequence.get(1), by_sequence[order[0]] if order else None)
    previous: _Event | None = None
    for sequence in order:
        event = by_sequence[sequence]
        adjacent = previous is not None and previous.sequence == sequence - 1
        walk.event(event, previous if adjacent else None)
        previous = event
    if walk.sealed_at is not None and order and walk.sealed_at != order[-1]:
        after = len(order) - order.index(walk.sealed_at) - 1
        problems.append(f"seq {walk.sealed_at}: sealed, yet {after} event(s) follow it")

    return ChainReport(
        cell_id=walk.cell_id,
        run_id=walk.run_id,
        chain_id=walk.chain_id,
        events=len(order),
        first_sequence=order[0] if order else None,
        last_sequence=order[-1] if order else None,
        signed=walk.signed,
        sealed=walk.sealed_at is not None,
        ok=not problems,
        problems=problems,
        gaps=walk.gaps,
        duplicates=duplicates,
        noncanonical=noncanonical,
        unsigned_tail=sum(1 for s in order if s > walk.last_signed),
    )


def _parse(index: int, payload: bytes, problems: list[str]) -> _Event | None:
    try:
        body = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        problems.append(f"message #{index}: not JSON")
        return None
    except RecursionError:  # a hostile message must be reported, not crash the verifier
        problems.append(f"message #{index}: nested too deeply to read")
        return None
    if type(body) is not dict:
        problems.append(f"message #{index}: not a JSON object")
        return None
    text = body.get("sequence")
    if not (type(text) is str and len(text) == 20 and text.isascii() and text.isdigit()):
        problems.append(f"message #{index}: sequence {text!r} is not 20 decimal digits")
        return None
    sequence = int(text)
    if sequence == 0:
        problems.append(f"message #{index}: sequence 0 (chains start at 1)")
        return None
    try:
        full = canonical(body)
    except CanonicalizationError as exc:
        problems.append(f"seq {sequence}: cannot be canonicalized ({exc.reason})")
        return None
    return _Event(sequence, body, digest_of(full), full == payload)


def _holes(order: list[int]) -> list[str]:
    found = []
    expected = 1
    for sequence in order:
        if sequence != expected:
            span = str(expected) if sequence - 1 == expected else f"{expected}-{sequence - 1}"
            found.append(f"seq {span} missing (an undeclared hole)")
        expected = sequence + 1
    return found


class _Walk:
    """The per-event checks, in sequence order, with what they learn along the way."""

    def __init__(self, trust: Mapping[str, bytes], problems: list[str]) -> None:
        self.trust = trust
        self.problems = problems
        self.cell_id: str | None = None
        self.run_id: str | None = None
        self.chain_id: str | None = None
        self.signed = 0
        self.last_signed = 0
        self.sealed_at: int | None = None
        self.gaps: list[Gap] = []

    def opened(self, first: _Event | None, earliest: _Event | None) -> None:
        """Fix the chain's identity from its opened event (or, failing that, from its
        earliest event, so the report still says which chain it is)."""
        if first is None or first.body.get("type") != OPENED:
            self.problems.append("chain does not start with an opened event at seq 1")
            anchor = first or earliest
            if anchor is not None:
                data = anchor.body.get("data")
                if type(data) is dict:
                    self.cell_id = _str_or_none(data.get("cellId"))
                    self.run_id = _str_or_none(data.get("runId"))
            return
        data = first.body.get("data")
        if type(data) is not dict:
            return  # reported by event()
        self.cell_id = _str_or_none(data.get("cellId"))
        self.run_id = _str_or_none(data.get("runId"))
        self.chain_id = _str_or_none(data.get("chainId"))
        kid = data.get("signkid")
        public_key = data.get("publicKey")
        raw = b64url_decode(public_key, PUBLIC_KEY_SIZE) if type(public_key) is str else None
        if raw is None:
            self.problems.append("seq 1: opened carries no valid publicKey")
        if type(kid) is not str or kid not in self.trust:
            self.problems.append(f"seq 1: opened names key {kid!r}, which is not trusted")
        elif raw is not None and self.trust[kid] != raw:
            self.problems.append(f"seq 1: opened's publicKey is not the trusted key {kid!r}")
        if first.body.get("signkid") != kid:
            self.problems.append("seq 1: opened is not signed by the key it announces")

    def event(self, event: _Event, previous: _Event | None) -> None:
        sequence, body = event.sequence, event.body
        say = self.problems.append
        prevhash = body.get("prevhash")
        if sequence == 1:
            if prevhash != "":
                say("seq 1: prevhash must be empty")
        elif previous is not None and prevhash != previous.digest:
            say(f"seq {sequence}: prevhash is not the digest of seq {sequence - 1}")

        data = body.get("data")
        if type(data) is not dict:
            say(f"seq {sequence}: data is not an object")
            data = {}
        if self.cell_id is not None and (
            data.get("cellId") != self.cell_id or data.get("runId") != self.run_id
        ):
            say(
                f"seq {sequence}: belongs to chain {data.get('cellId')!r}/{data.get('runId')!r}"
                f", not {self.cell_id!r}/{self.run_id!r}"
            )
        if body.get("subject") != data.get("cellId"):
            say(f"seq {sequence}: subject {body.get('subject')!r} is not its cellId")

        kind = body.get("type")
        signed = self._signature_ok(event)
        if kind in MUST_BE_SIGNED and not signed:
            say(f"seq {sequence}: {str(kind).rsplit('.', 1)[-1]} event is not validly signed")
        if kind == OPENED and sequence != 1:
            say(f"seq {sequence}: a second opened event")
        elif kind == CHECKPOINT:
            self._checkpoint(event, data, previous)
        elif kind == GAP:
            self.gaps.append(
                Gap(
                    sequence=sequence,
                    reason=_str_or_none(data.get("reason")),
                    lost_count=_int_or_none(data.get("lostCount")),
                    first_lost_at=_str_or_none(data.get("firstLostAt")),
                    last_lost_at=_str_or_none(data.get("lastLostAt")),
                )
            )
        elif kind == SEALED:
            if data.get("finalSequence") != format_sequence(sequence):
                say(f"seq {sequence}: sealed's finalSequence is not its own sequence")
            if self.sealed_at is None:
                self.sealed_at = sequence

    def _signature_ok(self, event: _Event) -> bool:
        body = event.body
        kid = body.get("signkid")
        signature = body.get("signature")
        if kid is None and signature is None:
            return False
        if type(kid) is not str or type(signature) is not str:
            self.problems.append(f"seq {event.sequence}: signkid and signature must come together")
            return False
        key = self.trust.get(kid)
        if key is None:
            self.problems.append(f"seq {event.sequence}: signed with untrusted key {kid!r}")
            return False
        signed_bytes = canonical({k: v for k, v in body.items() if k != "signature"})
        if not verify_signature(key, signed_bytes, signature):
            self.problems.append(f"seq {event.sequence}: signature does not verify")
            return False
        self.signed += 1
        self.last_signed = event.sequence
        return True

    def _checkpoint(self, event: _Event, data: dict[str, Any], previous: _Event | None) -> None:
        sequence = event.sequence
        if data.get("headSequence") != format_sequence(sequence - 1):
            self.problems.append(
                f"seq {sequence}: checkpoint headSequence is not seq {sequence - 1}"
            )
        head_hash = data.get("headHash")
        expected = previous.digest if previous is not None else event.body.get("prevhash")
        if (
            type(head_hash) is not str
            or not DIGEST_RE.fullmatch(head_hash)
            or head_hash != expected
        ):
            self.problems.append(
                f"seq {sequence}: checkpoint headHash is not the digest of seq {sequence - 1}"
            )


def _str_or_none(value: object) -> str | None:
    return value if type(value) is str else None


def _int_or_none(value: object) -> int | None:
    return value if type(value) is int else None
