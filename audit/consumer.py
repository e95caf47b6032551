"""The consumer library: follow, replay, export and verify a cell (or the whole stream).

Recipes are in docs/consumers.md. Every function takes a connected :class:`Broker` and a
:class:`Scope`; with ``Scope.cell`` set, only that cell's subjects and heads keys are read,
so a user whose permissions cover one cell can run all of them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

from audit.connect import NatsAuth
from audit.events import Received, rfc3339
from audit.export import ExportHeader, ExportReader, ExportWriter
from audit.options import DEFAULT_HEADS_BUCKET, DEFAULT_PREFIX, DEFAULT_STREAM
from audit.pipeline import Message, Preparer, ReadRange, Source
from audit.prepare import Prepared
from audit.source import Broker, ConnectOptions, Start, StreamState
from audit.verify import ChainReport, StreamVerifier

PARALLEL_FROM: Final = 20_000
"""Below this many messages starting worker processes costs more than it saves."""
READ_CHUNK: Final = 2048
"""Messages a worker reads per consumer: creating and deleting one costs about as much
as reading a few dozen messages, and at most ``workers + 1`` chunks are read or held at once."""

Progress = Callable[[int, int | None], None]
"""Called now and then during a long read: (messages so far, total or None)."""


@dataclass(frozen=True)
class Scope:
    """Which stream, subjects and heads bucket; ``cell`` narrows all three to one cell."""

    stream: str = DEFAULT_STREAM
    prefix: str = DEFAULT_PREFIX
    cell: str | None = None
    heads_bucket: str = DEFAULT_HEADS_BUCKET

    @property
    def subjects(self) -> str:
        return f"{self.prefix}.{self.cell}.>" if self.cell else f"{self.prefix}.>"


@dataclass(frozen=True)
class Verification:
    reports: list[ChainReport]
    messages: int
    stream: StreamState | None
    """The stream as found before reading (None for a file)."""


async def replay(
    broker: Broker,
    scope: Scope,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    from_seq: int | None = None,
) -> AsyncIterator[Received]:
    """The scope's messages from the start (or a time, or a stream sequence) up to the
    last one stored when the replay caught up (or ``until``)."""
    until_ns = _ns(until) if until is not None else None
    start = Start(sequence=from_seq, time=since)
    async for message in broker.messages(scope.stream, scope.subjects, start, until_ns=until_ns):
        yield message


def _ns(when: dt.datetime) -> int:
    """Nanoseconds since the epoch, exactly (a float timestamp loses the microseconds)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return (when - _EPOCH) // dt.timedelta(microseconds=1) * 1000


_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


async def follow(
    broker: Broker,
    scope: Scope,
    *,
    start: Start = Start(new=True),  # noqa: B008 (frozen)
) -> AsyncIterator[Received]:
    """The scope's messages as they are stored, until the caller stops iterating."""
    async for message in broker.messages(scope.stream, scope.subjects, start, follow=True):
        yield message


async def verify_stream(
    broker: Broker,
    scope: Scope,
    trust: dict[str, bytes],
    *,
    workers: int | None = None,
    every_signature: bool = False,
    progress: Progress | None = None,
    read_chunk: int = READ_CHUNK,
) -> Verification:
    """Verify every chain in the scope, reading the stream once in bounded memory.

    ``workers``: processes reading the stream and checking signatures, ``read_chunk``
    messages at a time (None: one per CPU for a stream of at least :data:`PARALLEL_FROM`
    messages, else none; 0: all in this process).
    ``every_signature``: check each signature directly, rather than anchors plus the hash
    links (see :mod:`audit.pipeline`)."""
    state = await broker.stream_state(scope.stream, scope.subjects if scope.cell else None)
    total = sum(state.subjects.values()) if scope.cell else state.messages
    heads = await broker.heads(scope.heads_bucket, scope.cell)  # before the events
    verifier = StreamVerifier(trust, heads=heads, trimmed=state.first_seq > 1)
    if workers is None and total < PARALLEL_FROM:
        workers = 0
    preparer = Preparer(
        trust,
        prefix=scope.prefix,
        workers=workers,
        every_signature=every_signature,
        source=Source(broker.options, scope.stream, scope.subjects),
    )
    if preparer.workers > 0:
        spans = read_ranges(state.first_seq, state.last_seq, total, read_chunk)
        with preparer:
            await _run(verifier, preparer.map_reads(spans), total, progress)
    else:

        async def messages() -> AsyncIterator[Message]:
            async for m in replay(broker, scope):
                yield (m.raw, m.subject, m.stream_seq)

        with preparer:
            await _run(verifier, preparer.map(messages()), total, progress)
    return Verification(reports=verifier.finish(), messages=verifier.messages, stream=state)


