"""End-to-end tests of the ``cellos-producer`` console script.

Every test runs the installed entry point (``.venv/bin/cellos-producer``) as a child
process, against real nats-server processes where a broker is involved, and judges only
what an operator or a supervisor sees: exit codes, stdout/stderr, files and sockets on
disk, and what ended up in JetStream. Every child is waited for with a timeout and killed
in teardown if a test left it running.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from producer.ops.cli import main as cli_main
from producer.ops.embedded import EmbeddedNats
from tests.support import CLI, Daemon, HeldPort, Result, acli, clean_env, cli, eventually

SPEC_HASH = "sha256:" + "ab" * 32
KID_LINE = re.compile(r"^kid: (ed25519:[0-9a-f]{16})$", re.MULTILINE)
PUB_LINE = re.compile(r"^public key: ([A-Za-z0-9_-]{43})$", re.MULTILINE)
STREAM = "CELLOS_TELEMETRY"
PREFIX = "cellos.telemetry"
GUEST_KINDS = {
    "process_spawned",
    "process_exited",
    "capability_denied",
    "net_connect_attempted",
    "fs_inotify_fired",
}


# --------------------------------------------------------------------------- helpers


def _procs_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (leak check)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (entry / "stat").read_text()
        except OSError:
            continue
        # A zombie has already exited; it only waits for its parent to reap it.
        if text in cmdline and ") Z " not in status:
            found.append(int(entry.name))
    return found


def _raw_public(key_file: Path) -> bytes:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _keygen(path: Path) -> str:
    res = cli("keygen", "--out", str(path))
    assert res.rc == 0, res
    match = KID_LINE.search(res.out)
    assert match, res
    return match[1]


def _trust(key: Path, trust: Path) -> None:
    res = cli("pubkey", "--key", str(key), "--trust-file", str(trust))
    assert res.rc == 0, res


def _config_text(
    *,
    data_dir: Path,
    key_file: Path,
    uds_base: Path,
    url: str | None = "nats://127.0.0.1:4",
    cell_id: str = "c1",
) -> str:
    nats_table = f'[nats]\nurl = "{url}"\n' if url is not None else ""
    return (
        'host_id = "cli-test-host"\n'
        f'data_dir = "{data_dir}"\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n'
        f"{nats_table}"
        f'[signing]\nkey_file = "{key_file}"\n'
        "[[cells]]\n"
        f'cell_id = "{cell_id}"\n'
        'run_id = "r1"\n'
        f'spec_signature_hash = "{SPEC_HASH}"\n'
        f'vsock_uds_base = "{uds_base}"\n'
    )


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except FileNotFoundError:
        return False


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory short enough for Unix socket paths (sun_path is 108 bytes)."""
    path = tempfile.mkdtemp(prefix="cp", dir="/tmp")
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def signing(tmp_path: Path) -> tuple[Path, str, Path]:
    """A keygen'd key, its kid, and a trust file listing it."""
    key = tmp_path / "signing.key"
    kid = _keygen(key)
    trust = tmp_path / "trust.json"
    _trust(key, trust)
    return key, kid, trust


async def _subject_counts(url: str, cell_id: str) -> dict[str, int]:
    """Messages per subject of one cell in the stream, straight from the server."""
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        info = await nc.jetstream(timeout=5).stream_info(STREAM, f"{PREFIX}.{cell_id}.>")
    finally:
        await nc.close()
    return dict(info.state.subjects or {})


def _guest_events(counts: dict[str, int], cell_id: str) -> int:
    base = f"{PREFIX}.{cell_id}.guest."
    return sum(n for s, n in counts.items() if s.startswith(base) and s[len(base) :] in GUEST_KINDS)


def test_entry_point_is_installed() -> None:
    assert CLI.is_file(), f"{CLI} missing: is the package installed in this venv?"
    assert os.access(CLI, os.X_OK)


# --------------------------------------------------------------------------- 1. help

SUBCOMMANDS = ["run", "demo", "keygen", "pubkey", "simulate-guest", "verify"]


