"""RFC 8785 (JCS) canonical JSON: the bytes that are hashed into the chain and signed.

Two paths produce the same bytes. msgspec's C encoder with sorted keys already emits JCS
for most values, and it runs once or twice per event, so it is the hot path. It is exact
only under two conditions, which one cheap walk checks before trusting it:

- no ``float`` anywhere: msgspec writes ``1.0`` / ``-0.0`` where JCS wants ``1`` / ``0``,
  and it writes NaN and infinities as ``null`` where JCS has no representation at all;
- no object key holding a character at or above U+E000: msgspec sorts keys by code point,
  JCS by UTF-16 code unit, and the two orders disagree only when a surrogate pair (an
  astral character) meets a code unit in U+E000..U+FFFF.

Everything else sends the value down :func:`_exact`, a small recursive encoder that
follows RFC 8785 literally (ECMAScript number formatting, UTF-16 key order) and reports
values JCS cannot express as :class:`~producer.errors.CanonicalizationError`. String
escaping is msgspec's on both paths; it matches RFC 8785 3.2.2.2 byte for byte (the
tests hold it to the ``rfc8785`` reference package).

Integers: JCS models every number as an IEEE 754 double, so only integers within
±(2**53 - 1) (I-JSON, RFC 7493) have one canonical form. The protocol keeps every number
in that range and writes 64-bit counters as decimal strings (``docs/protocol.md``), so
this module is plain RFC 8785 with no extension: an integer outside the range is refused
with :class:`~audit.errors.CanonicalizationError`, as the ``rfc8785`` reference package
refuses it, and the tests hold the two byte-equal.
"""

from __future__ import annotations

import math
from typing import Any, Final

import msgspec

from audit.errors import CanonicalizationError

_ENCODER: Final = msgspec.json.Encoder(order="sorted")
_encode: Final = _ENCODER.encode
_encode_str: Final = msgspec.json.encode
_FIRST_DIVERGENT_KEY_CHAR: Final = "\ue000"
MAX_SAFE_INTEGER: Final = 2**53 - 1
"""The largest integer RFC 8785 (through I-JSON) can canonicalize; its negation the least."""


def canonical(obj: Any) -> bytes:
    """Return the RFC 8785 bytes of ``obj`` (dict with str keys, list, tuple, str, int,
    float, bool, None).

    Raises :class:`CanonicalizationError` for anything JCS cannot express: NaN, infinities,
    integers outside ±(2**53 - 1), non-string keys, lone surrogates, other types.
    """
    try:
        if _fast_path_is_exact(obj):
            return _encode(obj)
    except (TypeError, ValueError, RecursionError):
        # Non-str keys (TypeError from str.join), lone surrogates (UnicodeEncodeError is a
        # ValueError) or deep nesting: the exact path names the problem precisely.
        pass
    return _exact(obj)


def canonical_event(event: dict[str, Any]) -> bytes:
    """:func:`canonical` for an event envelope the caller has already vetted: every
    top-level key ASCII and every top-level value other than ``data`` a ``str``.

    Skipping the walk over those attributes saves a measurable share of an unsigned seal;
    only :class:`producer.chain.ChainSealer`, which enforces that precondition, uses it.
    """
    try:
        if _fast_path_is_exact(event["data"]):
            return _encode(event)
    except (TypeError, ValueError, RecursionError):
        pass
    return _exact(event)


def _fast_path_is_exact(obj: Any) -> bool:
    """Whether msgspec's sorted encoding of ``obj`` is byte-for-byte its JCS form.

    Written for speed on event-shaped values: exact-type tests (subclasses take the exact
    path, which handles them), one ``str.join`` per dict to vet every key at C speed.
    A False answer only costs time (the exact path then decides), so the tests are
    conservative: an integer outside the safe range also goes the exact way, to be refused.
    """
    t = type(obj)
    if t is dict:
        keys = "".join(obj)
        if not keys.isascii() and max(keys) >= _FIRST_DIVERGENT_KEY_CHAR:
            return False
        values = obj.values()
    elif t is list:
        values = obj
    elif t is int:
        return bool(-MAX_SAFE_INTEGER <= obj <= MAX_SAFE_INTEGER)
    else:
        return t is str or t is bool or obj is None
    for v in values:
        tv = type(v)
        if tv is str or tv is bool or v is None:
            continue
        if tv is int:
            if -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
                continue
            return False
        if (tv is dict or tv is list) and _fast_path_is_exact(v):
            continue
        return False
    return True


