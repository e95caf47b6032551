"""Host probes inside the daemon (SPEC 8): a cell's probe readings become signed, chained
``host.v1.*`` events of that cell, and a probe that hangs holds up nothing else. Also the
agent-silence watchdog against a guest that is SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import msgspec

from audit.verify import verify_chain
from producer.guest.simulator import run_guest
from producer.ops.embedded import EmbeddedNats
from schemas.events import GUEST_TYPE, HOST_TYPE
from tests.probes.kernel import cgroup, tap
from tests.support import (
    cell_spec,
    eventually,
    history,
    running_producer,
    trust_of,
    verified,
)

PROBES = {"interval_s": 0.2, "timeout_s": 0.1}


def _events(payloads: list[bytes]) -> list[dict[str, object]]:
    return sorted((msgspec.json.decode(p) for p in payloads), key=lambda e: str(e["sequence"]))


async def test_probe_readings_become_host_events_of_their_cell_root(
    nats_server: EmbeddedNats,
) -> None:
    with cgroup() as group, tap() as iface:
        async with running_producer(nats_server.url, cells=0, probes=PROBES) as (p, signer, base):
            assert p.registry is not None
            spec = cell_spec(base, 1, cgroup_path=str(group), tap_iface=iface)
            await p.registry.register(spec)

            async def both_published() -> bool:
                types = {e["type"] for e in _events(await history(nats_server.url, "cell-1"))}
                return {HOST_TYPE + "cgroup", HOST_TYPE + "tap_link"} <= types

            await eventually_async(both_published)
            report, events = await verified(nats_server.url, "cell-1", signer)
    assert report.ok, report.problems
    host = [e for e in events if str(e["type"]).startswith(HOST_TYPE)]
    for e in host:
        data = e["data"]
        assert isinstance(data, dict)
        assert data["cellId"] == "cell-1" and e["subject"] == "cell-1"
        assert data["hostReceivedAt"] == e["time"]
    tap_out = next(e["data"]["output"] for e in host if e["type"] == HOST_TYPE + "tap_link")  # type: ignore[index]
    assert tap_out["operstate"] in ("down", "unknown")
    cg = next(e["data"] for e in host if e["type"] == HOST_TYPE + "cgroup")
    assert cg["inputs"]["path"] == str(group)  # type: ignore[index]
    assert "cpu.stat" in cg["output"]  # type: ignore[operator]


async def test_a_hanging_probe_does_not_hold_up_guest_events(nats_server: EmbeddedNats) -> None:
    # A Firecracker API socket that accepts and never answers: every metrics reading of
    # cell-1 hangs until the scheduler cuts it off.
    directory = Path(os.environ.get("TMPDIR", "/tmp"))
    api_path = str(directory / f"cp-hang-{os.getpid()}.sock")
    metrics = directory / f"cp-hang-{os.getpid()}.metrics"
    metrics.write_text("")
    hang = socket.socket(socket.AF_UNIX)
    hang.bind(api_path)
    hang.listen(16)
    try:
        async with running_producer(nats_server.url, cells=0, probes=PROBES) as (p, signer, base):
            assert p.registry is not None and p.probes is not None
            stuck = cell_spec(base, 1, fc_api_socket=api_path, fc_metrics_path=str(metrics))
            await p.registry.register(stuck)
            await p.registry.register(cell_spec(base, 2))
            stats = p.probes.stats

            await eventually(
                lambda: stats()[("cell-1", "fc_metrics")].failures.get("timeout", 0) >= 2
            )
            for cell_id in ("cell-1", "cell-2"):
                cell = p.registry.cells[cell_id]
                await run_guest(cell.socket_path, rate=0, count=50, seed=1)
            for cell_id in ("cell-1", "cell-2"):
                cell = p.registry.cells[cell_id]
                await eventually(lambda cell=cell: cell.counters.accepted == 50)  # type: ignore[misc]
            assert await p.drain(10)
            for cell_id in ("cell-1", "cell-2"):
                report, events = await verified(nats_server.url, cell_id, signer)
                assert report.ok, report.problems
                assert sum(str(e["type"]).startswith(GUEST_TYPE) for e in events) == 50
    finally:
        hang.close()
        os.unlink(api_path)
        metrics.unlink()


async def test_agent_silenced_once_after_the_guest_is_killed(nats_server: EmbeddedNats) -> None:
    async with running_producer(nats_server.url, cells=0, silence={"window_ms": 2000}) as (
        p,
        signer,
        base,
    ):
        assert p.registry is not None
        spec = cell_spec(base, 1)
        # The guest process starts first and retries until the socket exists (as the agent
        # in a booting VM does), so its start-up time cannot pass for silence.
        guest = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "producer", "simulate-guest",
            "--socket", f"{spec.vsock_uds_base}_9001", "--rate", "50",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert guest.stderr is not None
        await guest.stderr.readline()  # "cannot connect ...; retrying": it is running
        cell = await p.registry.register(spec)
        await eventually(lambda: cell.counters.accepted >= 20)
        assert not cell._silenced
        guest.send_signal(signal.SIGKILL)
        await guest.wait()
        last_frame = cell._last_frame_at
        await eventually(lambda: cell._silenced, timeout=15)
        # A guest that comes back does not make it fire again, however long it then waits.
        before = cell.counters.accepted
        await run_guest(cell.socket_path, rate=0, count=5, seed=9)
        await eventually(lambda: cell.counters.accepted == before + 5)
        # Silent again for longer than the window, and the watchdog has looked since.
        await eventually(lambda: time.monotonic() - cell._last_frame_s > 2.5, timeout=15)
        ticks = cell.ticks
        await eventually(lambda: cell.ticks > ticks)
        await p.registry.deregister("cell-1")
        assert await p.drain(10)
        payloads = await history(nats_server.url, "cell-1")
    events = _events(payloads)
    silenced = [e for e in events if e["type"] == GUEST_TYPE + "agent_silenced"]
    assert len(silenced) == 1
    data = silenced[0]["data"]
    assert isinstance(data, dict)
    assert data["windowMs"] == 2000 and data["silentForMs"] > 2000  # strictly after the window
    assert data["lastFrameAt"] == last_frame
    assert verify_chain(payloads, trust_of(signer)).ok


async def eventually_async(cond: object, timeout: float = 20.0) -> None:
    """:func:`eventually` for a condition that must ask the broker."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await cond():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)
