"""EmbeddedNats against real nats-server binaries: lifecycle, crash and recovery."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig

from producer.errors import EmbeddedServerError
from producer.ops.embedded import LOG_FILE_NAME, EmbeddedNats, find_binary
from tests.conftest import NATS_SERVER_29
from tests.support import eventually


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


async def _connect(server: EmbeddedNats) -> Client:
    return await nats.connect(server.url, allow_reconnect=False, connect_timeout=2)


async def _publish_one(server: EmbeddedNats, payload: bytes) -> int:
    nc = await _connect(server)
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(StreamConfig(name="T", subjects=["t.>"], storage=StorageType.FILE))
        ack = await js.publish("t.one", payload)
        return ack.seq
    finally:
        await nc.close()


async def _read_one(server: EmbeddedNats, seq: int) -> bytes:
    nc = await _connect(server)
    try:
        msg = await nc.jetstream(timeout=5).get_msg("T", seq)
        assert msg.data is not None
        return msg.data
    finally:
        await nc.close()


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture(params=["nats_server", "nats_server_29"])
def server(request: pytest.FixtureRequest) -> EmbeddedNats:
    """Each lifecycle test runs against both server generations SPEC 6 names."""
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


# -- find_binary --------------------------------------------------------------------


def test_find_binary_prefers_the_venv_copy() -> None:
    assert find_binary() == str(Path(sys.executable).parent / "nats-server")
    assert EmbeddedNats.find_binary() == find_binary()


def test_find_binary_falls_back_to_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    on_path = tmp_path / "path"
    on_path.mkdir()
    fake = _script(on_path, "nats-server", "exit 0")
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.setenv("PATH", str(on_path))
    assert find_binary() == fake


def test_find_binary_reports_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmbeddedServerError, match="not on PATH") as info:
        find_binary()
    assert str(tmp_path) in info.value.reason


# -- lifecycle ----------------------------------------------------------------------


async def test_started_server_answers_jetstream(server: EmbeddedNats) -> None:
    assert server.running
    assert server.url == f"nats://127.0.0.1:{server.port}"
    nc = await _connect(server)
    try:
        info = await nc.jetstream(timeout=5).account_info()
        assert info.limits is not None
    finally:
        await nc.close()
    assert (server.store_dir / LOG_FILE_NAME).stat().st_size > 0


async def test_context_manager_stops_and_stop_is_idempotent(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "s") as server:
        pid = server.pid
        port = server.port
        assert pid is not None
    assert not server.running
    assert _gone(pid)
    assert _port_closed(port)
    await server.stop()
    server.kill()
    assert not server.running


# An explicit port is checked with stand-in binaries, so no test needs a port that is
# free now and hopes it still is when the server binds it.


async def test_explicit_port_is_the_one_asked_for(tmp_path: Path) -> None:
    binary = _script(tmp_path, "record", f'echo "$@" > {tmp_path}/args; exit 3')
    server = EmbeddedNats(tmp_path / "s", binary=binary, port=4567)
    assert server.port == 4567
    assert server.url == "nats://127.0.0.1:4567"
    with pytest.raises(EmbeddedServerError, match="status 3"):
        await server.start()
    assert " -p 4567 " in (tmp_path / "args").read_text()


async def test_a_server_reporting_another_port_is_refused(tmp_path: Path) -> None:
    # As when the port was taken and the server that answers is not ours.
    ports = '{"nats": ["nats://127.0.0.1:5555"]}'
    binary = _script(
        tmp_path, "elsewhere", f"echo '{ports}' > {tmp_path}/s/elsewhere_$$.ports; exec sleep 60"
    )
    server = EmbeddedNats(tmp_path / "s", binary=binary, port=4567)
    with pytest.raises(EmbeddedServerError, match="bound port 5555, expected 4567"):
        await server.start()
    assert not server.running


async def test_auto_ports_do_not_collide(tmp_path: Path) -> None:
    async with (
        EmbeddedNats(tmp_path / "a") as first,
        EmbeddedNats(tmp_path / "b") as second,
    ):
        assert first.port != second.port


def test_port_is_unknown_before_first_start(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedServerError, match="start"):
        _ = EmbeddedNats(tmp_path / "s").url


async def test_start_twice_is_refused(nats_server: EmbeddedNats) -> None:
    with pytest.raises(EmbeddedServerError, match="already running"):
        await nats_server.start()


async def test_data_survives_graceful_restart(server: EmbeddedNats) -> None:
    port = server.port
    seq = await _publish_one(server, b"before restart")
    await server.restart()
    assert server.port == port
    assert await _read_one(server, seq) == b"before restart"


async def test_data_survives_kill_and_restart(server: EmbeddedNats) -> None:
    seq = await _publish_one(server, b"acked before the crash")
    pid = server.pid
    assert pid is not None
    server.kill()
    assert not server.running
    assert _gone(pid)
    await server.restart()
    assert server.pid != pid
    assert await _read_one(server, seq) == b"acked before the crash"


async def test_clients_see_the_outage_and_reconnect(nats_server: EmbeddedNats) -> None:
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(nats_server.url, reconnect_time_wait=0.1, reconnected_cb=on_reconnect)
    try:
        nats_server.kill()
        await nats_server.restart()
        await asyncio.wait_for(reconnected.wait(), 10)
        await nc.jetstream(timeout=5).account_info()
    finally:
        await nc.close()


async def test_stop_escalates_to_sigkill_after_grace(nats_server: EmbeddedNats) -> None:
    pid = nats_server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    await nats_server.stop(grace_s=0.3)
    assert _gone(pid)


# -- start failures -----------------------------------------------------------------


async def test_early_exit_reports_the_log_tail(tmp_path: Path) -> None:
    binary = _script(tmp_path, "broken", 'echo "boom: cannot start" >&2; exit 3')
    server = EmbeddedNats(tmp_path / "s", binary=binary)
    with pytest.raises(EmbeddedServerError, match="status 3") as info:
        await server.start()
    assert "boom: cannot start" in info.value.reason
    assert not server.running


async def test_start_timeout_kills_the_child(tmp_path: Path) -> None:
    binary = _script(tmp_path, "silent", "exec sleep 60")
    server = EmbeddedNats(tmp_path / "s", binary=binary, start_timeout_s=0.5)
    with pytest.raises(EmbeddedServerError, match="not ready within"):
        await server.start()
    assert not server.running


async def test_port_in_use_is_reported(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    clash = EmbeddedNats(tmp_path / "clash", port=nats_server.port, start_timeout_s=5)
    with pytest.raises(EmbeddedServerError) as info:
        await clash.start()
    assert "address already in use" in info.value.reason
    assert not clash.running


async def test_unrunnable_binary(tmp_path: Path) -> None:
    not_executable = tmp_path / "nats-server"
    not_executable.write_text("")
    server = EmbeddedNats(tmp_path / "s", binary=str(not_executable))
    with pytest.raises(EmbeddedServerError, match="cannot run"):
        await server.start()


async def test_cancelled_start_leaves_no_process(tmp_path: Path) -> None:
    binary = _script(tmp_path, "silent", "exec sleep 60")
    server = EmbeddedNats(tmp_path / "s", binary=binary)
    task = asyncio.create_task(server.start())
    await eventually(lambda: server.pid is not None)
    pid = server.pid
    assert pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not server.running
    assert _gone(pid)


@pytest.fixture
async def stopped_29(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    if not os.access(NATS_SERVER_29, os.X_OK):
        pytest.skip(f"needs nats-server 2.9 at {NATS_SERVER_29}")
    server = EmbeddedNats(tmp_path / "s", binary=NATS_SERVER_29)
    yield server
    await server.stop()


async def test_29_binary_reports_its_version_in_the_log(stopped_29: EmbeddedNats) -> None:
    await stopped_29.start()
    assert "Version:  2.9." in stopped_29.log_path.read_text()
