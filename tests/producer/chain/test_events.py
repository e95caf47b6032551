"""Stamping and the guest-event template: the template must be canonical() to the byte."""

from __future__ import annotations

import time

import msgspec
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.canonical import canonical
from audit.digest import format_sequence
from producer.chain.events import (
    ChainContext,
    GuestEncoder,
    Pending,
    Rfc3339Clock,
    chain_event,
    guest_event,
    host_event,
    silenced_event,
)
from producer.chain.sealer import ChainSealer
from producer.chain.signing import Signer
from schemas.events import CHAIN_KINDS, HOST_PROBES
from schemas.wire import PROBE_SOURCES, Declaration
from tests.chains import new_signer


def rfc3339_us(epoch_ns: int) -> str:
    secs, ns = divmod(epoch_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns // 1000:06d}Z"


ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
declarations = st.builds(
    Declaration,
    content_version=st.just(1),
    probe_source=st.sampled_from(sorted(PROBE_SOURCES)),
    guest_pid=st.integers(0, 2**32 - 1),
    guest_comm=st.text(max_size=40),
    guest_monotonic_ns=st.integers(0, 2**64 - 1),
)
contexts = st.builds(
    ChainContext,
    host_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True),
    cell_id=ids,
    run_id=ids,
    spec_signature_hash=st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True),
    chain_id=st.from_regex(r"[0-9a-f]{16}", fullmatch=True),
    subject_prefix=st.just("cellos.telemetry"),
)
times = st.integers(0, 4_102_444_800 * 10**9).map(rfc3339_us)
prevhashes = st.one_of(st.just(""), st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True))
kids = st.one_of(st.none(), st.text(min_size=1, max_size=30))


@settings(max_examples=400)
@given(
    ctx=contexts,
    decl=declarations,
    at=times,
    sequence=st.integers(1, 10**20 - 1),
    prevhash=prevhashes,
    kid=kids,
)
def test_template_equals_canonical_of_the_dict(
    *,
    ctx: ChainContext,
    decl: Declaration,
    at: str,
    sequence: int,
    prevhash: str,
    kid: str | None,
) -> None:
    event = guest_event(ctx, decl, at).event
    event["id"] = f"{ctx.chain_id}-{sequence}"
    event["sequence"] = format_sequence(sequence)
    event["prevhash"] = prevhash
    if kid is not None:
        event["signkid"] = kid
    encoder = GuestEncoder(ctx)
    assert encoder.encode(decl, at, sequence, prevhash, kid) == canonical(event)
    assert canonical(event) == rfc8785.dumps(event)  # plain RFC 8785, even at u64 max
    assert encoder.subject(decl) == guest_event(ctx, decl, at).subject


@settings(max_examples=50)
@given(contexts, st.lists(st.tuples(declarations, st.booleans()), min_size=1, max_size=8))
def test_template_sealing_matches_dict_sealing(
    ctx: ChainContext, steps: list[tuple[Declaration, bool]]
) -> None:
    signer: Signer = SIGNER
    by_dict, by_template = ChainSealer(signer), ChainSealer(signer)
    encoder = GuestEncoder(ctx)
    at = "2026-11-29T05:18:29.123456Z"
    for decl, sign in steps:
        event = guest_event(ctx, decl, at).event
        event["id"] = encoder.event_id(by_dict.sequence + 1)
        a = by_dict.seal(event, sign=sign)
        b = by_template.seal_encoded(
            lambda seq, prev, kid, decl=decl: encoder.encode(decl, at, seq, prev, kid),
            sign=sign,
        )
        assert a == b


SIGNER = new_signer()

u64_strings = st.integers(0, 2**64 - 1).map(str)
safe_ints = st.integers(0, 2**53 - 1)
counters = st.dictionaries(
    st.text(min_size=1, max_size=12), u64_strings | safe_ints | st.text(max_size=8), max_size=5
)


@st.composite
def any_event(draw: st.DrawFn) -> Pending:
    """One event of every builder the producer seals, with arbitrary allowed values."""
    ctx, at = draw(contexts), draw(times)
    kind = draw(st.sampled_from(["guest", "silenced", "host", *CHAIN_KINDS]))
    if kind == "guest":
        return guest_event(ctx, draw(declarations), at)
    if kind == "silenced":
        last = draw(st.none() | times)
        return silenced_event(
            ctx, at, window_ms=draw(safe_ints), silent_for_ms=draw(safe_ints), last_frame_at=last
        )
    if kind == "host":
        probe = draw(st.sampled_from(HOST_PROBES))
        return host_event(ctx, probe, at, draw(counters), {"rows": [draw(counters)]})
    fields = draw(st.dictionaries(st.text(max_size=10), u64_strings | safe_ints | st.booleans()))
    return chain_event(ctx, kind, at, fields)


@settings(max_examples=300)
@given(any_event(), st.booleans())
def test_every_event_type_seals_to_plain_rfc8785(pending: Pending, sign: bool) -> None:
    event = pending.event
    event["id"] = "0" * 16 + "-1"
    payload = ChainSealer(SIGNER).seal(event, sign=sign).payload
    assert rfc8785.dumps(msgspec.json.decode(payload)) == payload


def test_rfc3339_clock_formats_microseconds_utc() -> None:
    ns = iter([1_700_000_000_123_456_789, 1_700_000_000_999_999_999, 1_700_000_001_000_000_000])
    clock = Rfc3339Clock(lambda: next(ns))
    assert clock.now() == "2023-11-14T22:13:20.123456Z"
    assert clock.now() == "2023-11-14T22:13:20.999999Z"
    assert clock.now() == "2023-11-14T22:13:21.000000Z"
    assert Rfc3339Clock(lambda: 0).now() == "1970-01-01T00:00:00.000000Z"


def test_stamped_fields_come_from_the_registration_only() -> None:
    ctx = ChainContext(
        host_id="h",
        cell_id="cell-9",
        run_id="r",
        spec_signature_hash="sha256:" + "0" * 64,
        chain_id="0" * 16,
        subject_prefix="p",
    )
    decl = Declaration(1, "process.exited", 1, "cellId", 5)
    pending = guest_event(ctx, decl, "2026-01-01T00:00:00.000000Z")
    data = pending.event["data"]
    assert (data["cellId"], data["runId"], data["guestComm"]) == ("cell-9", "r", "cellId")
    assert pending.subject == "p.cell-9.guest.process_exited"
    assert msgspec.json.decode(canonical(pending.event))["subject"] == "cell-9"
