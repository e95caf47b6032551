"""Everything the verifier learns from one message on its own (docs/protocol.md, "Verifying",
steps 1, 2 and 6): pure, stateless, and therefore the part that runs in worker processes.

A message is decoded, re-canonicalized and hashed, its signature checked against the trust
file, and the facts the in-order chain checks need are kept in a small :class:`Prepared`
record. Nothing here depends on other events, so independent messages can be prepared in
parallel (:mod:`audit.pipeline`) while :mod:`audit.verify` walks the links in order.

Hashing and signature checks use the bytes re-canonicalized from the parsed event, never
an SDK object: a relay that re-encodes JSON does not change the event, and a payload the
producer published verbatim is its own canonical form, which one cheap comparison
confirms before the exact (slower) encoder is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

from audit.canonical import canonical
from audit.digest import SEQUENCE_DIGITS, digest_of
from audit.errors import CanonicalizationError
from audit.keys import SIGNATURE_SIZE, b64url_decode, is_b64url, verify_detached
from schemas.events import CHAIN_TYPE, TYPE_PREFIX

SIG_NONE: Final = 0
"""Unsigned: neither ``signkid`` nor ``signature``."""
SIG_VALID: Final = 1
SIG_INVALID: Final = 2
"""Signed under a trusted key id, but the signature does not verify."""
SIG_UNTRUSTED: Final = 3
"""Signed under a key id the trust file does not list."""
SIG_HALF: Final = 4
"""Only one of ``signkid`` and ``signature``, or either not a string."""
SIG_DEFERRED: Final = 5
"""Signed under a trusted key id and not checked here: the in-order checks either cover
it with a later verified signature through the hash links, or check it themselves from
``raw`` (:class:`audit.verify.ChainState`)."""

ANCHOR_EVERY: Final = 64
"""Every event whose sequence is a multiple of this, and every chain event, has its
signature checked where it is prepared (in parallel); see :func:`is_anchor`."""

_decode: Final = msgspec.json.decode
_encode_sorted: Final = msgspec.json.Encoder(order="sorted").encode
_SIGNATURE_MARK: Final = b',"signature":"'
_TYPE_HEAD: Final = TYPE_PREFIX + "."


class Prepared(msgspec.Struct, array_like=True, gc=False):
    """One message as the in-order checks need it. ``error`` set means it is not an event
    (and only ``index``, ``subject`` and ``stream_seq`` are meaningful)."""

    index: int
    """Position of the message in what was read (0-based), for problems without a chain."""
    subject: str | None
    """The NATS subject it was read from; None when unknown (a bare JSON-lines file)."""
    stream_seq: int | None
    error: str | None = None
    chain: str = ""
    """Chain id from the event ``id`` (the text before its last hyphen)."""
    sequence: int = 0
    id_ok: bool = True
    type: str = ""
    time: str = ""
    subject_attr: Any = None
    cell: str | None = None
    run: str | None = None
    prevhash: Any = None
    digest: str = ""
    canonical: bool = True
    kid: str | None = None
    signature: int = SIG_NONE
    data_ok: bool = True
    data: dict[str, Any] | None = None
    """``data`` of chain events (opened, checkpoint, gap, resumed, sealed) only."""
    expected_subject: str | None = None
    """The subject this event belongs on, when it was read from one that differs."""
    raw: bytes = b""
    """The message, kept only while its signature is deferred (a worker that was handed the
    message leaves it out of its answer and :mod:`audit.pipeline` puts it back; one that
    read the message itself sends it)."""


def is_anchor(sequence: int, type_: str) -> bool:
    """Whether an event's signature is checked where it is prepared, whatever follows."""
    return sequence % ANCHOR_EVERY == 0 or type_.startswith(CHAIN_TYPE)


