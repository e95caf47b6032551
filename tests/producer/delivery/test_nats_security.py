"""The daemon against brokers that demand proof of identity, one real nats-server per mode.

For each mode (user/password, token, NKey, operator-mode JWT credentials, mutual TLS) the
server is configured at test time (tests/natsauth.py) and the producer must (1) publish a
chain that then verifies, read back by the audit side with the same settings, and (2) with
a credential the server refuses, keep serving, log each refused attempt once with what is
wrong, and back off between attempts; no log line may carry a secret.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from audit.cli import collect_reports
from audit.connect import NatsAuth
from audit.errors import SourceError
from producer.guest.simulator import run_guest
from producer.ops.embedded import EmbeddedNats
from producer.ops.logs import JsonFormatter
from tests.natsauth import MODES, Secured, secured
from tests.support import eventually, running_producer, trust_of

RETRIES_TO_SEE = 3


@pytest.fixture(params=MODES)
async def broker(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Secured, EmbeddedNats]]:
    setup = secured(request.param, tmp_path / "auth")
    async with EmbeddedNats(
        tmp_path / "nats",
        name=f"cellos-{setup.mode}",
        config_file=setup.server_conf,
        client_auth=setup.good,
    ) as server:
        yield setup, server


def _nats_section(auth: NatsAuth) -> dict[str, Any]:
    """``auth`` as the producer's ``[nats]`` keys: the field names are the key names."""
    return {f.name: v for f in dataclasses.fields(auth) if (v := getattr(auth, f.name))}


def _retries(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        dict(r.fields)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "nats_connect_retry"
    ]


def _assert_no_secret(caplog: pytest.LogCaptureFixture, setup: Secured) -> None:
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    for secret in setup.secrets:
        assert secret not in text, f"a {setup.mode} secret is in the logs"


async def test_producer_publishes_through_a_secured_broker(
    broker: tuple[Secured, EmbeddedNats], caplog: pytest.LogCaptureFixture
) -> None:
    setup, server = broker
    caplog.set_level(logging.DEBUG)
    async with running_producer(server.url, nats=_nats_section(setup.good)) as (
        producer,
        signer,
        _,
    ):
        assert producer.registry is not None
        cell = producer.registry.cells["cell-1"]
        await run_guest(cell.socket_path, rate=0, count=20, seed=7)
        await eventually(lambda: cell.counters.accepted == 20)
        await producer.registry.deregister("cell-1")
        assert await producer.drain(20)
        assert producer.heads is not None
        assert await producer.heads.flush(10)
    assert not _retries(caplog)
    reports = await collect_reports(
        server.url,
        trust=trust_of(signer),
        stream="CELLOS_TELEMETRY",
        subject_prefix="cellos.telemetry",
        auth=setup.good,
    )
    (report,) = reports
    assert report.ok and report.sealed, report.problems
    assert report.events >= 22  # opened, 20 guest events, sealed
    _assert_no_secret(caplog, setup)


async def test_verifier_without_the_credential_is_refused_clearly(
    broker: tuple[Secured, EmbeddedNats],
) -> None:
    setup, server = broker
    for auth, expected in [(NatsAuth(), ()), *((w.auth, w.errors) for w in setup.wrong.values())]:
        with pytest.raises(SourceError) as info:
            await collect_reports(
                server.url,
                trust={},
                stream="CELLOS_TELEMETRY",
                subject_prefix="cellos.telemetry",
                auth=auth,
            )
        message = str(info.value)
        assert message.startswith(f"cannot connect to NATS at {server.url}")
        if expected:
            assert any(e in message for e in expected), message
        for secret in setup.secrets:
            assert secret not in message


async def test_refused_credentials_are_retried_with_backoff_and_never_crash(
    broker: tuple[Secured, EmbeddedNats], caplog: pytest.LogCaptureFixture
) -> None:
    setup, server = broker
    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    for case, wrong in setup.wrong.items():
        caplog.clear()
        started = loop.time()
        async with running_producer(server.url, nats=_nats_section(wrong.auth)) as (
            producer,
            _,
            _,
        ):
            await eventually(lambda: len(_retries(caplog)) >= RETRIES_TO_SEE, timeout=30)
            elapsed = loop.time() - started
            retries = _retries(caplog)
            # Still serving: the broker task keeps trying, nothing stopped the producer.
            assert producer.fatal is None
            assert producer.registry is not None and "cell-1" in producer.registry.cells
            assert not producer.publisher or not producer.publisher.connected
        assert "broker_ready" not in caplog.messages, case
        assert {r["auth"] for r in retries} == {setup.good.mode}, case
        for r in retries:
            assert not wrong.errors or any(e in r["error"] for e in wrong.errors), (case, r)
            assert r["kind"] in wrong.kinds, (case, r)
        assert [r["attempt"] for r in retries] == list(range(1, len(retries) + 1))
        waits = [float(r["next_in_s"]) for r in retries]
        # Backing off: each attempt waited its announced delay before the next one, the
        # delays grow, so attempts over the interval are bounded by the delays, not by CPU.
        assert all(w > 0 for w in waits), waits
        assert waits[RETRIES_TO_SEE - 1] > waits[0], waits
        assert sum(waits[:-1]) <= elapsed, (waits, elapsed)
        assert len(retries) <= 1 + elapsed / min(waits), (len(retries), elapsed, waits)
        _assert_no_secret(caplog, setup)


async def test_a_fixed_credential_file_is_picked_up_without_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The files are read at every attempt: fixing the password file is enough."""
    setup = secured("user", tmp_path / "auth")
    good_password = Path(setup.good.password_file or "").read_text()
    wrong = setup.wrong["wrong password"].auth
    password_file = Path(wrong.password_file or "")
    caplog.set_level(logging.INFO)
    async with (
        EmbeddedNats(
            tmp_path / "nats", config_file=setup.server_conf, client_auth=setup.good
        ) as server,
        running_producer(server.url, nats=_nats_section(wrong)) as (producer, _, _),
    ):
        await eventually(lambda: len(_retries(caplog)) >= 1, timeout=30)
        password_file.write_text(good_password)
        await eventually(lambda: "broker_ready" in caplog.messages, timeout=30)
        assert producer.publisher is not None and producer.publisher.connected
    _assert_no_secret(caplog, setup)
