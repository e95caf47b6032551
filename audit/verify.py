"""Chain verification (docs/protocol.md, "Verifying"): the pure, in-order half of the
verifier.

Messages are first turned into :class:`~audit.prepare.Prepared` facts (decoded,
re-canonicalized, hashed, signature checked; independent of each other, so possibly in
worker processes), then fed one at a time, in stream order, to :class:`StreamVerifier`,
which routes them to one :class:`ChainState` per ``chainId``. A chain keeps O(1) state
plus three bounded windows: a reorder buffer (the stream may hold a chain slightly out of
order after publish retries), the digests of its last events (to tell an exact redelivery
from a conflicting one) and the first problems found (counts are kept for the rest). So
memory does not grow with the length of the stream.

Each chain ends with one verdict (:class:`Verdict`). Forensics wants the whole picture, so
checking never stops at the first problem; the report names the first failing sequence and
why, lists the first few problems and counts the rest by reason.
"""

from __future__ import annotations

import enum
from array import array
from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec

from audit.digest import DIGEST_PREFIX, DIGEST_RE, format_sequence
from audit.keys import PUBLIC_KEY_SIZE, b64url_decode
from audit.prepare import (
    SIG_DEFERRED,
    SIG_HALF,
    SIG_INVALID,
    SIG_NONE,
    SIG_UNTRUSTED,
    SIG_VALID,
    Prepared,
    prepare,
)
from schemas.events import CHAIN_TYPE
from schemas.heads import ChainHead

OPENED: Final = CHAIN_TYPE + "opened"
CHECKPOINT: Final = CHAIN_TYPE + "checkpoint"
GAP: Final = CHAIN_TYPE + "gap"
RESUMED: Final = CHAIN_TYPE + "resumed"
SEALED: Final = CHAIN_TYPE + "sealed"
MUST_BE_SIGNED: Final = frozenset({OPENED, CHECKPOINT, GAP, RESUMED, SEALED})

UNATTRIBUTED: Final = ""
""":func:`group_chains` key for messages naming no chain; never a real chain id."""

REORDER_WINDOW: Final = 4096
"""Events of one chain held while an earlier sequence is still missing. The producer keeps
at most ``nats.max_inflight`` (default 4096) publishes open, so retries reorder a chain by
less than that."""
DIGEST_WINDOW: Final = 8192
"""Digests of a chain's latest events kept to compare redeliveries with: a re-publish
after an outage longer than the duplicate window lands within twice the in-flight bound."""
DEFERRED_WINDOW: Final = 256
"""Deferred signatures held before the newest one is checked to cover them all."""
SHOWN_PROBLEMS: Final = 50
LISTED: Final = 1000
"""Cap on the per-chain lists (gaps, duplicates, restarts, key spans): counts go on."""


class Reason(enum.StrEnum):
    """Why a sequence fails. Ordered as checked, so the first listed at one sequence is the
    most specific."""

    MALFORMED = "malformed"
    SPLICED = "spliced"
    WRONG_SUBJECT = "wrong-subject"
    AFTER_SEAL = "after-seal"
    RESTARTED = "restarted"
    MISSING_OPENED = "missing-opened"
    BAD_OPENED = "bad-opened"
    UNKNOWN_KEY = "unknown-key"
    BAD_SIGNATURE = "bad-signature"
    UNSIGNED = "unsigned"
    SEQUENCE_JUMP = "sequence-jump"
    BROKEN_LINK = "broken-link"
    CONFLICTING_DUPLICATE = "conflicting-duplicate"
    BAD_CHECKPOINT = "bad-checkpoint"
    BAD_RESUMED = "bad-resumed"
    BAD_SEAL = "bad-seal"
    HEAD_MISMATCH = "head-mismatch"
    TRUNCATED = "truncated"


_RANK: Final = {reason: i for i, reason in enumerate(Reason)}


