"""Exact problems for the faults a review's mutants showed untested, through the public
API (``verify_chain`` and its report), so they hold whatever the verifier's insides."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import msgspec

from audit.canonical import canonical
from audit.verify import ChainReport, verify_chain
from tests.chains import ChainBuilder, full_chain, new_signer

SIGNER = new_signer()
TRUST = {SIGNER.kid: SIGNER.public_raw}


def _report(payloads: list[bytes], **kw: Any) -> ChainReport:
    return verify_chain(payloads, TRUST, **kw)


def _resigned(payload: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """Edit an event and sign it again with SIGNER: what a faulty producer would publish."""
    event = msgspec.json.decode(payload)
    change(event)
    event.pop("signature", None)
    event["signature"] = SIGNER.sign(canonical(event))
    return canonical(event)


def test_a_second_sealed_does_not_hide_the_events_after_the_first() -> None:
    b = full_chain(SIGNER)
    b.guest(200)
    b.sealed()
    report = _report(b.payloads)
    assert report.problems == ["seq 10: sealed, yet 2 event(s) follow it"]
    assert report.sealed


def test_the_first_event_links_to_nothing() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    linked = _resigned(b.payloads[0], lambda e: e.update(prevhash="sha256:" + "0" * 64))
    assert _report([linked]).problems == ["seq 1: prevhash must be empty"]


def test_unsigned_opened_is_detected() -> None:
    b = ChainBuilder(SIGNER)
    b.opened(sign=False)
    assert _report(b.payloads).problems == [
        "seq 1: opened is not signed by the key it announces",
        "seq 1: opened event is not validly signed",
    ]


def test_an_event_too_deep_to_canonicalize_is_reported() -> None:
    # Deep enough that the exact encoder (two frames per object) runs out of stack where
    # the parser (one level per object) does not; a float keeps it off the fast path.
    depth = sys.getrecursionlimit() * 2 // 3
    data = b'{"a":' * depth + b"1.5" + b"}" * depth
    payload = b'{"sequence":"00000000000000000002","data":' + data + b"}"
    report = _report([full_chain(SIGNER).payloads[0], payload])
    assert report.problems == ["seq 2: cannot be canonicalized (value is nested too deeply)"]


def test_event_whose_data_is_not_an_object() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    report = _report([b.payloads[0], _resigned(b.payloads[1], lambda e: e.update(data=5))])
    assert report.problems == [
        "seq 2: data is not an object",
        "seq 2: belongs to chain None/None, not 'cell-7'/'run-1'",
        "seq 2: subject 'cell-7' is not its cellId",
    ]


def test_a_hole_is_one_problem_and_the_link_across_it_is_not_judged() -> None:
    chain = full_chain(SIGNER).payloads
    assert _report(chain[:2] + chain[3:]).problems == ["seq 3 missing (an undeclared hole)"]


def test_checkpoint_after_a_hole_is_judged_by_its_own_prevhash() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    b.guest(2)
    b.checkpoint()
    assert _report([*b.payloads[:2], b.payloads[3]]).problems == [
        "seq 3 missing (an undeclared hole)"
    ]


def test_checkpoint_names_the_event_before_it_not_its_own_prevhash() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    relinked = _resigned(b.checkpoint(), lambda e: e.update(prevhash="sha256:" + "1" * 64))
    assert _report([*b.payloads[:2], relinked]).problems == [
        "seq 3: prevhash is not the digest of seq 2"
    ]


def test_hostile_nesting_is_a_problem_not_a_crash() -> None:
    chain = full_chain(SIGNER).payloads
    deep = b'{"data":' * 100_000  # msgspec refuses it with RecursionError, not DecodeError
    report = _report([*chain, deep])
    assert not report.ok
    assert any("nested too deeply" in p for p in report.problems), report.problems
