"""The signing policy (SPEC 5.1) as a pure unit: every rule, with the clock passed in.

What adaptive mode promises: chain events are always signed; no chain goes more than
``max_unsigned`` events, nor ``max_unsigned_ms``, without a signature covering its
unsigned run; the host-wide budget refills at its rate up to its burst, and only the last
event of a batch spends it.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from producer.chain.signpolicy import SignBudget, SigningPolicy, UnsignedRun

MAX_UNSIGNED = 4
MAX_UNSIGNED_MS = 125  # 0.125 s: exact in binary, so the boundary itself can be tested
BOUND_S = MAX_UNSIGNED_MS / 1000


def _dry() -> SignBudget:
    """A budget that never has a token: only the policy's own rules sign."""
    return SignBudget(0.0, burst=0.0, now_s=0.0)


def _adaptive(budget: SignBudget | None = None) -> SigningPolicy:
    return SigningPolicy(
        strict=False,
        max_unsigned=MAX_UNSIGNED,
        max_unsigned_ms=MAX_UNSIGNED_MS,
        budget=_dry() if budget is None else budget,
    )


def _run(count: int, since_s: float = 0.0) -> UnsignedRun:
    return UnsignedRun(count=count, since_s=since_s)


def _decide(
    policy: SigningPolicy,
    run: UnsignedRun,
    now_s: float = 0.0,
    *,
    control: bool = False,
    last: bool = False,
) -> bool:
    return policy.decide(run, control=control, last_in_batch=last, now_s=now_s)


# ---- the budget


def test_budget_starts_full_and_spends_one_token_per_signature() -> None:
    budget = SignBudget(10.0, burst=3.0, now_s=5.0)
    assert [budget.take(5.0) for _ in range(4)] == [True, True, True, False]


# Rate 4/s with times in binary fractions: a quarter second is exactly one token.


def test_budget_refills_at_its_rate() -> None:
    budget = SignBudget(4.0, burst=2.0, now_s=0.0)
    assert budget.take(0.0) and budget.take(0.0)
    assert not budget.take(0.125)  # half a token
    assert budget.take(0.25)
    assert not budget.take(0.25)
    assert budget.take(0.5)


def test_budget_refill_is_capped_at_the_burst() -> None:
    budget = SignBudget(4.0, burst=2.0, now_s=0.0)
    assert budget.take(0.0) and budget.take(0.0)
    # An hour idle earns two tokens, not 14 400.
    assert [budget.take(3600.0) for _ in range(3)] == [True, True, False]


def test_budget_refill_counts_each_interval_once() -> None:
    budget = SignBudget(4.0, burst=5.0, now_s=0.0)
    for _ in range(5):
        assert budget.take(0.0)
    assert not budget.take(0.1875)  # 0.75 token
    assert budget.take(0.25)  # 0.1875 + 0.0625 s: one token, not 0.75 + 1
    assert not budget.take(0.25)


def test_budget_is_not_refilled_by_a_clock_going_backwards() -> None:
    budget = SignBudget(4.0, burst=1.0, now_s=10.0)
    assert budget.take(10.0)
    assert not budget.take(9.0)
    assert not budget.take(10.125)  # measured from 10.0, not from 9.0
    assert budget.take(10.25)


# ---- which events are signed


def test_strict_mode_signs_everything_whatever_the_budget() -> None:
    policy = SigningPolicy(strict=True, max_unsigned=4, max_unsigned_ms=100, budget=_dry())
    assert _decide(policy, _run(0))
    assert _decide(policy, _run(1, 0.0), now_s=0.001)


def test_without_a_budget_every_event_is_signed() -> None:
    policy = SigningPolicy(strict=False, max_unsigned=4, max_unsigned_ms=100, budget=None)
    assert _decide(policy, _run(0))


def test_chain_events_are_always_signed_and_spend_no_token() -> None:
    budget = SignBudget(0.0, burst=1.0, now_s=0.0)
    policy = _adaptive(budget)
    assert _decide(policy, _run(0), control=True)
    assert _decide(policy, _run(2, 0.0), now_s=0.01, control=True)
    assert _decide(policy, _run(0), last=True)  # the one token is still there
    assert not _decide(policy, _run(0), last=True)


def test_last_event_of_a_batch_is_signed_while_the_budget_has_tokens() -> None:
    policy = _adaptive(SignBudget(0.0, burst=2.0, now_s=0.0))
    assert _decide(policy, _run(0), last=True)
    assert _decide(policy, _run(0), last=True)
    assert not _decide(policy, _run(0), last=True)


def test_events_inside_a_batch_are_unsigned_and_spend_no_token() -> None:
    policy = _adaptive(SignBudget(0.0, burst=1.0, now_s=0.0))
    assert not _decide(policy, _run(0), last=False)
    assert not _decide(policy, _run(1, 0.0), last=False)
    assert _decide(policy, _run(2, 0.0), last=True)


