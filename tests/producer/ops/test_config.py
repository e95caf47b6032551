"""Config loading: layering, typing, and that every bad input names its key."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from audit.connect import NatsAuth
from producer.errors import ConfigError, RegistrationError
from producer.ops.config import (
    CellSpec,
    Config,
    config_reference,
    load_config,
    socket_path,
    validate_cell,
)
from tests.support import REPO

EXAMPLE = REPO / "deploy" / "config.example.toml"
HASH = "sha256:" + "ab" * 32
CELL = f"""
[[cells]]
cell_id = "cell-1"
run_id = "run-1"
spec_signature_hash = "{HASH}"
vsock_uds_base = "/run/cells/cell-1/v.sock"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "producer.toml"
    path.write_text(text)
    return str(path)


def load(tmp_path: Path, text: str = "", **kwargs: Any) -> Config:
    kwargs.setdefault("env", {})
    return load_config(write(tmp_path, text), **kwargs)


def error_key(tmp_path: Path, text: str = "", **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **kwargs)
    return info.value.key


def cell(**changes: Any) -> CellSpec:
    base = CellSpec(
        cell_id="cell-1",
        run_id="run-1",
        spec_signature_hash=HASH,
        vsock_uds_base="/run/cells/cell-1/v.sock",
    )
    return msgspec.structs.replace(base, **changes)


# --------------------------------------------------------------------------- good input


def test_defaults_without_a_file() -> None:
    config = load_config(None, env={})
    assert config.host_id == socket.gethostname()
    assert config.data_dir == "/var/lib/cellos-producer"
    assert config.nats.url is None
    assert config.nats.stream == "CELLOS_TELEMETRY"
    assert config.nats.subject_prefix == "cellos.telemetry"
    assert config.nats.mode == "structured"
    assert config.signing.mode == "adaptive"
    assert (config.signing.max_unsigned, config.signing.max_unsigned_ms) == (64, 100)
    assert config.listener.socket_mode == 0o600
    assert config.listener.port == 9001
    assert config.chain.checkpoint_every == 1000
    assert config.silence.window_ms == 10000
    assert (config.probes.interval_s, config.probes.timeout_s) == (10.0, 5.0)
    assert config.probes.max_concurrency == 16
    assert config.spool.full_policy == "block" and config.spool.fsync == "interval"
    assert config.log.level == "info"
    assert config.cells == ()


def test_empty_file_equals_defaults(tmp_path: Path) -> None:
    assert load(tmp_path, "host_id = 'h'") == load_config(None, env={}, overrides={"host_id": "h"})


def test_example_config_loads_completely() -> None:
    config = load_config(str(EXAMPLE), env={})
    assert config.host_id == "hv-017"
    assert len(config.nats.servers) == 3 and config.nats.stream_replicas == 3
    assert config.nats.auth.mode == "credentials" and config.nats.auth.tls_cert_file
    assert config.listener.socket_mode == 0o660
    (spec,) = config.cells
    assert spec.cell_id == "cell-7"
    assert spec.nft_family == "inet" and spec.nft_table == "cell_7"
    assert spec.netns == "/run/netns/cell-7"
    assert spec.cgroup_path and spec.fc_api_socket and spec.fc_metrics_path and spec.tap_iface
    assert spec.vsock_cid == 7
    assert socket_path(spec, config.listener.port) == (
        "/srv/jailer/firecracker/cell-7/root/v.sock_9001"
    )


def test_example_config_mentions_every_key() -> None:
    text = EXAMPLE.read_text()
    for key in re.findall(r"^\| `([^`]+)`", config_reference(), re.MULTILINE):
        leaf = key.rsplit(".", 1)[-1]
        assert re.search(rf"^#? ?{re.escape(leaf)} =", text, re.MULTILINE) or leaf == "cells", key


def test_config_is_frozen() -> None:
    config = load_config(None, env={})
    with pytest.raises(AttributeError):
        config.host_id = "other"  # type: ignore[misc]


