"""Metrics and health over real HTTP: the numbers a scrape returns are what happened."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from producer.guest.simulator import run_guest
from producer.ops.daemon import Producer
from producer.ops.embedded import EmbeddedNats
from producer.stats import Histogram
from tests.support import eventually, running_producer, send_stream

SMALL_SPOOL = {"max_bytes": 256 * 1024, "segment_bytes": 64 * 1024}


async def scrape(p: Producer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert p.metrics_address is not None
    host, port = p.metrics_address
    async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def get(p: Producer, path: str) -> tuple[int, Any]:
    assert p.metrics_address is not None
    host, port = p.metrics_address
    async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}{path}") as r:
        return r.status, await r.json()


async def test_a_scrape_reports_what_happened(nats_server: EmbeddedNats) -> None:
    async with running_producer(nats_server.url, cells=2) as (p, _, _base):
        assert p.registry is not None
        one, two = p.registry.cells["cell-1"], p.registry.cells["cell-2"]
        await run_guest(one.socket_path, rate=0, count=30, seed=1)
        await asyncio.to_thread(
            send_stream, two.socket_path, (9000).to_bytes(4, "little"), half_close=False
        )
        await eventually(lambda: one.counters.accepted == 30 and two.counters.rejected)
        assert await p.drain(10)
        m = await scrape(p)
    assert m[("cellos_producer_cells", ())] == 2
    assert m[("cellos_producer_frames_accepted_total", (("cell", "cell-1"),))] == 30
    assert m[("cellos_producer_frames_accepted_total", (("cell", "cell-2"),))] == 0
    rejected = (("cell", "cell-2"), ("reason", "FrameTooLarge"))
    assert m[("cellos_producer_frames_rejected_total", rejected)] == 1
    guest = sum(
        v for (name, labels), v in m.items()
        if name == "cellos_producer_events_total" and ("family", "guest") in labels
    )  # fmt: skip
    assert guest == 30
    assert m[("cellos_producer_events_total", (("family", "chain"), ("type", "opened")))] == 2
    acked = m[("cellos_producer_publish_acked_total", ())]
    assert acked == 32  # 30 guest events and two opened
    assert m[("cellos_producer_publish_latency_seconds_count", ())] == acked
    assert m[("cellos_producer_publish_latency_seconds_bucket", (("le", "+Inf"),))] == acked
    assert m[("cellos_producer_broker_connected", ())] == 1
    assert m[("cellos_producer_spool_events", ())] == 0
    assert m[("cellos_producer_chains_open", ())] == 2
    assert m[("cellos_producer_build_info", (("version", __import__("producer").__version__),))]


async def test_cell_labels_are_bounded(nats_server: EmbeddedNats) -> None:
    async with running_producer(nats_server.url, cells=3, metrics={"max_cell_labels": 2}) as (
        p,
        _,
        _base,
    ):
        assert p.registry is not None
        await run_guest(p.registry.cells["cell-3"].socket_path, rate=0, count=4, seed=1)
        await eventually(lambda: p.registry.cells["cell-3"].counters.accepted == 4)  # type: ignore[union-attr]
        m = await scrape(p)
    cells = {
        dict(labels)["cell"]
        for name, labels in m
        if name == "cellos_producer_frames_accepted_total"
    }
    assert cells == {"cell-1", "cell-2", "_other"}
    assert m[("cellos_producer_frames_accepted_total", (("cell", "_other"),))] == 4


async def test_readiness_follows_the_broker_and_the_spool(nats_server: EmbeddedNats) -> None:
    async with running_producer(nats_server.url, spool=SMALL_SPOOL) as (p, _, _base):
        assert p.registry is not None and p.spool is not None
        cell = p.registry.cells["cell-1"]
        assert await p.drain(10)
        assert (await get(p, "/healthz")) == (200, {"alive": True})
        status, body = await get(p, "/readyz")
        assert status == 200 and body["ready"] is True, body
        nats_server.kill()
        guest = asyncio.create_task(run_guest(cell.socket_path, rate=0, count=3000, seed=2))
        spool, publisher = p.spool, p.publisher
        assert publisher is not None
        await eventually(
            lambda: not publisher.connected and spool.live_bytes() >= spool.opts.max_bytes // 2,
            timeout=30,
        )
        status, body = await get(p, "/readyz")
        assert status == 503 and body["checks"]["broker_or_spool_headroom"] is False, body
        assert (await get(p, "/healthz"))[0] == 200  # alive all along
        await nats_server.restart()
        await guest
        assert await p.drain(30)
        status, body = await get(p, "/readyz")
        assert status == 200, body


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram([0.1, 1.0])
    for value in (0.05, 0.1, 0.5, 7.0):
        h.observe(value)
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert h.count == 4 and h.total == 7.65


async def test_exported_names_are_the_ones_dashboards_and_alerts_use(
    nats_server: EmbeddedNats,
) -> None:
    from tests.deploy.test_deploy import METRICS

    async with running_producer(nats_server.url) as (p, _, _base):
        assert p.metrics_address is not None
        host, port = p.metrics_address
        async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}/metrics") as r:
            text = await r.text()
    names = {
        f.name + "_total" if f.type == "counter" else f.name
        for f in text_string_to_metric_families(text)
    }
    assert names == METRICS, (names - METRICS, METRICS - names)
