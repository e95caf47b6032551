"""canonical() must equal RFC 8785 as implemented by the independent ``rfc8785`` package,
on both of its paths, and refuse what RFC 8785 cannot express (docs/canonical-json.md)."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgspec
import pytest
import rfc8785
from hypothesis import example, given, settings
from hypothesis import strategies as st

from audit import canonical as canonical_module
from audit.canonical import canonical, canonical_event, ecmascript_number
from audit.errors import CanonicalizationError

SAFE = 2**53 - 1
U64_MAX = 2**64 - 1
I64_MIN = -(2**63)

# Characters where code point order and UTF-16 order part ways (astral vs U+E000..U+FFFF),
# plus the ones escaping rules single out, drawn often so they meet inside one object.
_TRICKY = st.sampled_from(
    [
        *("\ue000", "\uffff", "\ufb33", "\U00010000", "\U0001f600", "\U0010ffff", "\x7f"),
        *("\u2028", "\u2029", "\x00", "\x1f", '"', "\\", "/", "\b", "\f", "\n", "\r", "\t"),
        *("\u20ac", "a"),
    ]
)
text = st.text(st.one_of(st.characters(codec="utf-8"), _TRICKY), max_size=8)
safe_ints = st.integers(-SAFE, SAFE)
finite = st.floats(allow_nan=False, allow_infinity=False)


def json_values(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(text, inner, max_size=5),
        max_leaves=30,
    )


no_floats = st.none() | st.booleans() | safe_ints | text
event_domain = json_values(no_floats | finite)


@settings(max_examples=1500)
@given(event_domain)
@example({"\U0001f600": 1, "\uffff": 2})
@example({"\ue000": [1.0, -0.0, 1e21, 1e-7, 5e-324], "\U00010000": {}})
def test_canonical_equals_rfc8785(value: Any) -> None:
    assert canonical(value) == rfc8785.dumps(value)


@settings(max_examples=1000)
@given(event_domain)
def test_exact_path_alone_equals_rfc8785(value: Any) -> None:
    # canonical() may hide a broken exact path behind the fast one; test it on its own.
    assert canonical_module._exact(value) == rfc8785.dumps(value)


@settings(max_examples=1000)
@given(json_values(no_floats))
def test_fast_path_is_only_taken_when_exact(value: Any) -> None:
    if canonical_module._fast_path_is_exact(value):
        assert msgspec.json.encode(value, order="sorted") == rfc8785.dumps(value)


@given(st.dictionaries(text, event_domain, max_size=4))
def test_canonical_event_equals_canonical(data: dict[str, Any]) -> None:
    event: dict[str, Any] = {"specversion": "1.0", "id": "x", "subject": "cell-7", "data": data}
    assert canonical_event(event) == canonical(event) == rfc8785.dumps(event)


def test_fast_path_covers_event_shaped_values() -> None:
    # The performance design rests on this: guest events never need the slow path.
    assert canonical_module._fast_path_is_exact(_guest_event(str(2**64 - 1)))
    assert canonical_module._fast_path_is_exact(_nft_event())


def test_fast_path_declines_what_msgspec_gets_wrong() -> None:
    decline = [
        {"a": 1.0},
        [[0.5]],
        {"\U0001f600": 1, "\uffff": 2},
        {"a": (1, 2)},
        {"a": b"x"},
        {"a": {1, 2}},
        {"a": [SAFE + 1]},
        2**64,
    ]
    for value in decline:
        assert not canonical_module._fast_path_is_exact(value), value


# ---- integers beyond 2**53 - 1: refused, as RFC 8785 (I-JSON) requires

big_ints = st.integers(max_value=-SAFE - 1) | st.integers(min_value=SAFE + 1)


@given(big_ints | st.integers(I64_MIN, -SAFE - 1) | st.integers(SAFE + 1, U64_MAX))
@example(U64_MAX)
@example(I64_MIN)
@example(SAFE + 1)
@example(-SAFE - 1)
@example(10**5000)
def test_integers_outside_the_safe_range_are_refused_like_rfc8785(n: int) -> None:
    if abs(n) < 10**100:  # rfc8785 cannot even format its error for huge ones
        with pytest.raises(rfc8785.IntegerDomainError):
            rfc8785.dumps(n)
    for value in (n, {"v": [n]}, {"v": [n, 0.5]}):  # the float forces the exact path
        with pytest.raises(CanonicalizationError, match="decimal strings"):
            canonical(value)


def test_the_safe_range_edges_are_accepted() -> None:
    for n in (SAFE, -SAFE):
        assert canonical({"v": n}) == rfc8785.dumps({"v": n})
        assert canonical({"v": [n, 0.5]}) == rfc8785.dumps({"v": [n, 0.5]})


unambiguous_floats = finite.filter(lambda f: not (f.is_integer() and abs(f) > SAFE))


@settings(max_examples=1000)
@given(json_values(no_floats | unambiguous_floats))
@example({"a": [3.932239302520539e16 / 8, -0.0, SAFE]})
def test_canonical_is_a_fixed_point_of_parsing(value: Any) -> None:
    # What a verifier does: parse the payload with exact integers, re-canonicalize, and
    # expect the same bytes. (An integral float beyond 2**53 comes back as an integer
    # JCS cannot express; the protocol has no floats, so no event carries one.)
    once = canonical(value)
    assert canonical(msgspec.json.decode(once)) == once


# ---- RFC 8785 fixed points, independent of the rfc8785 package

# RFC 8785 Appendix B: IEEE 754 bit patterns and their JCS form.
RFC8785_NUMBERS = {
    "0000000000000000": "0",
    "8000000000000000": "0",
    "0000000000000001": "5e-324",
    "8000000000000001": "-5e-324",
    "7fefffffffffffff": "1.7976931348623157e+308",
    "ffefffffffffffff": "-1.7976931348623157e+308",
    "4340000000000000": "9007199254740992",
    "c340000000000000": "-9007199254740992",
    "4430000000000000": "295147905179352830000",
    "44b52d02c7e14af5": "9.999999999999997e+22",
    "44b52d02c7e14af6": "1e+23",
    "44b52d02c7e14af7": "1.0000000000000001e+23",
    "444b1ae4d6e2ef4e": "999999999999999700000",
    "444b1ae4d6e2ef4f": "999999999999999900000",
    "444b1ae4d6e2ef50": "1e+21",
    "3eb0c6f7a0b5ed8c": "9.999999999999997e-7",
    "3eb0c6f7a0b5ed8d": "0.000001",
    "41b3de4355555553": "333333333.3333332",
    "41b3de4355555554": "333333333.33333325",
    "41b3de4355555555": "333333333.3333333",
    "41b3de4355555556": "333333333.3333334",
    "41b3de4355555557": "333333333.33333343",
    "becbf647612f3696": "-0.0000033333333333333333",
    "43143ff3c1cb0959": "1424953923781206.2",
}


@pytest.mark.parametrize(
    ("value", "expected"),
    # Exponent forms with two and three significant digits (Appendix B has one or 17).
    [(1.5e25, "1.5e+25"), (-2.5e-7, "-2.5e-7"), (1.25e-7, "1.25e-7")],
)
def test_exponent_forms_keep_every_digit(value: float, expected: str) -> None:
    assert ecmascript_number(value) == expected


@pytest.mark.parametrize(("bits", "expected"), RFC8785_NUMBERS.items())
def test_rfc8785_appendix_b_numbers(bits: str, expected: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert ecmascript_number(value) == expected
    assert canonical([value]) == f"[{expected}]".encode()


def test_rfc8785_key_order_example() -> None:
    # RFC 8785 3.2.3: sorted by UTF-16 code units; the emoji (a surrogate pair) sorts
    # before U+FB33 although its code point is larger.
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    order = ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert list(msgspec.json.decode(canonical(value))) == order


def test_string_escaping_is_rfc8785() -> None:
    # 3.2.2.2: the two-character escapes where JSON has them, \u00xx (lowercase) for the
    # other controls, everything else (DEL, U+2028/9, '/', non-ASCII) as raw UTF-8.
    cases = {
        "\b\t\n\f\r": b'"\\b\\t\\n\\f\\r"',
        "\x00\x01\x0b\x1f": b'"\\u0000\\u0001\\u000b\\u001f"',
        '"\\': b'"\\"\\\\"',
        "/\x7f": b'"/\x7f"',
        "\u2028\u2029": '"\u2028\u2029"'.encode(),
        "\u20ac\U0001f600": '"\u20ac\U0001f600"'.encode(),
    }
    for text_value, expected in cases.items():
        assert canonical(text_value) == expected
        assert canonical({text_value: text_value}) == b"{" + expected + b":" + expected + b"}"


# ---- refusals


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused(bad: float) -> None:
    for value in (bad, [bad], {"a": {"b": bad}}, {"a": 1, "b": [1, bad]}):
        with pytest.raises(CanonicalizationError) as info:
            canonical(value)
        assert info.value.reason == f"{bad!r} has no JSON representation"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({1: "a"}, "object key 1 is not a string"),
        ({"a": {None: 1}}, "object key None is not a string"),
        ("\ud800", "string contains a lone surrogate"),
        ({"a": ["x\udfff"]}, "string contains a lone surrogate"),
        ({"\ud83d": 1}, "object key contains a lone surrogate"),
        ({"a": b"bytes"}, "bytes is not a JSON value"),
        ({"a": {1, 2}}, "set is not a JSON value"),
        (object(), "object is not a JSON value"),
    ],
)
def test_non_json_values_are_refused(value: Any, reason: str) -> None:
    # The reason is what a verifier reports ("cannot be canonicalized (...)").
    with pytest.raises(CanonicalizationError) as info:
        canonical(value)
    assert info.value.reason == reason


def test_deep_nesting_is_refused_not_crashing() -> None:
    value: Any = 1.5
    for _ in range(100_000):
        value = [value]
    with pytest.raises(CanonicalizationError) as info:
        canonical(value)
    assert info.value.reason == "value is nested too deeply"


# ---- real-shaped events

STAMP = {
    "cellId": "cell-7",
    "runId": "run-2024-05-01",
    "specSignatureHash": "sha256:" + "ab" * 32,
    "hostReceivedAt": "2024-05-01T12:00:00.123456Z",
}


def _envelope(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "0190f5e2-7c1a-7d2e-8a4b-5f6e7d8c9b0a",
        "source": "urn:cellos:host:hv-01",
        "subject": "cell-7",
        "type": f"dev.cellos.events.cell.observability.{kind}",
        "time": "2024-05-01T12:00:00.123456Z",
        "datacontenttype": "application/json",
        "sequence": "00000000000000000042",
        "prevhash": "sha256:" + "cd" * 32,
        "data": {**STAMP, **data},
        "signkid": "ed25519:0123456789abcdef",
        "signature": "A" * 86,
    }


def _guest_event(monotonic_ns: str) -> dict[str, Any]:
    return _envelope(
        "guest.v1.process_spawned",
        {
            "probeSource": "process.spawned",
            "contentVersion": 1,
            "guestPid": 4242,
            "guestComm": "python3\u00e9\u20ac",
            "guestMonotonicNs": monotonic_ns,
        },
    )


def _nft_event() -> dict[str, Any]:
    row = {"family": "inet", "table": "cell_7", "chain": "egress", "handle": 12}
    return _envelope(
        "host.v1.nftables",
        {
            "probeSource": "host.nftables",
            "inputs": {"family": "inet", "table": "cell_7", "netns": None, "command": "nft"},
            "output": {
                "rows": [{**row, "packets": "3", "bytes": "180", "ruleRepr": 'ip daddr "x"'}]
            },
        },
    )


def _cgroup_event() -> dict[str, Any]:
    return _envelope(
        "host.v1.cgroup",
        {
            "probeSource": "host.cgroup",
            "inputs": {"path": "/sys/fs/cgroup/cellos/cell-7"},
            "output": {
                "memory.events": {"low": 0, "high": 0, "max": 2, "oom": 0, "oom_kill": 0},
                "cpu.pressure": {"some": {"avg10": 0.15, "avg60": 1.0, "total": 123456}},
                "io.weight": {"default": 100.0},
            },
        },
    )


def test_real_shaped_events_match_rfc8785() -> None:
    for event in (_guest_event("123456789"), _nft_event(), _cgroup_event()):
        assert canonical(event) == rfc8785.dumps(event)
    assert b'"avg60":1,' in canonical(_cgroup_event())  # 1.0 is written as JCS wants


def test_u64_guest_counter_as_a_string_is_plain_rfc8785() -> None:
    event = _guest_event(str(2**64 - 1))
    assert canonical(event) == canonical_event(event) == rfc8785.dumps(event)
    assert b'"guestMonotonicNs":"18446744073709551615"' in canonical(event)