class Verdict(enum.StrEnum):
    """One per chain. The first three are intact; the CLI exits 0 only when all are."""

    INTACT_SEALED = "intact-sealed"
    INTACT_OPEN = "intact-open"
    """Open, reaching (at least) its recorded head."""
    SUPERSEDED = "superseded"
    """Open, replaced by a later chain of the same registration, intact up to its head."""
    UNANCHORED = "unanchored"
    """Open and intact as far as it goes, but no recorded head says where it should end,
    so a cut tail cannot be ruled out."""
    TRUNCATED = "truncated"
    """Intact, but the stream ends before the recorded head: the tail was cut."""
    TAMPERED = "tampered"


INTACT: Final = frozenset({Verdict.INTACT_SEALED, Verdict.INTACT_OPEN, Verdict.SUPERSEDED})


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    sequence: int | None
    """The chain sequence it concerns (None: a message that names no sequence)."""
    reason: Reason
    detail: str


class Gap(msgspec.Struct, frozen=True, kw_only=True):
    """A loss the producer declared (a ``gap`` event); declared losses are not problems."""

    sequence: int
    reason: str | None
    lost_count: int | None
    first_lost_at: str | None
    last_lost_at: str | None


class Restart(msgspec.Struct, frozen=True, kw_only=True):
    """A ``resumed`` event: the producer stopped and continued this chain."""

    sequence: int
    time: str
    previous_stop_at: str | None
    clean: bool | None
    signkid: str | None


class KeySpan(msgspec.Struct, kw_only=True):
    """A run of consecutive signed events naming one trusted key id (an invalid signature
    among them is reported as a problem)."""

    kid: str
    first: int
    last: int
    signed: int


class Supersedes(msgspec.Struct, frozen=True, kw_only=True):
    chain_id: str | None
    last_known_sequence: int | None
    last_known_digest: str | None
    reason: str | None


class ChainReport(msgspec.Struct, kw_only=True):
    """What the verifier found about one chain. ``ok`` means no problem was found in the
    events present; ``verdict`` also weighs the end of the chain (seal, recorded head)."""

    cell_id: str | None
    run_id: str | None
    chain_id: str | None
    verdict: Verdict
    ok: bool
    events: int
    first_sequence: int | None
    last_sequence: int | None
    first_time: str | None
    last_time: str | None
    signed: int
    sealed: bool
    problems: list[str]
    """The first problems, in sequence order (at most ``SHOWN_PROBLEMS``)."""
    problems_total: int
    problem_counts: dict[str, int]
    """Every problem found, counted by :class:`Reason`."""
    first_problem: Problem | None
    gaps: list[Gap]
    duplicates: list[int]
    """Sequences delivered more than once with identical content (harmless)."""
    duplicates_total: int
    noncanonical: list[int]
    """Sequences whose payload was not byte-identical to its canonical form (re-encoded
    in transit; harmless to integrity, since digests are recomputed)."""
    unsigned_tail: int
    """Events after the last validly signed one: not yet authenticated (SPEC 5.1)."""
    key_spans: list[KeySpan]
    restarts: list[Restart]
    supersedes: Supersedes | None
    superseded_by: str | None
    retained_from: int | None
    """First sequence the stream still holds when its start was trimmed by the stream's
    retention limits (verified from there on), else None."""
    head_sequence: int | None
    """The recorded head's sequence (None: no head recorded or none given)."""

    @property
    def intact(self) -> bool:
        return self.verdict in INTACT


class _DigestRing:
    """The digests of a chain's last :data:`DIGEST_WINDOW` events, 40 bytes each (a dict
    of strings would take about four times that), grown only as the chain does.

    A slot holds the digest of one sequence and which turn of the ring it came from
    (``(sequence - 1) // DIGEST_WINDOW + 1``), which fits the array's 64 bits for any
    20-digit sequence a message can carry, where the sequence itself may not."""

    __slots__ = ("_digests", "_turns")

    def __init__(self) -> None:
        self._digests = bytearray()
        self._turns = array("q")

    def put(self, sequence: int, digest: str) -> None:
        turn, slot = divmod(sequence - 1, DIGEST_WINDOW)
        missing = slot + 1 - len(self._turns)
        if missing > 0:  # turn 0 marks a slot never filled
            self._turns.extend([0] * missing)
            self._digests += bytes(32 * missing)
        self._turns[slot] = turn + 1
        self._digests[32 * slot : 32 * slot + 32] = bytes.fromhex(digest[len(DIGEST_PREFIX) :])

    def get(self, sequence: int) -> str | None:
        turn, slot = divmod(sequence - 1, DIGEST_WINDOW)
        if slot >= len(self._turns) or self._turns[slot] != turn + 1:
            return None
        return DIGEST_PREFIX + self._digests[32 * slot : 32 * slot + 32].hex()