def test_top_level_help_lists_every_command() -> None:
    res = cli("--help")
    assert res.rc == 0, res
    assert "NATS JetStream" in res.out
    assert "Ed25519" in res.out
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", res.out, re.MULTILINE), (name, res)
    assert res.err == ""


def test_version() -> None:
    res = cli("--version")
    assert res.rc == 0, res
    assert re.fullmatch(r"cellos-producer \d+\.\d+\.\d+\S*\n", res.out), res


def test_no_command_is_a_usage_error() -> None:
    res = cli()
    assert res.rc == 2, res
    assert "usage: cellos-producer" in res.err


@functools.cache
def _help(command: str) -> Result:
    """``<command> --help``, run once per command for the tests below."""
    return cli(command, "--help")


@pytest.mark.parametrize(
    ("command", "phrase"),
    [
        ("run", "daemon"),
        ("demo", "verify them"),
        ("keygen", "Ed25519"),
        ("pubkey", "public key"),
        ("simulate-guest", "guest agent"),
        ("verify", "JetStream"),
    ],
)
def test_subcommand_help_says_what_it_does(command: str, phrase: str) -> None:
    res = _help(command)
    assert res.rc == 0, res
    assert res.out.startswith(f"usage: cellos-producer {command}")
    assert phrase in res.out, res


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("run", ["--config", "--nats-url", "--log-level", "--log-format"]),
        ("demo", ["--cells", "--seconds", "--nats-url", "--data-dir", "--mode", "--binary"]),
        ("keygen", ["--out"]),
        ("pubkey", ["--key", "--kid", "--trust-file"]),
        ("simulate-guest", ["--socket", "--rate", "--count", "--seed"]),
        ("verify", ["--nats-url", "--trust", "--cell", "--stream", "--json"]),
    ],
)
def test_subcommand_help_lists_its_options(command: str, options: list[str]) -> None:
    res = _help(command)
    assert res.rc == 0, res
    assert res.err == ""
    for option in options:
        assert option in res.out, (option, res)


# --------------------------------------------------------------------------- 2. keygen


