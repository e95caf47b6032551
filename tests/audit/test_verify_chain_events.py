"""The chain events (opened, resumed, checkpoint, sealed, a damaged spool's gap), the end of a
chain and the streaming verifier, asserted exactly: every problem's sequence and reason,
and the report fields the CLI prints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from audit.digest import digest_of, format_sequence
from audit.prepare import prepare
from audit.verify import (
    LISTED,
    Gap,
    Reason,
    Restart,
    StreamVerifier,
    Supersedes,
    Verdict,
    group_chains,
    verify_chain,
)
from producer.chain.signing import Signer
from tests.audit.test_verify_exact import SIGNER, TRUST, _exact, _resigned
from tests.chains import (
    AT,
    ChainBuilder,
    full_chain,
    new_signer,
    recorded_head,
    verify_stream_of,
)

# -- opened ------------------------------------------------------------------------------

OTHER = new_signer()
STRANGER = new_signer()
"""Not in any trust map."""


def _successor_of(old: ChainBuilder, signer: Signer, *, announce: Signer | None = None) -> bytes:
    """An opened, signed by ``signer``, that claims to supersede ``old``."""
    new = ChainBuilder(signer, run="run-2")
    new.chain_id = "f" * 16
    return new.opened(announce=announce, supersedes=_replacing(old))


def _replacing(old: ChainBuilder) -> dict[str, Any]:
    """What an opened's ``supersedes`` says of ``old``."""
    return {
        "chainId": old.chain_id,
        "lastKnownSequence": format_sequence(old.sealer.sequence),
        "lastKnownDigest": old.sealer.head_hash,
        "reason": "state_lost",
    }


@pytest.mark.parametrize(
    "forge",
    [
        lambda old: _resigned(
            _successor_of(old, SIGNER), lambda e: e["data"].update(publicKey="not-a-key")
        ),
        lambda old: _resigned(_successor_of(old, SIGNER), lambda e: e["data"].update(publicKey=5)),
        lambda old: _successor_of(old, STRANGER),
        lambda old: _resigned(
            _successor_of(old, SIGNER),
            lambda e: e["data"].update(publicKey=OTHER.public_key_b64),
        ),
        lambda old: _successor_of(old, SIGNER, announce=OTHER),
    ],
    ids=[
        "no-public-key",
        "public-key-not-text",
        "untrusted-key",
        "not-the-trusted-key",
        "signed-by-another-key",
    ],
)
def test_an_opened_with_a_bad_key_cannot_supersede_another_chain(
    forge: Callable[[ChainBuilder], bytes],
) -> None:
    """Else a forger could retire a genuine open chain by naming it."""
    old = ChainBuilder(SIGNER)
    old.opened()
    trust = {**TRUST, OTHER.kid: OTHER.public_raw}
    reports = {r.chain_id: r for r in verify_stream_of([*old.payloads, forge(old)], trust)}
    assert reports["f" * 16].supersedes is None and not reports["f" * 16].ok
    assert reports[old.chain_id].verdict == Verdict.UNANCHORED
    assert reports[old.chain_id].superseded_by is None


def test_a_second_opened_cannot_supersede_another_chain() -> None:
    old = ChainBuilder(SIGNER)
    old.opened()
    b = ChainBuilder(SIGNER, run="run-2")
    b.opened()
    b.opened(supersedes=_replacing(old))
    reports = {r.chain_id: r for r in verify_stream_of([*old.payloads, *b.payloads], TRUST)}
    _exact(reports[b.chain_id], (2, Reason.RESTARTED, "seq 2: a second opened event"))
    assert reports[b.chain_id].supersedes is None
    assert reports[old.chain_id].verdict == Verdict.UNANCHORED


