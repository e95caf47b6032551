"""``cellos-audit``: follow, replay, export and verify cells' histories.

For auditors who do not run the daemon; ``cellos-producer verify`` is the same ``verify``.
Exit codes: 0 success (for ``verify``: every chain intact); 1 a chain that is not intact,
or a broker or source error; 2 bad usage or an unusable trust file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import fnmatch
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, TextIO

import msgspec

from audit.connect import NatsAuth, auth_problem
from audit.consumer import (
    Scope,
    Verification,
    collect_reports,
    export,
    follow,
    replay,
    verify_file,
    verify_stream,
)
from audit.errors import AuditError, ConnectOptionsError, SourceError, TrustFileError
from audit.events import Received
from audit.keys import load_trust
from audit.options import SECURITY_FLAGS, add_connection, add_verify_arguments
from audit.source import Broker, ConnectOptions, Start
from audit.verify import ChainReport, Verdict
from schemas.events import TYPE_PREFIX

__all__ = ["add_verify_arguments", "collect_reports", "main", "print_reports", "run_verify"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
SHOWN = 5
"""Problems printed per chain; the rest are counted by reason."""
_CLOSED: frozenset[Verdict] = frozenset({Verdict.INTACT_SEALED, Verdict.SUPERSEDED})


# --------------------------------------------------------------------------- arguments


def _time(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cellos-audit",
        description=(
            "Follow, replay, export and verify CellOS cells' signed, hash-chained event "
            "histories in NATS JetStream."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tail = sub.add_parser(
        "tail",
        help="follow one cell live",
        description="Print a cell's events as they are stored, until interrupted.",
    )
    add_connection(tail)
    tail.add_argument("--cell", required=True, metavar="ID")
    tail.add_argument("--type", metavar="GLOB", help="only types matching (e.g. '*guest*')")
    tail.add_argument("--json", action="store_true", help="one event per line, as published")

    rp = sub.add_parser(
        "replay",
        help="replay a cell's history",
        description="Print a cell's stored events from the start, a time or a stream sequence.",
    )
    add_connection(rp)
    rp.add_argument("--cell", required=True, metavar="ID")
    _add_range(rp)
    rp.add_argument(
        "--format",
        choices=["pretty", "jsonl"],
        default="pretty",
        help="jsonl: the exact published events, one per line",
    )

    ex = sub.add_parser(
        "export",
        help="write events and chain heads to one file",
        description="Write a cell's events (as published) and its recorded "
        "chain heads to one JSON-lines file that `verify --jsonl` checks "
        "offline.",
    )
    add_connection(ex)
    ex.add_argument("--cell", metavar="ID", help="one cell (default: the whole stream)")
    _add_range(ex)
    ex.add_argument("--out", required=True, metavar="FILE")

    v = sub.add_parser(
        "verify",
        help="verify chains (exit 1 unless all intact)",
        description="Read chains from JetStream (or an export) and verify "
        "sequence, links, signatures, seals and recorded heads; one verdict "
        "per chain. Exit 0 only when every chain is intact.",
    )
    add_verify_arguments(v)

    cells = sub.add_parser(
        "cells",
        help="list cells and chains",
        description="List the "
        "cells and chains in the stream with event counts, times and "
        "state, from subject counts and recorded heads.",
    )
    add_connection(cells)
    cells.add_argument("--cell", metavar="ID", help="only this cell")
    cells.add_argument("--json", action="store_true")
    return p


def _add_range(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=_time, metavar="TIME", help="from this stored time")
    p.add_argument("--until", type=_time, metavar="TIME", help="up to this stored time")
    p.add_argument("--from-seq", type=int, metavar="N", help="from this stream sequence")


def _connect_options(args: argparse.Namespace) -> ConnectOptions:
    auth = NatsAuth(
        **{field: getattr(args, f"nats_{field}") for field, *_ in SECURITY_FLAGS.values()}
    )
    problem = auth_problem(auth)
    if problem is not None:
        raise ConnectOptionsError(problem[0], None, problem[1])
    return ConnectOptions(url=args.nats_url, auth=auth)


def _scope(args: argparse.Namespace) -> Scope:
    return Scope(
        stream=args.stream,
        prefix=args.subject_prefix,
        cell=getattr(args, "cell", None),
        heads_bucket=args.heads_bucket,
    )


# --------------------------------------------------------------------------- commands


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run(COMMANDS[args.command], args, prog="cellos-audit")


def run(
    command: Callable[[argparse.Namespace], Any], args: argparse.Namespace, *, prog: str
) -> int:
    """Run one command, turning audit errors into a message and an exit code."""
    try:
        code: int = asyncio.run(command(args))
    except (TrustFileError, ConnectOptionsError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AuditError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_OK  # the reader (head, less) went away
    return code


async def _tail(args: argparse.Namespace) -> int:
    async with await Broker.connect(_connect_options(args)) as broker:
        async for message in follow(broker, _scope(args)):
            _print_event(message, args.json, args.type)
    return EXIT_OK


async def _replay(args: argparse.Namespace) -> int:
    async with await Broker.connect(_connect_options(args)) as broker:
        async for message in replay(
            broker, _scope(args), since=args.since, until=args.until, from_seq=args.from_seq
        ):
            _print_event(message, args.format == "jsonl", None)
    return EXIT_OK


async def _export(args: argparse.Namespace) -> int:
    async with await Broker.connect(_connect_options(args)) as broker:
        progress = _Progress(sys.stderr, verb="exported")
        with _open(args.out, write=True) as out:
            count = await export(
                broker,
                _scope(args),
                out,
                since=args.since,
                until=args.until,
                from_seq=args.from_seq,
                progress=progress,
            )
    progress.done()
    print(f"wrote {count} event(s) to {args.out}", file=sys.stderr)
    return EXIT_OK


async def _verify(args: argparse.Namespace) -> int:
    if (args.jsonl is None) == (args.nats_url is None):
        print("verify: give either --nats-url or --jsonl", file=sys.stderr)
        return EXIT_USAGE
    trust = load_trust(args.trust)
    progress = _Progress(sys.stderr)
    if args.jsonl is not None:
        with _open(args.jsonl, write=False) as lines:
            result = await verify_file(
                args.jsonl,
                lines,
                trust,
                workers=args.workers,
                every_signature=args.every_signature,
                progress=progress,
            )
    else:
        async with await Broker.connect(_connect_options(args)) as broker:
            result = await verify_stream(
                broker,
                _scope(args),
                trust,
                workers=args.workers,
                every_signature=args.every_signature,
                progress=progress,
            )
    progress.done()
    return report_verification(result, args.json, args.require_sealed, sys.stdout)


def _open(path: str, *, write: bool) -> BinaryIO:
    """Open an export for reading or writing; a failure is a source error, not a traceback.
    (Reading and writing it blocks the loop, which is fine: nothing else runs meanwhile.)"""
    try:
        return open(path, "wb") if write else open(path, "rb")
    except OSError as exc:
        raise SourceError(f"cannot open {path}: {exc.strerror}") from exc


def report_verification(
    result: Verification, as_json: bool, require_sealed: bool, out: TextIO
) -> int:
    reports = result.reports
    print_reports(reports, out, as_json=as_json, require_sealed=require_sealed)
    if result.stream is not None and result.stream.limits:
        print(
            f"stream {result.stream.name} has retention limits "
            f"({', '.join(result.stream.limits)}); first retained stream seq "
            f"{result.stream.first_seq}",
            file=sys.stderr,
        )
    if not reports:
        print("no chains found", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if all(_passes(r, require_sealed) for r in reports) else EXIT_FAILED


async def run_verify(args: argparse.Namespace) -> int:
    """``verify`` for another program's parser (``cellos-producer verify``)."""
    return await _verify(args)


