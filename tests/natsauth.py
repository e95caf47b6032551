"""Secured nats-server setups made at test time: nothing secret is committed.

Each :class:`Secured` is one way a broker can demand proof of identity (user/password,
token, NKey, operator-mode JWT credentials, mutual TLS): the server configuration file to
start nats-server with, the client settings that pass, and client settings that must be
refused. Certificates come from ``cryptography``; NKeys from the ``nkeys`` package nats-py
itself uses; JWTs are signed here with those NKeys in the format nats-server verifies
(``ed25519-nkey`` over ``base64url(header).base64url(claims)``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from audit.connect import NatsAuth

MODES = ("user", "token", "nkey", "credentials", "tls")


@dataclass(frozen=True)
class Secured:
    """A server configuration and the client settings it accepts or refuses.

    ``wrong`` maps a name to client settings the server must refuse; ``secrets`` are
    values that must never appear in a log.
    """

    mode: str
    server_conf: Path
    good: NatsAuth
    wrong: dict[str, Wrong]
    secrets: tuple[str, ...]


@dataclass(frozen=True)
class Wrong:
    """Client settings a server refuses, and how the refusal reaches the client: the
    error must contain one of ``errors`` (when any are given) and be classified as one
    of ``kinds``."""

    auth: NatsAuth
    errors: tuple[str, ...]
    kinds: tuple[str, ...]


def _refused(auth: NatsAuth) -> Wrong:
    return Wrong(auth, ("Authorization Violation",), ("auth",))


def _write(path: Path, data: bytes | str, mode: int = 0o600) -> str:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return str(path)


def _quote(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid nats-server config string


# --------------------------------------------------------------------------- NKeys, JWT


def new_seed(prefix: int) -> bytes:
    """A fresh NKey seed of the given role (``nkeys.PREFIX_BYTE_USER`` ...)."""
    return bytes(nkeys.encode_seed(os.urandom(32), prefix))


def public_key(seed: bytes) -> str:
    key_pair = nkeys.from_seed(bytearray(seed))
    try:
        return str(key_pair.public_key.decode())
    finally:
        key_pair.wipe()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def issue_jwt(issuer_seed: bytes, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS v2 JWT for ``subject`` signed by ``issuer_seed``."""
    header = {"typ": "JWT", "alg": "ed25519-nkey"}
    claims: dict[str, Any] = {
        "iat": int(time.time()) - 60,
        "iss": public_key(issuer_seed),
        "name": name,
        "sub": subject,
        "nats": {**nats_claims, "version": 2},
    }
    digest = hashlib.sha512(json.dumps(claims, sort_keys=True).encode()).digest()[:32]
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    key_pair = nkeys.from_seed(bytearray(issuer_seed))
    try:
        signature = key_pair.sign(signing_input.encode())
    finally:
        key_pair.wipe()
    return f"{signing_input}.{_b64url(signature)}"


_UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}


