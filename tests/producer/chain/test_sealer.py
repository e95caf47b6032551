from __future__ import annotations

import copy
import hashlib
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.canonical import canonical
from audit.digest import MAX_SEQUENCE, digest_of, format_sequence
from audit.errors import CanonicalizationError
from audit.keys import verify_signature
from producer.chain.sealer import ChainSealer
from producer.errors import ChainError
from tests.chains import envelope, new_signer

SIGNER = new_signer()


def _event(data: dict[str, Any] | None = None, n: int = 1) -> dict[str, Any]:
    event = envelope(
        "cell-7",
        "run-1",
        "dev.cellos.events.cell.observability.guest.v1.x",
        {},
        n,
        chain_id="0" * 16,
    )
    if data is not None:
        event["data"] = data
    return event


# Data that tries to fool the signature splice: keys named like our attributes at every
# depth, strings spelling the marker, keys sorting around "signature"/"signkid".
_sneaky_text = st.sampled_from(
    ["signkid", "signature", ',"signkid":', '","signkid":"', "sequence", "signa", "\U0001f600"]
) | st.text(max_size=6)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53 - 1), 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _sneaky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_sneaky_text, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500)
@given(st.dictionaries(_sneaky_text, _json, max_size=6), st.booleans())
def test_sealed_payload_equals_full_reencode(data: dict[str, Any], sign: bool) -> None:
    sealer = ChainSealer(SIGNER)
    event = _event(data)
    sealed = sealer.seal(event, sign=sign)
    # the event now carries every chain attribute; the payload is exactly its JCS form
    assert sealed.payload == canonical(event)
    assert sealed.digest == "sha256:" + hashlib.sha256(sealed.payload).hexdigest()
    decoded = msgspec.json.decode(sealed.payload)
    assert decoded["sequence"] == "00000000000000000001" and decoded["prevhash"] == ""
    if sign:
        assert decoded["signkid"] == SIGNER.kid
        unsigned = {k: v for k, v in event.items() if k != "signature"}
        assert verify_signature(SIGNER.public_raw, canonical(unsigned), decoded["signature"])
    else:
        assert "signkid" not in decoded and "signature" not in decoded


def test_chain_links_sequences_and_hashes() -> None:
    sealer = ChainSealer(SIGNER)
    previous = ""
    for n in range(1, 6):
        sealed = sealer.seal(_event(n=n), sign=n % 2 == 0)
        body = msgspec.json.decode(sealed.payload)
        assert sealed.sequence == n and body["sequence"] == format_sequence(n)
        assert len(body["sequence"]) == 20
        assert body["prevhash"] == previous
        assert sealed.signed == (n % 2 == 0) == ("signature" in body)
        assert sealed.digest == digest_of(sealed.payload)
        previous = sealed.digest
        assert (sealer.sequence, sealer.head_hash) == (n, sealed.digest)


def test_restored_sealer_continues_the_same_chain() -> None:
    straight = ChainSealer(SIGNER)
    expected = [straight.seal(_event(n=n), sign=n == 3).payload for n in range(1, 6)]
    first = ChainSealer(SIGNER)
    got = [first.seal(_event(n=n), sign=False).payload for n in range(1, 3)]
    resumed = ChainSealer(SIGNER, sequence=first.sequence, head_hash=first.head_hash)
    got += [resumed.seal(_event(n=n), sign=n == 3).payload for n in range(3, 6)]
    assert got == expected


@pytest.mark.parametrize(
    ("sequence", "head_hash"),
    [
        (1, ""),
        (0, "sha256:" + "0" * 64),
        (-1, ""),
        (MAX_SEQUENCE + 1, "sha256:" + "0" * 64),
        (3, "sha256:" + "0" * 63),
        (3, "sha256:" + "A" * 64),
        (3, "md5:" + "0" * 64),
    ],
)
def test_inconsistent_restored_head_is_refused(sequence: int, head_hash: str) -> None:
    with pytest.raises(ChainError):
        ChainSealer(SIGNER, sequence=sequence, head_hash=head_hash)


def _mangled(change: str) -> dict[str, Any]:
    event = _event()
    if change == "extra":
        event["dataschema"] = "x"
    elif change == "reserved":
        event["sequence"] = "00000000000000000001"
    elif change == "missing":
        del event["time"]
    elif change == "not str":
        event["time"] = 17
    elif change == "data not object":
        event["data"] = [1]
    return event


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("extra", "unknown attributes: dataschema"),
        ("reserved", "sealer's to set: sequence"),
        ("missing", "missing attributes: time"),
        ("not str", "'time' must be a string"),
        ("data not object", "'data' must be an object"),
    ],
)
def test_malformed_envelope_is_refused_and_nothing_changes(change: str, reason: str) -> None:
    sealer = ChainSealer(SIGNER)
    sealer.seal(_event(), sign=True)
    head = (sealer.sequence, sealer.head_hash)
    event = _mangled(change)
    before = copy.deepcopy(event)
    with pytest.raises(ChainError, match=reason):
        sealer.seal(event, sign=True)
    assert (sealer.sequence, sealer.head_hash) == head
    assert event == before


def test_uncanonicalizable_data_leaves_chain_and_event_unchanged() -> None:
    sealer = ChainSealer(SIGNER)
    for sign in (False, True):
        event = _event({"load": float("nan")})
        before = copy.deepcopy(event)
        with pytest.raises(CanonicalizationError):
            sealer.seal(event, sign=sign)
        assert event.keys() == before.keys()
        assert (sealer.sequence, sealer.head_hash) == (0, "")
    assert sealer.seal(_event(), sign=True).sequence == 1


def test_signing_without_signer_is_refused() -> None:
    sealer = ChainSealer(None)
    assert sealer.seal(_event(), sign=False).sequence == 1
    with pytest.raises(ChainError, match="no signer"):
        sealer.seal(_event(), sign=True)
    with pytest.raises(ChainError, match="no signer"):
        sealer.seal_encoded(lambda seq, prev, kid: canonical(_event()), sign=True)
    assert sealer.sequence == 1


def test_every_envelope_problem_is_named_at_once() -> None:
    event = _event()
    del event["time"], event["data"]
    event.update(sequence="1", prevhash="", dataschema="x", traceparent="y")
    with pytest.raises(ChainError) as info:
        ChainSealer(None).seal(event, sign=False)
    assert str(info.value) == (
        "malformed envelope: chain attributes are the sealer's to set: prevhash, sequence; "
        "unknown attributes: dataschema, traceparent; missing attributes: data, time"
    )


def test_an_event_cannot_be_sealed_twice() -> None:
    sealer = ChainSealer(SIGNER)
    event = _event()
    sealer.seal(event, sign=True)
    with pytest.raises(ChainError, match="sealer's to set"):
        sealer.seal(event, sign=True)


def test_sequence_space_is_finite() -> None:
    sealer = ChainSealer(SIGNER, sequence=MAX_SEQUENCE - 1, head_hash="sha256:" + "0" * 64)
    assert msgspec.json.decode(sealer.seal(_event(), sign=False).payload)["sequence"] == "9" * 20
    with pytest.raises(ChainError, match="exhausted"):
        sealer.seal(_event(), sign=False)