@pytest.mark.parametrize("sequence", [2, "2x", "\uff12" * 20, None])
def test_supersedes_keeps_only_well_typed_fields(sequence: object) -> None:
    b = ChainBuilder(SIGNER)
    b.opened(supersedes={"chainId": 5, "lastKnownSequence": sequence, "reason": ["x"]})
    report = verify_chain(b.payloads, TRUST)
    assert report.ok, report.problems
    assert report.supersedes == Supersedes(
        chain_id=None, last_known_sequence=None, last_known_digest=None, reason=None
    )


# -- resumed ----------------------------------------------------------------------------


def test_a_restart_is_listed_with_what_resumed_says() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    b.resumed(clean=False)
    report = verify_chain(b.payloads, TRUST)
    assert report.ok, report.problems
    assert report.restarts == [
        Restart(sequence=3, time=AT, previous_stop_at=AT, clean=False, signkid=SIGNER.kid)
    ]


def test_a_restart_keeps_only_well_typed_fields() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.resumed()
    odd = _resigned(b.payloads[1], lambda e: e["data"].update(clean="yes", previousStopAt=5))
    report = verify_chain([b.payloads[0], odd], TRUST)
    assert report.restarts == [
        Restart(sequence=2, time=AT, previous_stop_at=None, clean=None, signkid=SIGNER.kid)
    ]


def test_resumed_without_a_usable_public_key() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    forged = _resigned(b.resumed(), lambda e: e["data"].update(publicKey="not-a-key"))
    report = verify_chain([*b.payloads[:2], forged], TRUST)
    _exact(report, (3, Reason.BAD_RESUMED, "seq 3: resumed carries no valid publicKey"))
    assert [r.sequence for r in report.restarts] == [3]


# -- checkpoint -------------------------------------------------------------------------


def test_checkpoint_naming_another_sequence_is_filed_at_its_own() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    forged = _resigned(b.checkpoint(), lambda e: e["data"].update(headSequence=format_sequence(1)))
    _exact(
        verify_chain([*b.payloads[:2], forged], TRUST),
        (3, Reason.BAD_CHECKPOINT, "seq 3: checkpoint headSequence is not seq 2"),
    )


@pytest.mark.parametrize("head_hash", [5, None, "sha256:" + "0" * 63, "sha256:" + "0" * 64])
def test_checkpoint_whose_head_hash_is_not_the_digest_before_it(head_hash: object) -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    forged = _resigned(b.checkpoint(), lambda e: e["data"].update(headHash=head_hash))
    _exact(
        verify_chain([*b.payloads[:2], forged], TRUST),
        (3, Reason.BAD_CHECKPOINT, "seq 3: checkpoint headHash is not the digest of seq 2"),
    )


# -- sealed -----------------------------------------------------------------------------


def test_sealed_naming_another_final_sequence_is_filed_at_its_own() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    forged = _resigned(b.sealed(), lambda e: e["data"].update(finalSequence=format_sequence(1)))
    report = verify_chain([b.payloads[0], forged], TRUST)
    _exact(report, (2, Reason.BAD_SEAL, "seq 2: sealed's finalSequence is not its own sequence"))
    assert report.sealed


# -- a damaged spool's gap declares the sequences it lost --------------------------------


def _chain_with_lost(
    declared: tuple[Any, Any], missing: set[int], *, sign: bool = True
) -> list[bytes]:
    """opened, guests at seq 2-4, a gap at seq 5 declaring ``declared``; ``missing``
    taken out of the stream."""
    b = ChainBuilder(SIGNER)
    b.opened()
    for pid in range(3):
        b.guest(pid, sign=False)
    b.gap(sequences=declared, sign=sign)
    return [p for n, p in enumerate(b.payloads, 1) if n not in missing]


