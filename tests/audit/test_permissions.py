"""An auditor whose NATS permissions cover one cell (the blocks in docs/consumers.md) can
verify, replay and list that cell, and is refused any other with a clear message.

The server is a real nats-server started from a configuration file with two users: an
admin the producer publishes as, and the per-cell auditor.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from audit.connect import NatsAuth
from audit.consumer import Scope, replay, verify_stream
from audit.errors import AccessDeniedError
from audit.keys import merge_trust
from audit.source import Broker, ConnectOptions
from audit.verify import Verdict
from producer.guest.simulator import run_guest
from producer.ops.embedded import find_binary
from tests.conftest import NATS_SERVER_29
from tests.support import eventually, running_producer

CLI = Path(sys.executable).parent / "cellos-audit"
STREAM, BUCKET, PREFIX = "CELLOS_TELEMETRY", "CELLOS_CHAIN_HEADS", "cellos.telemetry"


def auditor_permissions(cell: str) -> dict[str, object]:
    """Exactly the rights docs/consumers.md lists for an auditor of one cell."""
    return {
        "publish": {
            "allow": [
                "$JS.API.INFO",
                f"$JS.API.STREAM.INFO.{STREAM}",
                f"$JS.API.STREAM.INFO.KV_{BUCKET}",
                f"$JS.API.CONSUMER.CREATE.{STREAM}.*.{PREFIX}.{cell}.>",
                f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.>",
                f"$JS.API.CONSUMER.DELETE.{STREAM}.>",
                f"$JS.API.CONSUMER.INFO.{STREAM}.>",
                f"$JS.ACK.{STREAM}.>",
                f"$JS.API.DIRECT.GET.{STREAM}.{PREFIX}.{cell}.>",
                f"$JS.API.DIRECT.GET.KV_{BUCKET}.$KV.{BUCKET}.{cell}.>",
            ]
        },
        "subscribe": {"allow": ["_INBOX.>"]},
    }


@contextlib.asynccontextmanager
async def configured_server(tmp: Path, binary: str) -> AsyncIterator[int]:
    """nats-server from a config file (JSON is valid NATS config); yields its port."""
    config = {
        "listen": "127.0.0.1:-1",
        "ports_file_dir": str(tmp),
        "jetstream": {"store_dir": str(tmp / "js")},
        "accounts": {
            "FLEET": {
                "jetstream": "enabled",
                "users": [
                    {"user": "admin", "password": "admin"},
                    {
                        "user": "auditor",
                        "password": "auditor",
                        "permissions": auditor_permissions("cell-1"),
                    },
                ],
            }
        },
    }
    path = tmp / "server.conf"
    path.write_text(json.dumps(config))
    with (tmp / "server.log").open("wb") as log:
        proc = subprocess.Popen([binary, "-c", str(path)], stdout=log, stderr=log)  # noqa: ASYNC220
    try:
        port = await _port(tmp, proc)
        yield port
    finally:
        proc.kill()
        proc.wait()


async def _port(tmp: Path, proc: subprocess.Popen[bytes]) -> int:
    async def ready() -> int:
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()
            for ports in tmp.glob(f"*_{proc.pid}.ports"):
                with contextlib.suppress(ValueError, KeyError, IndexError):
                    url = json.loads(ports.read_text())["nats"][0]
                    port = int(url.rsplit(":", 1)[1])
                    async with await Broker.connect(_admin(port)) as broker:
                        await broker.api("$JS.API.INFO", None, what="ready")
                    return port
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(ready(), 15)


SECRETS = Path(tempfile.mkdtemp(prefix="cellos-auditor-"))
"""Password files of the test users, removed when the test run ends."""
atexit.register(shutil.rmtree, SECRETS, True)


def _login(port: int, user: str) -> ConnectOptions:
    """The user's password lives in a file (secrets never go on a command line); the test
    users' password is their name."""
    secret = SECRETS / user
    secret.parent.mkdir(exist_ok=True)
    secret.write_text(user)
    auth = NatsAuth(user=user, password_file=str(secret))
    return ConnectOptions(url=f"nats://127.0.0.1:{port}", auth=auth)


def _admin(port: int) -> ConnectOptions:
    return _login(port, "admin")


def _auditor(port: int) -> ConnectOptions:
    return _login(port, "auditor")


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(CLI), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def _binaries() -> list[object]:
    """The venv's nats-server (current 2.1x) and Debian's 2.9, which SPEC 6 also names."""
    old = pytest.mark.skipif(
        not os.access(NATS_SERVER_29, os.X_OK), reason=f"needs nats-server 2.9 at {NATS_SERVER_29}"
    )
    return [
        pytest.param(find_binary(), id="current"),
        pytest.param(NATS_SERVER_29, id="2.9", marks=old),
    ]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("binary", _binaries())
async def test_a_per_cell_auditor_reads_its_cell_and_is_refused_others(
    tmp_path: Path, binary: str
) -> None:
    async with configured_server(tmp_path, binary) as port:
        url = f"nats://admin:admin@127.0.0.1:{port}"
        async with running_producer(url, cells=2) as (p, signer, _):
            assert p.registry is not None and p.publisher is not None and p.heads is not None
            for n, cell_id in enumerate(("cell-1", "cell-2")):
                cell = p.registry.cells[cell_id]
                await run_guest(cell.socket_path, rate=0, count=10, seed=n)
                await eventually(lambda cell=cell: cell.counters.accepted == 10)
                await p.registry.deregister(cell_id)
            assert await p.drain(10) and await p.heads.flush(10)
        trust = {signer.kid: signer.public_raw}

        async with await Broker.connect(_auditor(port)) as broker:
            mine = await verify_stream(broker, Scope(cell="cell-1"), trust, workers=0)
            (report,) = mine.reports
            assert report.verdict == Verdict.INTACT_SEALED and report.cell_id == "cell-1"
            assert report.head_sequence == report.last_sequence == 12
            events = [m async for m in replay(broker, Scope(cell="cell-1"), from_seq=3)]
            assert events and all(m.subject.startswith(f"{PREFIX}.cell-1.") for m in events)
            for other in (Scope(cell="cell-2"), Scope()):
                with pytest.raises(AccessDeniedError, match="not permitted"):
                    await verify_stream(broker, other, trust, workers=0)
            # worker processes read ranges over their own connections, as the same user
            ranged = await verify_stream(broker, Scope(cell="cell-1"), trust, workers=2)
            assert ranged.reports == mine.reports

        trust_file = tmp_path / "trust.json"
        merge_trust(trust_file, signer.kid, signer.public_raw)
        auditor = _auditor(port).auth
        assert auditor.password_file is not None
        base = ("--nats-url", f"nats://127.0.0.1:{port}", "--user", "auditor")
        base += ("--password-file", auditor.password_file)
        rc, out, err = await _cli("verify", *base, "--cell", "cell-1", "--trust", str(trust_file))
        assert rc == 0 and out.rstrip().splitlines()[0].endswith(" sealed"), (out, err)
        rc, out, err = await _cli("cells", *base, "--cell", "cell-1")
        assert rc == 0 and out.startswith("cell-1  events=12 ") and "sealed" in out, (out, err)
        rc, out, err = await _cli("verify", *base, "--cell", "cell-2", "--trust", str(trust_file))
        assert rc == 1 and out == "", (out, err)
        assert "cellos-audit: not permitted" in err and "cell-2" in err, err
        assert "Traceback" not in err