def test_int_accepted_for_float_keys(tmp_path: Path) -> None:
    assert load(tmp_path, "[probes]\ninterval_s = 2\ntimeout_s = 1").probes.interval_s == 2.0


@pytest.mark.parametrize(
    ("toml_value", "mode"),
    [("0o640", 0o640), ('"0640"', 0o640), ('"640"', 0o640), ('"0o600"', 0o600), ("0", 0)],
)
def test_socket_mode_int_or_octal_string(tmp_path: Path, toml_value: str, mode: int) -> None:
    config = load(tmp_path, f"[listener]\nsocket_mode = {toml_value}")
    assert config.listener.socket_mode == mode


def test_nats_servers_splits_seed_list(tmp_path: Path) -> None:
    config = load(tmp_path, '[nats]\nurl = "nats://a:4222, tls://b:4223"')
    assert config.nats.servers == ["nats://a:4222", "tls://b:4223"]
    assert load_config(None, env={}).nats.servers == []


# --------------------------------------------------------------------------- env and CLI


def test_env_overrides_are_typed(tmp_path: Path) -> None:
    env = {
        "CELLOS_PRODUCER_HOST_ID": "hv-9",
        "CELLOS_PRODUCER_NATS__URL": "nats://broker:4222",
        "CELLOS_PRODUCER_NATS__MAX_INFLIGHT": "12",
        "CELLOS_PRODUCER_NATS__CREATE_STREAM": "false",
        "CELLOS_PRODUCER_NATS__ACK_TIMEOUT_S": "0.5",
        "CELLOS_PRODUCER_NATS__MODE": "binary",
        "CELLOS_PRODUCER_LISTENER__SOCKET_MODE": "0640",
        "CELLOS_PRODUCER_LISTENER__VSOCK": "1",
        "UNRELATED": "ignored",
    }
    config = load(tmp_path, "host_id = 'from-file'", env=env)
    assert config.host_id == "hv-9"
    assert config.nats.url == "nats://broker:4222"
    assert config.nats.max_inflight == 12
    assert config.nats.create_stream is False
    assert config.nats.ack_timeout_s == 0.5
    assert config.nats.mode == "binary"
    assert config.listener.socket_mode == 0o640
    assert config.listener.vsock is True


def test_env_empty_string_unsets_optional(tmp_path: Path) -> None:
    config = load(tmp_path, '[nats]\nurl = "nats://a:4222"', env={"CELLOS_PRODUCER_NATS__URL": ""})
    assert config.nats.url is None


def test_env_keeps_other_file_keys(tmp_path: Path) -> None:
    text = '[nats]\nstream = "S1"\n'
    config = load(tmp_path, text, env={"CELLOS_PRODUCER_NATS__URL": "nats://a"})
    assert (config.nats.stream, config.nats.url) == ("S1", "nats://a")


def test_cli_overrides_win_over_env_and_file(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[log]\nlevel = "error"',
        env={"CELLOS_PRODUCER_LOG__LEVEL": "warning"},
        overrides={"log.level": "debug", "probes.interval_s": "12.5", "nats.url": None},
    )
    assert config.log.level == "debug"
    assert config.probes.interval_s == 12.5
    assert config.nats.url is None  # None overrides are skipped, not applied


def test_cli_overrides_accept_typed_values(tmp_path: Path) -> None:
    config = load(tmp_path, overrides={"listener.port": 9100, "probes.enabled": False})
    assert (config.listener.port, config.probes.enabled) == (9100, False)


def test_no_file_with_overrides() -> None:
    config = load_config(None, env={}, overrides={"data_dir": "/tmp/x"})
    assert config.data_dir == "/tmp/x"


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "absent.toml"), env={})
    assert info.value.key == "config"
    assert "no such file" in info.value.reason


