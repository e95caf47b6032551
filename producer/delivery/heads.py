"""Each chain's latest signed head, kept outside the stream (SPEC 5.3).

Chain events (opened, checkpoint, gap, sealed) are always signed; when JetStream has
acknowledged one, its sequence and digest become the chain's recorded head in a key-value
bucket. A verifier that finds a chain in the stream ending *before* the recorded head knows
the tail was cut, where a quiet cell would simply end at its head.

Writes are coalesced per chain and done by one background task, so a slow bucket never
holds up the publisher: at most one pending head per chain is kept (bounded by the number
of chains), and only a newer sequence replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from producer.aio import cancel_and_wait, wait_set
from producer.errors import BrokerError
from producer.ops.logs import event
from schemas.heads import ChainHead

log = logging.getLogger(__name__)


async def open_bucket(js: JetStreamContext, bucket: str, *, replicas: int = 1) -> KeyValue:
    """Bind the bucket, creating it (file storage, one revision per key, direct gets) when
    missing, and turning direct gets on for one created without them: a per-cell auditor
    reads its cell's heads with direct gets, which need no consumer and so no rights to
    the others' keys."""
    try:
        kv = await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        kv = None
    except (nats.errors.Error, TimeoutError) as exc:
        raise BrokerError(f"cannot open key-value bucket {bucket}: {exc!r}") from exc
    try:
        if kv is None:
            return await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=1,
                    storage=StorageType.FILE,
                    direct=True,
                    replicas=replicas,
                )
            )
        info = await js.stream_info(f"KV_{bucket}")
        if not info.config.allow_direct:
            info.config.allow_direct = True
            await js.update_stream(info.config)
        return kv
    except (nats.errors.Error, TimeoutError) as exc:
        raise BrokerError(f"cannot set up key-value bucket {bucket}: {exc!r}") from exc


_head_decoder = msgspec.json.Decoder(ChainHead)


async def latest_head(
    js: JetStreamContext, bucket: str, cell_id: str, run_id: str
) -> ChainHead | None:
    """The most recently recorded head among the chains of a registration (the chain a new
    one replaces when this producer lost its state), or None."""
    try:
        kv = await js.key_value(bucket)
        watcher = await kv.watch(f"{cell_id}.{run_id}.*", ignore_deletes=True)
    except nats.js.errors.BucketNotFoundError:
        return None
    except (nats.errors.Error, TimeoutError) as exc:
        raise BrokerError(f"cannot read key-value bucket {bucket}: {exc!r}") from exc
    newest: tuple[int, ChainHead] | None = None
    try:
        while True:
            entry = await watcher.updates(timeout=5.0)  # type: ignore[no-untyped-call]
            if entry is None:
                break
            if entry.value and (newest is None or entry.revision > newest[0]):
                newest = (entry.revision or 0, _head_decoder.decode(entry.value))
    except (nats.errors.Error, TimeoutError) as exc:
        raise BrokerError(f"cannot read key-value bucket {bucket}: {exc!r}") from exc
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]
    return newest[1] if newest is not None else None


Reopen = Callable[[], Awaitable[KeyValue]]


class HeadRecorder:
    def __init__(self, kv: KeyValue, *, reopen: Reopen | None = None) -> None:
        self._kv = kv
        self._reopen = reopen
        self._pending: dict[str, ChainHead] = {}
        self._written: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def note(self, head: ChainHead) -> None:
        """Record ``head`` soon, unless a newer head of the same chain is already known."""
        key = head.key
        newest = self._pending.get(key)
        if (newest is not None and newest.sequence >= head.sequence) or self._written.get(
            key, 0
        ) >= head.sequence:
            return
        self._pending[key] = head
        self._idle.clear()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                key, head = next(iter(self._pending.items()))
                try:
                    await self._kv.put(key, msgspec.json.encode(head))
                except (nats.errors.Error, TimeoutError) as exc:
                    # Keep it pending; the next note (or this retry) writes it. The bucket
                    # may be gone with a wiped broker: bind (or create) it again.
                    self.failures += 1
                    event(log, logging.WARNING, "chain_head_write_failed", key=key, error=repr(exc))
                    await asyncio.sleep(1.0)
                    if self._reopen is not None:
                        with contextlib.suppress(BrokerError):
                            self._kv = await self._reopen()
                    continue
                if self._pending.get(key) is head:
                    del self._pending[key]
                if head.sealed:
                    self._written.pop(key, None)  # nothing follows a seal: keep memory bounded
                else:
                    self._written[key] = max(self._written.get(key, 0), head.sequence)
            self._idle.set()

    async def flush(self, grace_s: float) -> bool:
        """Wait (up to ``grace_s``) until every noted head is written."""
        return await wait_set(self._idle, grace_s)

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