@pytest.mark.parametrize(
    ("declared", "missing"),
    [
        (("00000000000000000003", "00000000000000000004"), {3, 4}),
        (("00000000000000000002", "00000000000000000004"), {3, 4}),
        (("00000000000000000001", "00000000000000000004"), {3, 4}),
        (("00000000000000000003", "00000000000000000003"), {3}),
    ],
)
def test_a_declared_loss_is_not_tampering(declared: tuple[str, str], missing: set[int]) -> None:
    report = verify_chain(_chain_with_lost(declared, missing), TRUST)
    assert report.ok and report.verdict == Verdict.UNANCHORED, report.problems
    assert [g.sequence for g in report.gaps] == [5]


@pytest.mark.parametrize(
    "declared",
    [
        ("00000000000000000003", "00000000000000000003"),  # not all of the hole
        ("00000000000000000004", "00000000000000000004"),
        ("00000000000000000000", "00000000000000000004"),  # sequences start at 1
        ("00000000000000000004", "00000000000000000003"),  # backwards
        ("00000000000000000003", "00000000000000000005"),  # the gap itself
        ("00000000000000000003", "00000000000000000009"),  # after the gap
        ("00000000000000000003", "4x"),
        ("00000000000000000003", "\uff14"),  # a digit, but not an ASCII one
        ("-3", "4"),
        (3, 4),
        ("00000000000000000003", None),
    ],
)
def test_a_hole_the_gap_does_not_declare_is_tampering(declared: tuple[Any, Any]) -> None:
    _exact(
        verify_chain(_chain_with_lost(declared, {3, 4}), TRUST),
        (3, Reason.SEQUENCE_JUMP, "seq 3-4 missing (an undeclared hole)"),
    )


def test_only_a_validly_signed_gap_declares_a_loss() -> None:
    declared = ("00000000000000000003", "00000000000000000004")
    _exact(
        verify_chain(_chain_with_lost(declared, {3, 4}, sign=False), TRUST),
        (3, Reason.SEQUENCE_JUMP, "seq 3-4 missing (an undeclared hole)"),
        (5, Reason.UNSIGNED, "seq 5: gap event is not validly signed"),
    )


# -- the end of a chain -----------------------------------------------------------------


def test_an_empty_chain_is_tampering() -> None:
    report = verify_chain([], TRUST)
    _exact(report, (None, Reason.MISSING_OPENED, "chain has no events"))
    assert (report.verdict, report.events, report.unsigned_tail) == (Verdict.TAMPERED, 0, 0)


def _open_chain(events: int = 5) -> ChainBuilder:
    """opened, then ``events`` unsigned guest events (seq 2 on)."""
    b = ChainBuilder(SIGNER)
    b.opened()
    for pid in range(events):
        b.guest(pid, sign=False)
    return b


def _at(b: ChainBuilder, sequence: int) -> tuple[int, str]:
    return sequence, digest_of(b.payloads[sequence - 1])


def test_a_tail_cut_before_the_recorded_head_is_truncation() -> None:
    b = _open_chain()
    report = verify_chain(b.payloads[:2], TRUST, head=_at(b, 4))
    assert (report.verdict, report.head_sequence, report.last_sequence) == (
        Verdict.TRUNCATED,
        4,
        2,
    )
    _exact(
        report,
        (
            3,
            Reason.TRUNCATED,
            "recorded head is seq 4 but the stream ends at seq 2: the tail was cut",
        ),
    )


def test_a_cut_tail_with_another_problem_is_tampering() -> None:
    b = _open_chain()
    report = verify_chain([*b.payloads[:2], b"junk"], TRUST, head=_at(b, 4))
    assert report.verdict == Verdict.TAMPERED
    assert report.problem_counts == {"malformed": 1, "truncated": 1}


def test_a_recorded_head_lost_in_a_hole_is_a_mismatch() -> None:
    b = _open_chain()
    _exact(
        verify_chain([*b.payloads[:3], *b.payloads[4:]], TRUST, head=_at(b, 4)),
        (4, Reason.SEQUENCE_JUMP, "seq 4 missing (an undeclared hole)"),
        (4, Reason.HEAD_MISMATCH, "seq 4: the recorded chain head is not in the stream"),
    )


