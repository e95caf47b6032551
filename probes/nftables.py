"""nftables counters of a cell's table: ``nft -j list table <family> <table>`` (SPEC 8).

The reading is the JSON that ``nft -j list table`` prints, taken in-process through
libnftables inside the cell's network namespace (``probes.libnftables`` says why not a
subprocess). :func:`parse_table` turns it into the output SPEC 4 fixes, one row per rule
in the shape of CellOS's ``NftCounterRow``::

    {"rows": [{"family": "inet", "table": "cell_1", "chain": "egress", "handle": "4",
               "packets": "12", "bytes": "1284",
               "ruleRepr": "ip daddr 1.2.3.4 tcp dport 443 counter accept"}],
     "counters": [{"family": "inet", "table": "cell_1", "name": "dns", "handle": "3",
                   "packets": "2", "bytes": "120"}]}

Decisions (docs/probes.md):

- Every rule yields a row, counter or not: an audit trail that dropped counter-less rules
  could not show that an ``accept`` without a counter was added. Such a row has
  ``packets`` and ``bytes`` null. A rule that refers to a named counter
  (``counter name "x"``) has no counter of its own either: its row is null too, and the
  named counter's values are in ``counters``, once, however many rules share it. A rule
  with several anonymous counters reports the first.
- ``handle`` is a string like the counters: the kernel's handles are 64-bit.
- ``ruleRepr`` is synthesized from the rule's JSON expressions in nft's syntax
  (without counter values, so it is stable across readings); an expression this
  renderer does not know is written as its canonical JSON rather than dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec

from probes.base import BlockingReader, Parse, ProbeContext, ProbeName, ProbeReading
from probes.libnftables import Libnftables, Session, shared

__all__ = ["NftablesProbe", "parse_table", "rule_repr"]

_PROBE: Final = "nftables"
_VERDICTS: Final = frozenset({"accept", "drop", "continue", "return", "notrack"})
_IMPLICIT_OPS: Final = frozenset({"==", "in"})
_BARE_META: Final = frozenset({"iif", "oif", "iifname", "oifname", "iiftype", "oiftype"})
_BINOPS: Final = frozenset({"|", "&", "^", "<<", ">>"})
_JSON: Final = msgspec.json.Encoder(order="sorted")
_U64_HALF: Final = 1 << 63


class _MalformedError(Exception):
    """Raised inside the pure parser; :func:`parse_table` turns it into :class:`Parse`."""


def parse_table(doc: bytes) -> dict[str, Any]:
    """The probe's ``output`` from what ``nft -j list table`` printed.

    Raises :class:`Parse` when ``doc`` is not nft's JSON (schema version 1).
    """
    try:
        top = msgspec.json.decode(doc)
        if not isinstance(top, dict) or not isinstance(top.get("nftables"), list):
            raise _MalformedError('expected {"nftables": [...]}')
        rows: list[dict[str, Any]] = []
        counters: list[dict[str, Any]] = []
        for item in top["nftables"]:
            if not isinstance(item, dict) or len(item) != 1:
                raise _MalformedError(f"expected a one-key object, got {_brief(item)}")
            ((kind, body),) = item.items()
            if kind == "rule":
                rows.append(_row(_object(body)))
            elif kind == "counter":
                counters.append(_named_counter(_object(body)))
    except (msgspec.DecodeError, _MalformedError) as exc:
        raise Parse(_PROBE, f"not nft JSON: {exc}") from exc
    return {"rows": rows, "counters": counters}


def _row(rule: dict[str, Any]) -> dict[str, Any]:
    exprs = rule.get("expr")
    if not isinstance(exprs, list):
        raise _MalformedError(f"rule without an expr list: {_brief(rule)}")
    packets = octets = None
    for stmt in exprs:
        if isinstance(stmt, dict) and isinstance(stmt.get("counter"), dict):
            packets, octets = _count(stmt["counter"], "packets"), _count(stmt["counter"], "bytes")
            break
    return {
        "family": _text(rule, "family"),
        "table": _text(rule, "table"),
        "chain": _text(rule, "chain"),
        "handle": _count(rule, "handle"),
        "packets": packets,
        "bytes": octets,
        "ruleRepr": rule_repr(exprs, rule.get("comment")),
    }


def _named_counter(counter: dict[str, Any]) -> dict[str, Any]:
    return {
        "family": _text(counter, "family"),
        "table": _text(counter, "table"),
        "name": _text(counter, "name"),
        "handle": _count(counter, "handle"),
        "packets": _count(counter, "packets"),
        "bytes": _count(counter, "bytes"),
    }


def _object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _MalformedError(f"expected an object, got {_brief(body)}")
    return body


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _MalformedError(f"{key!r} is not a string in {_brief(obj)}")
    return value


def _count(obj: dict[str, Any], key: str) -> str:
    """A kernel u64 as a decimal string.

    nft's JSON library prints integers as signed 64-bit, so a counter at or past 2^63
    arrives negative (2^64 - 1 as -1): it is mapped back to the unsigned value.
    """
    value = obj.get(key)
    # bool is an int in Python; JSON true is not a counter.
    if type(value) is not int or not -_U64_HALF <= value < 2 * _U64_HALF:
        raise _MalformedError(f"{key!r} is not a 64-bit integer in {_brief(obj)}")
    return str(value + 2 * _U64_HALF if value < 0 else value)


def _brief(value: object) -> str:
    text = _JSON.encode(value).decode() if _encodable(value) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _encodable(value: object) -> bool:
    try:
        _JSON.encode(value)
    except (TypeError, msgspec.EncodeError):
        return False
    return True


# --------------------------------------------------------------------------- ruleRepr


def rule_repr(exprs: list[Any], comment: object = None) -> str:
    """A rule's statements in nft syntax, counters without their values."""
    parts = [_statement(stmt) for stmt in exprs]
    if isinstance(comment, str):
        parts.append(f"comment {_quoted(comment)}")
    return " ".join(parts)