def test_keygen_creates_private_key_and_prints_its_id(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    res = cli("keygen", "--out", str(key))
    assert res.rc == 0, res
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    kid, pub = KID_LINE.search(res.out), PUB_LINE.search(res.out)
    assert kid and pub, res
    # The printed id and key are those of the key actually written (SPEC 5.1).
    raw = _raw_public(key)
    assert pub[1] == _b64url(raw)
    assert kid[1] == "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
    assert str(key) in res.out


def test_keygen_twice_gives_different_keys(tmp_path: Path) -> None:
    assert _keygen(tmp_path / "a.key") != _keygen(tmp_path / "b.key")


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    _keygen(key)
    before = key.read_bytes()
    res = cli("keygen", "--out", str(key))
    assert res.rc == 2, res
    assert str(key) in res.err and "already exists" in res.err, res
    assert "Traceback" not in res.err
    assert key.read_bytes() == before
    # Not even a plain file someone else put there.
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    res = cli("keygen", "--out", str(other))
    assert res.rc == 2, res
    assert other.read_text() == "keep me"


# --------------------------------------------------------------------------- 3. pubkey


def test_pubkey_prints_kid_and_merges_trust_file(tmp_path: Path) -> None:
    k1, k2 = tmp_path / "k1.key", tmp_path / "k2.key"
    kid1, kid2 = _keygen(k1), _keygen(k2)
    trust = tmp_path / "trust.json"

    res = cli("pubkey", "--key", str(k1), "--trust-file", str(trust))
    assert res.rc == 0, res
    assert KID_LINE.search(res.out)[1] == kid1  # type: ignore[index]
    assert json.loads(trust.read_text()) == {kid1: _b64url(_raw_public(k1))}

    res = cli("pubkey", "--key", str(k2), "--trust-file", str(trust))
    assert res.rc == 0, res
    assert KID_LINE.search(res.out)[1] == kid2  # type: ignore[index]
    assert json.loads(trust.read_text()) == {
        kid1: _b64url(_raw_public(k1)),
        kid2: _b64url(_raw_public(k2)),
    }

    # Without --trust-file nothing is written; the key is only described.
    res = cli("pubkey", "--key", str(k1))
    assert res.rc == 0, res
    assert PUB_LINE.search(res.out)[1] == _b64url(_raw_public(k1))  # type: ignore[index]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1.key", "k2.key", "trust.json"]


def test_pubkey_refuses_key_readable_by_others(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    _keygen(key)
    key.chmod(0o644)
    trust = tmp_path / "trust.json"
    res = cli("pubkey", "--key", str(key), "--trust-file", str(trust))
    assert res.rc == 2, res
    assert str(key) in res.err, res
    assert "0644" in res.err, res
    assert "Traceback" not in res.err
    assert res.out == ""
    assert not trust.exists()


def test_pubkey_missing_key_file(tmp_path: Path) -> None:
    key = tmp_path / "nope.key"
    res = cli("pubkey", "--key", str(key))
    assert res.rc == 2, res
    assert str(key) in res.err and "does not exist" in res.err, res
    assert "Traceback" not in res.err


# --------------------------------------------------------------------------- 4. bad config


def _valid_config(tmp_path: Path) -> str:
    return _config_text(
        data_dir=tmp_path / "data", key_file=tmp_path / "k.key", uds_base=tmp_path / "vm"
    )


_URL_LINE = 'url = "nats://127.0.0.1:4"'


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        pytest.param(lambda c: c.replace(_URL_LINE, _URL_LINE + "\nbogus = 1"), "nats.bogus",
                     id="nats.bogus"),
        pytest.param(lambda c: c.replace("[signing]", '[signing]\nkeyfile = "/k"'),
                     "signing.keyfile", id="misspelt-key"),
        pytest.param(lambda c: "mystery = true\n" + c, "mystery", id="unknown-top-level"),
        pytest.param(lambda c: c + "[nats.extra]\nx = 1\n", "nats.extra", id="unknown-table"),
        pytest.param(lambda c: c.replace('cell_id = "c1"', 'cell_id = "bad id"'),
                     "cells[0].cell_id", id="cell_id-space"),
        pytest.param(lambda c: c.replace('cell_id = "c1"', 'cell_id = "a.b"'),
                     "cells[0].cell_id", id="cell_id-dot"),
        pytest.param(lambda c: c.replace('"sha256:', '"md5:'),
                     "cells[0].spec_signature_hash", id="spec-hash"),
        pytest.param(lambda c: c.replace(_URL_LINE, _URL_LINE + '\nack_timeout_s = "soon"'),
                     "nats.ack_timeout_s", id="bad-type"),
        pytest.param(lambda c: c.replace('host_id = "cli-test-host"', "host_id = 5"),
                     "host_id", id="bad-type-top-level"),
        pytest.param(lambda c: c.replace("nats://", "http://"), "nats.url", id="url-scheme"),
        pytest.param(lambda c: c.replace("[signing]", "[listener]\nsocket_mode = 0o666\n[signing]"),
                     "listener.socket_mode", id="world-writable-socket"),
    ],
)  # fmt: skip
def test_run_rejects_bad_config_naming_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    edit: Callable[[str], str],
    key: str,
) -> None:
    text = edit(_valid_config(tmp_path))
    assert text != _valid_config(tmp_path)
    config = tmp_path / "bad.toml"
    config.write_text(text)
    # In-process: config errors end before anything global (logging, loop) is set up.
    for name in [n for n in os.environ if n.startswith("CELLOS_PRODUCER_")]:
        monkeypatch.delenv(name)
    rc = cli_main(["run", "--config", str(config)])
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert err.startswith(f"cellos-producer: config key '{key}': "), err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert out == ""
    assert not (tmp_path / "data").exists()  # refused before touching anything


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        (_URL_LINE, _URL_LINE + "\nbogus = 1", "nats.bogus"),
        ('cell_id = "c1"', 'cell_id = "c 1"', "cells[0].cell_id"),
        ("[signing]", '[queue]\nmax_events = "lots"\n[signing]', "queue.max_events"),
    ],
)
def test_run_script_rejects_bad_config(tmp_path: Path, old: str, new: str, key: str) -> None:
    text = _valid_config(tmp_path)
    assert old in text
    config = tmp_path / "bad.toml"
    config.write_text(text.replace(old, new))
    res = cli("run", "--config", str(config), timeout=10)
    assert res.rc == 2, res
    assert f"config key '{key}'" in res.err, res
    assert "Traceback" not in res.err
    assert res.out == ""


