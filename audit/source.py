"""Reading the stream and the recorded heads from NATS JetStream (the I/O edge).

Everything here works under permissions scoped to one cell (docs/consumers.md): messages
are read with an ordered pull consumer whose filter is the cell's subjects, created under
``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`` so a permission can name the filter;
heads are listed from the bucket stream's subject counts (``STREAM.INFO`` with a subject
filter) and fetched with direct gets, which need no consumer. Nothing lists every key or
every stream.

nats-py reports a publish the server refuses only through the error callback, and the
request then times out; :class:`Broker` remembers those reports, so a refused request is
raised as :class:`~audit.errors.AccessDeniedError` naming the subject instead of a bare
timeout. nats-py 2.16 raises plain ``asyncio.TimeoutError`` from some JetStream calls, so
that is caught alongside ``nats.errors.Error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import secrets
import ssl
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from audit.connect import NatsAuth, connect_kwargs, telling_error
from audit.errors import AccessDeniedError, NotFoundError, SourceError
from audit.events import Received
from audit.message import structured_bytes
from schemas.heads import ChainHead

_API: Final = "$JS.API"
_FETCH: Final = 1000
"""Messages per pull request; at most two requests' worth are held (bounded memory)."""
_ERR_STREAM_NOT_FOUND: Final = 10059
_NS: Final = 1_000_000_000
_head_decoder: Final = msgspec.json.Decoder(ChainHead)


@dataclass(frozen=True, kw_only=True)
class ConnectOptions:
    """How to reach and authenticate to NATS: the same security settings the daemon has
    (:class:`audit.connect.NatsAuth`: secrets from files only)."""

    url: str
    """One server, or a cluster's servers comma-separated (as the daemon's ``nats.url``)."""
    auth: NatsAuth = field(default_factory=NatsAuth)
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 5.0


@dataclass(frozen=True)
class Start:
    """Where a read begins: every retained message, a stream sequence, a time, the last
    message, or only messages stored from now on (``new``)."""

    sequence: int | None = None
    time: dt.datetime | None = None
    new: bool = False
    last: bool = False
    """Only the last message stored (on the read's subjects)."""

    def config(self) -> dict[str, Any]:
        if self.new:
            return {"deliver_policy": "new"}
        if self.last:
            return {"deliver_policy": "last"}
        if self.sequence is not None:
            return {"deliver_policy": "by_start_sequence", "opt_start_seq": self.sequence}
        if self.time is not None:
            when = self.time.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
            return {"deliver_policy": "by_start_time", "opt_start_time": when}
        return {"deliver_policy": "all"}


class StreamState(msgspec.Struct, frozen=True, kw_only=True):
    """What ``STREAM.INFO`` says, with subject counts when a filter was given."""

    name: str
    first_seq: int
    last_seq: int
    messages: int
    first_time: str | None
    last_time: str | None
    subjects: dict[str, int]
    allow_direct: bool
    limits: list[str]
    """Retention limits that delete old events (max_age, max_msgs, ...), if any."""