def _exact(obj: Any) -> bytes:
    parts: list[bytes] = []
    try:
        _emit(obj, parts)
    except RecursionError:
        raise CanonicalizationError("value is nested too deeply") from None
    return b"".join(parts)


def _emit(obj: Any, out: list[bytes]) -> None:
    # bool before int: bool is an int subclass.
    if obj is None:
        out.append(b"null")
    elif obj is True:
        out.append(b"true")
    elif obj is False:
        out.append(b"false")
    elif isinstance(obj, str):
        out.append(_string(str.__str__(obj)))
    elif isinstance(obj, int):
        if not -MAX_SAFE_INTEGER <= obj <= MAX_SAFE_INTEGER:
            raise CanonicalizationError(
                "integer outside ±(2**53 - 1) has no RFC 8785 form; "
                "64-bit quantities are decimal strings"
            )
        out.append(int.__repr__(obj).encode("ascii"))
    elif isinstance(obj, float):
        out.append(ecmascript_number(obj).encode("ascii"))
    elif isinstance(obj, dict):
        _emit_object(obj, out)
    elif isinstance(obj, list | tuple):
        out.append(b"[")
        for i, item in enumerate(obj):
            if i:
                out.append(b",")
            _emit(item, out)
        out.append(b"]")
    else:
        raise CanonicalizationError(f"{type(obj).__name__} is not a JSON value")


def _emit_object(obj: dict[Any, Any], out: list[bytes]) -> None:
    for key in obj:
        if not isinstance(key, str):
            raise CanonicalizationError(f"object key {key!r} is not a string")
    try:
        # RFC 8785 3.2.3: order by the keys' UTF-16 code units, which big-endian UTF-16
        # bytes compare exactly like.
        items = sorted(obj.items(), key=lambda kv: kv[0].encode("utf-16-be"))
    except UnicodeEncodeError:
        raise CanonicalizationError("object key contains a lone surrogate") from None
    out.append(b"{")
    for i, (key, value) in enumerate(items):
        if i:
            out.append(b",")
        out.append(_string(str.__str__(key)))
        out.append(b":")
        _emit(value, out)
    out.append(b"}")


def _string(s: str) -> bytes:
    try:
        return _encode_str(s)
    except UnicodeEncodeError:
        raise CanonicalizationError("string contains a lone surrogate") from None


def ecmascript_number(value: float) -> str:
    """Format a finite double as ECMA-262 Number::toString does (RFC 8785 3.2.2.3).

    Python's ``repr`` yields the same shortest round-tripping digits ECMAScript asks for;
    only the placement of the decimal point and the exponent differ, and that placement is
    what this function applies (ECMA-262 6.1.6.1.20, steps 5-12).
    """
    if not math.isfinite(value):
        raise CanonicalizationError(f"{value!r} has no JSON representation")
    if value == 0:
        return "0"  # also for -0.0, as ECMAScript prints it
    sign = "-" if value < 0 else ""
    mantissa, _, exp = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    raw = whole + fraction
    # value == 0.<digits> * 10**n, with digits free of leading and trailing zeros
    digits = raw.lstrip("0")
    n = len(whole) + (int(exp) if exp else 0) - (len(raw) - len(digits))
    digits = digits.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * -n + digits
    e = n - 1
    head = digits[0] + ("." + digits[1:] if k > 1 else "")
    return f"{sign}{head}e{'+' if e > 0 else '-'}{abs(e)}"
