"""Preparing messages in worker processes, results back in stream order.

Signature verification is most of a verifier's CPU, and each message's signature, digest
and canonical form depend on that message alone, so batches of messages go to a pool of
worker processes (:func:`audit.prepare.prepare` there) while the calling process reads the
stream and walks the links in order. By default only anchor signatures are checked there
(:func:`audit.prepare.is_anchor`); the in-order checks cover the others through the hash
links, or check them when something around them looks wrong; ``every_signature`` checks
all of them here. Results come back in submission order, and at most
``inflight`` batches are out at once, so memory stays bounded whatever the stream's length.

``workers=0`` prepares in the calling process: the single-process verifier, and the
baseline of ``bench/verify.py``.

Reading NATS costs the reading process as much as preparing does (nats-py parses every
message in Python), so online the workers can also do the reading (:meth:`Preparer.map_reads`):
each takes a range of stream sequences, reads it over its own connection with its own
ordered consumer, and returns the prepared messages, raw bytes included where a signature
is deferred; ranges are handed out and taken back in stream order, so the calling process
only walks the links.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Final

import msgspec

from audit.prepare import SIG_DEFERRED, Prepared, prepare
from audit.source import Broker, ConnectOptions, Start

BATCH: Final = 256
"""Messages per batch: large enough that the per-batch cost (a pickle, a pipe round trip)
is noise next to 256 signature checks, small enough to keep every worker busy."""

Message = tuple[bytes, str | None, int | None]
"""(structured-mode bytes, NATS subject or None, stream sequence or None)."""

_encode: Final = msgspec.msgpack.Encoder().encode
_decode_batch: Final = msgspec.msgpack.Decoder(list[Prepared]).decode

_trust: Mapping[str, bytes] = {}
_prefix: str | None = None
_every: bool = True
_source: Source | None = None


@dataclass(frozen=True)
class Source:
    """Where worker processes read from: how to connect, the stream and the subjects."""

    options: ConnectOptions
    stream: str
    subjects: str


@dataclass(frozen=True)
class ReadRange:
    """Stream sequences ``first`` to ``last``; ``last`` None: to the last one stored when
    the read gets there."""

    first: int
    last: int | None


def default_workers() -> int:
    """One worker per CPU the process may run on."""
    return len(os.sched_getaffinity(0))


def _init(
    trust: Mapping[str, bytes], prefix: str | None, every: bool, source: Source | None
) -> None:
    global _trust, _prefix, _every, _source
    _trust, _prefix, _every, _source = trust, prefix, every, source


def _prepare_all(
    first: int,
    batch: list[Message],
    trust: Mapping[str, bytes],
    prefix: str | None,
    every_signature: bool,
) -> list[Prepared]:
    return [
        prepare(
            raw,
            first + i,
            trust,
            subject=subject,
            stream_seq=seq,
            prefix=prefix,
            every_signature=every_signature,
        )
        for i, (raw, subject, seq) in enumerate(batch)
    ]


def _prepare_batch(first: int, batch: list[Message]) -> bytes:
    """Runs in a worker: msgpack is far cheaper to move back than pickled objects, and the
    messages themselves stay behind (the caller still has them; see :func:`_returned`)."""
    prepared = _prepare_all(first, batch, _trust, _prefix, _every)
    for p in prepared:
        p.raw = b""
    return _encode(prepared)


def _read_range(span: ReadRange) -> bytes:
    """Runs in a worker."""
    return _reader.read(span)


class _RangeReader:
    """A worker's reading side: one event loop and one NATS connection, kept for the
    pool's life (the process's exit closes the connection)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Broker | None = None

    def read(self, span: ReadRange) -> bytes:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self._prepared(span))

    async def _prepared(self, span: ReadRange) -> bytes:
        assert _source is not None, "a Preparer with a source starts its workers with it"
        if self._broker is None:
            self._broker = await Broker.connect(_source.options)
        read = self._broker.messages(
            _source.stream, _source.subjects, Start(sequence=span.first), until_seq=span.last
        )
        batch = [(m.raw, m.subject, m.stream_seq) async for m in read]
        # numbered from 0: the caller, which knows what came before, numbers them again
        prepared = _prepare_all(0, batch, _trust, _prefix, _every)
        return _encode(prepared)


_reader: Final = _RangeReader()


def _returned(encoded: bytes, batch: list[Message]) -> list[Prepared]:
    """A worker's results, with deferred events given their message back."""
    prepared = _decode_batch(encoded)
    for p, (raw, _, _) in zip(prepared, batch, strict=True):
        if p.signature == SIG_DEFERRED:
            p.raw = raw
    return prepared


class Preparer:
    """Maps messages to :class:`Prepared` facts, in order, in ``workers`` processes."""

    def __init__(
        self,
        trust: Mapping[str, bytes],
        *,
        prefix: str | None,
        workers: int | None = None,
        every_signature: bool = False,
        source: Source | None = None,
    ) -> None:
        self._trust = dict(trust)
        self._prefix = prefix
        self._every = every_signature
        self._source = source
        self.workers = default_workers() if workers is None else workers
        self._inflight = 2 * self.workers + 1
        self._pool: Executor | None = None

    def __enter__(self) -> Preparer:
        if self.workers > 0:
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init,
                initargs=(self._trust, self._prefix, self._every, self._source),
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _inline(self, first: int, batch: list[Message]) -> list[Prepared]:
        return _prepare_all(first, batch, self._trust, self._prefix, self._every)

    async def map_reads(self, ranges: Iterable[ReadRange]) -> AsyncIterator[Prepared]:
        """Prepared facts of the messages in ``ranges``, read and prepared by the workers,
        in stream order; the workers need the ``source`` this was made with."""
        if self._pool is None or self._source is None:
            raise ValueError("map_reads needs worker processes and a source")
        loop = asyncio.get_running_loop()
        pending: deque[asyncio.Future[bytes]] = deque()
        index = 0
        spans = iter(ranges)
        while True:
            while len(pending) <= self.workers:  # one waiting per worker: results are large
                span = next(spans, None)
                if span is None:
                    break
                pending.append(loop.run_in_executor(self._pool, _read_range, span))
            if not pending:
                return
            for prepared in _decode_batch(await pending.popleft()):
                prepared.index = index
                index += 1
                yield prepared

    async def map(self, messages: AsyncIterable[Message]) -> AsyncIterator[Prepared]:
        """Prepared facts of ``messages``, in their order; the event loop keeps reading
        while the workers check signatures."""
        loop = asyncio.get_running_loop()
        pending: deque[tuple[asyncio.Future[bytes], list[Message]]] = deque()
        batch: list[Message] = []
        index = 0
        async for message in messages:
            batch.append(message)
            if len(batch) < BATCH:
                continue
            if self._pool is None:
                for prepared in self._inline(index, batch):
                    yield prepared
            else:
                work = loop.run_in_executor(self._pool, _prepare_batch, index, batch)
                pending.append((work, batch))
                while len(pending) > self._inflight or (pending and pending[0][0].done()):
                    work, done = pending.popleft()
                    for prepared in _returned(await work, done):
                        yield prepared
            index += len(batch)
            batch = []
        if self._pool is None:
            for prepared in self._inline(index, batch):
                yield prepared
            return
        if batch:
            pending.append((loop.run_in_executor(self._pool, _prepare_batch, index, batch), batch))
        while pending:
            work, done = pending.popleft()
            for prepared in _returned(await work, done):
                yield prepared