class ChainRow(msgspec.Struct, kw_only=True):
    chain_id: str
    run_id: str
    head_sequence: int
    state: str


class CellRow(msgspec.Struct, kw_only=True):
    cell: str
    events: int
    first: str | None
    last: str | None
    chains: list[ChainRow]


async def _cells(args: argparse.Namespace) -> int:
    scope = _scope(args)
    async with await Broker.connect(_connect_options(args)) as broker:
        state = await broker.stream_state(scope.stream, scope.subjects)
        heads = await broker.heads(scope.heads_bucket, scope.cell)
        counts: dict[str, int] = {}
        for subject, n in state.subjects.items():
            cell = subject[len(scope.prefix) + 1 :].split(".", 1)[0]
            counts[cell] = counts.get(cell, 0) + n
        rows = []
        for cell in sorted(counts.keys() | {h.cell_id for h in heads.values()}):
            one = dataclasses.replace(scope, cell=cell)
            first = await _one(broker, one, Start())
            if state.allow_direct:
                last = await broker.last_message(scope.stream, one.subjects)
            else:
                last = await _one(broker, one, Start(last=True))
            chains = [
                ChainRow(
                    chain_id=h.chain_id,
                    run_id=h.run_id,
                    head_sequence=h.sequence,
                    state="sealed" if h.sealed else "open",
                )
                for h in sorted(heads.values(), key=lambda h: h.key)
                if h.cell_id == cell
            ]
            rows.append(
                CellRow(
                    cell=cell,
                    events=counts.get(cell, 0),
                    first=_event_time(first),
                    last=_event_time(last),
                    chains=chains,
                )
            )
    if args.json:
        sys.stdout.write(msgspec.json.encode(rows).decode() + "\n")
        return EXIT_OK
    for row in rows:
        print(f"{row.cell}  events={row.events}  first={row.first or '?'}  last={row.last or '?'}")
        for c in row.chains:
            print(f"    chain {c.chain_id} run={c.run_id} head=seq {c.head_sequence} {c.state}")
    total = sum(r.events for r in rows)
    print(f"{len(rows)} cell(s), {total} event(s) in stream {scope.stream}")
    return EXIT_OK


