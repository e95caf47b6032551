"""The consumer library against a real stream: replay from a time or a stream sequence,
following one cell live, typed and SDK views of an event; and the package's promise to
load without the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import pickle
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from audit.consumer import Scope, follow, read_ranges, replay
from audit.errors import AccessDeniedError, ExportFormatError, NotFoundError, SourceError
from audit.events import Received
from audit.pipeline import ReadRange
from audit.source import Broker, ConnectOptions
from producer.guest.simulator import run_guest
from producer.ops.embedded import EmbeddedNats
from schemas.events import ChainOpenedData, GuestData
from tests.support import eventually, running_producer

AUDIT = Path(__file__).resolve().parents[2] / "audit"
CLI = Path(sys.executable).parent / "cellos-audit"


def test_the_audit_package_loads_without_the_daemon() -> None:
    modules = sorted(f"audit.{p.stem}" for p in AUDIT.glob("*.py") if p.stem != "__init__")
    assert "audit.verify" in modules and "audit.consumer" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('producer', 'probes')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


async def _feed(p: object, cell_id: str, count: int, seed: int) -> None:
    cell = p.registry.cells[cell_id]  # type: ignore[attr-defined]
    await run_guest(cell.socket_path, rate=0, count=count, seed=seed)
    await eventually(lambda: cell.counters.accepted >= count)


def _at(ns: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ns // 1000)


async def _consumer_exists(url: str) -> None:
    """Wait until a reader has created its consumer (a follow sees only what comes after)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = asyncio.get_running_loop().time() + 20
        while (await js.stream_info("CELLOS_TELEMETRY")).state.consumer_count < 1:
            assert asyncio.get_running_loop().time() < deadline, "no consumer appeared"
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def test_replay_from_a_time_and_from_a_stream_sequence(nats_server: EmbeddedNats) -> None:
    async with running_producer(nats_server.url, cells=2) as (p, _, _):
        await _feed(p, "cell-1", 10, 1)
        assert await p.drain(10)
        async with await Broker.connect(ConnectOptions(url=nats_server.url)) as broker:
            everything = [m async for m in replay(broker, Scope(cell="cell-1"))]
            assert len(everything) == 11  # opened + 10 guest events
            middle = everything[5]
            assert middle.stream_seq is not None and middle.stored_ns is not None
            by_seq = [
                m async for m in replay(broker, Scope(cell="cell-1"), from_seq=middle.stream_seq)
            ]
            assert by_seq == everything[5:]
            since = _at(middle.stored_ns)  # floored to the microsecond a datetime holds
            by_time = [m async for m in replay(broker, Scope(cell="cell-1"), since=since)]
            assert len(by_time) >= len(everything) - 5
            assert by_time == everything[len(everything) - len(by_time) :]
            until = _at(everything[3].stored_ns + 1000)  # type: ignore[operator]
            upto = [m async for m in replay(broker, Scope(cell="cell-1"), until=until)]
            assert len(upto) >= 4 and upto == everything[: len(upto)]
            assert all(m.stored_ns <= everything[3].stored_ns + 1000 for m in upto)  # type: ignore[operator]
            assert [m async for m in replay(broker, Scope(cell="nosuch"))] == []


async def test_typed_and_sdk_views_of_an_event(nats_server: EmbeddedNats) -> None:
    async with running_producer(nats_server.url, nats={"mode": "binary"}) as (p, _, _):
        await _feed(p, "cell-1", 1, 3)
        assert await p.drain(10)
        async with await Broker.connect(ConnectOptions(url=nats_server.url)) as broker:
            opened, guest = [m async for m in replay(broker, Scope(cell="cell-1"))]
    typed = guest.event()
    assert isinstance(typed.data, GuestData) and typed.data.cell_id == "cell-1"
    assert isinstance(opened.event().data, ChainOpenedData)
    sdk = guest.cloudevent()
    assert sdk.get_id() == typed.envelope.id and sdk.get_type() == typed.envelope.type
    assert sdk.get_data()["guestPid"] == typed.data.guest_pid  # type: ignore[index]
    # binary-mode messages arrive rebuilt into the structured event
    assert json.loads(guest.raw)["data"]["cellId"] == "cell-1"


async def test_follow_sees_one_cells_new_events_only(nats_server: EmbeddedNats) -> None:
    async with running_producer(nats_server.url, cells=2) as (p, _, _):
        await _feed(p, "cell-1", 3, 1)  # stored before the follow starts: not shown
        assert await p.drain(10)
        async with await Broker.connect(ConnectOptions(url=nats_server.url)) as broker:
            seen: list[Received] = []

            async def watch() -> None:
                async for m in follow(broker, Scope(cell="cell-2")):
                    seen.append(m)

            task = asyncio.create_task(watch())
            try:
                await _consumer_exists(nats_server.url)
                await asyncio.gather(_feed(p, "cell-1", 6, 4), _feed(p, "cell-2", 5, 5))
                await eventually(lambda: len(seen) >= 5)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    assert {m.subject.split(".")[2] for m in seen} == {"cell-2"}  # type: ignore[union-attr]
    assert len(seen) == 5


