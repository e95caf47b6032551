"""The broker goes away under load, and nothing is lost or stored twice (SPEC 6, 7).

Real nats-server processes and real guests (numbered frames over the cells' sockets); the
producer runs in-process so the test can watch its spool. Each scenario ends the same way:
the guests stop, every cell is sealed, every event is acknowledged, and then the stream
itself is read back: each ``Nats-Msg-Id`` exactly once, one verified chain per cell, and
every frame every guest sent in it once, in order.

- a: the broker is killed for a while and restarted on the same store;
- c: the stream is replicated on three clustered servers and its leader is killed;
- e: the broker stays up but its replies (PubAcks) are swallowed for longer than the
  stream's duplicate window, so re-sent events would be stored twice without the
  publisher's stored-check; a control run without it shows that they are.
"""

from __future__ import annotations

import asyncio
import shutil
from types import TracebackType
from typing import Self

import nats
import pytest

from producer.chain.signing import generate_key_file
from producer.delivery.publisher import OutMsg, Publisher
from producer.guest.simulator import run_guest
from producer.ops.daemon import Producer
from producer.ops.embedded import EmbeddedNats
from schemas.events import GUEST_TYPE
from tests.support import (
    GUEST_RATE,
    SOAK,
    STREAM,
    Stored,
    all_delivered,
    at_least,
    cell_spec,
    delivered_chains,
    eventually,
    guest_counts,
    loaded,
    make_config,
    settle,
    short_dir,
    stored,
    trust_of,
    wait_for_guest_events,
)

# -- a: the broker killed for a while -------------------------------------------------------


@pytest.mark.parametrize(
    "outage_s",
    [
        pytest.param(3.0, id="3s", marks=pytest.mark.timeout(180)),
        pytest.param(30.0, id="30s", marks=SOAK),
    ],
)
async def test_a_broker_killed_under_load_loses_and_doubles_nothing(
    nats_server: EmbeddedNats, outage_s: float
) -> None:
    url = nats_server.url
    # A publish window far smaller than the outage's backlog: most of it waits on disk and
    # is fed back from the spool's segments after the broker returns.
    async with loaded(url, cells=8, queue={"max_events": 256}) as load:
        spool = load.producer.spool
        assert spool is not None
        await wait_for_guest_events(url, dict.fromkeys(load.guests, 20), timeout=30)

        nats_server.kill()
        sent = {c: g.sent() for c, g in load.guests.items()}
        await eventually(
            lambda: all(
                g.sent() >= sent[c] + GUEST_RATE * outage_s for c, g in load.guests.items()
            ),
            timeout=10 * outage_s + 30,
        )
        assert spool.stats.spills > 0, "the outage's backlog should outgrow the window"
        await nats_server.start()

        await all_delivered(load, url)


# -- c: the stream leader of a three-server cluster killed --------------------------------


async def stream_leader(url: str) -> tuple[str, int]:
    """The server leading the stream, and how many replicas it has."""
    nc = await nats.connect(url.split(","), connect_timeout=2, allow_reconnect=False)
    try:
        info = await nc.jetstream(timeout=5).stream_info(STREAM)
    finally:
        await nc.close()
    assert info.cluster is not None and info.cluster.leader
    return info.cluster.leader, info.config.num_replicas or 1


@pytest.mark.parametrize(
    "kills",
    [
        pytest.param(1, id="once", marks=pytest.mark.timeout(240)),
        pytest.param(4, id="4x", marks=SOAK),
    ],
)
async def test_c_stream_leader_killed_under_load_loses_and_doubles_nothing(
    nats_cluster: list[EmbeddedNats], kills: int
) -> None:
    url = ",".join(s.url for s in nats_cluster)
    async with loaded(url, cells=4, nats={"stream_replicas": 3}) as load:
        await wait_for_guest_events(url, dict.fromkeys(load.guests, 20), timeout=60)
        for kill in range(kills):
            leader, replicas = await stream_leader(url)
            assert replicas == 3, "nats.stream_replicas = 3 makes an R3 stream"
            (victim,) = [s for s in nats_cluster if s.name == leader]
            others = ",".join(s.url for s in nats_cluster if s is not victim)
            before = await guest_counts(others)
            victim.kill()
            # A new leader takes the stream and the events keep coming in.
            await wait_for_guest_events(others, at_least(before, int(GUEST_RATE)), timeout=60)
            if kill < kills - 1:
                await victim.start()
        survivors = ",".join(s.url for s in nats_cluster if s.running)
        await all_delivered(load, survivors)


# -- e: PubAcks lost for longer than the duplicate window ---------------------------------

WINDOW_S = 2.0
"""The stream's duplicate window. The outage lasts several: long enough that the broker
has forgotten the ids of the first events sent into the blackhole before any of them can
be acknowledged (it purges ids older than the window)."""


