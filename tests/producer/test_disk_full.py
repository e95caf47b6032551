"""The spool's disk fills up while the broker is down (SPEC 7): readers pause, nothing
crashes, the log says why, and when the broker returns and acknowledged segments are
deleted, reading resumes and every frame read reaches the stream once.

The spool lives on a 4 MiB tmpfs the test mounts (root needed, hence the names). Two
ways to run out: the free-space floor (``spool.min_free_bytes``) is crossed first, or
there is no floor and a write fails with ENOSPC.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.delivery.spool import segment_indexes
from producer.ops.embedded import EmbeddedNats
from tests.support import SOAK, Load, all_delivered, eventually, loaded, wait_for_guest_events

SIZE = 4 << 20
RATE = 1000.0
"""Frames a second per guest: fills the tmpfs in seconds."""


@contextlib.contextmanager
def tmpfs(size: int) -> Iterator[str]:
    """A size-limited tmpfs, unmounted (and its mount point removed) whatever happens."""
    where = tempfile.mkdtemp(prefix="cpfs", dir="/tmp")
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", where],
            check=True,
            capture_output=True,
        )
        try:
            yield where
        finally:
            done = subprocess.run(["umount", where], check=False, capture_output=True)
            if done.returncode:  # still busy: detach it now, the kernel frees it when idle
                subprocess.run(["umount", "--lazy", where], check=True, capture_output=True)
    finally:
        os.rmdir(where)


def logged(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == name]


@pytest.mark.parametrize(
    ("floor", "first_line"),
    [(True, "spool_disk_low"), (False, "spool_write_failed")],
    ids=["free-space-floor", "ENOSPC"],
)
@pytest.mark.parametrize(
    "size",
    [
        pytest.param(SIZE, id="4MiB", marks=pytest.mark.timeout(120)),
        pytest.param(8 * SIZE, id="32MiB", marks=SOAK),
    ],
)
async def test_f_a_full_spool_disk_pauses_readers_and_recovers_as_root(
    nats_server: EmbeddedNats,
    caplog: pytest.LogCaptureFixture,
    floor: bool,
    first_line: str,
    size: int,
) -> None:
    caplog.set_level(logging.INFO, logger="producer")
    url = nats_server.url
    with tmpfs(size) as disk:
        spool_cfg = {"min_free_bytes": size // 2 if floor else 0, "segment_bytes": 64 << 10}
        async with loaded(url, cells=2, rate=RATE, data_dir=disk, spool=spool_cfg) as load:
            await wait_for_guest_events(url, dict.fromkeys(load.guests, 20), timeout=30)
            nats_server.kill()
            await fill_up(load, first_line, caplog)
            if not floor:
                take_what_is_left(disk)
            await nats_server.start()
            await recover(load, Path(disk) / "spool")
            await all_delivered(load, url)
        assert load.producer.fatal is None


async def fill_up(load: Load, first_line: str, caplog: pytest.LogCaptureFixture) -> None:
    """Until the spool says it is full and every cell has stopped reading; then the guests'
    frames wait in their sockets and nothing grows."""
    spool, registry = load.producer.spool, load.producer.registry
    assert spool is not None and registry is not None
    cells = registry.cells.values()
    await eventually(
        lambda: not spool.has_space() and all(c.listener.paused for c in cells), timeout=60
    )
    if first_line == "spool_write_failed":
        # The write is retried every second; saying so once is enough, and readers stay
        # paused between retries rather than flapping.
        await eventually(lambda: spool.stats.write_errors >= 3, timeout=30)
    (line,) = logged(caplog, first_line)
    assert line.levelno == logging.ERROR
    if first_line == "spool_write_failed":
        assert line.fields["errno"] == errno.errorcode[errno.ENOSPC]  # type: ignore[attr-defined]
    assert len(logged(caplog, "spool_full")) == 1, "the full spool is logged, once"
    # The guests are held back by the kernel, not dropped: their frames wait unread.
    await eventually(lambda: all(g.unread_bytes() > 0 for g in load.guests.values()), 30)


def take_what_is_left(disk: str) -> None:
    """Fill the last free bytes of ``disk``, as another process on a full disk would: the
    spool must still manage to record its state and delete what the broker acknowledged."""
    fd = os.open(os.path.join(disk, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, bytes(4096))
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


async def recover(load: Load, spool_dir: Path) -> None:
    """The broker is back: acknowledged segments are deleted, space returns, reading
    resumes and the guests get ahead again."""
    spool, registry = load.producer.spool, load.producer.registry
    assert spool is not None and registry is not None
    full = set(segment_indexes(str(spool_dir)))
    await eventually(
        lambda: spool.has_space() and not any(c.listener.paused for c in registry.cells.values()),
        timeout=60,
    )
    sent = {c: g.sent() for c, g in load.guests.items()}
    await eventually(
        lambda: all(g.sent() > sent[c] + RATE for c, g in load.guests.items()), timeout=30
    )
    await eventually(lambda: not full & set(segment_indexes(str(spool_dir))), timeout=30)