class ChainState:
    """The in-order checks of one chain, fed :class:`Prepared` events in any order close
    to sequence order."""

    def __init__(
        self,
        chain_id: str | None,
        trust: Mapping[str, bytes],
        *,
        head: ChainHead | tuple[int, str] | None = None,
        trimmed: bool = False,
    ) -> None:
        self.chain_id = chain_id
        """None until the first event names it (:func:`verify_chain`)."""
        self.trust = trust
        self._head = (head.sequence, head.digest) if isinstance(head, ChainHead) else head
        self._head_sealed = isinstance(head, ChainHead) and head.sealed
        self._trimmed_allowed = trimmed
        self.cell_id: str | None = None
        self.run_id: str | None = None
        self._pending: dict[int, Prepared] = {}
        self._last: Prepared | None = None
        self._digests = _DigestRing()
        self._problems: list[tuple[int, int, Problem]] = []
        self.problems_total = 0
        self._holes: list[tuple[int, int]] = []
        """Missing sequence ranges not (yet) declared by a ``gap``: a gap names the range
        its producer lost from a damaged spool only after the hole, so holes wait for the
        end of the chain before they count as tampering."""
        self._declared: list[tuple[int, int]] = []
        self.problem_counts: dict[str, int] = {}
        self.events = 0
        self.first_sequence: int | None = None
        self.first_time: str | None = None
        self.signed = 0
        self.last_signed = 0
        self.sealed_at: int | None = None
        self._after_seal = 0
        self._first_after_seal = 0
        self.gaps: list[Gap] = []
        self.duplicates: list[int] = []
        self.duplicates_total = 0
        self.noncanonical: list[int] = []
        self.key_spans: list[KeySpan] = []
        self.restarts: list[Restart] = []
        self.supersedes: Supersedes | None = None
        self.retained_from: int | None = None
        self._head_seen = False
        self._deferred: list[Prepared] = []
        """Events whose signature is deferred, since the last verified one (in order)."""

    # -- feeding ------------------------------------------------------------------------

    def add(self, event: Prepared) -> None:
        """Take one event; it is checked once every earlier sequence was (or given up)."""
        sequence = event.sequence
        last = self._last.sequence if self._last is not None else 0
        if sequence <= last:
            self._redelivered(event)
            return
        held = self._pending.get(sequence)
        if held is not None:
            self._compare(sequence, held.digest, event)
            return
        self._pending[sequence] = event
        self._drain()
        if len(self._pending) > REORDER_WINDOW:
            self._skip_hole()

    def finish(self) -> ChainReport:
        """Check what is still held (reporting the holes before it) and close the report."""
        while self._pending:
            self._skip_hole()
        for first, last in self._holes:
            if not any(lo <= first and last <= hi for lo, hi in self._declared):
                self._hole(first, last)
        if self._deferred and not self._check_newest_deferred():
            self._check_deferred()
        return self._report()

    def _drain(self) -> None:
        last = self._last.sequence if self._last is not None else 0
        while (event := self._pending.pop(last + 1, None)) is not None:
            self._check(event, self._last)
            last += 1

    def _skip_hole(self) -> None:
        """Give up waiting for the missing sequences before the lowest held one."""
        first = min(self._pending)
        expected = self._last.sequence + 1 if self._last is not None else 1
        if expected == 1 and self._trimmed_allowed:
            self.retained_from = first
        elif len(self._holes) < LISTED:
            self._holes.append((expected, first - 1))
        else:
            self._hole(expected, first - 1)
        self._check(self._pending.pop(first), None)
        self._drain()

    def _hole(self, first: int, last: int) -> None:
        span = str(first) if first == last else f"{first}-{last}"
        self._say(first, Reason.SEQUENCE_JUMP, f"seq {span} missing (an undeclared hole)")

    def malformed(self, event: Prepared, error: str | None = None) -> None:
        """A message that is not an event of any chain; it still counts as a problem."""
        error = error or event.error or "not an event"
        where = f"message #{event.index}" + (f" on {event.subject}" if event.subject else "")
        self._say(
            None, Reason.MALFORMED, error if error.startswith("seq ") else f"{where}: {error}"
        )

    def _redelivered(self, event: Prepared) -> None:
        known = self._digests.get(event.sequence)
        if known is None:
            self._say(
                event.sequence,
                Reason.SEQUENCE_JUMP,
                f"seq {event.sequence}: arrived out of place, after the chain had moved on "
                "(too far to compare or to check its links)",
            )
            return
        self._compare(event.sequence, known, event)

    def _compare(self, sequence: int, digest: str, event: Prepared) -> None:
        if digest == event.digest:
            self.duplicates_total += 1
            if len(self.duplicates) < LISTED:
                self.duplicates.append(sequence)
        else:
            self._say(
                sequence,
                Reason.CONFLICTING_DUPLICATE,
                f"seq {sequence}: two different events carry it",
            )

    # -- the checks ---------------------------------------------------------------------

    def _check(self, event: Prepared, previous: Prepared | None) -> None:
        """Every in-order check of one event; ``previous`` is the event just before it, or
        None after a hole."""
        sequence = event.sequence
        say = self._say
        if previous is not None and previous.sequence != sequence - 1:
            previous = None
        if previous is None and self._deferred:
            self._check_deferred()  # a hole: no later signature can cover them
        problems_before = self.problems_total
        first = self._last is None
        self._last = event
        self.events += 1
        if first:
            self.first_sequence = sequence
            self.first_time = event.time
            self._identify(event)
        self._digests.put(sequence, event.digest)
        if not event.canonical and len(self.noncanonical) < LISTED:
            self.noncanonical.append(sequence)

        if not event.id_ok or event.chain != self.chain_id:
            say(sequence, Reason.MALFORMED, f"seq {sequence}: id is not {self.chain_id}-{sequence}")
        if not event.data_ok:
            say(sequence, Reason.MALFORMED, f"seq {sequence}: data is not an object")
        if self.cell_id is not None and (event.cell, event.run) != (self.cell_id, self.run_id):
            say(
                sequence,
                Reason.SPLICED,
                f"seq {sequence}: belongs to chain {event.cell!r}/{event.run!r}"
                f", not {self.cell_id!r}/{self.run_id!r}",
            )
        if event.subject_attr != event.cell:
            say(
                sequence,
                Reason.WRONG_SUBJECT,
                f"seq {sequence}: subject {event.subject_attr!r} is not its cellId",
            )
        elif event.expected_subject is not None:
            say(
                sequence,
                Reason.WRONG_SUBJECT,
                f"seq {sequence}: published on {event.subject}, not {event.expected_subject}",
            )
        if self.sealed_at is not None:
            self._after_seal += 1
            self._first_after_seal = self._first_after_seal or sequence
        if event.type == OPENED and sequence != 1:
            say(sequence, Reason.RESTARTED, f"seq {sequence}: a second opened event")

        signed = self._signature(event)
        if event.type in MUST_BE_SIGNED and not signed:
            kind = event.type.rsplit(".", 1)[-1]
            say(sequence, Reason.UNSIGNED, f"seq {sequence}: {kind} event is not validly signed")

        if sequence == 1:
            if event.prevhash != "":
                say(1, Reason.BROKEN_LINK, "seq 1: prevhash must be empty")
        elif previous is not None and event.prevhash != previous.digest:
            say(
                sequence,
                Reason.BROKEN_LINK,
                f"seq {sequence}: prevhash is not the digest of seq {sequence - 1}",
            )
        if self._head is not None and self._head[0] == sequence:
            self._head_seen = True
            if self._head[1] != event.digest:
                say(
                    sequence,
                    Reason.HEAD_MISMATCH,
                    f"seq {sequence}: digest differs from the recorded chain head",
                )
        self._chain_event(event, previous)
        self._cover(event, suspect=self.problems_total > problems_before)

    def _cover(self, event: Prepared, *, suspect: bool) -> None:
        """Deferred signatures: a verified signature with every link up to it intact
        authenticates every earlier byte of the chain (deferred signatures included), so
        those are only checked one by one when something around them looks wrong, or
        when the newest of too many has to be checked to cover the rest."""
        if suspect:
            self._check_deferred()
        elif event.signature == SIG_VALID:
            self._deferred.clear()
        elif len(self._deferred) > DEFERRED_WINDOW and not self._check_newest_deferred():
            self._check_deferred()

    def _check_newest_deferred(self) -> bool:
        """Check the newest deferred signature; True when it verifies (covering the rest)."""
        newest = self._deferred[-1]
        if self._verifies(newest):
            self._deferred.clear()
            return True
        return False

    def _check_deferred(self) -> None:
        """Check every deferred signature, reporting each that fails."""
        for event in self._deferred:
            if not self._verifies(event):
                sequence = event.sequence
                self._say(
                    sequence, Reason.BAD_SIGNATURE, f"seq {sequence}: signature does not verify"
                )
                self.signed -= 1
        self._deferred.clear()

    def _verifies(self, event: Prepared) -> bool:
        return prepare(event.raw, event.index, self.trust).signature == SIG_VALID

    def _identify(self, first: Prepared) -> None:
        """Fix the chain's identity from its first event (opened, or the first retained)."""
        self.cell_id, self.run_id = first.cell, first.run
        if self.chain_id is None:
            opened = first.type == OPENED and first.data is not None
            self.chain_id = _str(first.data.get("chainId")) if opened else first.chain  # type: ignore[union-attr]
        if first.sequence == 1 and first.type == OPENED:
            return
        if first.sequence == 1 or not self._trimmed_allowed:
            self._say(
                1, Reason.MISSING_OPENED, "chain does not start with an opened event at seq 1"
            )

    def _signature(self, event: Prepared) -> bool:
        sequence, state, kid = event.sequence, event.signature, event.kid
        if state == SIG_NONE:
            return False
        if state == SIG_HALF:
            self._say(
                sequence,
                Reason.UNSIGNED,
                f"seq {sequence}: signkid and signature must come together",
            )
        elif state == SIG_UNTRUSTED:
            self._say(
                sequence, Reason.UNKNOWN_KEY, f"seq {sequence}: signed with untrusted key {kid!r}"
            )
        elif state == SIG_INVALID:
            self._say(sequence, Reason.BAD_SIGNATURE, f"seq {sequence}: signature does not verify")
        if state not in (SIG_VALID, SIG_DEFERRED, SIG_INVALID) or kid is None:
            return False
        spans = self.key_spans  # by the trusted key each event names (bad ones are problems)
        if spans and spans[-1].kid == kid:
            spans[-1].last = sequence
            spans[-1].signed += 1
        elif len(spans) < LISTED:
            spans.append(KeySpan(kid=kid, first=sequence, last=sequence, signed=1))
        if state == SIG_INVALID:
            return False
        if state == SIG_DEFERRED:
            self._deferred.append(event)
        self.signed += 1
        self.last_signed = sequence
        return True

    def _chain_event(self, event: Prepared, previous: Prepared | None) -> None:
        kind, sequence, data = event.type, event.sequence, event.data or {}
        if kind == OPENED and sequence == 1:
            self._opened(event, data)
        elif kind == CHECKPOINT:
            self._checkpoint(event, data, previous)
        elif kind == GAP:
            declared = _declared_range(data, sequence)
            if (
                declared is not None
                and event.signature == SIG_VALID
                and len(self._declared) < LISTED
            ):
                self._declared.append(declared)
            if len(self.gaps) < LISTED:
                self.gaps.append(
                    Gap(
                        sequence=sequence,
                        reason=_str(data.get("reason")),
                        lost_count=_int(data.get("lostCount")),
                        first_lost_at=_str(data.get("firstLostAt")),
                        last_lost_at=_str(data.get("lastLostAt")),
                    )
                )
        elif kind == RESUMED:
            self._resumed(event, data)
        elif kind == SEALED:
            if data.get("finalSequence") != format_sequence(sequence):
                self._say(
                    sequence,
                    Reason.BAD_SEAL,
                    f"seq {sequence}: sealed's finalSequence is not its own sequence",
                )
            if self.sealed_at is None:
                self.sealed_at = sequence

    def _opened(self, event: Prepared, data: dict[str, Any]) -> None:
        say = self._say
        if self.chain_id is not None and data.get("chainId") != self.chain_id:
            say(1, Reason.BAD_OPENED, f"seq 1: opened announces chainId {data.get('chainId')!r}")
        if not self._announced_key(1, "opened", event, data, Reason.BAD_OPENED):
            return
        supersedes = data.get("supersedes")
        if type(supersedes) is dict:
            self.supersedes = Supersedes(
                chain_id=_str(supersedes.get("chainId")),
                last_known_sequence=_sequence(supersedes.get("lastKnownSequence")),
                last_known_digest=_str(supersedes.get("lastKnownDigest")),
                reason=_str(supersedes.get("reason")),
            )

    def _announced_key(
        self, sequence: int, kind: str, event: Prepared, data: dict[str, Any], reason: Reason
    ) -> bool:
        """``opened`` and ``resumed`` name the key that signs from there on: it must be
        trusted under that id and sign the event itself."""
        kid, public_key = data.get("signkid"), data.get("publicKey")
        raw = b64url_decode(public_key, PUBLIC_KEY_SIZE) if type(public_key) is str else None
        ok = True
        if raw is None:
            self._say(sequence, reason, f"seq {sequence}: {kind} carries no valid publicKey")
            ok = False
        if type(kid) is not str or kid not in self.trust:
            self._say(
                sequence,
                Reason.UNKNOWN_KEY,
                f"seq {sequence}: {kind} names key {kid!r}, which is not trusted",
            )
            ok = False
        elif raw is not None and self.trust[kid] != raw:
            self._say(
                sequence,
                reason,
                f"seq {sequence}: {kind}'s publicKey is not the trusted key {kid!r}",
            )
            ok = False
        if event.kid != kid:
            self._say(
                sequence, reason, f"seq {sequence}: {kind} is not signed by the key it announces"
            )
            ok = False
        return ok

    def _resumed(self, event: Prepared, data: dict[str, Any]) -> None:
        self._announced_key(event.sequence, "resumed", event, data, Reason.BAD_RESUMED)
        if len(self.restarts) < LISTED:
            clean = data.get("clean")
            self.restarts.append(
                Restart(
                    sequence=event.sequence,
                    time=event.time,
                    previous_stop_at=_str(data.get("previousStopAt")),
                    clean=clean if type(clean) is bool else None,
                    signkid=_str(data.get("signkid")),
                )
            )

    def _checkpoint(self, event: Prepared, data: dict[str, Any], previous: Prepared | None) -> None:
        sequence = event.sequence
        if data.get("headSequence") != format_sequence(sequence - 1):
            self._say(
                sequence,
                Reason.BAD_CHECKPOINT,
                f"seq {sequence}: checkpoint headSequence is not seq {sequence - 1}",
            )
        head_hash = data.get("headHash")
        expected = previous.digest if previous is not None else event.prevhash
        if (
            type(head_hash) is not str
            or not DIGEST_RE.fullmatch(head_hash)
            or head_hash != expected
        ):
            self._say(
                sequence,
                Reason.BAD_CHECKPOINT,
                f"seq {sequence}: checkpoint headHash is not the digest of seq {sequence - 1}",
            )

    def _say(self, sequence: int | None, reason: Reason, detail: str) -> None:
        self.problems_total += 1
        self.problem_counts[reason] = self.problem_counts.get(reason, 0) + 1
        if len(self._problems) < SHOWN_PROBLEMS:
            key = sequence if sequence is not None else -1
            self._problems.append(
                (key, _RANK[reason], Problem(sequence=sequence, reason=reason, detail=detail))
            )

    # -- the end ------------------------------------------------------------------------

    def _end(self) -> None:
        """The end-of-chain findings: events after a seal, a tail cut before the head."""
        if self.sealed_at is not None and self._after_seal:
            self._say(
                self._first_after_seal,
                Reason.AFTER_SEAL,
                f"seq {self.sealed_at}: sealed, yet {self._after_seal} event(s) follow it",
            )
        head = self._head
        if self._last is None and head is None:
            self._say(None, Reason.MISSING_OPENED, "chain has no events")
        if head is not None and self._last is None and self._trimmed_allowed:
            self.retained_from = head[0] + 1  # all of it trimmed away
            if self._head_sealed:
                self.sealed_at = head[0]
        elif head is not None and not self._head_seen:
            last = self._last.sequence if self._last is not None else 0
            if last < head[0]:
                self._say(
                    last + 1,
                    Reason.TRUNCATED,
                    f"recorded head is seq {head[0]} but the stream ends at seq {last}: "
                    "the tail was cut",
                )
            elif last >= head[0] and self.retained_from is None:
                self._say(
                    head[0],
                    Reason.HEAD_MISMATCH,
                    f"seq {head[0]}: the recorded chain head is not in the stream",
                )

    def _report(self) -> ChainReport:
        self._end()
        problems = sorted(self._problems, key=lambda p: (p[0], p[1]))
        last = self._last
        sealed = self.sealed_at is not None
        reasons = set(self.problem_counts)
        if reasons - {Reason.TRUNCATED}:
            verdict = Verdict.TAMPERED
        elif reasons:
            verdict = Verdict.TRUNCATED
        elif sealed:
            verdict = Verdict.INTACT_SEALED
        elif self._head is not None:
            verdict = Verdict.INTACT_OPEN
        else:
            verdict = Verdict.UNANCHORED
        return ChainReport(
            cell_id=self.cell_id,
            run_id=self.run_id,
            chain_id=self.chain_id,
            verdict=verdict,
            ok=not self.problems_total,
            events=self.events,
            first_sequence=self.first_sequence,
            last_sequence=last.sequence if last is not None else None,
            first_time=self.first_time,
            last_time=last.time if last is not None else None,
            signed=self.signed,
            sealed=sealed,
            problems=[p[2].detail for p in problems],
            problems_total=self.problems_total,
            problem_counts={str(k): v for k, v in self.problem_counts.items() if v},
            first_problem=problems[0][2] if problems else None,
            gaps=self.gaps,
            duplicates=self.duplicates,
            duplicates_total=self.duplicates_total,
            noncanonical=self.noncanonical,
            unsigned_tail=(last.sequence - max(self.last_signed, (self.first_sequence or 1) - 1))
            if last is not None
            else 0,
            key_spans=self.key_spans,
            restarts=self.restarts,
            supersedes=self.supersedes,
            superseded_by=None,
            retained_from=self.retained_from,
            head_sequence=self._head[0] if self._head is not None else None,
        )


