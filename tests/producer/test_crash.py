"""The producer process killed under load and started again with the same config (SPEC 7).

``python -m producer run --config FILE`` runs as a child process; numbered guests
(tests/support.py) send steadily to every cell through all of it, reconnecting whenever
the producer goes away. At random moments under load the producer gets a real signal and
is started again. What a guest sent is checked against the stream per connection: the
frames stored are exactly the first ones sent, in order, each once; frames still in the
kernel's socket buffer at a stop were never read (by design the guest's to count), but
every frame the producer had read must be there. ``SIGTERM`` spools everything read;
``SIGKILL`` can only lose what the process held in memory at that instant, at most one
read per connection. Each cell keeps one chain, continued by one ``resumed`` per restart.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from producer.chain.signing import generate_key_file
from producer.guest.listener import READ_SIZE
from producer.guest.wire import encode_frame
from producer.ops.config import socket_path
from producer.ops.embedded import EmbeddedNats
from schemas.wire import Declaration
from tests.support import (
    SOAK,
    Connection,
    Daemon,
    NumberedGuest,
    acli,
    cell_spec,
    chain_kinds,
    config_raw,
    delivered_chains,
    guest_counts,
    guest_frames,
    recorded_heads,
    short_dir,
    stored,
    trust_of,
    wait_for_guest_events,
)

MODULE = (sys.executable, "-m", "producer")
SHORT = pytest.mark.timeout(300)
PROGRESS = 50
"""Guest events every cell must add to the stream after a start before the next signal."""
COMM = "x" * 1000
"""A long ``guest_comm``: frames of about 1 KiB, so one read holds few of them."""
SMALLEST_FRAME = len(encode_frame(Declaration(1, "process.exited", 1, COMM, 0)))
ONE_READ = READ_SIZE // SMALLEST_FRAME + 1
"""The most frames one read from a connection can complete: all a SIGKILL may catch in
the producer's hands (read, not yet written to the spool)."""


def toml_of(raw: Mapping[str, Any]) -> str:
    """TOML for a config: top-level values, then tables, then arrays of tables."""
    top, tables, arrays = [], [], []
    for key, value in raw.items():
        if isinstance(value, dict):
            tables.append(f"[{key}]\n{_assignments(value)}")
        elif isinstance(value, list):
            arrays.extend(f"[[{key}]]\n{_assignments(item)}" for item in value)
        else:
            top.append(f"{key} = {_toml_value(value)}\n")
    return "".join(top) + "".join(tables) + "".join(arrays)


def _assignments(table: Mapping[str, Any]) -> str:
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items() if v is not None)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string for the ASCII values used here


@pytest.fixture
def base() -> Iterator[str]:
    path = short_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_connection(conn: Connection, got: list[int], slack: int) -> None:
    """Frames stored from one connection: exactly the first ones sent, in order, each once,
    and at least those the producer had read when it was stopped (less ``slack``)."""
    assert got == list(range(len(got))), f"connection {conn.number}: not a prefix: {got[:20]}"
    assert len(got) <= conn.frames_accepted()
    floor = conn.read_floor
    if floor is not None:
        assert len(got) >= floor - slack, f"connection {conn.number}: frames read, not stored"


async def progress(daemon: Daemon, url: str, wanted: dict[str, int]) -> None:
    """Until the stream holds ``wanted`` guest events per cell (the daemon's log if not)."""
    try:
        await wait_for_guest_events(url, wanted, timeout=120)
    except AssertionError as exc:
        tail = "\n".join(daemon.stderr.splitlines()[-40:])
        pytest.fail(f"{exc}; daemon {daemon.proc.pid} rc {daemon.proc.returncode}:\n{tail}")


