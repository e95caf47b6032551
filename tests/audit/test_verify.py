"""Chains built by the real sealer verify; every kind of tampering SPEC 5.2 promises to
expose is reported."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from audit.canonical import canonical
from audit.digest import digest_of
from audit.verify import UNATTRIBUTED, ChainReport, Gap, group_chains, verify_chain
from producer.chain.signing import Signer
from tests.chains import AT, ChainBuilder, full_chain, new_signer

OPENED_TYPE = "dev.cellos.events.cell.observability.chain.v1.opened"
SIGNER = new_signer()
TRUST = {SIGNER.kid: SIGNER.public_raw}


def _report(payloads: list[bytes], trust: dict[str, bytes] | None = None) -> ChainReport:
    return verify_chain(payloads, TRUST if trust is None else trust)


def _edit(payload: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """Decode, change, and re-encode canonically (a careful attacker's edit)."""
    event = msgspec.json.decode(payload)
    change(event)
    return canonical(event)


def _resigned(payload: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """Edit an event and sign it again with SIGNER: what a faulty producer would publish."""
    event = msgspec.json.decode(payload)
    change(event)
    event.pop("signature", None)
    event["signature"] = SIGNER.sign(canonical(event))
    return canonical(event)


def _assert_problem(report: ChainReport, *fragments: str) -> None:
    assert not report.ok
    text = "\n".join(report.problems)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"


# ---- genuine chains


def test_genuine_sealed_chain_verifies() -> None:
    chain = full_chain(SIGNER).payloads
    report = _report(chain)
    assert report.ok, report.problems
    assert (report.cell_id, report.run_id, report.chain_id) == ("cell-7", "run-1", "cell-7.run-1")
    assert (report.events, report.first_sequence, report.last_sequence) == (10, 1, 10)
    assert report.signed == 6  # opened, guest 102, checkpoint, gap, guest 104, sealed
    assert report.sealed and report.unsigned_tail == 0
    assert report.gaps == [
        Gap(sequence=8, reason="queue_full", lost_count=3, first_lost_at=AT, last_lost_at=AT)
    ]
    assert report.duplicates == [] and report.noncanonical == []


def test_any_stream_order_verifies() -> None:
    chain = full_chain(SIGNER).payloads
    for seed in range(5):
        shuffled = chain[:]
        random.Random(seed).shuffle(shuffled)
        assert _report(shuffled).ok


def test_open_chain_reports_its_unsigned_tail_as_information() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    for pid in range(3):
        b.guest(pid, sign=False)
    report = _report(b.payloads)
    assert report.ok, report.problems
    assert not report.sealed and report.unsigned_tail == 3 and report.signed == 2


def test_reencoded_payloads_still_verify_and_are_flagged() -> None:
    chain = full_chain(SIGNER).payloads
    # same event, other spelling: keys reversed and whitespace added
    event = msgspec.json.decode(chain[3])
    respelled = msgspec.json.format(msgspec.json.encode(dict(reversed(event.items()))), indent=1)
    report = _report([*chain[:3], respelled, *chain[4:]])
    assert report.ok, report.problems
    assert report.noncanonical == [4]


def test_identical_redelivery_is_reported_not_failed() -> None:
    chain = full_chain(SIGNER).payloads
    report = _report([*chain[:5], chain[2], *chain[5:], chain[9]])
    assert report.ok
    assert report.duplicates == [3, 10]
    assert report.events == 10


# ---- tampering


def test_changed_data_in_signed_event_is_detected() -> None:
    chain = full_chain(SIGNER).payloads
    assert b'"guestPid":102' in chain[3]
    tampered = chain[3].replace(b'"guestPid":102', b'"guestPid":103')
    _assert_problem(
        _report([*chain[:3], tampered, *chain[4:]]),
        "seq 4: signature does not verify",
        "seq 5: prevhash is not the digest of seq 4",
    )


def test_changed_data_in_unsigned_event_is_detected() -> None:
    chain = full_chain(SIGNER).payloads
    assert b'"guestPid":100' in chain[1]
    tampered = chain[1].replace(b'"guestPid":100', b'"guestPid":666')
    report = _report([chain[0], tampered, *chain[2:]])
    assert report.problems == ["seq 3: prevhash is not the digest of seq 2"]


def test_flipped_byte_making_garbage_is_detected() -> None:
    chain = full_chain(SIGNER).payloads
    broken = bytearray(chain[4])
    broken[0] ^= 0xFF
    _assert_problem(_report([*chain[:4], bytes(broken), *chain[5:]]), "not JSON", "seq 5 missing")


def test_unsigned_tail_of_a_sealed_chain_cannot_be_edited() -> None:
    # The guest event at seq 7 is unsigned; only the signed gap after it protects it.
    chain = full_chain(SIGNER).payloads
    tampered = _edit(chain[6], lambda e: e["data"].update(guestComm="evil"))
    _assert_problem(_report([*chain[:6], tampered, *chain[7:]]), "seq 8: prevhash")


@pytest.mark.parametrize("index", [1, 4, 8])
def test_deleted_event_is_detected(index: int) -> None:
    chain = full_chain(SIGNER).payloads
    report = _report(chain[:index] + chain[index + 1 :])
    _assert_problem(report, f"seq {index + 1} missing")


def test_deleted_run_of_events_is_reported_as_one_hole() -> None:
    chain = full_chain(SIGNER).payloads
    _assert_problem(_report(chain[:2] + chain[5:]), "seq 3-5 missing")


def test_swapped_sequence_numbers_are_detected() -> None:
    chain = full_chain(SIGNER).payloads
    # seq 2 and 3 are unsigned: swap their sequence attributes and re-encode both
    a = _edit(chain[1], lambda e: e.update(sequence="00000000000000000003"))
    b = _edit(chain[2], lambda e: e.update(sequence="00000000000000000002"))
    _assert_problem(_report([chain[0], a, b, *chain[3:]]), "prevhash is not the digest")


def test_swapped_data_between_events_is_detected() -> None:
    chain = full_chain(SIGNER).payloads
    one, two = msgspec.json.decode(chain[1]), msgspec.json.decode(chain[2])
    one["data"], two["data"] = two["data"], one["data"]
    report = _report([chain[0], canonical(one), canonical(two), *chain[3:]])
    _assert_problem(report, "seq 3: prevhash", "seq 4: prevhash")


def test_conflicting_event_under_one_sequence_is_tampering() -> None:
    chain = full_chain(SIGNER).payloads
    forged = _edit(chain[2], lambda e: e["data"].update(guestPid=1))
    report = _report([*chain, forged])
    _assert_problem(report, "seq 3: two different events carry it")
    assert report.duplicates == []


def test_event_spliced_from_another_chain_is_detected() -> None:
    chain = full_chain(SIGNER).payloads
    other_run = full_chain(SIGNER, run="run-2").payloads  # same key, same cell
    report = _report([*chain[:3], other_run[3], *chain[4:]])
    _assert_problem(
        report,
        "seq 4: belongs to chain 'cell-7'/'run-2', not 'cell-7'/'run-1'",
        "seq 4: prevhash",
    )
    # same cell and run, a chain that forked at seq 2: identity matches, hashes don't
    fork = ChainBuilder(SIGNER)
    fork.opened()
    fork.guest(555, sign=False)
    fork.guest(101, sign=False)
    fork.guest(102)
    assert fork.payloads[3] != chain[3]
    report = _report([*chain[:3], fork.payloads[3], *chain[4:]])
    assert report.problems == [
        "seq 4: prevhash is not the digest of seq 3",
        "seq 5: prevhash is not the digest of seq 4",
    ]


def test_wrong_key_is_detected() -> None:
    mallory = new_signer()
    chain = full_chain(mallory).payloads
    report = _report(chain)
    _assert_problem(report, "opened names key", "signed with untrusted key", "opened event")
    assert report.signed == 0 and report.unsigned_tail == report.events
    # Mallory reusing our kid: the key id matches, the signatures do not
    impostor = new_signer(kid=SIGNER.kid)
    _assert_problem(
        _report(full_chain(impostor).payloads),
        "opened's publicKey is not the trusted key",
        "seq 1: signature does not verify",
    )


def test_opened_must_be_signed_by_the_key_it_announces() -> None:
    other = new_signer()
    b = ChainBuilder(other)
    b.opened(announce=SIGNER)
    b.guest(1)
    report = _report(b.payloads, {**TRUST, other.kid: other.public_raw})
    assert report.problems == ["seq 1: opened is not signed by the key it announces"]


def test_rotated_keys_both_in_trust_verify() -> None:
    old, new = new_signer(), new_signer()
    trust = {old.kid: old.public_raw, new.kid: new.public_raw}
    assert _report(full_chain(old).payloads, trust).ok
    assert _report(full_chain(new).payloads, trust).ok
    assert not _report(full_chain(new).payloads, {old.kid: old.public_raw}).ok


def test_missing_opened_is_detected() -> None:
    chain = full_chain(SIGNER).payloads
    report = _report(chain[1:])
    _assert_problem(report, "does not start with an opened event", "seq 1 missing")
    assert (report.cell_id, report.run_id) == ("cell-7", "run-1")


def test_opened_later_in_chain_is_detected() -> None:
    b = ChainBuilder(SIGNER)
    b.guest(1)
    b.opened()
    _assert_problem(_report(b.payloads), "does not start with an opened event", "second opened")


def test_event_after_sealed_is_detected() -> None:
    b = full_chain(SIGNER)
    b.guest(200)
    b.guest(201, sign=False)
    report = _report(b.payloads)
    _assert_problem(report, "seq 10: sealed, yet 2 event(s) follow it")
    assert report.sealed


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


@pytest.mark.parametrize("kind", ["checkpoint", "gap", "sealed"])
def test_unsigned_control_event_is_detected(kind: str) -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    getattr(b, kind)(sign=False)
    assert _report(b.payloads).problems == [f"seq 3: {kind} event is not validly signed"]


def test_unsigned_opened_is_detected() -> None:
    b = ChainBuilder(SIGNER)
    b.opened(sign=False)
    assert _report(b.payloads).problems == [
        "seq 1: opened is not signed by the key it announces",
        "seq 1: opened event is not validly signed",
    ]


def test_badly_signed_control_events_are_not_signed() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    checkpoint = b.checkpoint()
    half = _edit(checkpoint, lambda e: e.pop("signature"))
    forged = _edit(
        checkpoint, lambda e: e.update(signature=msgspec.json.decode(b.payloads[1])["signature"])
    )
    assert _report([*b.payloads[:2], half]).problems == [
        "seq 3: signkid and signature must come together",
        "seq 3: checkpoint event is not validly signed",
    ]
    assert _report([*b.payloads[:2], forged]).problems == [
        "seq 3: signature does not verify",
        "seq 3: checkpoint event is not validly signed",
    ]


def test_checkpoint_must_name_the_event_before_it() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    wrong = {
        "headSequence": "00000000000000000001",
        "headHash": "sha256:" + "0" * 64,
    }
    b._add(OPENED_TYPE.replace("opened", "checkpoint"), wrong, sign=True)
    _assert_problem(
        _report(b.payloads),
        "seq 3: checkpoint headSequence is not seq 2",
        "seq 3: checkpoint headHash is not the digest of seq 2",
    )


def test_sealed_must_name_its_own_sequence_as_final() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    fields = {"reason": "deregistered", "finalSequence": "00000000000000000001"}
    b._add(OPENED_TYPE.replace("opened", "sealed"), fields, sign=True)
    report = _report(b.payloads)
    assert report.problems == ["seq 2: sealed's finalSequence is not its own sequence"]


def test_subject_must_be_the_cell() -> None:
    chain = full_chain(SIGNER).payloads
    moved = _edit(chain[1], lambda e: e.update(subject="cell-8"))
    _assert_problem(_report([chain[0], moved, *chain[2:]]), "seq 2: subject 'cell-8'")


def test_half_signed_event_is_detected() -> None:
    chain = full_chain(SIGNER).payloads
    stripped = _edit(chain[3], lambda e: e.pop("signature"))
    _assert_problem(_report([*chain[:3], stripped, *chain[4:]]), "seq 4: signkid and signature")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("5", "is not 20 decimal digits"),
        ("0000000000000000000x", "is not 20 decimal digits"),
        ("\uff10" * 20, "is not 20 decimal digits"),  # fullwidth digits
        (5, "is not 20 decimal digits"),
        ("00000000000000000000", "sequence 0 (chains start at 1)"),
    ],
)
def test_bad_sequence_text_is_detected(bad: object, reason: str) -> None:
    chain = full_chain(SIGNER).payloads
    edited = _edit(chain[4], lambda e: e.update(sequence=bad))
    report = _report([*chain[:4], edited, *chain[5:]])
    _assert_problem(report, "message #4: sequence ", reason, "seq 5 missing")