class StreamVerifier:
    """Verifies every chain of a stream (or of one cell's subjects), one message at a time.

    ``heads`` are the recorded heads by chain id (read *before* the stream, so the stream
    already holds each of them); ``trimmed`` says the stream's retention limits removed
    its oldest messages (its first retained sequence is above 1), so a chain whose start is
    missing was trimmed rather than cut.
    """

    def __init__(
        self,
        trust: Mapping[str, bytes],
        *,
        heads: Mapping[str, ChainHead] | None = None,
        trimmed: bool = False,
    ) -> None:
        self._trust = trust
        self._heads = dict(heads or {})
        self._trimmed = trimmed
        self._chains: dict[str, ChainState] = {}
        self._stray = ChainState(None, trust)
        self.messages = 0

    def add(self, event: Prepared) -> None:
        self.messages += 1
        if event.error is not None:
            self._stray.malformed(event)
            return
        chain = self._chains.get(event.chain)
        if chain is None:
            if not event.chain:
                self._stray.malformed(event, "id names no chain")
                return
            chain = self._chains[event.chain] = ChainState(
                event.chain, self._trust, head=self._heads.get(event.chain), trimmed=self._trimmed
            )
        chain.add(event)

    def finish(self) -> list[ChainReport]:
        """One report per chain seen in the stream or the heads, plus one for messages that
        name no chain (if any), in (cell, run, first time) order."""
        for chain_id, head in self._heads.items():
            if chain_id not in self._chains:
                state = self._chains[chain_id] = ChainState(
                    chain_id, self._trust, head=head, trimmed=self._trimmed
                )
                state.cell_id, state.run_id = head.cell_id, head.run_id
        reports = [state.finish() for state in self._chains.values()]
        by_id = {r.chain_id: r for r in reports}
        for report in reports:
            replaced = report.supersedes
            if replaced is None or replaced.chain_id not in by_id:
                continue
            old = by_id[replaced.chain_id]
            old.superseded_by = report.chain_id
            if old.verdict in (Verdict.INTACT_OPEN, Verdict.UNANCHORED):
                old.verdict = Verdict.SUPERSEDED
        if self._stray.problems_total:
            reports.append(self._stray.finish())
        return sorted(reports, key=lambda r: (r.cell_id or "", r.run_id or "", r.first_time or ""))