@pytest.mark.timeout(60)
async def test_tail_cli_prints_one_cells_events(nats_server: EmbeddedNats) -> None:
    async with running_producer(nats_server.url, cells=2) as (p, _, _):
        proc = await asyncio.create_subprocess_exec(
            str(CLI), "tail", "--nats-url", nats_server.url, "--cell", "cell-1", "--json",
            "--type", "guest.*", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await _consumer_exists(nats_server.url)
            lines: list[bytes] = []
            feeding = asyncio.gather(_feed(p, "cell-1", 4, 1), _feed(p, "cell-2", 4, 2))
            while len(lines) < 4:
                assert proc.stdout is not None
                lines.append(await asyncio.wait_for(proc.stdout.readline(), 20))
            await feeding
        finally:
            proc.terminate()
            await proc.wait()
    events = [json.loads(line) for line in lines]
    assert {e["subject"] for e in events} == {"cell-1"}
    assert all(".guest.v1." in e["type"] for e in events)


@pytest.mark.timeout(90)
async def test_cli_replay_jsonl_and_export_verify_offline(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    from audit.keys import merge_trust

    async with running_producer(nats_server.url, cells=2) as (p, signer, _):
        await _feed(p, "cell-1", 5, 1)
        assert p.registry is not None and p.publisher is not None and p.heads is not None
        await p.registry.deregister("cell-1")
        assert await p.drain(10) and await p.heads.flush(10)
        trust = tmp_path / "trust.json"
        merge_trust(trust, signer.kid, signer.public_raw)
        url = ("--nats-url", nats_server.url)
        out = tmp_path / "cell-1.jsonl"
        replayed = await _run(CLI, "replay", *url, "--cell", "cell-1", "--format", "jsonl")
        exported = await _run(CLI, "export", *url, "--cell", "cell-1", "--out", str(out))
    assert exported.endswith("wrote 7 event(s) to " + str(out) + "\n")
    events = [line for line in out.read_bytes().splitlines() if not line.startswith(b'{"cellos')]
    assert replayed.encode().splitlines() == events and len(events) == 7
    verdict = await _run(CLI, "verify", "--jsonl", str(out), "--trust", str(trust))
    assert verdict.splitlines()[0].startswith("OK   cell=cell-1 ") and verdict.splitlines()[
        0
    ].endswith(" sealed")
    bare = tmp_path / "bare.jsonl"  # events only: a sealed chain needs no recorded head
    bare.write_text(replayed)
    assert "1 verified, 0 failed" in await _run(
        CLI, "verify", "--jsonl", str(bare), "--trust", str(trust)
    )


async def _run(*args: object) -> str:
    proc = await asyncio.create_subprocess_exec(
        *map(str, args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (args, out, err)
    return (out + err).decode()


@pytest.mark.parametrize(
    ("first", "last", "messages", "chunk"),
    [(1, 100, 100, 7), (5, 5, 1, 4096), (1, 1000, 10, 3), (40, 60, 21, 21), (1, 9, 9, 100)],
)
def test_read_ranges_cover_the_stream_once_in_order_then_stay_open(
    first: int, last: int, messages: int, chunk: int
) -> None:
    spans = list(read_ranges(first, last, messages, chunk))
    assert spans[0].first == first and spans[-1] == ReadRange(last + 1, None)
    for before, after in itertools.pairwise(spans):
        assert before.last is not None and after.first == before.last + 1
    per_range = max(1, (last - first + 1) * chunk // messages)
    assert all(s.last is not None and s.last - s.first + 1 <= per_range for s in spans[:-1])
    assert len(spans) - 1 == -(-(last - first + 1) // per_range)


def test_an_empty_stream_is_one_open_range() -> None:
    assert list(read_ranges(0, 0, 0, 4096)) == [ReadRange(1, None)]
    assert list(read_ranges(12, 11, 0, 4096)) == [ReadRange(12, None)]


@pytest.mark.parametrize(
    "error",
    [
        AccessDeniedError("cellos.telemetry.cell-2.>", "read cellos.telemetry.cell-2.>"),
        NotFoundError("stream", "NOPE"),
        SourceError("the server stopped answering"),
        ExportFormatError("x.jsonl", 3, "not JSON"),
    ],
)
def test_errors_cross_from_a_worker_process_with_their_type_and_fields(
    error: SourceError,
) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert vars(back) == vars(error)