async def _one(broker: Broker, scope: Scope, start: Start) -> Received | None:
    """The first message a read from ``start`` sees."""
    async with contextlib.aclosing(broker.messages(scope.stream, scope.subjects, start)) as read:
        async for message in read:
            return message
    return None


def _event_time(message: Received | None) -> str | None:
    if message is None:
        return None
    try:
        value = message.as_dict().get("time")
    except AuditError:
        return message.stored_at
    return value if isinstance(value, str) else message.stored_at


COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "tail": _tail,
    "replay": _replay,
    "export": _export,
    "verify": _verify,
    "cells": _cells,
}


# --------------------------------------------------------------------------- output


def _print_event(message: Received, as_json: bool, type_glob: str | None) -> None:
    try:
        event = message.as_dict()
    except AuditError as exc:
        print(f"# stream seq {message.stream_seq}: {exc}", file=sys.stderr)
        return
    kind = str(event.get("type", ""))
    short = kind.removeprefix(TYPE_PREFIX + ".")
    if type_glob is not None and not (
        fnmatch.fnmatchcase(kind, type_glob) or fnmatch.fnmatchcase(short, type_glob)
    ):
        return
    if as_json:
        sys.stdout.buffer.write(message.raw + b"\n")
        sys.stdout.flush()
        return
    found = event.get("data")
    data: dict[str, Any] = found if isinstance(found, dict) else {}
    seq = str(event.get("sequence", "?")).lstrip("0") or "0"
    signed = "signed" if "signature" in event else "unsigned"
    print(
        f"{event.get('time', '?')}  {event.get('subject', '?')}  #{seq:<6} {short:<28} "
        f"{_summary(short, data)}  [{signed}]",
        flush=True,
    )


def _summary(short: str, data: dict[str, Any]) -> str:
    """The few ``data`` fields a reader of that kind of event wants first."""
    fields = {
        "chain.v1.opened": ("chainId", "signkid", "supersedes"),
        "chain.v1.checkpoint": ("headSequence",),
        "chain.v1.gap": ("reason", "lostCount"),
        "chain.v1.resumed": ("previousStopAt", "clean", "signkid"),
        "chain.v1.sealed": ("reason",),
        "guest.v1.agent_silenced": ("silentForMs", "lastFrameAt"),
    }.get(short, ("guestPid", "guestComm", "probeSource"))
    return " ".join(f"{k}={data[k]}" for k in fields if k in data)