def test_nothing_at_all() -> None:
    report = _report([])
    assert report.problems == ["chain does not start with an opened event at seq 1"]
    assert (report.events, report.first_sequence, report.last_sequence) == (0, None, None)
    assert (report.cell_id, report.run_id, report.chain_id) == (None, None, None)


def test_messages_that_are_no_event_are_reported() -> None:
    chain = full_chain(SIGNER).payloads
    deep = b"[" * 100_000 + b"]" * 100_000
    report = _report([chain[0], b"[1]", deep, *chain[1:]])
    assert report.problems == [
        "message #1: not a JSON object",
        "message #2: nested too deeply to read",
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


def test_opened_without_an_object_for_data_names_no_chain() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    report = _report([_resigned(b.payloads[0], lambda e: e.update(data=[])), b.payloads[1]])
    assert (report.cell_id, report.run_id, report.chain_id) == (None, None, None)
    assert report.problems == [
        "seq 1: data is not an object",
        "seq 1: subject 'cell-7' is not its cellId",
        "seq 2: prevhash is not the digest of seq 1",
    ]


@pytest.mark.parametrize("key", [5, "not base64url", ""])
def test_opened_must_carry_a_valid_public_key(key: object) -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    bad = _resigned(b.payloads[0], lambda e: e["data"].update(publicKey=key))
    assert _report([bad]).problems == ["seq 1: opened carries no valid publicKey"]


def test_missing_opened_is_reported_exactly() -> None:
    chain = full_chain(SIGNER).payloads
    assert _report(chain[1:]).problems == [
        "seq 1 missing (an undeclared hole)",
        "chain does not start with an opened event at seq 1",
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


@pytest.mark.parametrize("head_hash", [5, None, "sha256:" + "A" * 64])
def test_checkpoint_head_hash_must_be_the_digest(head_hash: object) -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    fields = {"headSequence": "00000000000000000002", "headHash": head_hash}
    b._add(OPENED_TYPE.replace("opened", "checkpoint"), fields, sign=True)
    assert _report(b.payloads).problems == ["seq 3: checkpoint headHash is not the digest of seq 2"]


def test_gap_fields_of_the_wrong_type_are_left_out() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    fields = {"reason": 5, "lostCount": "3", "firstLostAt": 1, "lastLostAt": None}
    b._add(OPENED_TYPE.replace("opened", "gap"), fields, sign=True)
    report = _report(b.payloads)
    assert report.ok, report.problems
    assert report.gaps == [
        Gap(sequence=2, reason=None, lost_count=None, first_lost_at=None, last_lost_at=None)
    ]


# ---- grouping


def test_group_chains_keeps_stream_order_and_unattributed_messages() -> None:
    a = full_chain(SIGNER, "cell-1", "r").payloads
    b = full_chain(SIGNER, "cell-2", "r").payloads
    c = full_chain(SIGNER, "cell-1", "r2").payloads
    deep = b'{"data":' * 100_000
    mixed = [p for trio in zip(a, b, c, strict=True) for p in trio] + [b"junk", b"{}", deep]
    groups = group_chains(mixed)
    assert groups == {
        ("cell-1", "r"): a,
        ("cell-2", "r"): b,
        ("cell-1", "r2"): c,
        UNATTRIBUTED: [b"junk", b"{}", deep],
    }
    assert all(verify_chain(g, TRUST).ok for k, g in groups.items() if k != UNATTRIBUTED)
    assert not verify_chain(groups[UNATTRIBUTED], TRUST).ok


def test_signer_fixture_is_real() -> None:
    # guards the helpers: a chain signed by SIGNER carries SIGNER's key in opened
    opened = msgspec.json.decode(full_chain(SIGNER).payloads[0])
    assert opened["signkid"] == SIGNER.kid and isinstance(SIGNER, Signer)
    assert opened["data"]["publicKey"] == SIGNER.public_key_b64


# ---- the recorded head (SPEC 5.3): a cut tail versus a quiet cell


def test_recorded_head_problems_name_the_sequences() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    b.guest(2)
    wrong = "sha256:" + "0" * 64
    assert verify_chain(b.payloads, TRUST, head=(5, wrong)).problems == [
        "recorded head is seq 5 but the stream ends at seq 3: the tail was cut"
    ]
    assert verify_chain(b.payloads, TRUST, head=(2, wrong)).problems == [
        "seq 2: digest differs from the recorded chain head"
    ]
    assert verify_chain([], TRUST, head=(1, wrong)).problems == [
        "recorded head is seq 1 but the stream ends at seq 0: the tail was cut",
        "chain does not start with an opened event at seq 1",
    ]


def test_recorded_head_tells_a_cut_tail_from_a_quiet_cell() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    checkpoint = b.checkpoint()
    head = (3, digest_of(checkpoint))
    b.guest(2)
    quiet = verify_chain(b.payloads, {SIGNER.kid: SIGNER.public_raw}, head=head)
    assert quiet.ok, quiet.problems
    cut = verify_chain(b.payloads[:2], {SIGNER.kid: SIGNER.public_raw}, head=head)
    assert not cut.ok
    assert any("tail was cut" in p for p in cut.problems)
    forged = verify_chain(
        b.payloads, {SIGNER.kid: SIGNER.public_raw}, head=(3, "sha256:" + "0" * 64)
    )
    assert not forged.ok
    assert any("recorded chain head" in p for p in forged.problems)