class Broker:
    """One NATS connection used for reading; translate every failure into ``audit.errors``."""

    def __init__(self, nc: _Client, refused: deque[str], options: ConnectOptions) -> None:
        self._nc = nc
        self._refused = refused
        self._timeout = options.request_timeout_s
        self.options = options
        """How this connection was made: worker processes connect the same way."""

    @classmethod
    async def connect(cls, options: ConnectOptions) -> Broker:
        refused: deque[str] = deque(maxlen=16)
        errors: list[BaseException] = []

        async def remember(exc: Exception) -> None:
            # nats-py would log every report with a traceback; keep them for the messages.
            if "permissions violation" in str(exc).lower():
                refused.append(str(exc))
            else:
                errors.append(exc)

        kwargs = connect_kwargs(options.auth)
        nc = _Client()
        try:
            await nc.connect(
                [server.strip() for server in options.url.split(",")],  # a cluster's seeds
                connect_timeout=max(1, round(options.connect_timeout_s)),
                allow_reconnect=False,
                max_reconnect_attempts=1,
                error_cb=remember,
                **kwargs,
            )
        except (TimeoutError, OSError, nats.errors.Error, ssl.SSLError) as exc:
            # What error_cb saw is more specific than what connect raised, and a refused
            # credential or certificate says best what to fix.
            cause = telling_error([exc, *errors])
            reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
            raise SourceError(f"cannot connect to NATS at {options.url}: {reason}") from exc
        return cls(nc, refused, options)

    async def close(self) -> None:
        with contextlib.suppress(nats.errors.Error, OSError, asyncio.TimeoutError):
            await self._nc.close()

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests -----------------------------------------------------------------------

    def _denied(self, subject: str) -> bool:
        """Whether the server reported refusing ``subject`` since the last check."""
        # nats-py lowercases the server's -ERR text
        found = any(subject.lower() in report.lower() for report in self._refused)
        if found:
            self._refused.clear()
        return found

    async def request(self, subject: str, body: bytes = b"", *, what: str) -> Msg:
        try:
            return await self._nc.request(subject, body, timeout=self._timeout)
        except nats.errors.NoRespondersError as exc:
            raise SourceError(f"{what}: nothing answers on {subject}") from exc
        except (TimeoutError, nats.errors.Error) as exc:
            await self._flush_errors()
            if self._denied(subject):
                raise AccessDeniedError(subject, what) from exc
            raise SourceError(f"{what}: no answer on {subject} ({exc!r})") from exc

    async def _flush_errors(self) -> None:
        """A PING round trip, so a permission report sent before it has been read."""
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
            await self._nc.flush(timeout=1)

    async def api(self, subject: str, body: dict[str, Any] | None, *, what: str) -> dict[str, Any]:
        """A JetStream API request; its error reply becomes an exception."""
        msg = await self.request(subject, msgspec.json.encode(body) if body else b"", what=what)
        try:
            reply = msgspec.json.decode(msg.data)
        except msgspec.DecodeError as exc:
            raise SourceError(f"{what}: the server's reply is not JSON") from exc
        error = reply.get("error") if type(reply) is dict else None
        if error:
            code = error.get("err_code")
            raise _ApiError(what, int(code) if code else 0, str(error.get("description")))
        return reply  # type: ignore[no-any-return]

    # -- streams ------------------------------------------------------------------------

    async def stream_state(self, stream: str, subjects_filter: str | None = None) -> StreamState:
        """``STREAM.INFO`` of ``stream``; with a filter, its per-subject message counts (all
        pages of them)."""
        subjects: dict[str, int] = {}
        offset = 0
        while True:
            body: dict[str, Any] | None = None
            if subjects_filter is not None:
                body = {"subjects_filter": subjects_filter, "offset": offset}
            try:
                info = await self.api(
                    f"{_API}.STREAM.INFO.{stream}", body, what=f"read stream {stream}"
                )
            except _ApiError as exc:
                if exc.err_code == _ERR_STREAM_NOT_FOUND:
                    raise NotFoundError("stream", stream) from exc
                raise SourceError(str(exc)) from exc
            state, config = info.get("state", {}), info.get("config", {})
            page = state.get("subjects") or {}
            subjects.update(page)
            offset += len(page)
            total, limit = info.get("total", 0), info.get("limit", 0)
            if not page or not limit or offset >= total:
                break
        return StreamState(
            name=stream,
            first_seq=int(state.get("first_seq", 0)),
            last_seq=int(state.get("last_seq", 0)),
            messages=int(state.get("messages", 0)),
            first_time=_zero_time(state.get("first_ts")),
            last_time=_zero_time(state.get("last_ts")),
            subjects=subjects,
            allow_direct=bool(config.get("allow_direct")),
            limits=_limits(config),
        )

    async def last_message(self, stream: str, subject: str) -> Received | None:
        """The last message on ``subject`` (wildcards allowed) by a direct get, or None."""
        msg = await self.request(
            f"{_API}.DIRECT.GET.{stream}.{subject}", what=f"read the last message of {subject}"
        )
        headers = msg.headers or {}
        if headers.get("Status"):
            return None
        return Received(
            raw=structured_bytes(msg.data, headers),
            subject=headers.get("Nats-Subject"),
            stream_seq=int(headers.get("Nats-Sequence", "0")) or None,
            stored_ns=_parse_time_ns(headers.get("Nats-Time-Stamp")),
        )

    async def heads(self, bucket: str, cell: str | None = None) -> dict[str, ChainHead]:
        """The recorded chain heads, by chain id (only ``cell``'s when given); empty when
        the bucket does not exist."""
        key_prefix = f"$KV.{bucket}."
        wanted = f"{key_prefix}{cell}.>" if cell else f"{key_prefix}>"
        try:
            state = await self.stream_state(f"KV_{bucket}", wanted)
        except NotFoundError:
            return {}
        heads: dict[str, ChainHead] = {}
        for subject in sorted(state.subjects):
            found = await self.last_message(f"KV_{bucket}", subject)
            if found is None or not found.raw:
                continue  # a deleted key
            try:
                head = _head_decoder.decode(found.raw)
            except msgspec.DecodeError as exc:
                raise SourceError(f"recorded head {subject} is not a chain head: {exc}") from exc
            heads[head.chain_id] = head
        return heads

    # -- reading messages ---------------------------------------------------------------

    async def messages(
        self,
        stream: str,
        subject_filter: str,
        start: Start = Start(),
        *,
        follow: bool = False,
        until_ns: int | None = None,
        until_seq: int | None = None,
    ) -> AsyncGenerator[Received, None]:
        """Messages on ``subject_filter`` in stream order, from ``start``; without
        ``follow``, up to the last one stored when the read caught up, and not past
        ``until_ns`` (stored time) or ``until_seq`` (stream sequence)."""
        reader = _OrderedReader(self, stream, subject_filter, follow=follow, until_seq=until_seq)
        try:
            async for msg in reader.read(start):
                if until_ns is not None and msg.stored_ns is not None and msg.stored_ns > until_ns:
                    return
                yield msg
        finally:
            await reader.close()

    @property
    def nc(self) -> _Client:
        return self._nc