def _statement(stmt: object) -> str:
    key, body = _single(stmt)
    if key is None:
        return _canonical(stmt)
    if key in _VERDICTS and body is None:
        return key
    render = _STATEMENTS.get(key)
    text = render(body) if render is not None else None
    return text if text is not None else _canonical(stmt)


def _match(body: Any) -> str | None:
    if not isinstance(body, dict) or "left" not in body or "right" not in body:
        return None
    op = body.get("op", "==")
    middle = "" if op in _IMPLICIT_OPS else f" {op}"
    return f"{_expr(body['left'])}{middle} {_expr(body['right'])}"


def _counter(body: Any) -> str | None:
    if isinstance(body, str):
        return f"counter name {_quoted(body)}"
    return "counter" if isinstance(body, dict) else None


def _jump(verb: str) -> Callable[[Any], str | None]:
    def render(body: Any) -> str | None:
        if isinstance(body, dict) and isinstance(body.get("target"), str):
            return f"{verb} {body['target']}"
        return None

    return render


def _vmap(body: Any) -> str | None:
    if isinstance(body, dict) and "key" in body and "data" in body:
        return f"{_expr(body['key'])} vmap {_expr(body['data'])}"
    return None


def _log(body: Any) -> str | None:
    if body is None:
        return "log"
    if not isinstance(body, dict):
        return None
    words = ["log"]
    for key in ("prefix", "level", "group"):
        if key in body:
            value = body[key]
            words.append(f"{key} {_quoted(value) if key == 'prefix' else _expr(value)}")
    return " ".join(words)


def _limit(body: Any) -> str | None:
    if not isinstance(body, dict) or "rate" not in body:
        return None
    over = "over " if body.get("inv") else ""
    unit = body.get("rate_unit", "packets")
    shown_unit = "" if unit == "packets" else f" {unit}"
    default_burst = 5 if unit == "packets" else 0  # what nft omits when listing
    burst = body.get("burst", default_burst)
    shown_burst = "" if burst == default_burst else f" burst {burst}"
    per = body.get("per", "second")
    return f"limit rate {over}{body['rate']}{shown_unit}/{per}{shown_burst}"


def _nat(verb: str) -> Callable[[Any], str | None]:
    def render(body: Any) -> str | None:
        if body is None:
            return verb
        if not isinstance(body, dict):
            return None
        target = _expr(body["addr"]) if "addr" in body else ""
        if "port" in body:
            target += f":{_expr(body['port'])}"
        return f"{verb} to {target}" if target else verb

    return render


def _reject(body: Any) -> str | None:
    if body is None:
        return "reject"
    if isinstance(body, dict) and "type" in body:
        detail = f" {_expr(body['expr'])}" if "expr" in body else ""
        return f"reject with {body['type']}{detail}"
    return None


def _mangle(body: Any) -> str | None:
    if isinstance(body, dict) and "key" in body and "value" in body:
        return f"{_expr(body['key'])} set {_expr(body['value'])}"
    return None


def _set_update(body: Any) -> str | None:
    if isinstance(body, dict) and {"op", "elem", "set"} <= body.keys():
        return f"{body['op']} {_expr(body['set'])} {{ {_expr(body['elem'])} }}"
    return None