def test_max_unsigned_events_force_a_signature() -> None:
    policy = _adaptive()
    assert not _decide(policy, _run(MAX_UNSIGNED - 1))
    assert _decide(policy, _run(MAX_UNSIGNED))
    assert _decide(policy, _run(MAX_UNSIGNED + 1))


def test_max_unsigned_ms_forces_a_signature() -> None:
    policy = _adaptive()
    run = _run(1, since_s=50.0)
    assert not _decide(policy, run, now_s=50.0 + BOUND_S * 0.99)
    assert _decide(policy, run, now_s=50.0 + BOUND_S)  # at the bound itself, not after it
    assert _decide(policy, run, now_s=50.0 + 10 * BOUND_S)


def test_the_age_of_an_empty_run_forces_nothing() -> None:
    assert not _decide(_adaptive(), _run(0, since_s=0.0), now_s=1000.0)


# ---- keeping the unsigned run


def test_the_run_counts_unsigned_events_and_dates_from_the_first() -> None:
    run = UnsignedRun()
    SigningPolicy.record(run, signed=False, now_s=1.0)
    SigningPolicy.record(run, signed=False, now_s=1.0625)
    assert (run.count, run.since_s) == (2, 1.0)
    # The first unsigned event is 125 ms old at 1.125: the bound is measured from it.
    assert _decide(_adaptive(), run, now_s=1.125)


def test_a_signature_ends_the_run() -> None:
    run = UnsignedRun()
    for i in range(MAX_UNSIGNED):
        SigningPolicy.record(run, signed=False, now_s=i * 0.001)
    SigningPolicy.record(run, signed=True, now_s=0.01)
    assert run.count == 0
    policy = _adaptive()
    assert policy.cover_due(run, 0.01) is None
    # A new run starts at its own first event, not at the old run's.
    SigningPolicy.record(run, signed=False, now_s=5.0)
    assert (run.count, run.since_s) == (1, 5.0)
    assert not _decide(policy, run, now_s=5.05)


# ---- covering a quiet tail


def test_nothing_to_cover_without_unsigned_events() -> None:
    assert _adaptive().cover_due(_run(0, 3.0), 3.0) is None


def test_an_unsigned_tail_is_covered_within_half_the_bound() -> None:
    policy = _adaptive()
    assert policy.cover_due(_run(3, since_s=2.0), 2.0) == BOUND_S / 2
    assert policy.cover_due(_run(3, since_s=2.0), 2.0625) == 0.0
    assert policy.cover_due(_run(3, since_s=2.0), 2.03125) == BOUND_S / 2 - 0.03125


def test_an_overdue_cover_is_due_at_once() -> None:
    assert _adaptive().cover_due(_run(1, since_s=2.0), 9.0) == 0.0


# ---- the promise, over any burst


@given(
    batches=st.lists(
        st.tuples(st.integers(1, 40), st.integers(0, 80)),  # (events, ms since the last batch)
        min_size=1,
        max_size=40,
    ),
    rate=st.sampled_from([0.0, 5.0, 200.0]),
)
def test_no_burst_leaves_a_run_longer_than_the_bounds(
    batches: list[tuple[int, int]], rate: float
) -> None:
    """A chain driven the way ``CellRuntime`` drives it: each batch decided and recorded
    event by event, and a signed checkpoint wherever a cover fell due between batches.
    Every unsigned run ends within ``max_unsigned`` events and ``max_unsigned_ms``."""
    policy = _adaptive(SignBudget(rate, burst=2.0, now_s=0.0))
    run = UnsignedRun()
    signed_at: list[tuple[float, bool]] = []  # (time, signed) per event, in chain order
    now = 0.0
    for size, gap_ms in batches:
        arrive = now + gap_ms / 1000
        due = policy.cover_due(run, now)
        if due is not None and now + due <= arrive:
            now += due
            assert _decide(policy, run, now, control=True, last=True)
            policy.record(run, signed=True, now_s=now)
            signed_at.append((now, True))
        now = arrive
        for i in range(size):
            sign = _decide(policy, run, now, last=i == size - 1)
            policy.record(run, signed=sign, now_s=now)
            signed_at.append((now, sign))
    # The tail is covered by the checkpoint cover_due asks for.
    due = policy.cover_due(run, now)
    if due is not None:
        signed_at.append((now + due, True))

    first_unsigned: float | None = None
    length = 0
    for at, signed in signed_at:
        if signed:
            if first_unsigned is not None:
                assert at - first_unsigned <= BOUND_S
            first_unsigned, length = None, 0
        else:
            first_unsigned = at if first_unsigned is None else first_unsigned
            length += 1
            assert length <= MAX_UNSIGNED
    assert first_unsigned is None
