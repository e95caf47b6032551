"""Chains that outlive the process and the broker (SPEC 5.2, 5.3, 7), in-process: a wiped
data dir, a wiped broker, a damaged spool. Subprocess kill tests live in test_crash.py."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from audit.digest import format_sequence
from audit.verify import ChainReport, verify_chain
from producer.chain.signing import Signer, generate_key_file
from producer.ops.config import Config
from producer.ops.daemon import Producer
from producer.ops.embedded import EmbeddedNats
from schemas.events import CHAIN_TYPE, GUEST_TYPE
from tests.support import (
    cell_spec,
    chain_kinds,
    damage_event,
    eventually,
    history,
    make_config,
    recorded_heads,
    run_guest,
    short_dir,
    trust_of,
)


@dataclass
class Setup:
    base: str
    signer: Signer
    config: Config


@contextlib.asynccontextmanager
async def setup(url: str, **sections: Any) -> AsyncIterator[Setup]:
    base = short_dir()
    try:
        signer = generate_key_file(f"{base}/signing.key")
        config = make_config(url, f"{base}/signing.key", (cell_spec(base, 1),), **sections)
        yield Setup(base, signer, config)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.asynccontextmanager
async def producer(s: Setup) -> AsyncIterator[Producer]:
    p = Producer(s.config, signer=s.signer)
    await p.startup()
    try:
        yield p
    finally:
        await p.shutdown()


async def feed(p: Producer, count: int, seed: int) -> None:
    assert p.registry is not None
    cell = p.registry.cells["cell-1"]
    before = cell.counters.accepted
    await run_guest(cell.socket_path, rate=0, count=count, seed=seed)
    await eventually(lambda: cell.counters.accepted == before + count)


def chains_of(payloads: list[bytes]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for payload in payloads:
        event_id = msgspec.json.decode(payload)["id"]
        out.setdefault(event_id.rpartition("-")[0], []).append(payload)
    return out


async def test_a_wiped_data_dir_opens_a_chain_that_supersedes_the_lost_one(
    nats_server: EmbeddedNats,
) -> None:
    async with setup(nats_server.url) as s:
        async with producer(s) as first:
            await feed(first, 20, seed=1)
            assert await first.drain(10)
            assert first.heads is not None and await first.heads.flush(10)
        (old_id,) = chains_of(await history(nats_server.url, "cell-1"))
        recorded = (await recorded_heads(nats_server.url))[f"cell-1.run-1.{old_id}"]

        shutil.rmtree(Path(s.base) / "spool")  # the producer's state is gone

        async with producer(s) as second:
            await feed(second, 5, seed=2)
            assert second.registry is not None
            await second.registry.deregister("cell-1")
            assert await second.drain(10)
        chains = chains_of(await history(nats_server.url, "cell-1"))
        assert set(chains) - {old_id}, "a second chain was opened"
        (new_id,) = set(chains) - {old_id}
        opened = msgspec.json.decode(sorted(chains[new_id])[0])
        trust = trust_of(s.signer)
        reports = {c: verify_chain(p, trust) for c, p in chains.items()}
    first_event = min((msgspec.json.decode(p) for p in chains[new_id]), key=lambda e: e["sequence"])
    assert first_event["type"] == CHAIN_TYPE + "opened"
    assert opened is not None
    assert first_event["data"]["supersedes"] == {
        "chainId": old_id,
        "lastKnownSequence": format_sequence(recorded.sequence),
        "lastKnownDigest": recorded.digest,
        "reason": "state_lost",
    }
    old: ChainReport = reports[old_id]
    new: ChainReport = reports[new_id]
    assert old.ok and not old.sealed, old.problems  # cut short, not tampered
    assert new.ok and new.sealed, new.problems


async def test_a_broker_wiped_under_the_producer_gets_its_stream_back(
    nats_server: EmbeddedNats,
) -> None:
    async with setup(nats_server.url) as s, producer(s) as p:
        await feed(p, 10, seed=1)
        assert await p.drain(10)
        nats_server.kill()
        shutil.rmtree(nats_server.store_dir)  # stream, heads bucket, dedup state: all gone
        await nats_server.restart()
        await feed(p, 10, seed=2)
        assert await p.drain(30)  # the stream was made again and took the events
        assert p.registry is not None
        await p.registry.deregister("cell-1")
        assert await p.drain(10)
        payloads = await history(nats_server.url, "cell-1")
        report = verify_chain(payloads, trust_of(s.signer))
    events = sorted((msgspec.json.decode(x) for x in payloads), key=lambda e: e["sequence"])
    seqs = [int(e["sequence"]) for e in events]
    # What the wiped stream held is gone, and the verifier says so: the retained history
    # starts late, and is contiguous and sealed from there.
    assert seqs[0] > 1 and seqs == list(range(seqs[0], seqs[-1] + 1))
    assert sum(e["type"].startswith(GUEST_TYPE) for e in events) == 10
    assert not report.ok and any("opened" in problem for problem in report.problems)
    assert report.sealed


async def test_a_damaged_spool_is_recovered_and_the_loss_declared(
    nats_server: EmbeddedNats,
) -> None:
    async with setup(nats_server.url, spool={"fsync": "always"}) as s:
        nats_server.kill()  # everything stays in the spool
        async with producer(s) as first:
            await feed(first, 30, seed=1)
        damage_event(Path(s.base) / "spool", 10)

        await nats_server.restart()
        async with producer(s) as second:
            assert second.spool is not None and second.spool.damage
            assert second.registry is not None
            await second.registry.deregister("cell-1")
            assert await second.drain(20)
        payloads = await history(nats_server.url, "cell-1")
        report = verify_chain(payloads, trust_of(s.signer))
        quarantined = list((Path(s.base) / "spool" / "quarantine").iterdir())
    assert quarantined, "the damaged file is kept aside"
    events = sorted((msgspec.json.decode(x) for x in payloads), key=lambda e: e["sequence"])
    gaps = [e for e in events if e["type"] == CHAIN_TYPE + "gap"]
    assert [(g["data"]["reason"], g["data"]["firstLostSequence"]) for g in gaps] == [
        ("spool_damaged", format_sequence(10))
    ]
    assert 10 not in [int(e["sequence"]) for e in events]
    assert report.ok and report.sealed, report.problems  # the hole is declared, so not tampering
    assert chain_kinds(events)[:2] == ["opened", "resumed"]