class _Client(Client):
    """nats-py's client with a cheaper message-header parser, the hot spot of reading a
    stream: nats-py 2.16 checks each header name for whitespace with a generator over its
    characters, a quarter of what reading a message costs; one regex search gives the same
    answer. The result is the same as nats-py's for any header block (a property test holds
    the two together, and fails if nats-py stops calling the method).

    A reader's own subscription can also be routed past nats-py's message handling
    (:meth:`route`): its messages go to a plain callable as the parser's bytes, without a
    ``Msg`` object, a header dict, a queue and a task wake-up each, which together cost
    more than the parsing itself."""

    def __init__(self) -> None:
        super().__init__()
        self._routes: dict[int, Route] = {}

    def route(self, sid: int, to: Route | None) -> None:
        """Hand subscription ``sid``'s messages to ``to`` (None: back to nats-py)."""
        if to is None:
            self._routes.pop(sid, None)
        else:
            self._routes[sid] = to

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        to = self._routes.get(sid)
        if to is None:
            await super()._process_msg(sid, subject, reply, data, headers)
        else:
            to(subject, reply, data, headers)

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue
            if _SPACE.search(key) is None:
                out[key] = value.strip().decode("utf-8", "replace")
        return out


_SPACE: Final = re.compile(r"\s")

Route = Callable[[bytes, bytes, bytes, bytes], None]
"""``(subject, reply, payload, header block)`` of one message, as the server sent them."""
RawMsg = tuple[bytes, bytes, bytes, bytes]
_HEADER_LINE: Final = b"NATS/1.0"
_BINARY_MARK: Final = b"ce-specversion"


class _ApiError(SourceError):
    def __init__(self, what: str, err_code: int, description: str) -> None:
        self.err_code = err_code
        super().__init__(f"{what}: {description} (err_code {err_code})")


