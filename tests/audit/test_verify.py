"""Chains built by the real sealer verify; every kind of tampering SPEC 5.2 promises to
expose is reported."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from audit.canonical import canonical
from audit.digest import digest_of
from audit.prepare import prepare
from audit.verify import (
    DEFERRED_WINDOW,
    DIGEST_WINDOW,
    UNATTRIBUTED,
    ChainReport,
    Reason,
    Verdict,
    group_chains,
    verify_chain,
)
from producer.chain.signing import Signer
from schemas.heads import ChainHead
from tests.chains import ChainBuilder, full_chain, new_signer, verify_stream_of

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


def _assert_problem(report: ChainReport, *fragments: str) -> None:
    assert not report.ok
    text = "\n".join(report.problems)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"


# ---- genuine chains


def test_genuine_sealed_chain_verifies() -> None:
    built = full_chain(SIGNER)
    chain = built.payloads
    report = _report(chain)
    assert report.ok, report.problems
    assert (report.cell_id, report.run_id, report.chain_id) == ("cell-7", "run-1", built.chain_id)
    assert (report.events, report.first_sequence, report.last_sequence) == (10, 1, 10)
    assert report.signed == 6  # opened, guest 102, checkpoint, gap, guest 104, sealed
    assert report.sealed and report.unsigned_tail == 0
    assert [(g.sequence, g.reason, g.lost_count) for g in report.gaps] == [(8, "queue_full", 3)]
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
    assert report.signed == 0
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


@pytest.mark.parametrize("kind", ["opened", "checkpoint", "gap", "sealed"])
def test_unsigned_control_event_is_detected(kind: str) -> None:
    b = ChainBuilder(SIGNER)
    b.opened(sign=kind != "opened")
    b.guest(1)
    if kind != "opened":
        getattr(b, kind)(sign=False)
    _assert_problem(_report(b.payloads), f"{kind} event is not validly signed")


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
    assert not report.ok and report.events == 0 and report.first_sequence is None


# ---- grouping


def test_group_chains_keeps_stream_order_and_unattributed_messages() -> None:
    chains = [full_chain(SIGNER, "cell-1", "r"), full_chain(SIGNER, "cell-2", "r")]
    chains.append(full_chain(SIGNER, "cell-1", "r2"))
    a, b, c = (chain.payloads for chain in chains)
    mixed = [p for trio in zip(a, b, c, strict=True) for p in trio] + [b"junk", b"{}"]
    groups = group_chains(mixed)
    assert groups == {
        chains[0].chain_id: a,
        chains[1].chain_id: b,
        chains[2].chain_id: c,
        UNATTRIBUTED: [b"junk", b"{}"],
    }
    assert all(verify_chain(g, TRUST).ok for k, g in groups.items() if k != UNATTRIBUTED)
    assert not verify_chain(groups[UNATTRIBUTED], TRUST).ok


def test_signer_fixture_is_real() -> None:
    # guards the helpers: a chain signed by SIGNER carries SIGNER's key in opened
    opened = msgspec.json.decode(full_chain(SIGNER).payloads[0])
    assert opened["signkid"] == SIGNER.kid and isinstance(SIGNER, Signer)
    assert opened["data"]["publicKey"] == SIGNER.public_key_b64


# ---- the recorded head (SPEC 5.3): a cut tail versus a quiet cell


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


# ---- key rotation, restarts, superseded chains (StreamVerifier)


def test_a_rotated_key_is_accepted_and_each_keys_span_reported() -> None:
    old, new = new_signer(), new_signer()
    b = ChainBuilder(old)
    b.opened()
    b.guest(1)
    b.rotate(new)  # SIGHUP reload: same chain, new signkid
    b.guest(2)
    b.resumed()  # a restart announces the key it signs with
    b.guest(3)
    b.sealed()
    trust = {old.kid: old.public_raw, new.kid: new.public_raw}
    (report,) = verify_stream_of(b.payloads, trust)
    assert report.verdict == Verdict.INTACT_SEALED, report.problems
    assert [(s.kid, s.first, s.last, s.signed) for s in report.key_spans] == [
        (old.kid, 1, 2, 2),
        (new.kid, 3, 6, 4),
    ]
    assert [(r.sequence, r.clean, r.signkid) for r in report.restarts] == [(4, True, new.kid)]
    # without the new key the rotation is the first failure
    (only_old,) = verify_stream_of(b.payloads, {old.kid: old.public_raw})
    assert only_old.verdict == Verdict.TAMPERED and only_old.first_problem is not None
    assert (only_old.first_problem.sequence, only_old.first_problem.reason) == (
        3,
        Reason.UNKNOWN_KEY,
    )


def test_resumed_must_announce_the_key_that_signs_it() -> None:
    other = new_signer()
    b = ChainBuilder(SIGNER)
    b.opened()
    b.guest(1)
    b.resumed()
    forged = _edit(b.payloads[2], lambda e: e["data"].update(signkid=other.kid))
    resigned = canonical(_resign(msgspec.json.decode(forged), SIGNER))
    (report,) = verify_stream_of(
        [*b.payloads[:2], resigned], {**TRUST, other.kid: other.public_raw}
    )
    assert report.first_problem is not None
    assert report.first_problem.reason == Reason.BAD_RESUMED, report.problems


def _resign(event: dict[str, Any], signer: Signer) -> dict[str, Any]:
    body = {k: v for k, v in event.items() if k != "signature"}
    body["signkid"] = signer.kid
    body["signature"] = signer.sign(canonical(body))
    return body


def test_a_superseded_chain_is_reported_as_such_from_its_recorded_head() -> None:
    first = ChainBuilder(SIGNER, run="run-1")
    first.opened()
    first.guest(1)
    head = first.checkpoint()
    first.guest(2)  # published, but after the last recorded head
    second = ChainBuilder(SIGNER, run="run-1")
    second.chain_id = "0" * 15 + "1"
    second.opened(
        supersedes={
            "chainId": first.chain_id,
            "lastKnownSequence": "00000000000000000003",
            "lastKnownDigest": digest_of(head),
            "reason": "spool_lost",
        }
    )
    second.guest(3)
    heads = {
        first.chain_id: ChainHead(
            cell_id="cell-7",
            run_id="run-1",
            chain_id=first.chain_id,
            sequence=3,
            digest=digest_of(head),
            event_id=f"{first.chain_id}-3",
            type="checkpoint",
        )
    }
    reports = {
        r.chain_id: r
        for r in verify_stream_of(first.payloads + second.payloads, TRUST, heads=heads)
    }
    old, new = reports[first.chain_id], reports[second.chain_id]
    assert old.verdict == Verdict.SUPERSEDED and old.superseded_by == second.chain_id
    assert new.supersedes is not None and new.supersedes.chain_id == first.chain_id
    assert new.verdict == Verdict.UNANCHORED  # open, and no head recorded for it
    # cut before its recorded head, a superseded chain is still truncated
    cut = {
        r.chain_id: r
        for r in verify_stream_of(first.payloads[:2] + second.payloads, TRUST, heads=heads)
    }
    assert cut[first.chain_id].verdict == Verdict.TRUNCATED


def test_a_reordered_stream_is_not_tampering() -> None:
    b = full_chain(SIGNER)
    swapped = [*b.payloads[:3], b.payloads[4], b.payloads[3], *b.payloads[5:]]
    (report,) = verify_stream_of(swapped, TRUST)
    assert report.verdict == Verdict.INTACT_SEALED, report.problems


def test_problems_are_capped_and_counted() -> None:
    mallory = new_signer()
    b = ChainBuilder(mallory)
    b.opened()
    for pid in range(120):
        b.guest(pid)
    (report,) = verify_stream_of(b.payloads, TRUST)
    assert report.problems_total > len(report.problems) == 50
    assert report.problem_counts["unknown-key"] == 122  # opened's key, then every signature
    assert report.first_problem is not None and report.first_problem.sequence == 1


# ---- deferred signatures: anchors plus the hash links


def _states(payloads: list[bytes], *, every: bool) -> tuple[ChainReport, int]:
    """Verify one chain with deferred (or every) signature checks; also return the most
    deferred signatures it held at once."""
    from audit.verify import ChainState

    state = ChainState(None, TRUST)
    most = 0
    for i, payload in enumerate(payloads):
        state.add(prepare(payload, i, TRUST, every_signature=every))
        most = max(most, len(state._deferred))
    return state.finish(), most


def _long_chain(events: int = 700) -> ChainBuilder:
    b = ChainBuilder(SIGNER)
    b.opened()
    for pid in range(events):
        b.guest(pid)
    return b


def test_deferred_signatures_are_bounded_and_reach_the_same_verdict() -> None:
    b = _long_chain()
    deferred, most = _states(b.payloads, every=False)
    every, none_held = _states(b.payloads, every=True)
    assert deferred == every and deferred.ok and deferred.signed == 701
    assert none_held == 0 and 0 < most <= DEFERRED_WINDOW + 1


def test_a_rewritten_run_between_anchors_is_found_event_by_event() -> None:
    # the attacker edits seq 100 and re-links seq 101 to it: 101's link holds, its
    # signature does not, and 102's link breaks; no anchor lies in between
    payloads = _long_chain().payloads
    edited = _edit(payloads[99], lambda e: e["data"].update(guestComm="evil"))
    relinked = _edit(payloads[100], lambda e: e.update(prevhash=digest_of(edited)))
    altered = [*payloads[:99], edited, relinked, *payloads[101:]]
    deferred, _ = _states(altered, every=False)
    every, _ = _states(altered, every=True)
    assert (
        deferred.problems
        == every.problems
        == [
            "seq 100: signature does not verify",
            "seq 101: signature does not verify",
            "seq 102: prevhash is not the digest of seq 101",
        ]
    )
    assert deferred.signed == every.signed == 699


def test_a_forged_last_event_is_checked_at_the_end() -> None:
    payloads = _long_chain(70).payloads  # the last event, seq 71, is no anchor
    forged = _edit(payloads[-1], lambda e: e["data"].update(guestPid=1))
    report, _ = _states([*payloads[:-1], forged], every=False)
    assert report.problems == ["seq 71: signature does not verify"]


def test_redeliveries_are_compared_within_the_digest_window_only() -> None:
    b = _long_chain(DIGEST_WINDOW + 200)
    last = len(b.payloads)
    recent, old = b.payloads[last - 100], b.payloads[99]  # seq last-99 and seq 100
    (report,) = verify_stream_of([*b.payloads, recent, old], TRUST)
    assert report.duplicates == [last - 99]
    assert report.problems == [
        "seq 100: arrived out of place, after the chain had moved on "
        "(too far to compare or to check its links)"
    ]
    # a chain whose retained history starts late still remembers what it saw
    (trimmed,) = verify_stream_of([*b.payloads[5000:], b.payloads[5100]], TRUST, trimmed=True)
    assert trimmed.retained_from == 5001 and trimmed.duplicates == [5101] and trimmed.ok