def test_a_chain_reaching_its_recorded_head_is_intact_and_open() -> None:
    b = _open_chain()
    report = verify_chain(b.payloads, TRUST, head=_at(b, 4))
    assert (report.verdict, report.head_sequence, report.ok) == (Verdict.INTACT_OPEN, 4, True)


def test_a_head_trimmed_away_with_the_start_of_its_chain_is_no_mismatch() -> None:
    b = _open_chain()
    heads = recorded_head(b, 2)
    (report,) = verify_stream_of(b.payloads[3:], TRUST, heads=heads, trimmed=True)
    assert report.ok and report.verdict == Verdict.INTACT_OPEN, report.problems
    assert (report.retained_from, report.first_sequence, report.events) == (4, 4, 3)
    assert report.unsigned_tail == 3  # only what is retained


def test_a_report_spans_its_first_and_last_event_and_counts_redeliveries() -> None:
    later = "2024-05-01T12:00:09.000000Z"
    b = _open_chain(1)
    last = _resigned(b.guest(9), lambda e: e.update(time=later))
    report = verify_chain([*b.payloads[:2], b.payloads[1], b.payloads[1], last], TRUST)
    assert report.ok, report.problems
    assert (report.first_time, report.last_time) == (AT, later)
    assert (report.duplicates, report.duplicates_total, report.events) == ([2, 2], 2, 3)


# -- the streaming verifier -------------------------------------------------------------


def test_every_message_is_counted() -> None:
    chain = full_chain(SIGNER).payloads
    verifier = StreamVerifier(TRUST)
    for index, payload in enumerate([*chain, b"junk"]):
        verifier.add(prepare(payload, index, TRUST))
    assert verifier.messages == len(chain) + 1


def test_a_message_that_is_no_event_gets_a_report_of_its_own() -> None:
    chain = full_chain(SIGNER, "Alpha").payloads
    stray, good = verify_stream_of([*chain, b"junk"], TRUST)  # no cell sorts first
    assert good.verdict == Verdict.INTACT_SEALED, good.problems
    assert (stray.chain_id, stray.verdict, stray.events) == (None, Verdict.TAMPERED, 0)
    _exact(
        stray,
        (None, Reason.MALFORMED, "message #10: not JSON"),
        (None, Reason.MISSING_OPENED, "chain has no events"),
    )


def test_an_event_whose_id_names_no_chain_is_a_stray() -> None:
    chain = full_chain(SIGNER).payloads
    nameless = _resigned(chain[1], lambda e: e.update(id="2"))
    stray, opened = verify_stream_of([chain[0], nameless], TRUST)
    assert opened.events == 1 and opened.ok, opened.problems
    _exact(
        stray,
        (None, Reason.MALFORMED, "message #1: id names no chain"),
        (None, Reason.MISSING_OPENED, "chain has no events"),
    )


def test_a_recorded_head_with_no_events_is_a_cut_chain() -> None:
    b = full_chain(SIGNER)
    (report,) = verify_stream_of([], TRUST, heads=recorded_head(b, 6))
    assert (report.cell_id, report.run_id, report.chain_id) == (b.cell, b.run, b.chain_id)
    assert (report.verdict, report.head_sequence, report.events) == (Verdict.TRUNCATED, 6, 0)
    _exact(
        report,
        (
            1,
            Reason.TRUNCATED,
            "recorded head is seq 6 but the stream ends at seq 0: the tail was cut",
        ),
    )


@pytest.mark.parametrize(
    ("sealed", "verdict"), [(False, Verdict.INTACT_OPEN), (True, Verdict.INTACT_SEALED)]
)
def test_a_chain_trimmed_away_entirely_is_intact_to_its_head(
    sealed: bool, verdict: Verdict
) -> None:
    b = full_chain(SIGNER)
    (report,) = verify_stream_of([], TRUST, heads=recorded_head(b, 10, sealed=sealed), trimmed=True)
    assert (report.cell_id, report.run_id, report.chain_id) == (b.cell, b.run, b.chain_id)
    assert (report.verdict, report.retained_from, report.sealed) == (verdict, 11, sealed)
    assert report.ok and report.problems == []


