"""``cellos-producer spool stats|check --data-dir DIR [--json]`` on real spools: left by a
producer that delivered everything, by one whose broker was down (a backlog), and one with
a flipped bit in a segment. The console script runs as a child process, as an operator
would run it next to (or after) the daemon.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from producer.ops.embedded import EmbeddedNats
from producer.ops.registry import Registry
from tests.support import (
    Result,
    acli,
    damage_event,
    eventually,
    run_guest,
    running_producer,
)

FRAMES = 30
NO_WAIT = {"connect_timeout_s": 0.5}
"""With the broker down, a first start waits twice this for it (to learn what a new chain
supersedes) before it opens the chain."""


async def feed(registry: Registry | None, count: int) -> None:
    assert registry is not None
    cell = registry.cells["cell-1"]
    await run_guest(cell.socket_path, rate=0, count=count, seed=7)
    await eventually(lambda: cell.counters.accepted == count)


async def spool(action: str, data_dir: str, *json_flag: str) -> Result:
    return await acli("spool", action, "--data-dir", data_dir, *json_flag)


def report_of(res: Result) -> dict[str, Any]:
    assert res.rc == 0, res
    report: dict[str, Any] = json.loads(res.out)
    return report


@pytest.mark.timeout(60)
async def test_spool_stats_and_check_of_a_delivered_spool(nats_server: EmbeddedNats) -> None:
    async with running_producer(nats_server.url) as (producer, _, base):
        await feed(producer.registry, FRAMES)
        assert await producer.drain(10)
        await producer.shutdown()
        stats, text, check = (
            await spool("stats", base, "--json"),
            await spool("stats", base),
            await spool("check", base),
        )
    report = report_of(stats)
    assert report["state"] == "ok" and report["clean_stop"] is True
    assert report["unacked"] == 0 and report["backlog_by_cell"] == {}
    assert report["problems"] == [] and report["quarantined"] == []
    (chain,) = report["chains"]
    assert chain["cell_id"] == "cell-1" and chain["sealed"] is False
    assert chain["sequence"] == chain["acked"] >= FRAMES + 1  # opened + the frames
    assert text.rc == 0, text
    assert "state ok, last stop clean" in text.out and "0 event(s) waiting" in text.out, text
    assert check.rc == 0 and "PROBLEM" not in check.out, check


@pytest.mark.timeout(60)
async def test_spool_stats_shows_the_backlog_of_a_broker_outage(
    nats_server: EmbeddedNats,
) -> None:
    nats_server.kill()
    async with running_producer(nats_server.url, nats=NO_WAIT) as (producer, _, base):
        await feed(producer.registry, FRAMES)
        await producer.shutdown()  # nothing could be published: all of it stays
        stats, text, check = (
            await spool("stats", base, "--json"),
            await spool("stats", base),
            await spool("check", base),
        )
    report = report_of(stats)
    (chain,) = report["chains"]
    waiting = chain["sequence"]
    assert waiting >= FRAMES + 1 and chain["acked"] == 0
    assert report["unacked"] == waiting
    assert report["backlog_by_cell"] == {"cell-1": waiting}
    assert report["oldest_unacked_at"] is not None and report["bytes"] > 0
    assert text.rc == 0, text
    assert f"{waiting} event(s) waiting" in text.out, text
    assert f"backlog cell=cell-1 events={waiting}" in text.out, text
    assert check.rc == 0, "a backlog is not damage"


@pytest.mark.timeout(60)
async def test_spool_check_names_the_damage(nats_server: EmbeddedNats) -> None:
    nats_server.kill()
    async with running_producer(nats_server.url, nats=NO_WAIT, spool={"fsync": "always"}) as (
        p,
        _,
        base,
    ):
        await feed(p.registry, FRAMES)
        await p.shutdown()
        segment = damage_event(Path(base) / "spool", 10)
        check, as_json, stats = (
            await spool("check", base),
            await spool("check", base, "--json"),
            await spool("stats", base),
        )
    assert check.rc == 1, check
    problem = re.search(rf"PROBLEM: {segment.name}: (\d+) damaged bytes at offset \d+", check.out)
    assert problem and int(problem[1]) > 0, check
    assert as_json.rc == 1, as_json
    report = json.loads(as_json.out)
    assert report["problems"] and segment.name in report["problems"][0]
    damaged = {s["name"]: s["damaged_bytes"] for s in report["segments"]}
    assert damaged[segment.name] > 0
    assert stats.rc == 0 and "PROBLEM" in stats.out, "stats reports damage, only check fails"