def test_invalid_toml_reports_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, 'host_id = "a"\n[nats\n')
    assert info.value.key == "config"
    assert "line 2" in info.value.reason


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 'blue'", "colour"),
        ("[nats]\nurll = 'nats://x'", "nats.urll"),
        ("[nats]\nmax_inflight = 'many'", "nats.max_inflight"),
        ("[nats]\ncreate_stream = 1", "nats.create_stream"),
        ("[listener]\nport = 9001.5", "listener.port"),
        ("[log]\nlevel = 'loud'", "log.level"),
        ("nats = 5", "nats"),
        ("host_id = 'bad host'", "host_id"),
        ("data_dir = 'relative/dir'", "data_dir"),
        ("[nats]\nurl = 'http://x:4222'", "nats.url"),
        ("[nats]\nurl = 'nats://x:notaport'", "nats.url"),
        ("[nats]\nsubject_prefix = 'cellos.*'", "nats.subject_prefix"),
        ("[nats]\nsubject_prefix = 'cellos..t'", "nats.subject_prefix"),
        ("[nats]\nstream = 'A.B'", "nats.stream"),
        ("[nats]\nack_timeout_s = 0", "nats.ack_timeout_s"),
        ("[nats]\nduplicate_window_s = nan", "nats.duplicate_window_s"),
        ("[nats]\ncredentials = 'x.creds'", "nats.credentials"),
        ("[nats]\nurl = 'nats://a:b@x:4222'", "nats.url"),
        ("[nats]\nurl = 'nats://x:1,nats://tok@y:2'", "nats.url"),
        ("[nats]\nurl = 'nats://x'\npassword_file = '/p'", "nats.password_file"),
        ("[nats]\nurl = 'nats://x'\nuser = 'u'", "nats.user"),
        ("[nats]\nurl = 'nats://x'\nuser = 'u'\npassword_file = 'p'", "nats.password_file"),
        (
            "[nats]\nurl = 'nats://x'\ntoken_file = '/t'\nnkey_seed_file = '/n'",
            "nats.nkey_seed_file",
        ),
        ("[nats]\nurl = 'nats://x'\nnkey_seed_file = '/n'\ncredentials = '/c'", "nats.credentials"),
        ("[nats]\nurl = 'nats://x'\ntls_cert_file = '/c'", "nats.tls_cert_file"),
        ("[nats]\nurl = 'nats://x'\ntls_key_file = '/k'", "nats.tls_key_file"),
        ("[nats]\nurl = 'nats://x'\ntls_ca_file = 'ca.pem'", "nats.tls_ca_file"),
        ("[nats]\ntoken_file = '/t'", "nats.token_file"),
        ("[nats]\ntls_ca_file = '/ca.pem'", "nats.tls_ca_file"),
        ("[signing]\nmax_unsigned = -1", "signing.max_unsigned"),
        ("[signing]\nkid = 'has space'", "signing.kid"),
        ("[signing]\nmode = 'sometimes'", "signing.mode"),
        ("[listener]\nsocket_mode = 600", "listener.socket_mode"),
        ("[listener]\nsocket_mode = '0689'", "listener.socket_mode"),
        ("[listener]\nsocket_mode = 'rw-------'", "listener.socket_mode"),
        ("[listener]\nsocket_mode = 0o666", "listener.socket_mode"),
        ("[listener]\nport = 0", "listener.port"),
        ("[chain]\ncheckpoint_every = 0", "chain.checkpoint_every"),
        ("[silence]\nwindow_ms = 0", "silence.window_ms"),
        ("[spool]\nfull_policy = 'drop_oldest'", "spool.full_policy"),
        ("[spool]\nmax_bytes = 100000", "spool.max_bytes"),
        ("[nats]\nstream_replicas = 7", "nats.stream_replicas"),
        ("[probes]\ntick_s = 10", "probes.tick_s"),
        ("[probes]\ninterval_s = 0", "probes.interval_s"),
        ("[probes]\ntimeout_s = -1", "probes.timeout_s"),
        ("[probes]\ninterval_s = 2\ntimeout_s = 3", "probes.timeout_s"),
        ("[probes]\nmax_concurrency = 0", "probes.max_concurrency"),
        (CELL + "colour = 'x'", "cells[0].colour"),
        ("[[cells]]\ncell_id = 'a'", "cells[0].run_id"),
    ],
)
def test_bad_value_names_key(tmp_path: Path, text: str, key: str) -> None:
    assert error_key(tmp_path, text) == key