def account_jwt(operator_seed: bytes, account_seed: bytes, name: str, *, js: bool) -> str:
    limits: dict[str, Any] = dict(_UNLIMITED)
    if js:
        limits |= {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    return issue_jwt(
        operator_seed,
        public_key(account_seed),
        name,
        {"type": "account", "limits": limits, "default_permissions": {"pub": {}, "sub": {}}},
    )


def creds_file(path: Path, account_seed: bytes, name: str) -> str:
    """A ``.creds`` file for a new user of the account ``account_seed``."""
    user_seed = new_seed(nkeys.PREFIX_BYTE_USER)
    user_jwt = issue_jwt(
        account_seed,
        public_key(user_seed),
        name,
        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
    )
    return _write(
        path,
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed.decode()}\n"
        "------END USER NKEY SEED------\n",
    )


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_ca: str
    rogue_client_cert: str
    rogue_client_key: str


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                False,
            )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a
    rogue CA with a client certificate of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for ca_name in ("ca", "rogue_ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _certificate(f"cellos test {ca_name}", ca_key, None)
        files[ca_name] = _write(directory / f"{ca_name}.pem", _pem_cert(ca_cert), 0o644)
        leaves = [("server", True), ("client", False)] if ca_name == "ca" else [("client", False)]
        for leaf, server in leaves:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _certificate(
                f"cellos test {leaf}", key, (ca_cert.subject, ca_key), server=server
            )
            prefix = "" if ca_name == "ca" else "rogue_"
            files[f"{prefix}{leaf}_cert"] = _write(
                directory / f"{prefix}{leaf}.pem", _pem_cert(cert), 0o644
            )
            files[f"{prefix}{leaf}_key"] = _write(directory / f"{prefix}{leaf}.key", _pem_key(key))
    return Pki(**files)


def tls_block(pki: Pki) -> str:
    return (
        "tls {\n"
        f"  cert_file: {_quote(pki.server_cert)}\n"
        f"  key_file: {_quote(pki.server_key)}\n"
        f"  ca_file: {_quote(pki.ca)}\n"
        "  verify: true\n"
        "  timeout: 5\n"
        "}\n"
    )


def client_tls(pki: Pki) -> NatsAuth:
    return NatsAuth(tls_ca_file=pki.ca, tls_cert_file=pki.client_cert, tls_key_file=pki.client_key)


# --------------------------------------------------------------------------- setups


def operator_block(directory: Path) -> tuple[str, bytes]:
    """Operator-mode server configuration (memory resolver, a system account and a
    JetStream-enabled account); returns it and the account's seed for issuing users."""
    operator = new_seed(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
    system = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
    operator_jwt = issue_jwt(
        operator, public_key(operator), "cellos-test-operator", {"type": "operator"}
    )
    preload = {
        public_key(account): account_jwt(operator, account, "CELLOS", js=True),
        public_key(system): account_jwt(operator, system, "SYS", js=False),
    }
    entries = "".join(f"  {key}: {_quote(jwt)}\n" for key, jwt in preload.items())
    text = (
        f"operator: {_quote(operator_jwt)}\n"
        f"system_account: {public_key(system)}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n{entries}}}\n"
    )
    return text, account


def secured(mode: str, directory: Path) -> Secured:
    """The server configuration for ``mode`` under ``directory`` and its clients."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "server.conf"
    wrong: dict[str, Wrong] = {}
    hidden: tuple[str, ...] = ()
    if mode == "user":
        password, bad = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
        text = (
            "authorization {\n  users = [\n"
            f"    {{user: producer, password: {_quote(password)}}}\n  ]\n}}\n"
        )
        good = NatsAuth(
            user="producer", password_file=_write(directory / "password", password + "\n")
        )
        wrong["wrong password"] = _refused(
            NatsAuth(user="producer", password_file=_write(directory / "bad-password", bad))
        )
        hidden = (password, bad)
    elif mode == "token":
        token, bad = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        text = f"authorization {{\n  token: {_quote(token)}\n}}\n"
        good = NatsAuth(token_file=_write(directory / "token", token + "\n"))
        wrong["wrong token"] = _refused(NatsAuth(token_file=_write(directory / "bad-token", bad)))
        hidden = (token, bad)
    elif mode == "nkey":
        seed, stranger = new_seed(nkeys.PREFIX_BYTE_USER), new_seed(nkeys.PREFIX_BYTE_USER)
        text = f"authorization {{\n  users = [\n    {{nkey: {public_key(seed)}}}\n  ]\n}}\n"
        good = NatsAuth(nkey_seed_file=_write(directory / "user.nk", seed + b"\n"))
        wrong["unknown nkey"] = _refused(
            NatsAuth(nkey_seed_file=_write(directory / "stranger.nk", stranger))
        )
        hidden = (seed.decode(), stranger.decode())
    elif mode == "credentials":
        text, account = operator_block(directory)
        rogue_account = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
        good = NatsAuth(credentials=creds_file(directory / "producer.creds", account, "producer"))
        wrong["user of an unknown account"] = _refused(
            NatsAuth(credentials=creds_file(directory / "rogue.creds", rogue_account, "rogue"))
        )
        hidden = (
            _seed_in(Path(good.credentials or "")),
            _seed_in(Path(directory / "rogue.creds")),
        )
    elif mode == "tls":
        pki = make_pki(directory / "pki")
        text = tls_block(pki)
        good = client_tls(pki)
        wrong["server certificate from an untrusted CA"] = Wrong(
            NatsAuth(
                tls_ca_file=pki.rogue_ca,
                tls_cert_file=pki.client_cert,
                tls_key_file=pki.client_key,
            ),
            ("CERTIFICATE_VERIFY_FAILED",),
            ("tls",),
        )
        wrong["client certificate from an unknown CA"] = Wrong(
            NatsAuth(
                tls_ca_file=pki.ca,
                tls_cert_file=pki.rogue_client_cert,
                tls_key_file=pki.rogue_client_key,
            ),
            # TLS 1.3 verifies the client after the client's side of the handshake is
            # done: the server's alert often arrives, but it may lose the race with the
            # close, and then the client can only see a lost connection (any wording).
            (),
            ("tls", "unreachable", "timeout"),
        )
        hidden = (
            _pem_body(Path(pki.client_key)),
            _pem_body(Path(pki.rogue_client_key)),
        )
    else:
        raise ValueError(mode)
    conf.write_text(text)
    return Secured(mode, conf, good, wrong, hidden)


def _seed_in(creds: Path) -> str:
    lines = creds.read_text().splitlines()
    return lines[lines.index("-----BEGIN USER NKEY SEED-----") + 1]


def _pem_body(path: Path) -> str:
    """The base64 of a PEM key without its armour lines: what a leak would show."""
    return "".join(line for line in path.read_text().splitlines() if "-----" not in line)
