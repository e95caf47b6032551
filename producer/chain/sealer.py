"""Sequencing, hash-chaining and signing of one chain's events (SPEC 5.1, 5.2).

Pure: no clock, no I/O. The caller decides when an event is signed (always for chain
events, by policy otherwise) and persists the head (``sequence``, ``head_hash``) so a
restarted producer continues the chain instead of forking it.

The sealer is the last gate before bytes become permanent, so it insists on the exact
SPEC 4 envelope: the eight attributes the caller supplies, ``data`` an object and the
others strings. That also keeps the signature splice below provably correct.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec

from audit.canonical import canonical_event
from audit.digest import DIGEST_RE, MAX_SEQUENCE, digest_of, format_sequence
from producer.chain.signing import Signer
from producer.errors import ChainError

STRING_ATTRIBUTES: Final = (
    "specversion",
    "id",
    "source",
    "subject",
    "type",
    "time",
    "datacontenttype",
)
ENVELOPE_KEYS: Final = frozenset((*STRING_ATTRIBUTES, "data"))
"""What a caller hands to :meth:`ChainSealer.seal`; the sealer adds the chain attributes."""

CHAIN_ATTRIBUTES: Final = frozenset({"sequence", "prevhash", "signkid", "signature"})

# The signature is spliced into the bytes that were signed instead of encoding the event a
# second time. In the sorted top level "signature" falls right before "signkid" (no
# envelope key sorts between them), and rfind lands on the top-level signkid: every value
# after it (source ... type) is a string, where `"` is always escaped, so the marker cannot
# occur there; nested "signkid" keys in data come earlier, since "data" sorts first.
_SIGNKID_MARK: Final = b',"signkid":'
_SIGNATURE_OPEN: Final = b',"signature":"'


class Sealed(msgspec.Struct, frozen=True, gc=False):
    """One sealed event: ``payload`` is what gets spooled and published, byte for byte."""

    sequence: int
    digest: str
    payload: bytes
    signed: bool


EventEncoder = Callable[[int, str, "str | None"], bytes]
"""``(sequence, prevhash, signkid or None) -> canonical bytes`` of a complete event without
``signature``: what a pre-compiled template (``producer.events.GuestEncoder``) provides
instead of a dict, on the hot path."""


class ChainSealer:
    """Seals the events of one chain (one registration: cellId + runId) in order.

    ``sequence`` is the last sequence used (0 before the first event) and ``head_hash``
    the digest of that event; pass both back in after a restart to continue the chain.
    """

    __slots__ = ("_head_hash", "_sequence", "_signer")

    def __init__(self, signer: Signer | None, *, sequence: int = 0, head_hash: str = "") -> None:
        if not 0 <= sequence <= MAX_SEQUENCE:
            raise ChainError(f"restored sequence {sequence} is out of range")
        if (sequence == 0) != (head_hash == ""):
            raise ChainError("a restored head needs both a sequence and its hash, or neither")
        if head_hash and not DIGEST_RE.fullmatch(head_hash):
            raise ChainError(f"restored head hash {head_hash!r} is not sha256:<64 hex>")
        self._signer = signer
        self._sequence = sequence
        self._head_hash = head_hash

    @property
    def sequence(self) -> int:
        return self._sequence

    @property
    def head_hash(self) -> str:
        return self._head_hash

    @property
    def signer(self) -> Signer | None:
        return self._signer

    def seal(self, event: dict[str, Any], *, sign: bool) -> Sealed:
        """Give ``event`` the next sequence and the head's hash, sign it if asked, encode it
        canonically, and advance the head.

        The chain attributes (``sequence``, ``prevhash`` and, when signed, ``signkid`` and
        ``signature``) are added to ``event`` in place, because binary-mode publishing
        needs them as headers; a second seal of the same dict is therefore refused.
        Raises :class:`ChainError` for a malformed envelope, a signed event without a
        signer, or an exhausted sequence space, and
        :class:`~producer.errors.CanonicalizationError` for data JCS cannot express; on
        any error both the chain and ``event`` are left as they were.
        """
        if event.keys() != ENVELOPE_KEYS:
            raise ChainError(_envelope_problem(event))
        for name in STRING_ATTRIBUTES:
            if type(event[name]) is not str:
                raise ChainError(f"attribute {name!r} must be a string")
        if type(event["data"]) is not dict:
            raise ChainError("attribute 'data' must be an object")
        sequence, signer = self._next(sign)
        event["sequence"] = format_sequence(sequence)
        event["prevhash"] = self._head_hash
        try:
            if signer is not None and sign:
                event["signkid"] = signer.kid
                payload, signature = _signed(signer, canonical_event(event))
                event["signature"] = signature
            else:
                payload = canonical_event(event)
        except BaseException:
            for name in CHAIN_ATTRIBUTES:
                event.pop(name, None)
            raise
        return self._advance(sequence, payload, sign)

    def seal_encoded(self, encode: EventEncoder, *, sign: bool) -> Sealed:
        """:meth:`seal` for an event the caller encodes itself from the chain attributes.

        ``encode`` must return the RFC 8785 bytes of the whole event without
        ``signature``; the tests hold every encoder to byte equality with
        :func:`~producer.canonical.canonical` of the same event as a dict.
        """
        sequence, signer = self._next(sign)
        if signer is not None and sign:
            payload, _ = _signed(signer, encode(sequence, self._head_hash, signer.kid))
        else:
            payload = encode(sequence, self._head_hash, None)
        return self._advance(sequence, payload, sign)

    def _next(self, sign: bool) -> tuple[int, Signer | None]:
        """The next sequence and the signer, refusing what cannot be sealed."""
        sequence = self._sequence + 1
        if sequence > MAX_SEQUENCE:
            raise ChainError("sequence space exhausted")
        if sign and self._signer is None:
            raise ChainError("a signed event was requested but this chain has no signer")
        return sequence, self._signer

    def _advance(self, sequence: int, payload: bytes, signed: bool) -> Sealed:
        digest = digest_of(payload)
        self._sequence = sequence
        self._head_hash = digest
        return Sealed(sequence, digest, payload, signed)


def _signed(signer: Signer, signed_bytes: bytes) -> tuple[bytes, str]:
    """Sign canonical bytes and splice the signature in at its sorted place."""
    signature = signer.sign(signed_bytes)
    cut = signed_bytes.rfind(_SIGNKID_MARK)
    payload = b"".join(
        (signed_bytes[:cut], _SIGNATURE_OPEN, signature.encode("ascii"), b'"', signed_bytes[cut:])
    )
    return payload, signature


def _envelope_problem(event: dict[str, Any]) -> str:
    keys = set(event)
    parts = []
    if reserved := sorted(keys & CHAIN_ATTRIBUTES):
        parts.append(f"chain attributes are the sealer's to set: {', '.join(reserved)}")
    if unknown := sorted(map(str, keys - ENVELOPE_KEYS - CHAIN_ATTRIBUTES)):
        parts.append(f"unknown attributes: {', '.join(unknown)}")
    if missing := sorted(ENVELOPE_KEYS - keys):
        parts.append(f"missing attributes: {', '.join(missing)}")
    return "malformed envelope: " + "; ".join(parts)