def verify_chain(
    payloads: Iterable[bytes],
    trust: Mapping[str, bytes],
    *,
    head: tuple[int, str] | None = None,
) -> ChainReport:
    """Check the messages of one chain (structured-mode payloads, any order close to
    sequence order) against the protocol and the keys in ``trust`` (kid -> raw key).

    ``head`` is the chain's recorded latest signed head (sequence, digest): the stream must
    contain exactly that event, or its tail was cut.
    """
    state = ChainState(None, trust, head=head)
    for index, payload in enumerate(payloads):
        event = prepare(payload, index, trust)
        if event.error is None:
            state.add(event)
        else:
            state.malformed(event)
    return state.finish()


def group_chains(payloads: Iterable[bytes]) -> dict[str, list[bytes]]:
    """Split a replay into chains, keyed by chain id (from each event's ``id``), stream
    order kept. Messages that name no chain go under :data:`UNATTRIBUTED`, so verifying
    every group accounts for every message."""
    chains: dict[str, list[bytes]] = {}
    for payload in payloads:
        try:
            event_id = _id_decoder.decode(payload).id
        except msgspec.DecodeError:  # includes ValidationError
            event_id = ""
        chain = event_id.rpartition("-")[0]
        chains.setdefault(chain, []).append(payload)
    return chains


class _Id(msgspec.Struct):
    id: str


_id_decoder: Final = msgspec.json.Decoder(_Id)


def _declared_range(data: dict[str, Any], sequence: int) -> tuple[int, int] | None:
    """The sequences a ``gap`` declares lost from a damaged spool (before its own)."""
    lo, hi = _sequence(data.get("firstLostSequence")), _sequence(data.get("lastLostSequence"))
    if lo is None or hi is None:
        return None
    return (lo, hi) if 0 < lo <= hi < sequence else None


def _str(value: object) -> str | None:
    return value if type(value) is str else None


def _int(value: object) -> int | None:
    return value if type(value) is int else None


def _sequence(value: object) -> int | None:
    return int(value) if type(value) is str and value.isascii() and value.isdigit() else None