# -- the bounded lists ------------------------------------------------------------------


def test_gaps_and_restarts_are_listed_up_to_the_cap() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    for _ in range(LISTED + 1):
        b.gap(sequences=("00000000000000000001", "00000000000000000001"))
        b.resumed()
    report = verify_chain(b.payloads, TRUST)
    assert report.ok, report.problems
    assert len(report.gaps) == len(report.restarts) == LISTED
    assert report.gaps[-1].sequence == report.restarts[-1].sequence - 1 == 2 * LISTED


def test_declared_losses_are_kept_up_to_the_cap_and_later_holes_count() -> None:
    """Memory stays bounded against a producer declaring without end; past the cap a
    hole is reported, never excused unseen."""
    b = ChainBuilder(SIGNER)
    b.opened()
    for _ in range(LISTED):
        b.gap(sequences=("00000000000000000001", "00000000000000000001"))
    b.guest(sign=False)
    lost = len(b.payloads) + 1
    b.guest(sign=False)
    b.gap(sequences=(format_sequence(lost), format_sequence(lost)))
    _exact(
        verify_chain(b.payloads[: lost - 1] + b.payloads[lost:], TRUST),
        (lost, Reason.SEQUENCE_JUMP, f"seq {lost} missing (an undeclared hole)"),
    )


def test_reports_come_in_cell_then_run_order() -> None:
    order = [("c2", "r1"), ("c1", "r2"), ("c1", "r1")]  # all at the same time
    chains = [full_chain(SIGNER, cell, run) for cell, run in order]
    reports = verify_stream_of([p for b in chains for p in b.payloads], TRUST)
    assert [(r.cell_id, r.run_id) for r in reports] == [("c1", "r1"), ("c1", "r2"), ("c2", "r1")]


def test_a_chain_known_only_from_its_head_comes_first_in_its_run() -> None:
    """It has no first time; the stream's chain of the same run has one."""
    gone = full_chain(SIGNER)
    gone.chain_id = "0" * 16
    present = full_chain(SIGNER)
    reports = verify_stream_of(present.payloads, TRUST, heads=recorded_head(gone, 10), trimmed=True)
    assert [r.chain_id for r in reports] == [gone.chain_id, present.chain_id]


def test_messages_are_grouped_by_the_text_before_the_last_hyphen_of_their_id() -> None:
    assert group_chains([b'{"id":"a-b-3"}', b'{"id":"a-4"}']) == {
        "a-b": [b'{"id":"a-b-3"}'],
        "a": [b'{"id":"a-4"}'],
    }


def test_problems_naming_no_sequence_come_first() -> None:
    b = ChainBuilder(SIGNER)
    b.opened()
    misnamed = _resigned(b.payloads[0], lambda e: e.update(id=f"{b.chain_id}-9"))
    _exact(
        verify_chain([misnamed, b"junk"], TRUST),
        (None, Reason.MALFORMED, "message #1: not JSON"),
        (1, Reason.MALFORMED, f"seq 1: id is not {b.chain_id}-1"),
    )


def test_a_gap_is_listed_with_what_it_says_and_keeps_only_a_whole_lost_count() -> None:
    later = "2024-05-01T12:00:09.000000Z"
    b = ChainBuilder(SIGNER)
    b.opened()
    odd = _resigned(b.gap(), lambda e: e["data"].update(lostCount="3", lastLostAt=later))
    report = verify_chain([b.payloads[0], odd], TRUST)
    assert report.ok, report.problems
    assert report.gaps == [
        Gap(sequence=2, reason="queue_full", lost_count=None, first_lost_at=AT, last_lost_at=later)
    ]