_STATEMENTS: Final[dict[str, Callable[[Any], str | None]]] = {
    "match": _match,
    "counter": _counter,
    "jump": _jump("jump"),
    "goto": _jump("goto"),
    "vmap": _vmap,
    "log": _log,
    "limit": _limit,
    "snat": _nat("snat"),
    "dnat": _nat("dnat"),
    "masquerade": _nat("masquerade"),
    "redirect": _nat("redirect"),
    "reject": _reject,
    "mangle": _mangle,
    "set": _set_update,
}


def _expr(expr: object) -> str:
    if isinstance(expr, bool):
        return "true" if expr else "false"
    if isinstance(expr, int | str):
        return str(expr)
    if isinstance(expr, list):  # flag lists: ct state established,related
        return ",".join(_expr(item) for item in expr)
    key, body = _single(expr)
    render = _EXPRESSIONS.get(key) if key is not None else None
    text = render(body) if render is not None else None
    return text if text is not None else _canonical(expr)


def _anonymous_set(body: Any) -> str:
    items = body if isinstance(body, list) else [body]
    return "{ " + ", ".join(_expr(item) for item in items) + " }"


def _prefix(body: Any) -> str | None:
    if isinstance(body, dict) and "addr" in body and "len" in body:
        return f"{_expr(body['addr'])}/{body['len']}"
    return None


def _range(body: Any) -> str | None:
    if isinstance(body, list) and len(body) == 2:
        return f"{_expr(body[0])}-{_expr(body[1])}"
    return None


def _payload(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    if "protocol" in body and "field" in body:
        return f"{body['protocol']} {body['field']}"
    if {"base", "offset", "len"} <= body.keys():
        return f"@{body['base']},{body['offset']},{body['len']}"
    return None


def _meta(body: Any) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("key"), str):
        return None
    key: str = body["key"]
    return key if key in _BARE_META else f"meta {key}"


def _ct(body: Any) -> str | None:
    if not isinstance(body, dict) or "key" not in body:
        return None
    words = ["ct"]
    for key in ("dir", "family"):
        if key in body:
            words.append(str(body[key]))
    words.append(str(body["key"]))
    return " ".join(words)


def _concat(body: Any) -> str | None:
    return " . ".join(_expr(item) for item in body) if isinstance(body, list) else None


def _map(body: Any) -> str | None:
    if isinstance(body, dict) and "key" in body and "data" in body:
        return f"{_expr(body['key'])} map {_expr(body['data'])}"
    return None


def _elem(body: Any) -> str | None:
    return _expr(body["val"]) if isinstance(body, dict) and "val" in body else None


def _binop(op: str) -> Callable[[Any], str | None]:
    def render(body: Any) -> str | None:
        if isinstance(body, list) and len(body) == 2:
            return f"{_expr(body[0])} {op} {_expr(body[1])}"
        return None

    return render


_EXPRESSIONS: Final[dict[str, Callable[[Any], str | None]]] = {
    "set": _anonymous_set,
    "prefix": _prefix,
    "range": _range,
    "payload": _payload,
    "meta": _meta,
    "ct": _ct,
    "concat": _concat,
    "map": _map,
    "elem": _elem,
    **{op: _binop(op) for op in _BINOPS},
}


def _single(obj: object) -> tuple[str | None, Any]:
    if isinstance(obj, dict) and len(obj) == 1:
        ((key, body),) = obj.items()
        return str(key), body
    return None, None


def _canonical(obj: object) -> str:
    return _JSON.encode(obj).decode()


def _quoted(text: object) -> str:
    # JSON string quoting escapes quotes and control characters, as nft's output does.
    return _JSON.encode(str(text)).decode()


# --------------------------------------------------------------------------- probe


class NftablesProbe:
    """Reads one cell's table, in the cell's network namespace when one is given."""

    name: ProbeName = "nftables"

    def __init__(
        self,
        family: str,
        table: str,
        netns: str | None = None,
        *,
        lib: Callable[[], Libnftables] = shared,
    ) -> None:
        self.family = family
        self.table = table
        self.netns = netns
        self._lib = lib
        self._session: Session | None = None
        self._reader: BlockingReader | None = None
        self._command = f"list table {family} {table}"

    async def read(self, ctx: ProbeContext) -> ProbeReading:
        if self._session is None or self._reader is None:
            lib = self._lib()  # PlatformUnsupported when the library is missing
            self._session = lib.session(self.netns)
            self._reader = BlockingReader(_PROBE, lib.worker)
        session = self._session
        doc = await self._reader.run(lambda: session.run(self._command))
        inputs = {
            "family": self.family,
            "table": self.table,
            "netns": self.netns,
            "command": f"nft -j {self._command}",
        }
        return ProbeReading(self.name, inputs, parse_table(doc))

    def close(self) -> None:
        if self._session is not None:
            self._session.free()
            self._session = None
            self._reader = None