def prepare(
    raw: bytes,
    index: int,
    trust: Mapping[str, bytes],
    *,
    subject: str | None = None,
    stream_seq: int | None = None,
    prefix: str | None = None,
    every_signature: bool = True,
) -> Prepared:
    """Decode, canonicalize, hash and check the signature of one structured-mode event.

    ``prefix`` is the subject prefix; with ``subject`` it lets the attribution check say
    whether the message sits on the subject its own ``subject``/``type`` name. Without
    ``every_signature``, only anchors (:func:`is_anchor`) are checked here and the other
    signatures are deferred (:data:`SIG_DEFERRED`).
    """
    try:
        body = _decode(raw)
    except msgspec.DecodeError:
        return Prepared(index, subject, stream_seq, error="not JSON")
    except RecursionError:  # msgspec's answer to hostile nesting: not a DecodeError
        return Prepared(index, subject, stream_seq, error="nested too deeply to be an event")
    if type(body) is not dict:
        return Prepared(index, subject, stream_seq, error="not a JSON object")
    text = body.get("sequence")
    if not (
        type(text) is str and len(text) == SEQUENCE_DIGITS and text.isascii() and text.isdigit()
    ):
        return Prepared(
            index, subject, stream_seq, error=f"sequence {text!r} is not 20 decimal digits"
        )
    sequence = int(text)
    if sequence == 0:
        return Prepared(index, subject, stream_seq, error="sequence 0 (chains start at 1)")
    try:
        full = _encode_sorted(body)
    except (TypeError, ValueError, OverflowError):
        full = b""  # the exact encoder below names the problem
    if full != raw:
        try:
            full = canonical(body)
        except CanonicalizationError as exc:
            return Prepared(
                index,
                subject,
                stream_seq,
                error=f"seq {sequence}: cannot be canonicalized ({exc.reason})",
            )
    event_id = body.get("id")
    chain, _, id_sequence = event_id.rpartition("-") if type(event_id) is str else ("", "", "")
    found = body.get("data")
    data_ok = isinstance(found, dict)
    data: dict[str, Any] = found if isinstance(found, dict) else {}
    type_ = body.get("type")
    type_ = type_ if type(type_) is str else ""
    cell = _str(data.get("cellId"))
    check = every_signature or is_anchor(sequence, type_)
    kid, state = _signature(body, full, trust, check)
    return Prepared(
        index,
        subject,
        stream_seq,
        chain=chain,
        sequence=sequence,
        id_ok=bool(chain) and id_sequence == str(sequence),
        type=type_,
        time=_str(body.get("time")) or "",
        subject_attr=body.get("subject"),
        cell=cell,
        run=_str(data.get("runId")),
        prevhash=body.get("prevhash"),
        digest=digest_of(full),
        canonical=full == raw,
        kid=kid,
        signature=state,
        data_ok=data_ok,
        data=data if type_.startswith(CHAIN_TYPE) else None,
        expected_subject=_misplaced(subject, prefix, body.get("subject"), type_),
        raw=raw if state == SIG_DEFERRED else b"",
    )


def _signature(
    body: dict[str, Any], full: bytes, trust: Mapping[str, bytes], check: bool
) -> tuple[str | None, int]:
    kid = body.get("signkid")
    signature = body.get("signature")
    if kid is None and signature is None:
        return None, SIG_NONE
    if type(kid) is not str or type(signature) is not str:
        return (kid if type(kid) is str else None), SIG_HALF
    key = trust.get(kid)
    if key is None:
        return kid, SIG_UNTRUSTED
    if not is_b64url(signature, SIGNATURE_SIZE):
        return kid, SIG_INVALID
    if not check:
        return kid, SIG_DEFERRED
    raw_signature = b64url_decode(signature, SIGNATURE_SIZE)
    assert raw_signature is not None  # is_b64url said so
    ok = verify_detached(key, _signed_bytes(body, full, signature), raw_signature)
    return kid, SIG_VALID if ok else SIG_INVALID


def _signed_bytes(body: dict[str, Any], full: bytes, signature: str) -> bytes:
    """The canonical bytes without ``signature``.

    In sorted order the top-level ``signature`` member is never first and comes after
    ``data`` (every nested key sorts inside it) and before the string attributes whose
    escaped values cannot contain the marker, so its last occurrence is the member; cutting
    it out of canonical bytes leaves the canonical bytes of the rest.
    """
    member = _SIGNATURE_MARK + signature.encode() + b'"'
    cut = full.rfind(_SIGNATURE_MARK)
    if cut > 0 and full.startswith(member, cut):
        return full[:cut] + full[cut + len(member) :]
    return canonical({k: v for k, v in body.items() if k != "signature"})


def _misplaced(subject: str | None, prefix: str | None, cell: object, type_: str) -> str | None:
    """The subject the event belongs on when ``subject`` is not it, else None."""
    if subject is None or prefix is None:
        return None
    if not (type(cell) is str and type_.startswith(_TYPE_HEAD)):
        expected = f"{prefix}.{cell}.?"
        return expected if subject != expected else None
    family, _, rest = type_[len(_TYPE_HEAD) :].partition(".")
    kind = rest.partition(".")[2]
    expected = f"{prefix}.{cell}.{family}.{kind}"
    return None if subject == expected else expected


def _str(value: object) -> str | None:
    return value if type(value) is str else None