class _OrderedReader:
    """An ordered pull consumer: an ephemeral, unacknowledged consumer read in batches,
    recreated after the last stream sequence seen if a delivery is ever skipped, so the
    caller sees each message once, in stream order. With ``until_seq`` no request asks for
    more messages than there are stream sequences left up to it, so a read of a range
    stops without having pulled the messages after it."""

    def __init__(
        self,
        broker: Broker,
        stream: str,
        subject_filter: str,
        *,
        follow: bool,
        until_seq: int | None = None,
    ) -> None:
        self._broker = broker
        self._stream = stream
        self._filter = subject_filter
        self._follow = follow
        self._until_seq = until_seq
        self._last_sseq = 0
        self._name: str | None = None
        self._inbox = broker.nc.new_inbox()
        self._queue: deque[RawMsg] = deque()
        self._arrived = asyncio.Event()
        self._outstanding = 0
        self._request_over = False
        self._sub: Any = None

    async def _create(self, start: Start) -> None:
        nc = self._broker.nc
        name = "cellos_audit_" + secrets.token_hex(8)
        config: dict[str, Any] = {
            "name": name,
            "filter_subject": self._filter,
            "ack_policy": "none",
            "replay_policy": "instant",
            "inactive_threshold": 60 * _NS,
            "mem_storage": True,
            "num_replicas": 1,
            **start.config(),
        }
        version = nc.connected_server_version
        if (version.major, version.minor) >= (2, 9):
            subject = f"{_API}.CONSUMER.CREATE.{self._stream}.{name}.{self._filter}"
        else:
            # before 2.9 the subject names no filter, so no permission can scope it
            del config["name"]
            subject = f"{_API}.CONSUMER.CREATE.{self._stream}"
        body = {"stream_name": self._stream, "config": config}
        try:
            reply = await self._broker.api(subject, body, what=f"read {self._filter}")
        except _ApiError as exc:
            if exc.err_code == _ERR_STREAM_NOT_FOUND:
                raise NotFoundError("stream", self._stream) from exc
            raise
        self._name = str(reply.get("name") or name)

    async def _pull(self) -> None:
        batch = _FETCH
        if self._until_seq is not None:
            batch = max(1, min(batch, self._until_seq - self._last_sseq))
        request: dict[str, Any] = {"batch": batch}
        if self._follow:
            request.update(expires=5 * _NS, idle_heartbeat=2 * _NS)
        else:
            request.update(no_wait=True)
        self._outstanding = batch
        self._request_over = False
        subject = f"{_API}.CONSUMER.MSG.NEXT.{self._stream}.{self._name}"
        try:
            await self._broker.nc.publish(subject, msgspec.json.encode(request), reply=self._inbox)
        except nats.errors.Error as exc:
            raise SourceError(f"read {self._filter}: {exc!r}") from exc

    def _on_message(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        # Bounded without a limit of its own: at most two pull requests are outstanding.
        self._queue.append((subject, reply, data, headers))
        self._arrived.set()

    async def read(self, start: Start) -> AsyncIterator[Received]:
        nc = self._broker.nc
        try:
            self._sub = await nc.subscribe(self._inbox)
        except nats.errors.Error as exc:
            raise SourceError(f"cannot subscribe to {self._inbox}: {exc!r}") from exc
        nc.route(self._sub._id, self._on_message)
        await self._create(start)
        if start.sequence is not None:
            self._last_sseq = start.sequence - 1
        await self._pull()
        last_dseq = 0
        while True:
            if not self._queue:
                await self._wait()
                continue
            subject, reply, data, headers = self._queue.popleft()
            status = _status_of(headers)
            if status is not None:
                if await self._status(*status):
                    return
                continue
            self._outstanding -= 1
            if self._outstanding == 0:
                self._request_over = True
            consumer, sseq, dseq, stored_ns, pending = _ack_fields(reply.decode())
            if consumer != self._name:
                continue  # still in flight from a consumer replaced by _restart
            if dseq != last_dseq + 1:
                await self._restart(Start(sequence=self._last_sseq + 1))
                last_dseq = 0
                continue
            if self._until_seq is not None and sseq > self._until_seq:
                return
            self._last_sseq, last_dseq = sseq, dseq
            # only a binary-mode message needs its headers read
            fields = _Client._parse_header_lines(headers) if _BINARY_MARK in headers else None
            yield Received(
                raw=structured_bytes(data, fields),
                subject=subject.decode(),
                stream_seq=sseq,
                stored_ns=stored_ns,
            )
            if (pending == 0 and not self._follow) or sseq == self._until_seq:
                return
            if self._request_over and len(self._queue) < _FETCH:
                await self._pull()

    async def _wait(self) -> None:
        self._arrived.clear()
        if self._request_over:
            await self._pull()
        try:
            await asyncio.wait_for(self._arrived.wait(), 30.0)
        except TimeoutError as exc:
            # a follow request expires every 5 s with heartbeats in between: silence means
            # the server or the consumer is gone
            raise SourceError(f"read {self._filter}: the server stopped answering") from exc

    async def _status(self, status: str, description: str) -> bool:
        """Handle a status message; True when a (non-follow) read is over."""
        if status == "100":
            return False  # idle heartbeat
        if status in ("404", "408"):
            self._request_over = True
            return status == "404" and not self._follow
        if status == "409" and "Consumer Deleted" in description:
            raise SourceError(f"read {self._filter}: the consumer was deleted")
        self._request_over = True
        return False

    async def _restart(self, start: Start) -> None:
        await self._delete()
        self._queue.clear()
        await self._create(start)
        await self._pull()

    async def _delete(self) -> None:
        if self._name is None:
            return
        name, self._name = self._name, None
        with contextlib.suppress(SourceError):
            await self._broker.request(
                f"{_API}.CONSUMER.DELETE.{self._stream}.{name}", what="delete a consumer"
            )

    async def close(self) -> None:
        if self._sub is not None:
            self._broker.nc.route(self._sub._id, None)
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
        await self._delete()


def _status_of(headers: bytes) -> tuple[str, str] | None:
    """(code, description) of a status message (``NATS/1.0 404 No Messages``), else None."""
    if not headers.startswith(_HEADER_LINE + b" "):
        return None
    line = headers[len(_HEADER_LINE) + 1 :].partition(b"\r\n")[0]
    code, _, description = line.partition(b" ")
    return code.strip().decode("ascii", "replace"), description.strip().decode("utf-8", "replace")


def _ack_fields(reply: str) -> tuple[str, int, int, int, int]:
    """(consumer, stream seq, consumer seq, stored ns, pending) from a JetStream reply
    subject: ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ns>.<pending>``, or
    the longer form with domain and account hash before the stream."""
    tokens = reply.split(".")
    base = 2 if len(tokens) == 9 else 4
    return (
        tokens[base + 1],
        int(tokens[base + 3]),
        int(tokens[base + 4]),
        int(tokens[base + 5]),
        int(tokens[base + 6]),
    )


def _zero_time(value: object) -> str | None:
    if type(value) is not str or value.startswith("0001-"):
        return None
    return value


def _parse_time_ns(value: str | None) -> int | None:
    """Nanoseconds since the epoch of a server timestamp (RFC 3339, up to ns digits)."""
    if not value:
        return None
    head, _, fraction = value.rstrip("Z").partition(".")
    try:
        base = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC)
    except ValueError:
        return None
    digits = (fraction + "000000000")[:9] if fraction.isdigit() else "0"
    return int(base.timestamp()) * _NS + int(digits)


def _limits(config: dict[str, Any]) -> list[str]:
    limits = []
    if config.get("max_age"):
        limits.append(f"max_age {config['max_age'] / _NS:g}s")
    for name in ("max_msgs", "max_bytes", "max_msgs_per_subject"):
        value = config.get(name)
        if isinstance(value, int) and value > 0:
            limits.append(f"{name} {value}")
    return limits
