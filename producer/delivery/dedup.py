"""Asking the stream which events it already holds (SPEC 7: nothing stored twice).

JetStream drops a re-published message whose ``Nats-Msg-Id`` it saw within the stream's
duplicate window. Past that window (a long outage, or a restart after one) it would store
it again, so before re-publishing such an event the producer asks: it reads the headers of
the cell's messages stored since the event was sealed (an ephemeral consumer over
``<prefix>.<cell>.>`` starting at that time, headers only) and settles the events it finds
there instead of sending them. The read covers only what was stored for that cell since
the oldest event in question, which is what was published around the outage.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable
from typing import Final

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from producer.errors import BrokerError

CLOCK_SKEW_S: Final = 60.0
"""How far the broker's clock may lag ours: the read starts this much earlier."""
FETCH_BATCH: Final = 1000


async def stored_ids(
    js: JetStreamContext,
    *,
    stream: str,
    subject_prefix: str,
    candidates: Iterable[tuple[str, str, float]],
    timeout_s: float = 2.0,
) -> set[str]:
    """The msg ids among ``candidates`` (cell id, msg id, wall time it was sealed, or
    earlier) that the stream already holds."""
    by_cell: dict[str, tuple[set[str], float]] = {}
    for cell, msg_id, since in candidates:
        ids, earliest = by_cell.get(cell, (set(), since))
        ids.add(msg_id)
        by_cell[cell] = (ids, min(earliest, since))
    found: set[str] = set()
    for cell, (ids, since) in by_cell.items():
        start = dt.datetime.fromtimestamp(max(0.0, since - CLOCK_SKEW_S), tz=dt.UTC)
        found |= ids & await _stored_since(
            js, stream, f"{subject_prefix}.{cell}.>", start, timeout_s
        )
    return found


async def _stored_since(
    js: JetStreamContext, stream: str, subject: str, start: dt.datetime, timeout_s: float
) -> set[str]:
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=start,
        headers_only=True,
        ack_policy=AckPolicy.EXPLICIT,
        max_ack_pending=-1,
        inactive_threshold=60.0,
    )
    try:
        sub = await js.pull_subscribe(subject, stream=stream, config=config)
    except (nats.errors.Error, TimeoutError) as exc:
        raise BrokerError(f"cannot read {subject} from {stream}: {exc!r}") from exc
    ids: set[str] = set()
    try:
        while True:
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=timeout_s)
            except (nats.errors.TimeoutError, TimeoutError):
                break  # nothing (more) stored since the start time
            for msg in msgs:
                msg_id = (msg.headers or {}).get("Nats-Msg-Id")
                if msg_id:
                    ids.add(msg_id)
                await msg.ack()
            if not msgs or msgs[-1].metadata.num_pending == 0:
                break
    except nats.errors.Error as exc:
        raise BrokerError(f"cannot read {subject} from {stream}: {exc!r}") from exc
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return ids