def test_enum_error_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "[log]\nlevel = 'loud'")
    assert "'debug'" in info.value.reason


@pytest.mark.parametrize(
    "bad_id", ["cell 1", "a.b", "*", ">", "x" * 65, "", "cell\n", "célula", "a/b"]
)
@pytest.mark.parametrize("field", ["cell_id", "run_id"])
def test_bad_cell_tokens(tmp_path: Path, field: str, bad_id: str) -> None:
    text = CELL.replace(f'{field} = "{"cell-1" if field == "cell_id" else "run-1"}"', "")
    text += f"{field} = {msgspec.json.encode(bad_id).decode()}\n"
    assert error_key(tmp_path, text) == f"cells[0].{field}"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("spec_signature_hash", "sha256:" + "AB" * 32),
        ("spec_signature_hash", "sha256:" + "ab" * 31),
        ("spec_signature_hash", "ab" * 32),
        ("vsock_uds_base", "run/v.sock"),
        ("vsock_uds_base", "/run/cells/"),
        ("vsock_uds_base", "/" + "x" * 120),
        ("nft_family", "inet6"),
        ("nft_table", "bad table"),
        ("netns", "cell-7"),
        ("cgroup_path", "cellos/cell-7"),
        ("fc_api_socket", "fc.sock"),
        ("fc_metrics_path", "metrics"),
        ("tap_iface", "tap-with-a-very-long-name"),
        ("vsock_cid", 2),
        ("vsock_cid", "7"),
    ],
)
def test_bad_cell_fields(tmp_path: Path, field: str, value: object) -> None:
    lines = [line for line in CELL.splitlines() if not line.startswith(field)]
    extra = "\nnft_table = 't'" if field == "nft_family" else ""
    extra = "\nnft_family = 'inet'" if field == "nft_table" else extra
    text = "\n".join(lines) + f"\n{field} = {msgspec.json.encode(value).decode()}{extra}\n"
    assert error_key(tmp_path, text) == f"cells[0].{field}"


def test_nft_family_needs_table(tmp_path: Path) -> None:
    assert error_key(tmp_path, CELL + "nft_family = 'inet'\n") == "cells[0].nft_table"


def test_duplicate_cell_id_names_later_entry(tmp_path: Path) -> None:
    second = CELL.replace("cell-1/v.sock", "cell-2/v.sock")
    assert error_key(tmp_path, CELL + second) == "cells[1].cell_id"


def test_duplicate_socket_path(tmp_path: Path) -> None:
    other = CELL.replace('"cell-1"', '"cell-2"')  # same vsock_uds_base
    assert error_key(tmp_path, CELL + other) == "cells[1].vsock_uds_base"


def test_duplicate_vsock_cid(tmp_path: Path) -> None:
    other = CELL.replace("cell-1", "cell-2")
    assert error_key(tmp_path, CELL + "vsock_cid = 5\n" + other + "vsock_cid = 5\n") == (
        "cells[1].vsock_cid"
    )


def test_unknown_env_var_names_variable(tmp_path: Path) -> None:
    for name in (
        "CELLOS_PRODUCER_NATS__URLL",
        "CELLOS_PRODUCER_COLOUR",
        "CELLOS_PRODUCER_NATS",
        "CELLOS_PRODUCER_NATS__URL__X",
    ):
        assert error_key(tmp_path, env={name: "x"}) == name


def test_env_cannot_set_cells(tmp_path: Path) -> None:
    assert error_key(tmp_path, env={"CELLOS_PRODUCER_CELLS": "[]"}) == "CELLOS_PRODUCER_CELLS"


def test_env_bad_type_names_key_and_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env={"CELLOS_PRODUCER_NATS__MAX_INFLIGHT": "lots"})
    assert info.value.key == "nats.max_inflight"
    assert "CELLOS_PRODUCER_NATS__MAX_INFLIGHT" in info.value.reason