def print_reports(
    reports: list[ChainReport], out: TextIO, *, as_json: bool = False, require_sealed: bool = False
) -> None:
    """One verdict line per chain, the facts worth knowing under it, then a summary."""
    if as_json:
        out.write(msgspec.json.encode(reports).decode() + "\n")
        return
    for r in reports:
        passes = _passes(r, require_sealed)
        out.write(
            f"{'OK  ' if passes else 'FAIL'} cell={r.cell_id} run={r.run_id} chain={r.chain_id} "
            f"events={r.events} seq={r.first_sequence}..{r.last_sequence} signed={r.signed} "
            f"{_verdict(r, require_sealed)}\n"
        )
        for line in _facts(r):
            out.write(f"     · {line}\n")
        for problem in r.problems[:SHOWN]:
            out.write(f"     - {problem}\n")
        rest = r.problems_total - min(SHOWN, len(r.problems))
        if rest > 0:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(r.problem_counts.items()))
            out.write(f"     ... and {rest} more (all problems by reason: {counts})\n")
    bad = sum(not _passes(r, require_sealed) for r in reports)
    verdicts: dict[str, int] = {}
    for r in reports:
        verdicts[r.verdict] = verdicts.get(r.verdict, 0) + 1
    listed = ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))
    out.write(
        f"{len(reports)} chain(s), {len(reports) - bad} verified, {bad} failed"
        f"{f' ({listed})' if listed else ''}\n"
    )


def _passes(r: ChainReport, require_sealed: bool) -> bool:
    return r.intact and (not require_sealed or r.verdict in _CLOSED)


def _verdict(r: ChainReport, require_sealed: bool) -> str:
    first = r.first_problem
    if r.verdict == Verdict.TAMPERED and first is not None:
        where = f"at seq {first.sequence}" if first.sequence is not None else "(unattributed)"
        return f"TAMPERED {where}: {first.reason}"
    if r.verdict == Verdict.TRUNCATED:
        return (
            f"TRUNCATED: stream ends at seq {r.last_sequence or 0}, "
            f"recorded head is seq {r.head_sequence}"
        )
    if r.verdict == Verdict.UNANCHORED:
        return f"UNANCHORED: open, last event at {r.last_time}, no recorded head to prove the end"
    if r.verdict == Verdict.SUPERSEDED:
        return f"superseded by chain {r.superseded_by} (intact up to its head)"
    if r.verdict == Verdict.INTACT_OPEN:
        tail = " (--require-sealed)" if require_sealed else ""
        return f"open (intact to head seq {r.head_sequence}; last event at {r.last_time}){tail}"
    return "sealed"


def _facts(r: ChainReport) -> list[str]:
    facts = []
    if r.retained_from is not None:
        facts.append(
            f"history trimmed by the stream's retention limits: retained from seq "
            f"{r.retained_from}, verified from there on"
        )
    if r.supersedes is not None:
        facts.append(
            f"supersedes chain {r.supersedes.chain_id} (last known seq "
            f"{r.supersedes.last_known_sequence}, {r.supersedes.reason})"
        )
    for restart in r.restarts[:SHOWN]:
        facts.append(
            f"restart at seq {restart.sequence} ({'clean' if restart.clean else 'after a crash'}; "
            f"stopped {restart.previous_stop_at}, resumed {restart.time})"
        )
    if len(r.key_spans) > 1 or r.restarts:
        spans = ", ".join(f"{s.kid} seq {s.first}..{s.last}" for s in r.key_spans)
        facts.append(f"keys: {spans}")
    if r.gaps:
        lost = sum(g.lost_count or 0 for g in r.gaps)
        facts.append(
            f"{len(r.gaps)} declared gap(s), {lost} event(s) lost: first at seq "
            f"{r.gaps[0].sequence} ({r.gaps[0].reason})"
        )
    if r.duplicates_total:
        facts.append(
            f"{r.duplicates_total} exact duplicate delivery(ies) (harmless), first at "
            f"seq {r.duplicates[0]}"
        )
    if r.unsigned_tail:
        facts.append(f"{r.unsigned_tail} unsigned event(s) at the end, not yet authenticated")
    return facts


class _Progress:
    """``verified N/M events`` (or another verb) on a terminal, redrawn at most twice a
    second; nothing when the stream is not a terminal."""

    def __init__(
        self, out: TextIO, clock: Callable[[], float] = time.monotonic, *, verb: str = "verified"
    ) -> None:
        self._out = out
        self._verb = verb
        self._tty = out.isatty()
        self._clock = clock
        self._start = clock()
        self._drawn = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = self._clock()
        if not self._tty or now - self._drawn < 0.5:
            return
        self._drawn = now
        rate = done / max(now - self._start, 1e-9)
        of = f"/{total}" if total else ""
        self._out.write(f"\r{self._verb} {done}{of} events ({rate:,.0f}/s)\x1b[K")
        self._out.flush()

    def done(self) -> None:
        if self._tty and self._drawn:
            self._out.write("\r\x1b[K")
            self._out.flush()


if __name__ == "__main__":
    sys.exit(main())
