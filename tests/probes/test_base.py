"""What every probe shares: error fields for logs, and blocking reads kept off the loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from probes.base import BlockingReader, Io, Parse, ProbeReading
from tests.probes.kernel import until


def test_errors_carry_their_fields() -> None:
    error = Io("nftables", "no such table", command="list table inet t", returncode=-1)
    assert error.fields() == {
        "probe": "nftables",
        "reason": "no such table",
        "command": "list table inet t",
        "returncode": -1,
    }
    assert str(Parse("cgroup", "bad", path="/x")) == "probe cgroup (/x): bad"


def test_probe_source_is_the_spec_name() -> None:
    assert ProbeReading("tap_link", {}, {}).probe_source == "host.tap_link"


async def test_a_stuck_blocking_read_holds_one_worker_not_more() -> None:
    release = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        reader = BlockingReader("cgroup", pool)
        stuck = asyncio.ensure_future(reader.run(release.wait))
        await asyncio.sleep(0)
        stuck.cancel()  # what the scheduler's timeout does
        with pytest.raises(asyncio.CancelledError):
            await stuck
        # The thread is still inside the "kernel": the next reading fails fast.
        with pytest.raises(Io, match="previous reading"):
            await reader.run(lambda: 1)
        release.set()

        async def free_again() -> bool:
            try:
                return await reader.run(lambda: 2) == 2
            except Io:
                return False

        await until(free_again, "the stuck read to return")