def test_env_bad_socket_mode(tmp_path: Path) -> None:
    env = {"CELLOS_PRODUCER_LISTENER__SOCKET_MODE": "0x1FF"}
    assert error_key(tmp_path, env=env) == "listener.socket_mode"


@pytest.mark.parametrize("key", ["nats.nope", "nope", "cells", "cells[0].cell_id", "nats"])
def test_unknown_cli_override(tmp_path: Path, key: str) -> None:
    assert error_key(tmp_path, overrides={key: "x"}) == key


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLOS_PRODUCER_HOST_ID", "from-environ")
    assert load_config(None).host_id == "from-environ"


# --------------------------------------------------------------------------- registration API


def test_validate_cell_accepts_good_spec() -> None:
    validate_cell(cell(nft_family="ip", nft_table="t", vsock_cid=3))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"cell_id": "cell 1"}, "cell_id"),
        ({"run_id": "a.b"}, "run_id"),
        ({"spec_signature_hash": "md5:00"}, "spec_signature_hash"),
        ({"vsock_uds_base": "v.sock"}, "vsock_uds_base"),
        ({"vsock_cid": True}, "vsock_cid"),
    ],
)
def test_validate_cell_refuses(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(RegistrationError) as info:
        validate_cell(cell(**changes))
    assert info.value.reason.startswith(f"{field}:")


def test_validate_cell_checks_socket_length_for_port() -> None:
    spec = cell(vsock_uds_base="/" + "x" * 101)  # 102 bytes + "_9001" = 107: fits
    validate_cell(spec)
    with pytest.raises(RegistrationError):
        validate_cell(spec, port=90010)


@given(st.text(max_size=70))
def test_cell_id_rule_matches_spec_regex(value: str) -> None:
    ok = re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value) is not None
    try:
        validate_cell(cell(cell_id=value))
    except RegistrationError:
        assert not ok
    else:
        assert ok


# --------------------------------------------------------------------------- reference


def test_reference_covers_every_field() -> None:
    reference = config_reference()
    for key in (
        "host_id",
        "nats.url",
        "signing.max_unsigned_ms",
        "listener.socket_mode",
        "spool.full_policy",
        "cells[].vsock_cid",
    ):
        assert f"| `{key}` |" in reference
    rows = [line for line in reference.splitlines() if line.startswith("| `")]
    assert all(line.count(" | ") == 3 for line in rows)
    assert all(not line.endswith("|  |") for line in rows), "every key needs a meaning"


def test_nats_security_keys_become_the_shared_auth_settings(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "[nats]\nurl = 'tls://10.0.0.5:4222'\nuser = 'producer'\n"
        "tls_ca_file = '/etc/cellos-producer/nats-ca.pem'\n"
        "tls_cert_file = '/etc/cellos-producer/client.pem'\n"
        "tls_key_file = '/etc/cellos-producer/client.key'\ntls_hostname = 'nats.internal'\n",
        # The secret's path from the environment, e.g. systemd's credentials directory.
        env={"CELLOS_PRODUCER_NATS__PASSWORD_FILE": "/run/credentials/x/nats-password"},
    )
    assert config.nats.auth == NatsAuth(
        user="producer",
        password_file="/run/credentials/x/nats-password",
        tls_ca_file="/etc/cellos-producer/nats-ca.pem",
        tls_cert_file="/etc/cellos-producer/client.pem",
        tls_key_file="/etc/cellos-producer/client.key",
        tls_hostname="nats.internal",
    )
    assert config.nats.auth.mode == "user"


def test_url_with_credentials_is_refused_without_quoting_them(tmp_path: Path) -> None:
    for url in ("nats://producer:hunter2@x:4222", "nats://hunter2@x:4222"):
        with pytest.raises(ConfigError) as info:
            load(tmp_path, f"[nats]\nurl = 'nats://ok:4222,{url}'")
        assert info.value.key == "nats.url"
        assert "hunter2" not in str(info.value)