def test_valid_config_template_is_valid(tmp_path: Path) -> None:
    """The cases above fail because of their edit, not because the template is broken: the
    unedited config gets past loading and stops only at the (absent) signing key."""
    config = tmp_path / "good.toml"
    config.write_text(_valid_config(tmp_path))
    res = cli("run", "--config", str(config), timeout=10)
    assert res.rc == 2, res
    assert "signing key" in res.err and str(tmp_path / "k.key") in res.err, res
    assert "config key" not in res.err


def test_run_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    res = cli("run", "--config", str(missing), timeout=10)
    assert res.rc == 2, res
    assert str(missing) in res.err and "no such file" in res.err, res


def test_run_invalid_toml(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[nats\nurl = 1\n")
    res = cli("run", "--config", str(config), timeout=10)
    assert res.rc == 2, res
    assert str(config) in res.err and "invalid TOML" in res.err, res


def test_run_bad_override_flag_names_key(tmp_path: Path) -> None:
    config = tmp_path / "good.toml"
    config.write_text(_valid_config(tmp_path))
    res = cli("run", "--config", str(config), "--nats-url", "http://x", timeout=10)
    assert res.rc == 2, res
    assert "'nats.url'" in res.err, res


def test_run_unknown_environment_key(tmp_path: Path) -> None:
    config = tmp_path / "good.toml"
    config.write_text(_valid_config(tmp_path))
    env = clean_env(CELLOS_PRODUCER_NATS__BOGUS="1")
    res = cli("run", "--config", str(config), timeout=10, env=env)
    assert res.rc == 2, res
    assert "CELLOS_PRODUCER_NATS__BOGUS" in res.err, res


def test_run_refuses_key_readable_by_others(tmp_path: Path, short_dir: Path) -> None:
    key = tmp_path / "k.key"
    _keygen(key)
    key.chmod(0o640)
    config = tmp_path / "good.toml"
    config.write_text(
        _config_text(data_dir=tmp_path / "data", key_file=key, uds_base=short_dir / "vm")
    )
    res = cli("run", "--config", str(config), timeout=10)
    assert res.rc == 2, res
    assert str(key) in res.err and "0640" in res.err, res
    assert not _is_socket(short_dir / "vm_9001")


# --------------------------------------------------------------------------- 5. run


@pytest.mark.timeout(40)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_run_serves_guest_and_suspends_on_signal(
    *,
    tmp_path: Path,
    short_dir: Path,
    nats_server: EmbeddedNats,
    signing: tuple[Path, str, Path],
    start_daemon: Callable[..., Any],
    sig: signal.Signals,
) -> None:
    key, kid, trust = signing
    base = short_dir / "vm"
    sock = short_dir / "vm_9001"
    config = tmp_path / "good.toml"
    config.write_text(
        _config_text(data_dir=tmp_path / "data", key_file=key, uds_base=base, url=nats_server.url)
    )
    daemon: Daemon = await start_daemon(config)

    # Bind before boot: the socket is there (and private) before any guest could connect.
    await daemon.wait_until("cell socket", lambda: _is_socket(sock), limit_s=15)
    assert stat.S_IMODE(sock.lstat().st_mode) == 0o600

    guest = await acli("simulate-guest", "--socket", str(sock), "--count", "50", "--rate", "0")
    assert guest.rc == 0, guest
    assert "sent 50 frames" in guest.out, guest

    # Frames still in the socket buffer at the signal are (by design) not read; wait until
    # all 50 reached JetStream so the count below judges the pipeline, not the timing.
    async def all_stored() -> bool:
        assert daemon.proc.returncode is None, daemon.describe()
        return _guest_events(await _subject_counts(nats_server.url, "c1"), "c1") >= 50

    await eventually(all_stored, timeout=15)

    rc = await daemon.stop(sig, limit_s=15)
    assert rc == 0, daemon.describe()
    assert not sock.exists(), "socket file left behind"
    assert not _procs_mentioning(str(config))

    events = [e.get("event") for e in daemon.log_events()]
    assert "producer_started" in events, daemon.describe()
    stopped = [e for e in daemon.log_events() if e.get("event") == "producer_stopped"]
    assert stopped and stopped[-1]["drained"] is True, daemon.describe()
    assert daemon.out_path.read_text() == ""  # logs go to stderr only

    counts = await _subject_counts(nats_server.url, "c1")
    assert _guest_events(counts, "c1") == 50, counts
    assert counts.get(f"{PREFIX}.c1.chain.opened") == 1, counts
    # A stop suspends the chain (the next start continues it); only deregistration seals.
    assert f"{PREFIX}.c1.chain.sealed" not in counts, counts

    res = await acli("verify", "--nats-url", nats_server.url, "--trust", str(trust))
    assert res.rc == 0, res
    lines = [line for line in res.out.splitlines() if "cell=c1 " in line]
    assert len(lines) == 1, res
    assert lines[0].startswith("OK ") and re.search(r" open \(intact to head seq \d+;", lines[0]), (
        res
    )
    n_events = int(re.search(r"events=(\d+)", lines[0])[1])  # type: ignore[index]
    assert n_events >= 51, res
    assert "1 chain(s), 1 verified, 0 failed" in res.out, res

    res = await acli("verify", "--nats-url", nats_server.url, "--trust", str(trust), "--json")
    assert res.rc == 0, res
    (report,) = json.loads(res.out)
    assert report["cell_id"] == "c1" and report["run_id"] == "r1"
    assert report["ok"] is True and report["sealed"] is False
    assert report["events"] == n_events == sum(counts.values())
    assert report["first_sequence"] == 1 and report["last_sequence"] == n_events
    assert report["problems"] == [] and report["gaps"] == []
    assert kid in trust.read_text()


# --------------------------------------------------------------------------- 6. broker late


@pytest.mark.timeout(40)
async def test_run_binds_and_spools_while_the_broker_is_down(
    *,
    tmp_path: Path,
    short_dir: Path,
    signing: tuple[Path, str, Path],
    start_daemon: Callable[..., Any],
    held_port: HeldPort,
    nats_server: EmbeddedNats,
) -> None:
    key, _, trust = signing
    url = held_port.url
    sock = short_dir / "vm_9001"
    config = tmp_path / "late.toml"
    config.write_text(
        _config_text(data_dir=tmp_path / "data", key_file=key, uds_base=short_dir / "vm", url=url)
    )
    daemon: Daemon = await start_daemon(config)

    def complained() -> bool:
        return any(
            e.get("level") == "warning" and str(held_port.port) in json.dumps(e)
            for e in daemon.log_events()
        )

    # The guest never waits for the broker: the socket is bound at once, frames are taken
    # and spooled, and the daemon says why nothing is published yet.
    await daemon.wait_until("cell socket", lambda: _is_socket(sock), limit_s=10)
    guest = await acli("simulate-guest", "--socket", str(sock), "--count", "5", "--rate", "0")
    assert guest.rc == 0, guest
    await daemon.wait_until("connection warning", complained, limit_s=10)
    await daemon.wait_until("a second retry", lambda: daemon.retries_logged() >= 2, limit_s=10)
    assert daemon.proc.returncode is None, daemon.describe()

    await held_port.relay_to(nats_server.port)

    async def published() -> bool:
        with contextlib.suppress(nats.js.errors.NotFoundError):  # not created yet
            return _guest_events(await _subject_counts(url, "c1"), "c1") >= 5
        return False

    await eventually(published, timeout=15)
    rc = await daemon.stop(signal.SIGTERM, limit_s=15)
    assert rc == 0, daemon.describe()
    assert not sock.exists()
    res = await acli("verify", "--nats-url", url, "--trust", str(trust), "--cell", "c1")
    assert res.rc == 0, res
    assert re.search(r"^OK .*cell=c1 .*events=6 .* open \(intact", res.out, re.MULTILINE), res


@pytest.mark.timeout(30)
async def test_run_logs_nats_connect_retry(
    tmp_path: Path,
    short_dir: Path,
    signing: tuple[Path, str, Path],
    start_daemon: Callable[..., Any],
    held_port: HeldPort,
) -> None:
    key, _, _ = signing
    config = tmp_path / "late.toml"
    config.write_text(
        _config_text(
            data_dir=tmp_path / "data", key_file=key, uds_base=short_dir / "vm", url=held_port.url
        )
    )
    daemon: Daemon = await start_daemon(config)
    await daemon.wait_until("nats_connect_retry log line", daemon.retries_logged, limit_s=10)
    (line,) = [e for e in daemon.log_events() if e.get("event") == "nats_connect_retry"][:1]
    assert line["level"] == "warning" and line["url"] == held_port.url


@pytest.mark.timeout(30)
async def test_run_stops_on_sigterm_while_broker_unreachable(
    tmp_path: Path,
    short_dir: Path,
    signing: tuple[Path, str, Path],
    start_daemon: Callable[..., Any],
    held_port: HeldPort,
) -> None:
    key, _, _ = signing
    config = tmp_path / "late.toml"
    config.write_text(
        _config_text(
            data_dir=tmp_path / "data", key_file=key, uds_base=short_dir / "vm", url=held_port.url
        )
    )
    daemon: Daemon = await start_daemon(config)
    await daemon.wait_until("nats_connect_retry log line", daemon.retries_logged, limit_s=10)
    rc = await daemon.stop(signal.SIGTERM, limit_s=15)
    assert rc == 0, daemon.describe()


# --------------------------------------------------------------------------- 7. verify


async def _demo_chain(url: str, data_dir: Path) -> str:
    """One sealed, strictly signed chain in the server's stream; returns its cell id."""
    res = await acli(
        "demo", "--seconds", "1", "--cells", "1", "--rate", "50", "--nats-url", url,
        "--data-dir", str(data_dir), "--mode", "strict",
    )  # fmt: skip
    assert res.rc == 0, res
    assert "DEMO OK" in res.out, res
    match = re.search(r"^OK +cell=(\S+) ", res.out, re.MULTILINE)
    assert match, res
    return match[1]


@pytest.mark.timeout(40)
async def test_verify_exit_codes(
    tmp_path: Path, short_dir: Path, nats_server: EmbeddedNats
) -> None:
    data = short_dir / "d"
    cell = await _demo_chain(nats_server.url, data)
    trust = str(data / "trust.json")
    # A trust file that lists some other key: every signature is unverifiable.
    other_key = tmp_path / "other.key"
    _keygen(other_key)
    other_trust = tmp_path / "other-trust.json"
    _trust(other_key, other_trust)
    none = str(tmp_path / "none.json")

    base = ("verify", "--nats-url", nats_server.url, "--trust")
    # Independent read-only runs: concurrently, to keep the file's runtime down.
    (
        good,
        as_json,
        only,
        wrong,
        wrong_json,
        nosuch,
        nosuch_json,
        missing,
        no_stream,
    ) = await asyncio.gather(
        acli(*base, trust),
        acli(*base, trust, "--json"),
        acli(*base, trust, "--cell", cell),
        acli(*base, str(other_trust)),
        acli(*base, str(other_trust), "--json"),
        acli(*base, trust, "--cell", "nosuch"),
        acli(*base, trust, "--cell", "nosuch", "--json"),
        acli(*base, none),
        acli(*base, trust, "--stream", "NO_SUCH_STREAM"),
    )

    assert good.rc == 0, good
    assert re.search(rf"^OK +cell={cell} .* sealed$", good.out, re.MULTILINE), good
    assert "1 chain(s), 1 verified, 0 failed" in good.out, good

    assert as_json.rc == 0, as_json
    reports = json.loads(as_json.out)
    assert isinstance(reports, list) and len(reports) == 1, as_json
    assert reports[0]["cell_id"] == cell
    assert reports[0]["ok"] is True and reports[0]["sealed"] is True
    assert reports[0]["signed"] == reports[0]["events"] > 2  # strict: every event signed

    assert only.rc == 0, only
    assert f"cell={cell} " in only.out, only

    assert wrong.rc == 1, wrong
    assert re.search(rf"^FAIL cell={cell} ", wrong.out, re.MULTILINE), wrong
    assert "1 chain(s), 0 verified, 1 failed" in wrong.out, wrong
    assert wrong_json.rc == 1, wrong_json
    (bad,) = json.loads(wrong_json.out)
    assert bad["ok"] is False and bad["problems"], wrong_json

    assert nosuch.rc == 1, nosuch
    assert "no chains found" in nosuch.err, nosuch
    assert nosuch_json.rc == 1, nosuch_json
    assert json.loads(nosuch_json.out) == []

    assert missing.rc == 2, missing
    assert none in missing.err, missing

    assert no_stream.rc == 1, no_stream
    assert "NO_SUCH_STREAM" in no_stream.err, no_stream
    for res in (good, wrong, nosuch, missing, no_stream):
        assert "Traceback" not in res.err, res


async def test_verify_unreachable_broker(tmp_path: Path, held_port: HeldPort) -> None:
    key, trust = tmp_path / "k.key", tmp_path / "trust.json"
    _keygen(key)
    _trust(key, trust)
    res = await acli("verify", "--nats-url", held_port.url, "--trust", str(trust), limit_s=20)
    assert res.rc == 1, res
    assert f"cellos-producer: cannot connect to NATS at {held_port.url}" in res.err, res
    assert "Traceback" not in res.err, res
    assert res.out == ""


# --------------------------------------------------------------------------- 8. demo


def _demo_dirs(parent: Path) -> list[Path]:
    return sorted(parent.glob("cellos-demo-*"))


@pytest.mark.timeout(40)
async def test_demo_embedded(short_dir: Path) -> None:
    # Without --data-dir the demo makes one under TMPDIR: keep it short and ours.
    res = await acli("demo", "--seconds", "3", "--cells", "2", env=clean_env(TMPDIR=str(short_dir)))
    assert res.rc == 0, res
    assert "(embedded)" in res.out
    assert "DEMO OK" in res.out, res
    assert len(re.findall(r"^OK .* sealed$", res.out, re.MULTILINE)) == 2, res
    assert "2 chain(s), 2 verified, 0 failed" in res.out
    # As root (as here and in CI) the demo gives its cells real host objects to probe.
    probes = re.search(r"^host probe readings published as host.v1.\* events: (.*)$", res.out, re.M)
    assert probes, res
    assert {kv.split("=")[0] for kv in probes[1].split(", ")} == {
        "cgroup",
        "fc_metrics",
        "nftables",
        "tap_link",
    }, res
    (data_dir,) = _demo_dirs(short_dir)
    assert (data_dir / "trust.json").is_file()
    assert not _procs_mentioning(str(data_dir)), "embedded nats-server left running"


@pytest.mark.timeout(40)
async def test_demo_external_server_strict(short_dir: Path, nats_server: EmbeddedNats) -> None:
    data = short_dir / "d"
    res = await acli(
        "demo", "--seconds", "2", "--cells", "1", "--nats-url", nats_server.url,
        "--mode", "strict", "--data-dir", str(data),
    )  # fmt: skip
    assert res.rc == 0, res
    assert "DEMO OK" in res.out, res
    assert "(embedded)" not in res.out
    assert not (data / "nats").exists()  # the given server was used, none was started
    line = re.search(r"^OK .*events=(\d+) .*signed=(\d+) sealed$", res.out, re.MULTILINE)
    assert line and line[1] == line[2], res  # strict: every event signed

    # The trust file left behind names the demo's key, and verifies the stream independently.
    trust = json.loads((data / "trust.json").read_text())
    key_res = cli("pubkey", "--key", str(data / "signing.key"))
    assert key_res.rc == 0, key_res
    kid = KID_LINE.search(key_res.out)[1]  # type: ignore[index]
    assert trust == {kid: PUB_LINE.search(key_res.out)[1]}  # type: ignore[index]
    verify = await acli(
        "verify", "--nats-url", nats_server.url, "--trust", str(data / "trust.json")
    )
    assert verify.rc == 0, verify

    # A second run in the same data dir reuses the key and starts a new chain.
    again = await acli(
        "demo", "--seconds", "0.5", "--cells", "1", "--nats-url", nats_server.url,
        "--data-dir", str(data),
    )  # fmt: skip
    assert again.rc == 0, again
    assert json.loads((data / "trust.json").read_text()) == trust
    both = await acli("verify", "--nats-url", nats_server.url, "--trust", str(data / "trust.json"))
    assert both.rc == 0, both
    assert "2 chain(s), 2 verified, 0 failed" in both.out, both


@pytest.mark.timeout(40)
async def test_demo_binary_mode(short_dir: Path) -> None:
    data = short_dir / "d"
    res = await acli("demo", "--binary", "--seconds", "2", "--cells", "1", "--data-dir", str(data))
    assert res.rc == 0, res
    assert "DEMO OK" in res.out, res
    assert "1 chain(s), 1 verified, 0 failed" in res.out
    assert (data / "trust.json").is_file()
    assert not _procs_mentioning(str(data)), "embedded nats-server left running"


@pytest.mark.timeout(40)
async def test_run_reloads_its_key_on_sighup(
    tmp_path: Path,
    short_dir: Path,
    nats_server: EmbeddedNats,
    signing: tuple[Path, str, Path],
    start_daemon: Callable[..., Any],
) -> None:
    key, kid, _ = signing
    config = tmp_path / "c.toml"
    config.write_text(
        _config_text(
            data_dir=tmp_path / "data", key_file=key, uds_base=short_dir / "vm", url=nats_server.url
        )
    )
    daemon: Daemon = await start_daemon(config)
    await daemon.wait_until(
        "started",
        lambda: any(e.get("event") == "producer_started" for e in daemon.log_events()),
        15,
    )
    key.unlink()
    new_kid = _keygen(key)
    daemon.proc.send_signal(signal.SIGHUP)

    def reloaded() -> bool:
        return any(e.get("event") == "signing_key_reloaded" for e in daemon.log_events())

    await daemon.wait_until("key reloaded", reloaded, limit_s=10)
    (line,) = [e for e in daemon.log_events() if e.get("event") == "signing_key_reloaded"]
    assert (line["kid"], line["previous_kid"]) == (new_kid, kid)
    assert daemon.proc.returncode is None  # SIGHUP does not stop the daemon
    rc = await daemon.stop(signal.SIGTERM)
    assert rc == 0, daemon.describe()


def _actions(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            found.append((path, action))
    return found


def test_every_option_of_every_command_has_help_text() -> None:
    from producer.ops.cli import _parser

    missing = [
        f"{path} {'/'.join(a.option_strings) or a.dest}"
        for path, a in _actions(_parser(), "cellos-producer")
        if not a.help
    ]
    assert not missing, missing


def test_run_without_config_names_the_file_it_reads(tmp_path: Path) -> None:
    absent = tmp_path / "nowhere.toml"
    res = cli("run", timeout=10, env=clean_env(CELLOS_PRODUCER_CONFIG=str(absent)))
    assert res.rc == 2, res
    assert str(absent) in res.err and "--config" in res.err, res


async def test_simulate_guest_says_when_it_cannot_connect(short_dir: Path) -> None:
    missing = short_dir / "nobody_9001"
    proc = await asyncio.create_subprocess_exec(
        str(CLI), "simulate-guest", "--socket", str(missing), "--count", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stderr.readline(), 20)
    finally:
        proc.kill()
        await proc.wait()
    assert f"cannot connect to {missing}" in line.decode() and "retrying" in line.decode()
