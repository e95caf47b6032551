"""The NATS security settings shared by the daemon and the verifier: consistency rules,
what is read from which file, and errors that name the setting without quoting a secret.
The same settings against real secured servers: tests/producer/delivery/test_nats_security.py.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import nats.errors
import nkeys
import pytest

from audit.connect import NatsAuth, auth_problem, connect_error_kind, connect_kwargs
from audit.errors import ConnectOptionsError
from tests.natsauth import creds_file, make_pki, new_seed


def _file(tmp_path: Path, name: str, data: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


@pytest.mark.parametrize(
    ("auth", "field"),
    [
        (NatsAuth(password_file="/p"), "password_file"),
        (NatsAuth(user="u"), "user"),
        (NatsAuth(user="", password_file="/p"), "password_file"),
        (NatsAuth(user="u", password_file="/p", token_file="/t"), "token_file"),
        (NatsAuth(token_file="/t", nkey_seed_file="/n"), "nkey_seed_file"),
        (NatsAuth(nkey_seed_file="/n", credentials="/c"), "credentials"),
        (NatsAuth(tls_cert_file="/c"), "tls_cert_file"),
        (NatsAuth(tls_key_file="/k"), "tls_key_file"),
        (NatsAuth(tls_hostname=""), "tls_hostname"),
    ],
)
def test_inconsistent_settings_name_the_field(auth: NatsAuth, field: str) -> None:
    problem = auth_problem(auth)
    assert problem is not None and problem[0] == field
    with pytest.raises(ConnectOptionsError) as info:
        connect_kwargs(auth)
    assert info.value.field == field


def test_mutually_exclusive_modes_are_all_listed() -> None:
    problem = auth_problem(NatsAuth(token_file="/t", credentials="/c"))
    assert problem is not None
    assert "token_file" in problem[1] and "credentials" in problem[1]


def test_no_settings_no_kwargs() -> None:
    assert connect_kwargs(NatsAuth()) == {}
    assert NatsAuth().mode == "none"


def test_password_and_token_come_from_their_files(tmp_path: Path) -> None:
    auth = NatsAuth(user="producer", password_file=_file(tmp_path, "pw", "s3cret pass\r\n"))
    assert connect_kwargs(auth) == {"user": "producer", "password": "s3cret pass"}
    assert auth.mode == "user"
    token = NatsAuth(token_file=_file(tmp_path, "tok", "abc.def\n"))
    assert connect_kwargs(token) == {"token": "abc.def"}


def test_a_file_is_read_at_every_call(tmp_path: Path) -> None:
    path = tmp_path / "tok"
    path.write_text("first\n")
    auth = NatsAuth(token_file=str(path))
    assert connect_kwargs(auth)["token"] == "first"
    path.write_text("second\n")
    assert connect_kwargs(auth)["token"] == "second"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "is empty"),
        (b"\n\n", "is empty"),
        (b"Zq8-first\nZq8-second\n", "more than one line"),
        (b"\xff\xfe Zq8-bytes", "not UTF-8"),
        (b"x" * (64 * 1024 + 1), "larger than"),
    ],
)
def test_unusable_password_files_are_refused_without_quoting_them(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = _file(tmp_path, "pw", content)
    with pytest.raises(ConnectOptionsError) as info:
        connect_kwargs(NatsAuth(user="u", password_file=path))
    err = info.value
    assert (err.field, err.path) == ("password_file", path)
    assert reason in str(err)
    assert "Zq8" not in str(err)


def test_missing_file_names_field_and_path(tmp_path: Path) -> None:
    path = str(tmp_path / "absent")
    with pytest.raises(ConnectOptionsError) as info:
        connect_kwargs(NatsAuth(token_file=path))
    assert (info.value.field, info.value.path) == ("token_file", path)
    assert "No such file" in info.value.reason


def test_nkey_seed_is_checked_and_passed_by_path(tmp_path: Path) -> None:
    seed = new_seed(nkeys.PREFIX_BYTE_USER)
    path = _file(tmp_path, "user.nk", seed + b"\n")
    assert connect_kwargs(NatsAuth(nkey_seed_file=path)) == {"nkeys_seed": path}


@pytest.mark.parametrize(
    "content",
    [
        b"SUnot-a-seed",
        new_seed(nkeys.PREFIX_BYTE_ACCOUNT),  # a valid seed, but of an account
        b"UABCDEF",  # a public key, not a seed
    ],
)
def test_bad_nkey_seed_is_refused_without_quoting_it(tmp_path: Path, content: bytes) -> None:
    path = _file(tmp_path, "user.nk", content)
    with pytest.raises(ConnectOptionsError) as info:
        connect_kwargs(NatsAuth(nkey_seed_file=path))
    assert info.value.field == "nkey_seed_file"
    assert content.decode() not in str(info.value)


def test_creds_file_is_checked_and_passed_by_path(tmp_path: Path) -> None:
    account = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
    path = creds_file(tmp_path / "u.creds", account, "u")
    assert connect_kwargs(NatsAuth(credentials=path)) == {"user_credentials": path}


def test_creds_file_without_its_blocks_is_refused(tmp_path: Path) -> None:
    # nats-py would read such a file in an endless loop at connect time.
    path = _file(tmp_path, "u.creds", "just a JWT, no armour\n")
    with pytest.raises(ConnectOptionsError) as info:
        connect_kwargs(NatsAuth(credentials=path))
    assert info.value.field == "credentials"
    assert "not a NATS .creds file" in str(info.value)


def test_tls_context_verifies_the_server_and_presents_the_client_cert(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    kwargs = connect_kwargs(
        NatsAuth(
            tls_ca_file=pki.ca,
            tls_cert_file=pki.client_cert,
            tls_key_file=pki.client_key,
            tls_hostname="nats.internal",
        )
    )
    ctx = kwargs["tls"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert kwargs["tls_hostname"] == "nats.internal"
    # Only the CA given is trusted (plus nothing else was loaded from the system store
    # that would carry our test CA's name).
    assert any("cellos test ca" in str(c.get("subject")) for c in ctx.get_ca_certs())


def test_tls_hostname_alone_uses_the_system_cas() -> None:
    kwargs = connect_kwargs(NatsAuth(tls_hostname="nats.internal"))
    assert isinstance(kwargs["tls"], ssl.SSLContext)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tls_ca_file": "client_key"}, "tls_ca_file"),
        ({"tls_key_file": "server_key"}, "tls_cert_file"),
        ({"tls_key_file": "absent"}, "tls_key_file"),
        ({"tls_cert_file": "absent"}, "tls_cert_file"),
    ],
)
def test_unusable_tls_files_name_the_field(
    tmp_path: Path, change: dict[str, str], field: str
) -> None:
    pki = make_pki(tmp_path)
    paths = {
        "tls_ca_file": pki.ca,
        "tls_cert_file": pki.client_cert,
        "tls_key_file": pki.client_key,
    }
    for key, which in change.items():
        paths[key] = str(tmp_path / "absent") if which == "absent" else getattr(pki, which)
    with pytest.raises(ConnectOptionsError) as info:
        connect_kwargs(NatsAuth(**paths))
    assert info.value.field == field
    key_body = "".join(Path(pki.client_key).read_text().splitlines()[1:-1])
    assert key_body not in str(info.value)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (nats.errors.Error("nats: 'Authorization Violation'"), "auth"),
        (nats.errors.AuthorizationError(), "auth"),
        (nats.errors.Error("nats: 'User Authentication Expired'"), "auth"),
        (ssl.SSLCertVerificationError("certificate verify failed"), "tls"),
        (ConnectOptionsError("token_file", "/t", "is empty"), "config"),
        (nats.errors.TimeoutError(), "timeout"),
        (ConnectionRefusedError(111, "Connection refused"), "unreachable"),
    ],
)
def test_connect_error_kind(exc: BaseException, kind: str) -> None:
    assert connect_error_kind(exc) == kind