def read_ranges(first: int, last: int, messages: int, chunk: int) -> Iterator[ReadRange]:
    """Stream sequence ranges of about ``chunk`` of the ``messages`` stored between
    ``first`` and ``last`` (spread evenly, as far as anyone can know before reading), then
    one open range for what is stored while they are read."""
    first = max(first, 1)
    if messages > 0 and last >= first:
        step = max(1, (last - first + 1) * chunk // messages)
        while first <= last:
            end = min(first + step - 1, last)
            yield ReadRange(first, end)
            first = end + 1
    yield ReadRange(first, None)


async def verify_file(
    path: str,
    lines: Iterable[bytes],
    trust: dict[str, bytes],
    *,
    workers: int | None = None,
    every_signature: bool = False,
    progress: Progress | None = None,
) -> Verification:
    """Verify an export (or a bare JSON-lines file of events) offline."""
    reader = ExportReader(path, iter(lines))
    header = reader.header
    verifier = StreamVerifier(
        trust, heads=reader.heads, trimmed=header is not None and header.trimmed
    )
    prefix = header.subject_prefix if header is not None else None

    async def messages() -> AsyncIterator[Message]:
        for m in reader.messages():
            yield (m.raw, m.subject, m.stream_seq)

    with Preparer(trust, prefix=prefix, workers=workers, every_signature=every_signature) as p:
        await _run(verifier, p.map(messages()), None, progress)
    return Verification(reports=verifier.finish(), messages=verifier.messages, stream=None)


async def _run(
    verifier: StreamVerifier,
    prepared: AsyncIterator[Prepared],
    total: int | None,
    progress: Progress | None,
) -> None:
    async for p in prepared:
        verifier.add(p)
        if progress is not None and not verifier.messages % 1024:
            progress(verifier.messages, total)
    if progress is not None:
        progress(verifier.messages, total)


async def export(
    broker: Broker,
    scope: Scope,
    out: BinaryIO,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    from_seq: int | None = None,
    now: Callable[[], float] = time.time,
    progress: Progress | None = None,
) -> int:
    """Write the scope's events and chain heads to ``out`` (docs: audit/export.py); returns
    the number of events written."""
    state = await broker.stream_state(scope.stream)
    heads = await broker.heads(scope.heads_bucket, scope.cell)
    first = max(state.first_seq, from_seq or 0)
    writer = ExportWriter(out)
    writer.header(
        ExportHeader(
            stream=scope.stream,
            subject_prefix=scope.prefix,
            cell=scope.cell,
            first_seq=first,
            last_seq=state.last_seq,
            trimmed=first > 1 or since is not None,
            exported_at=rfc3339(int(now() * 1e9)),
        )
    )
    for head in sorted(heads.values(), key=lambda h: h.key):
        writer.head(head)
    count = 0
    total = state.last_seq - first + 1 if scope.cell is None else None
    async for message in replay(broker, scope, since=since, until=until, from_seq=from_seq):
        writer.message(message)
        count += 1
        if progress is not None and not count % 1024:
            progress(count, total)
    return count


async def collect_reports(
    nats_url: str,
    *,
    trust: dict[str, bytes],
    stream: str,
    subject_prefix: str,
    cells: list[str] | None = None,
    heads_bucket: str = DEFAULT_HEADS_BUCKET,
    auth: NatsAuth | None = None,
) -> list[ChainReport]:
    """Verify every chain under the prefix (or only those of ``cells``), connecting with
    ``auth`` (the daemon's own ``[nats]`` security settings): the demo's and tests'
    shortcut."""
    whole = Scope(stream=stream, prefix=subject_prefix, heads_bucket=heads_bucket)
    scopes = [dataclasses.replace(whole, cell=c) for c in cells] if cells else [whole]
    reports: list[ChainReport] = []
    options = ConnectOptions(url=nats_url, auth=auth or NatsAuth())
    async with await Broker.connect(options) as broker:
        for scope in scopes:
            reports.extend((await verify_stream(broker, scope, trust)).reports)
    return reports
