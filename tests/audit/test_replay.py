"""Reading a history back from a real JetStream: whole, in order, or a SourceError."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from audit.errors import SourceError
from audit.replay import fetch_history
from producer.ops.embedded import EmbeddedNats

STREAM = "T"


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    """A client on a server whose stream holds 25 messages on ``t.a``."""
    client = await nats.connect(nats_server.url)
    try:
        js = client.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=["t.>"], storage=StorageType.FILE))
        for i in range(25):
            await js.publish("t.a", b"%d" % i)
        yield client
    finally:
        await client.close()


def _fetch_answering(
    monkeypatch: pytest.MonkeyPatch, answer: BaseException | list[Any]
) -> list[int]:
    """Make every pull fetch raise ``answer`` (or return it); returns the batch sizes asked."""
    asked: list[int] = []

    async def fetch(_self: object, batch: int = 1, **_: object) -> list[Any]:
        asked.append(batch)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(JetStreamContext.PullSubscription, "fetch", fetch)
    return asked


async def test_whole_history_in_stream_order_across_batches(nc: Client) -> None:
    got = await fetch_history(nc, stream=STREAM, subject="t.a", batch=10)
    assert got == [b"%d" % i for i in range(25)]


async def test_subject_without_messages_is_empty_and_fetches_nothing(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `verify --cell nosuch`: the stream has messages, none on this subject. No fetch may be
    # attempted, since nats-py answers an empty fetch with a timeout.
    asked = _fetch_answering(monkeypatch, TimeoutError())
    assert await fetch_history(nc, stream=STREAM, subject="t.nosuch") == []
    assert asked == []


async def test_bare_asyncio_timeout_from_the_client_is_a_source_error(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nats-py 2.16 raises a bare asyncio.TimeoutError (the builtin TimeoutError since
    # Python 3.11) from a fetch, not only its own nats.errors.TimeoutError.
    asked = _fetch_answering(monkeypatch, TimeoutError())
    with pytest.raises(SourceError, match=r"t\.a from T stopped with 25 message\(s\) due"):
        await fetch_history(nc, stream=STREAM, subject="t.a", batch=10)
    assert asked == [10]


async def test_a_fetch_bringing_nothing_while_messages_are_due_is_a_source_error(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fetch_answering(monkeypatch, [])
    with pytest.raises(SourceError, match=r"nothing arrived with 25 message\(s\) due"):
        await fetch_history(nc, stream=STREAM, subject="t.a")


async def test_real_fetch_timeout_is_a_source_error_not_a_short_history(nc: Client) -> None:
    # A microsecond is shorter than any round trip to the server: the real client times
    # out, with whichever TimeoutError it raises on that path.
    with pytest.raises(SourceError, match=r"stopped with 25 message\(s\) due"):
        await fetch_history(nc, stream=STREAM, subject="t.a", timeout_s=1e-6)


async def test_missing_stream_is_a_source_error(nc: Client) -> None:
    with pytest.raises(SourceError, match="stream NOPE not found"):
        await fetch_history(nc, stream="NOPE", subject="t.a")
