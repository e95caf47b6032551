"""``cellos-producer run`` and ``verify`` against a broker requiring a password and mutual
TLS, as an operator drives them: config keys, flags, log lines, exit codes."""

# The CLI helpers and fixtures of test_cli are imported; pytest passes the fixtures in as
# parameters of the same names, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from producer.ops.embedded import EmbeddedNats
from tests.natsauth import client_tls, make_pki, secured, tls_block
from tests.producer.ops.test_cli import (  # noqa: F401 - fixtures are used by name
    _config_text,
    short_dir,
    signing,
)
from tests.support import Daemon, acli, cli, eventually


def _security_toml(**keys: str) -> str:
    return "".join(f'{key} = "{value}"\n' for key, value in keys.items())


def test_run_refuses_a_missing_password_file_naming_the_key(
    tmp_path: Path, short_dir: Path, signing: tuple[Path, str, Path]
) -> None:
    key, _, _ = signing
    config = tmp_path / "p.toml"
    text = _config_text(data_dir=tmp_path / "d", key_file=key, uds_base=short_dir / "vm")
    config.write_text(
        text.replace(
            "[signing]",
            _security_toml(user="producer", password_file=str(tmp_path / "absent")) + "[signing]",
        )
    )
    res = cli("run", "--config", str(config))
    assert res.rc == 2, res
    assert "nats.password_file" in res.err and str(tmp_path / "absent") in res.err, res
    assert not (short_dir / "vm_9001").exists()


@pytest.mark.timeout(90)
async def test_password_and_mutual_tls_from_config_and_flags(
    tmp_path: Path,
    short_dir: Path,
    signing: tuple[Path, str, Path],
    start_daemon: Callable[..., Any],
) -> None:
    key, _, trust = signing
    setup = secured("user", tmp_path / "auth")
    pki = make_pki(tmp_path / "pki")
    conf = tmp_path / "server.conf"
    conf.write_text(setup.server_conf.read_text() + tls_block(pki))
    tls = client_tls(pki)
    good_password = Path(setup.good.password_file or "").read_text()
    password_file = Path(setup.wrong["wrong password"].auth.password_file or "")
    security = {
        "user": "producer",
        "password_file": str(password_file),
        "tls_ca_file": pki.ca,
        "tls_cert_file": pki.client_cert,
        "tls_key_file": pki.client_key,
    }
    probe_auth = dataclasses.replace(tls, user="producer", password_file=setup.good.password_file)
    async with EmbeddedNats(tmp_path / "nats", config_file=conf, client_auth=probe_auth) as server:
        config = tmp_path / "p.toml"
        text = _config_text(
            data_dir=tmp_path / "d", key_file=key, uds_base=short_dir / "vm", url=server.url
        )
        config.write_text(text.replace("[signing]", _security_toml(**security) + "[signing]"))
        daemon: Daemon = await start_daemon(config)

        def retries() -> list[dict[str, Any]]:
            return [e for e in daemon.log_events() if e.get("event") == "nats_connect_retry"]

        # A wrong password: the daemon serves guests anyway and says what is wrong.
        await daemon.wait_until("three refused attempts", lambda: len(retries()) >= 3, 30)
        assert all(r["kind"] == "auth" and r["auth"] == "user" for r in retries())
        assert "Authorization Violation" in retries()[0]["error"]
        sock = short_dir / "vm_9001"
        res = await acli("simulate-guest", "--socket", str(sock), "--rate", "0", "--count", "25")
        assert res.rc == 0, res

        # Fixing the file is enough: the next attempt reads it.
        password_file.write_text(good_password)

        def ready() -> bool:
            return any(e.get("event") == "broker_ready" for e in daemon.log_events())

        await daemon.wait_until("broker_ready", ready, 30)
        assert good_password.strip() not in daemon.stderr
        flags = [
            "--user",
            "producer",
            "--password-file",
            str(password_file),
            "--tls-ca",
            pki.ca,
            "--tls-cert",
            pki.client_cert,
            "--tls-key",
            pki.client_key,
        ]
        verify = ["verify", "--nats-url", server.url, "--trust", str(trust)]

        async def opened_is_stored() -> bool:
            # broker_ready comes before the spool's first events are acknowledged; a stop
            # before that keeps them in the spool (correctly) and the stream is empty.
            return "1 chain(s)" in (await acli(*verify, *flags)).out

        await eventually(opened_is_stored, timeout=30)
        rc = await daemon.stop(signal.SIGTERM, limit_s=30)
        assert rc == 0, daemon.describe()

        res = await acli(*verify, *flags)
        assert res.rc == 0, res
        assert "1 chain(s), 1 verified, 0 failed" in res.out, res

        res = await acli(*verify, *flags[:4])  # no client certificate
        assert res.rc == 1 and "cannot connect to NATS" in res.err, res
        res = await acli(*verify, "--password-file", str(password_file), *flags[4:])
        assert res.rc == 2 and "password_file" in res.err and "needs user" in res.err, res