class Blackhole:
    """A TCP proxy between the producer and NATS that, while ``dropping``, still forwards
    everything the client sends (so publishes are stored) but swallows what the server
    sends back (so their PubAcks are lost), without breaking the connection."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.dropping = False
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        for task in (
            asyncio.create_task(self._pump(client_r, server_w, droppable=False)),
            asyncio.create_task(self._pump(server_r, client_w, droppable=True)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, droppable: bool
    ) -> None:
        try:
            while data := await src.read(65536):
                if droppable and self.dropping:
                    self.dropped += len(data)
                    continue
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()


def never_check(_: Publisher, __: OutMsg) -> bool:
    return False


@pytest.mark.parametrize("guarded", [True, False], ids=["stored-check", "control-without-it"])
@pytest.mark.parametrize(
    ("windows", "cells"),
    [
        pytest.param(4, 2, id="4-windows", marks=pytest.mark.timeout(120)),
        pytest.param(15, 4, id="15-windows", marks=SOAK),
    ],
)
async def test_e_pubacks_lost_past_the_duplicate_window_store_nothing_twice(
    nats_server: EmbeddedNats,
    monkeypatch: pytest.MonkeyPatch,
    guarded: bool,
    windows: int,
    cells: int,
) -> None:
    if not guarded:
        # The control: the same outage without the stored-check must store events twice,
        # or this test would not be guarding anything.
        monkeypatch.setattr(Publisher, "_needs_check", never_check)
    nats_cfg = {"duplicate_window_s": WINDOW_S, "ack_timeout_s": 0.5}
    async with (
        Blackhole(nats_server.port) as proxy,
        loaded(proxy.url, cells=cells, nats=nats_cfg) as load,
    ):
        publisher = load.producer.publisher
        assert publisher is not None
        await wait_for_guest_events(nats_server.url, dict.fromkeys(load.guests, 20), timeout=30)

        proxy.dropping = True
        before = await guest_counts(nats_server.url)
        timeouts = publisher.stats.timeouts
        # The outage itself: this long, while the guests keep sending.
        await asyncio.sleep(windows * WINDOW_S)
        assert proxy.dropped > 0 and publisher.stats.timeouts > timeouts, "PubAcks were lost"
        after = await guest_counts(nats_server.url)  # straight from the broker
        assert all(after[c] > before[c] for c in before), "publishes were stored meanwhile"
        proxy.dropping = False

        if guarded:
            await all_delivered(load, nats_server.url)
        else:
            await settle(load)
            found: Stored = await stored(nats_server.url)
            doubled = [i for i, n in found.ids.items() if n > 1]
            assert doubled, "without the stored-check, re-sent events were stored twice"


CANARY = "canary"


async def until_ids_forgotten(url: str, timeout: float = 30.0) -> None:
    """Until the broker has forgotten every ``Nats-Msg-Id`` stored so far: a canary stored
    now is taken as new again once its duplicate window has passed (the window forgets
    ids oldest first). The stream denies purges, so readers drop the canary themselves."""
    subject = f"cellos.telemetry.{CANARY}"
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.publish(subject, b"", headers={"Nats-Msg-Id": "canary"})

        async def forgotten() -> bool:
            ack = await js.publish(subject, b"", headers={"Nats-Msg-Id": "canary"})
            return not ack.duplicate

        await eventually(forgotten, timeout=timeout)
    finally:
        await nc.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("guarded", [True, False], ids=["stored-check", "control-without-it"])
async def test_e_a_restart_past_the_window_after_lost_pubacks_stores_nothing_twice(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch, guarded: bool
) -> None:
    # A run whose PubAcks are swallowed stops with its events stored but unacknowledged;
    # the next run starts once the broker has forgotten their ids. It cannot tell which
    # the stream has, so it must ask before sending any of them again.
    if not guarded:
        monkeypatch.setattr(Publisher, "_needs_check", never_check)
    base = short_dir()
    key = f"{base}/signing.key"
    signer = generate_key_file(key)
    nats_cfg = {"duplicate_window_s": WINDOW_S, "ack_timeout_s": 0.5}
    try:
        async with Blackhole(nats_server.port) as proxy:
            config = make_config(proxy.url, key, (cell_spec(base, 1),), nats=nats_cfg)
            first = Producer(config, signer=signer)
            await first.startup()
            assert await first.drain(30)  # `opened` is acknowledged: the broker is ready
            proxy.dropping = True
            assert first.registry is not None
            await run_guest(first.registry.cells["cell-1"].socket_path, rate=0, count=40, seed=3)
            await wait_for_guest_events(nats_server.url, {"cell-1": 40}, timeout=30)
            assert not await first.shutdown(grace_s=0.5)  # stopped with nothing acknowledged
        await until_ids_forgotten(nats_server.url)

        # The cell is gone from the config, so the second run seals its chain at startup.
        second = Producer(make_config(nats_server.url, key, (), nats=nats_cfg), signer=signer)
        await second.startup()
        try:
            assert await second.drain(30)
        finally:
            await second.shutdown()
        found = await stored(nats_server.url)
        del found.by_cell[CANARY], found.ids[CANARY]
        if guarded:
            (events,) = delivered_chains(found, trust_of(signer)).values()
            assert sum(e["type"].startswith(GUEST_TYPE) for e in events) == 40
        else:
            assert any(n > 1 for n in found.ids.values()), "re-sent events were stored twice"
    finally:
        shutil.rmtree(base, ignore_errors=True)