# The load stays within what the producer sustains on a busy 2-core machine (about 1,200
# frames/s of 1 KiB): beyond it the backlog grows without bound and every restart spends
# longer settling it than the test waits.
@pytest.mark.parametrize(
    ("sig", "restarts", "cells", "rate", "linger_s"),
    [
        pytest.param(signal.SIGKILL, 5, 4, 300.0, 1.0, id="SIGKILL", marks=SHORT),
        pytest.param(signal.SIGTERM, 5, 4, 300.0, 1.0, id="SIGTERM", marks=SHORT),
        pytest.param(signal.SIGKILL, 12, 8, 150.0, 5.0, id="SIGKILL-soak", marks=SOAK),
        pytest.param(signal.SIGTERM, 12, 8, 150.0, 5.0, id="SIGTERM-soak", marks=SOAK),
    ],
)
async def test_b_restarts_under_load_lose_nothing_read_and_continue_every_chain(
    *,
    nats_server: EmbeddedNats,
    start_daemon: Any,
    tmp_path: Path,
    base: str,
    sig: signal.Signals,
    restarts: int,
    cells: int,
    rate: float,
    linger_s: float,
) -> None:
    seed = random.randrange(1 << 32)
    print(f"random seed {seed}")  # shown with a failure, to replay the same moments
    rng = random.Random(seed)
    url = nats_server.url
    signer = generate_key_file(f"{base}/signing.key")
    specs = tuple(cell_spec(base, i) for i in range(1, cells + 1))
    config = tmp_path / "producer.toml"
    config.write_text(toml_of(config_raw(url, f"{base}/signing.key", specs)))
    guests = {s.cell_id: NumberedGuest(socket_path(s), rate=rate, comm=COMM) for s in specs}
    for guest in guests.values():
        guest.start()
    try:
        daemon: Daemon = await start_daemon(config, entry=MODULE)
        counts = dict.fromkeys(guests, 0)
        for _ in range(restarts):
            wanted = {c: n + PROGRESS for c, n in counts.items()}
            await progress(daemon, url, wanted)
            await asyncio.sleep(rng.uniform(0, linger_s))  # a random moment under load
            for guest in guests.values():
                guest.mark_read()
            rc = await daemon.stop(sig, limit_s=60)
            assert rc == (0 if sig == signal.SIGTERM else -signal.SIGKILL), daemon.describe()
            counts = await guest_counts(url)
            daemon = await start_daemon(config, entry=MODULE)
        await progress(daemon, url, {c: n + PROGRESS for c, n in counts.items()})

        # The end: the guests fall quiet, the producer reads every byte, an orderly stop
        # publishes everything (nothing may be left in the spool).
        for guest in guests.values():
            await guest.read_out()
            guest.mark_read()
        rc = await daemon.stop(signal.SIGTERM, limit_s=60)
        assert rc == 0, daemon.describe()
        stops = [e for e in daemon.log_events() if e.get("event") == "producer_stopped"]
        assert stops and stops[-1]["drained"] is True, daemon.describe()
    finally:
        for guest in guests.values():
            await guest.stop()

    spool = await acli("spool", "stats", "--data-dir", base, "--json")
    assert spool.rc == 0, spool
    assert json.loads(spool.out)["unacked"] == 0, spool

    chains = delivered_chains(await stored(url), trust_of(signer), heads=await recorded_heads(url))
    assert sorted(chains) == sorted(guests)
    for cell_id, events in chains.items():
        # No gap even after SIGKILL: a write the kill cut short is cut off the spool at the
        # restart, and nothing in it had been published (the spool tests cover it exactly).
        kinds = [k for k in chain_kinds(events) if k != "checkpoint"]
        assert kinds == ["opened"] + ["resumed"] * restarts, (cell_id, kinds)
        resumed = [e["data"] for e in events if e["type"].endswith(".resumed")]
        assert all(r["clean"] is (sig == signal.SIGTERM) for r in resumed), resumed
        frames = guest_frames(events)
        guest = guests[cell_id]
        assert set(frames) <= {c.number for c in guest.connections}
        slack = 0 if sig == signal.SIGTERM else ONE_READ
        for conn in guest.connections:
            check_connection(conn, frames.get(conn.number, []), slack)
        last = guest.connections[-1]
        assert len(frames[last.number]) == last.frames_accepted(), "all read before the end"
