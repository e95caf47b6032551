"""Exact problems for the faults a review's mutants showed untested, through the public
API (``verify_chain`` and its report), so they hold whatever the verifier's insides."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec

from audit.canonical import canonical
from audit.consumer import verify_file
from audit.prepare import prepare
from audit.verify import (
    DEFERRED_WINDOW,
    DIGEST_WINDOW,
    LISTED,
    REORDER_WINDOW,
    SHOWN_PROBLEMS,
    ChainReport,
    KeySpan,
    Problem,
    Reason,
    StreamVerifier,
    Supersedes,
    Verdict,
    verify_chain,
)
from schemas.events import CHAIN_TYPE
from tests.chains import (
    AT,
    ChainBuilder,
    full_chain,
    new_signer,
    recorded_head,
    verify_stream_of,
)

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


def _exact(report: ChainReport, *expected: tuple[int | None, Reason, str]) -> None:
    """Every problem with its sequence and reason, not only its text."""
    assert report.problems == [detail for _, _, detail in expected]
    assert report.problem_counts == dict(Counter(str(reason) for _, reason, _ in expected))
    assert report.problems_total == len(expected)
    first = expected[0]
    assert report.first_problem == Problem(sequence=first[0], reason=first[1], detail=first[2])


def test_a_second_sealed_does_not_hide_the_events_after_the_first() -> None:
    b = full_chain(SIGNER)
    b.guest(200)
    b.sealed()
    report = _report(b.payloads)
    _exact(report, (11, Reason.AFTER_SEAL, "seq 10: sealed, yet 2 event(s) follow it"))
    assert report.sealed


def test_the_first_event_links_to_nothing() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    linked = _resigned(b.payloads[0], lambda e: e.update(prevhash="sha256:" + "0" * 64))
    _exact(_report([linked]), (1, Reason.BROKEN_LINK, "seq 1: prevhash must be empty"))


def test_unsigned_opened_is_detected() -> None:
    b = ChainBuilder(SIGNER)
    b.opened(sign=False)
    b.guest(1, sign=False)
    report = _report(b.payloads)
    _exact(
        report,
        (1, Reason.BAD_OPENED, "seq 1: opened is not signed by the key it announces"),
        (1, Reason.UNSIGNED, "seq 1: opened event is not validly signed"),
    )
    assert (report.signed, report.unsigned_tail) == (0, 2)


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
    _exact(
        report,
        (2, Reason.MALFORMED, "seq 2: data is not an object"),
        (2, Reason.SPLICED, "seq 2: belongs to chain None/None, not 'cell-7'/'run-1'"),
        (2, Reason.WRONG_SUBJECT, "seq 2: subject 'cell-7' is not its cellId"),
    )


def test_a_hole_is_one_problem_and_the_link_across_it_is_not_judged() -> None:
    chain = full_chain(SIGNER).payloads
    _exact(
        _report(chain[:2] + chain[3:]),
        (3, Reason.SEQUENCE_JUMP, "seq 3 missing (an undeclared hole)"),
    )


def test_checkpoint_after_a_hole_is_judged_by_its_own_prevhash() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    b.guest(2)
    b.checkpoint()
    _exact(
        _report([*b.payloads[:2], b.payloads[3]]),
        (3, Reason.SEQUENCE_JUMP, "seq 3 missing (an undeclared hole)"),
    )


def test_checkpoint_names_the_event_before_it_not_its_own_prevhash() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    relinked = _resigned(b.checkpoint(), lambda e: e.update(prevhash="sha256:" + "1" * 64))
    _exact(
        _report([*b.payloads[:2], relinked]),
        (3, Reason.BROKEN_LINK, "seq 3: prevhash is not the digest of seq 2"),
    )


def test_hostile_nesting_is_a_problem_not_a_crash() -> None:
    chain = full_chain(SIGNER).payloads
    deep = b'{"data":' * 100_000  # msgspec refuses it with RecursionError, not DecodeError
    report = _report([*chain, deep])
    assert not report.ok
    assert any("nested too deeply" in p for p in report.problems), report.problems


# -- the keys and chains opened announces ------------------------------------------------


def test_opened_must_announce_the_chain_its_ids_name() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    forged = _resigned(b.payloads[0], lambda e: e["data"].update(chainId="0" * 16))
    (report,) = verify_stream_of([forged, b.payloads[1]], TRUST)
    _exact(
        report,
        (1, Reason.BAD_OPENED, "seq 1: opened announces chainId '0000000000000000'"),
        (2, Reason.BROKEN_LINK, "seq 2: prevhash is not the digest of seq 1"),
    )


def test_opened_without_a_usable_public_key() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    forged = _resigned(b.payloads[0], lambda e: e["data"].update(publicKey="not-a-key"))
    _exact(
        _report([forged, b.payloads[1]]),
        (1, Reason.BAD_OPENED, "seq 1: opened carries no valid publicKey"),
        (2, Reason.BROKEN_LINK, "seq 2: prevhash is not the digest of seq 1"),
    )


def test_opened_announcing_another_key_than_the_trusted_one_for_its_id() -> None:
    other = new_signer()
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    forged = _resigned(b.payloads[0], lambda e: e["data"].update(publicKey=other.public_key_b64))
    _exact(
        _report([forged, b.payloads[1]]),
        (1, Reason.BAD_OPENED, f"seq 1: opened's publicKey is not the trusted key {SIGNER.kid!r}"),
        (2, Reason.BROKEN_LINK, "seq 2: prevhash is not the digest of seq 1"),
    )


def test_opened_signed_by_another_key_than_it_announces() -> None:
    other = new_signer()
    b = ChainBuilder(SIGNER)
    b.opened(announce=other)
    b.guest(1)
    _exact(
        _report(b.payloads),
        (1, Reason.BAD_OPENED, "seq 1: opened is not signed by the key it announces"),
        (1, Reason.UNKNOWN_KEY, f"seq 1: opened names key {other.kid!r}, which is not trusted"),
    )
    # Trusting the announced key does not make the signature its own.
    _exact(
        verify_chain(b.payloads, {**TRUST, other.kid: other.public_raw}),
        (1, Reason.BAD_OPENED, "seq 1: opened is not signed by the key it announces"),
    )


def test_a_superseding_chain_names_what_it_replaces_and_the_old_one_says_so() -> None:
    old = ChainBuilder(SIGNER, run="run-1")
    old.opened()
    old.guest(1)
    new = ChainBuilder(SIGNER, run="run-2")
    new.chain_id = "f" * 16
    head = old.sealer.head_hash
    new.opened(
        supersedes={
            "chainId": old.chain_id,
            "lastKnownSequence": "00000000000000000002",
            "lastKnownDigest": head,
            "reason": "state_lost",
        }
    )
    new.guest(1)
    reports = {r.chain_id: r for r in verify_stream_of([*old.payloads, *new.payloads], TRUST)}
    assert reports[new.chain_id].supersedes == Supersedes(
        chain_id=old.chain_id, last_known_sequence=2, last_known_digest=head, reason="state_lost"
    )
    assert reports[old.chain_id].verdict == Verdict.SUPERSEDED
    assert reports[old.chain_id].superseded_by == new.chain_id


# -- the bounded windows, at their bounds ------------------------------------------------

OUT_OF_PLACE = (
    "arrived out of place, after the chain had moved on (too far to compare or to check its links)"
)


def _unsigned_chain(events: int) -> list[bytes]:
    """opened, then unsigned guest events up to seq ``events`` (cheap to build and check)."""
    b = ChainBuilder(SIGNER)
    b.opened()
    for pid in range(events - 1):
        b.guest(pid, sign=False)
    return b.payloads


def test_an_event_held_back_by_the_whole_reorder_window_still_fits() -> None:
    chain = _unsigned_chain(REORDER_WINDOW + 2)
    late = [*chain[1 : REORDER_WINDOW + 1], chain[0], *chain[REORDER_WINDOW + 1 :]]
    report = _report(late)
    assert report.ok, report.problems
    assert report.events == REORDER_WINDOW + 2
    assert (report.first_sequence, report.first_time) == (1, AT)


def test_an_event_held_back_by_more_than_the_reorder_window_is_out_of_place() -> None:
    chain = _unsigned_chain(REORDER_WINDOW + 2)
    report = _report([*chain[1:], chain[0]])
    _exact(
        report,
        (1, Reason.MISSING_OPENED, "chain does not start with an opened event at seq 1"),
        (1, Reason.SEQUENCE_JUMP, f"seq 1: {OUT_OF_PLACE}"),
        (1, Reason.SEQUENCE_JUMP, "seq 1 missing (an undeclared hole)"),
    )
    assert (report.first_sequence, report.events) == (2, REORDER_WINDOW + 1)


def test_redeliveries_are_compared_back_to_the_oldest_digest_kept() -> None:
    """Once the digest ring has wrapped, the slots not yet refilled still answer."""
    chain = _unsigned_chain(DIGEST_WINDOW + 200)
    oldest = 201  # the last DIGEST_WINDOW sequences are 201 .. DIGEST_WINDOW + 200
    report = _report([*chain, chain[oldest - 1], chain[oldest - 2], chain[-1]])
    _exact(report, (oldest - 1, Reason.SEQUENCE_JUMP, f"seq {oldest - 1}: {OUT_OF_PLACE}"))
    assert report.duplicates == [oldest, DIGEST_WINDOW + 200]


def test_a_sequence_beyond_63_bits_is_checked_like_any_other() -> None:
    top = 2**64 - 1  # the last sequence a sealer can give
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)

    def renumber(event: dict[str, Any]) -> None:
        event.update(sequence=f"{top:020d}", id=f"{b.chain_id}-{top}")

    far = _resigned(b.payloads[1], renumber)
    report = _report([b.payloads[0], far, far])
    _exact(report, (2, Reason.SEQUENCE_JUMP, f"seq 2-{top - 1} missing (an undeclared hole)"))
    assert report.duplicates == [top]
    assert report.signed == 2


def test_identical_redeliveries_are_listed_up_to_the_cap_and_all_counted() -> None:
    chain = _unsigned_chain(2)
    report = _report([*chain, *[chain[1]] * (LISTED + 1)])
    assert report.ok, report.problems
    assert report.duplicates == [2] * LISTED
    assert report.duplicates_total == LISTED + 1


def test_holes_past_the_list_are_reported_as_soon_as_found() -> None:
    """Only LISTED holes can wait for a gap that declares them; the rest count at once."""
    chain = _unsigned_chain(2 * LISTED + 3)
    holes = LISTED + 1
    report = _report(chain[::2])  # seq 2, 4, .. 2 * LISTED + 2 missing
    assert report.problem_counts == {"sequence-jump": holes}
    assert report.problems_total == holes
    assert report.first_problem == Problem(
        sequence=2, reason=Reason.SEQUENCE_JUMP, detail="seq 2 missing (an undeclared hole)"
    )
    shown = [f"seq {2 * n} missing (an undeclared hole)" for n in range(1, SHOWN_PROBLEMS)]
    assert report.problems == [*shown, f"seq {2 * holes} missing (an undeclared hole)"]


def test_a_malformed_message_names_the_subject_it_was_read_from() -> None:
    verifier = StreamVerifier(TRUST)
    verifier.add(prepare(b"junk", 3, TRUST, subject="cellos.events.cell-7"))
    (report,) = verifier.finish()
    _exact(
        report,
        (None, Reason.MALFORMED, "message #3 on cellos.events.cell-7: not JSON"),
        (None, Reason.MISSING_OPENED, "chain has no events"),
    )
    assert (report.cell_id, report.run_id, report.first_time) == (None, None, None)


def test_noncanonical_events_are_listed_up_to_the_cap() -> None:
    chain = _unsigned_chain(LISTED + 2)
    respelled = [chain[0], *(msgspec.json.format(p, indent=1) for p in chain[1:])]
    report = _report(respelled)
    assert report.ok, report.problems
    assert report.noncanonical == list(range(2, LISTED + 2))


# -- what each event's own fields must say -----------------------------------------------


def test_an_event_whose_id_names_another_chain() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    moved = _resigned(b.payloads[1], lambda e: e.update(id="0" * 16 + "-2"))
    _exact(
        _report([b.payloads[0], moved]),
        (2, Reason.MALFORMED, f"seq 2: id is not {b.chain_id}-2"),
    )


def test_an_event_read_from_another_subject_than_its_own() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    verifier = StreamVerifier(TRUST)
    subject = "cellos.cell-7.chain.opened"
    verifier.add(prepare(b.payloads[0], 0, TRUST, subject=subject, prefix="cellos"))
    verifier.add(prepare(b.guest(1), 1, TRUST, subject=subject, prefix="cellos"))
    (report,) = verifier.finish()
    _exact(
        report,
        (
            2,
            Reason.WRONG_SUBJECT,
            f"seq 2: published on {subject}, not cellos.cell-7.guest.process_spawned",
        ),
    )


# -- deferred signatures ---------------------------------------------------------------


def _anchored(payloads: list[bytes], *, every: bool) -> ChainReport:
    """One chain through the offline verifier, in this process, anchored or not."""
    run = verify_file("export", payloads, TRUST, workers=0, every_signature=every)
    (report,) = asyncio.run(run).reports
    return report


def test_a_bad_signature_the_links_authenticate_is_seen_only_checking_every_one() -> None:
    """docs/consumers.md: an event its producer signed wrongly keeps authentic bytes, so a
    later verified signature covers it; only --every-signature reports it."""
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    b.rotate(new_signer(kid=SIGNER.kid))  # the producer signing with a wrong key
    b.guest(2)
    b.rotate(SIGNER)
    b.guest(3)
    b.guest(4)
    anchored = _anchored(b.payloads, every=False)
    assert anchored.ok, anchored.problems
    assert anchored.signed == 5
    every = _anchored(b.payloads, every=True)
    _exact(every, (3, Reason.BAD_SIGNATURE, "seq 3: signature does not verify"))
    assert every.signed == 4
    # the key span still counts the event that names the key, valid or not
    span = KeySpan(kid=SIGNER.kid, first=1, last=5, signed=5)
    assert anchored.key_spans == every.key_spans == [span]


def _many_deferred(bad: int) -> list[bytes]:
    """Signed guests up to seq 263 whose anchors (multiples of 64) are unsigned, so nothing
    verifies along the way; ``bad`` is signed by the producer with a wrong key."""
    b = ChainBuilder(SIGNER)
    b.opened()
    while b.sealer.sequence < 263:
        sequence = b.sealer.sequence + 1
        b.rotate(new_signer(kid=SIGNER.kid) if sequence == bad else SIGNER)
        b.guest(sequence, sign=sequence % 64 != 0)
    return b.payloads


def test_the_newest_of_too_many_deferred_signatures_covers_the_rest() -> None:
    """The newest is checked once more than DEFERRED_WINDOW wait: at seq 262, not 261."""
    assert DEFERRED_WINDOW + 1 == 262 - 1 - 262 // 64  # deferred: seq 2 to 262, no anchors
    payloads = _many_deferred(bad=261)
    anchored = _anchored(payloads, every=False)
    assert anchored.ok, anchored.problems
    every = _anchored(payloads, every=True)
    _exact(every, (261, Reason.BAD_SIGNATURE, "seq 261: signature does not verify"))


def test_when_the_newest_of_too_many_fails_every_waiting_one_is_checked() -> None:
    payloads = _many_deferred(bad=262)
    for every in (False, True):
        report = _anchored(payloads, every=every)
        _exact(report, (262, Reason.BAD_SIGNATURE, "seq 262: signature does not verify"))
        assert report.signed == 263 - 1 - 263 // 64


def test_a_chain_event_with_an_invalid_signature_is_not_signed() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    b.rotate(new_signer(kid=SIGNER.kid))
    b.checkpoint()
    b.rotate(SIGNER)
    b.guest(2)
    _exact(
        _report(b.payloads),
        (3, Reason.BAD_SIGNATURE, "seq 3: signature does not verify"),
        (3, Reason.UNSIGNED, "seq 3: checkpoint event is not validly signed"),
    )


def test_a_chain_whose_first_event_is_a_later_chain_event_takes_its_id_from_the_id() -> None:
    built = full_chain(SIGNER)
    report = _report(built.payloads[5:])  # from the checkpoint at seq 6
    assert report.chain_id == built.chain_id
    _exact(
        report,
        (1, Reason.MISSING_OPENED, "chain does not start with an opened event at seq 1"),
        (1, Reason.SEQUENCE_JUMP, "seq 1-5 missing (an undeclared hole)"),
    )


# -- recorded heads and trimmed streams --------------------------------------------------


def test_the_recorded_head_must_be_the_event_at_its_sequence() -> None:
    b = full_chain(SIGNER)
    forged = (3, "sha256:" + "0" * 64)
    _exact(
        _report(b.payloads, head=forged),
        (3, Reason.HEAD_MISMATCH, "seq 3: digest differs from the recorded chain head"),
    )
    (report,) = verify_stream_of(b.payloads[:2], TRUST, heads=recorded_head(b, 3))
    _exact(
        report,
        (
            3,
            Reason.TRUNCATED,
            "recorded head is seq 3 but the stream ends at seq 2: the tail was cut",
        ),
    )
    assert (report.verdict, report.head_sequence) == (Verdict.TRUNCATED, 3)
    (reached,) = verify_stream_of(b.payloads[:3], TRUST, heads=recorded_head(b, 3))
    assert (reached.verdict, reached.ok) == (Verdict.INTACT_OPEN, True)


def test_a_chain_trimmed_away_entirely_keeps_the_verdict_of_its_head() -> None:
    b = full_chain(SIGNER)
    (sealed,) = verify_stream_of([], TRUST, heads=recorded_head(b, 10, sealed=True), trimmed=True)
    assert (sealed.verdict, sealed.retained_from, sealed.events) == (Verdict.INTACT_SEALED, 11, 0)
    (open_,) = verify_stream_of([], TRUST, heads=recorded_head(b, 3), trimmed=True)
    assert (open_.verdict, open_.retained_from, open_.ok) == (Verdict.INTACT_OPEN, 4, True)
    (cut,) = verify_stream_of([], TRUST, heads=recorded_head(b, 3))
    _exact(
        cut,
        (
            1,
            Reason.TRUNCATED,
            "recorded head is seq 3 but the stream ends at seq 0: the tail was cut",
        ),
    )


def test_a_trimmed_stream_still_needs_opened_when_it_holds_seq_1() -> None:
    b = ChainBuilder(SIGNER)
    b.guest(1)
    b.guest(2)
    (report,) = verify_stream_of(b.payloads, TRUST, trimmed=True)
    _exact(report, (1, Reason.MISSING_OPENED, "chain does not start with an opened event at seq 1"))
    assert report.retained_from is None


def test_a_trimmed_stream_excuses_only_its_start_not_a_later_hole() -> None:
    chain = full_chain(SIGNER).payloads
    (report,) = verify_stream_of([*chain[3:6], *chain[7:]], TRUST, trimmed=True)
    _exact(report, (7, Reason.SEQUENCE_JUMP, "seq 7 missing (an undeclared hole)"))
    assert (report.retained_from, report.first_sequence) == (4, 4)


def test_a_gap_declaring_the_hole_before_it_excuses_exactly_that_range() -> None:
    def chain_with_gap(first: int, last: int) -> list[bytes]:
        b = ChainBuilder(SIGNER)
        b.opened()
        for pid in range(3):
            b.guest(pid)
        lost = {"firstLostSequence": f"{first:020d}", "lastLostSequence": f"{last:020d}"}
        b._add(CHAIN_TYPE + "gap", {"reason": "spool_damaged", **lost}, sign=True)
        return [*b.payloads[:2], b.payloads[4]]  # seq 3 and 4 lost

    assert _report(chain_with_gap(3, 4)).ok
    for first, last in ((3, 3), (4, 4)):
        _exact(
            _report(chain_with_gap(first, last)),
            (3, Reason.SEQUENCE_JUMP, "seq 3-4 missing (an undeclared hole)"),
        )


def test_key_spans_are_listed_up_to_the_cap() -> None:
    other = new_signer()
    b = ChainBuilder(SIGNER)
    b.opened()
    for pid in range(LISTED):
        b.rotate(other if pid % 2 == 0 else SIGNER)
        b.guest(pid)
    report = verify_chain(b.payloads, {**TRUST, other.kid: other.public_raw})
    assert report.ok, report.problems
    assert len(report.key_spans) == LISTED
    assert report.key_spans[-1] == KeySpan(kid=other.kid, first=LISTED, last=LISTED, signed=1)
    assert report.signed == LISTED + 1


def test_without_a_chain_id_given_the_opened_event_names_it() -> None:
    """verify_chain takes the chain id opened announces, so ids naming another one fail."""
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    renamed = _resigned(b.payloads[0], lambda e: e["data"].update(chainId="0" * 16))
    report = _report([renamed, b.payloads[1]])
    assert report.chain_id == "0" * 16
    _exact(
        report,
        (1, Reason.MALFORMED, f"seq 1: id is not {'0' * 16}-1"),
        (2, Reason.MALFORMED, f"seq 2: id is not {'0' * 16}-2"),
        (2, Reason.BROKEN_LINK, "seq 2: prevhash is not the digest of seq 1"),
    )


def test_untrusted_and_half_signed_events_are_not_signed() -> None:
    mallory = new_signer()
    b = ChainBuilder(SIGNER)
    b.opened()
    b.rotate(mallory)
    b.guest(1)
    b.rotate(SIGNER)
    event = msgspec.json.decode(b.guest(2))
    del event["signature"]
    report = _report([*b.payloads[:2], canonical(event)])
    _exact(
        report,
        (2, Reason.UNKNOWN_KEY, f"seq 2: signed with untrusted key {mallory.kid!r}"),
        (3, Reason.UNSIGNED, "seq 3: signkid and signature must come together"),
    )
    assert report.key_spans == [KeySpan(kid=SIGNER.kid, first=1, last=1, signed=1)]
    assert (report.signed, report.unsigned_tail) == (1, 2)


def test_a_late_event_in_a_hole_across_the_ring_wrap_is_out_of_place() -> None:
    """The hole is given up when the reorder window overflows; the ring has wrapped past
    it without ever filling the late event's slot."""
    chain = _unsigned_chain(DIGEST_WINDOW + REORDER_WINDOW + 1)
    late = REORDER_WINDOW + 2
    report = _report([*chain[:3], *chain[DIGEST_WINDOW:], chain[late - 1]])
    _exact(
        report,
        (4, Reason.SEQUENCE_JUMP, f"seq 4-{DIGEST_WINDOW} missing (an undeclared hole)"),
        (late, Reason.SEQUENCE_JUMP, f"seq {late}: {OUT_OF_PLACE}"),
    )
