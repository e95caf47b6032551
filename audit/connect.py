"""How a client authenticates to NATS and secures the connection, in one place.

The producer daemon and ``cellos-producer verify`` talk to the same brokers, so they must
accept the same security settings and fail the same way when those are wrong. This module
turns a small, declarative :class:`NatsAuth` (paths, never secret values) into the
keyword arguments of ``nats.connect``. It lives in ``audit/`` because auditors install the
audit package without the daemon, and the daemon imports it from here.

Secrets stay in files, named by path in the configuration: a value in an environment
variable is readable in ``/proc/<pid>/environ`` and ``systemctl show``, and a value in the
config file would be copied wherever the config is. The files are read at every connection
attempt, so an operator who fixes a wrong password file need not restart anything; nothing
read from them ever appears in an error message or a log line.

nats-py reads ``.creds`` and NKey seed files itself at each (re)connect; both are checked
here first, because nats-py loops forever reading a ``.creds`` file that lacks its JWT
block, and reports a malformed seed only as a failed connection.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import nats.errors
import nkeys

from audit.errors import ConnectOptionsError

__all__ = ["NatsAuth", "auth_problem", "connect_error_kind", "connect_kwargs", "telling_error"]

_JWT_BEGIN: Final = b"-----BEGIN NATS USER JWT-----"
_SEED_BEGIN: Final = b"BEGIN USER NKEY SEED"
_SECRET_MAX: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class NatsAuth:
    """One authentication mode (or none) plus optional TLS; every secret is a file path.

    Field names are the ``[nats]`` configuration keys, so an error about a field names the
    key an operator has to fix.
    """

    user: str | None = None
    password_file: str | None = None
    token_file: str | None = None
    nkey_seed_file: str | None = None
    credentials: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_hostname: str | None = None

    @property
    def mode(self) -> str:
        """The authentication mode, for logs: none, user, token, nkey or credentials."""
        modes = _modes(self)
        return modes[0] if modes else "none"

    @property
    def uses_tls_files(self) -> bool:
        return any(
            getattr(self, name) is not None
            for name in ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_hostname")
        )

    def paths(self) -> dict[str, str]:
        """Every file this configuration names, by field, for path checks."""
        return {
            f.name: value
            for f in dataclasses.fields(self)
            if f.name.endswith("_file") or f.name == "credentials"
            if isinstance(value := getattr(self, f.name), str)
        }


def _modes(auth: NatsAuth) -> list[str]:
    modes = []
    if auth.user is not None or auth.password_file is not None:
        modes.append("user")
    if auth.token_file is not None:
        modes.append("token")
    if auth.nkey_seed_file is not None:
        modes.append("nkey")
    if auth.credentials is not None:
        modes.append("credentials")
    return modes


_MODE_FIELD: Final = {
    "user": "user",
    "token": "token_file",
    "nkey": "nkey_seed_file",
    "credentials": "credentials",
}


def auth_problem(auth: NatsAuth) -> tuple[str, str] | None:
    """``(field, reason)`` for the first inconsistency, or None. Pure: reads no file."""
    if auth.password_file is not None and not auth.user:
        return "password_file", "needs user: a password authenticates a named user"
    if auth.user is not None and auth.password_file is None:
        return "user", "needs password_file (the password is read from that file)"
    if auth.user == "":
        return "user", "must not be empty"
    modes = _modes(auth)
    if len(modes) > 1:
        fields = ", ".join(_MODE_FIELD[m] for m in modes)
        return (
            _MODE_FIELD[modes[1]],
            f"{fields} are mutually exclusive: choose one way to authenticate",
        )
    if auth.tls_cert_file is not None and auth.tls_key_file is None:
        return "tls_cert_file", "needs tls_key_file (the client certificate's private key)"
    if auth.tls_key_file is not None and auth.tls_cert_file is None:
        return "tls_key_file", "needs tls_cert_file (the client certificate)"
    if auth.tls_hostname == "":
        return "tls_hostname", "must not be empty"
    return None


def connect_kwargs(auth: NatsAuth) -> dict[str, Any]:
    """The ``nats.connect`` keyword arguments for ``auth``, secrets read from their files.

    Raises :class:`ConnectOptionsError` naming the field (and file) that is unusable; the
    error never quotes what a file contains.
    """
    problem = auth_problem(auth)
    if problem is not None:
        raise ConnectOptionsError(problem[0], None, problem[1])
    kwargs: dict[str, Any] = {}
    if auth.user is not None and auth.password_file is not None:
        kwargs["user"] = auth.user
        kwargs["password"] = _read_secret("password_file", auth.password_file)
    if auth.token_file is not None:
        kwargs["token"] = _read_secret("token_file", auth.token_file)
    if auth.nkey_seed_file is not None:
        _check_seed(auth.nkey_seed_file)
        kwargs["nkeys_seed"] = auth.nkey_seed_file
    if auth.credentials is not None:
        _check_creds(auth.credentials)
        kwargs["user_credentials"] = auth.credentials
    if auth.uses_tls_files:
        kwargs["tls"] = _tls_context(auth)
    if auth.tls_hostname is not None:
        kwargs["tls_hostname"] = auth.tls_hostname
    return kwargs


def connect_error_kind(exc: BaseException) -> str:
    """What kind of failure a connection attempt met, so a log line says what to fix:
    ``auth`` (credentials refused), ``tls`` (handshake or certificate), ``config`` (an
    unusable local file), ``timeout`` or ``unreachable``."""
    if isinstance(exc, ConnectOptionsError):
        return "config"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    text = str(exc).lower()
    if isinstance(exc, nats.errors.AuthorizationError) or "authoriz" in text:
        return "auth"
    if "authentication" in text or "user jwt" in text or "expired" in text:
        return "auth"
    if "tls" in text or "ssl" in text or "certificate" in text:
        return "tls"
    if isinstance(exc, TimeoutError | nats.errors.TimeoutError):
        return "timeout"
    return "unreachable"


def telling_error(errors: Sequence[BaseException]) -> BaseException:
    """Of the errors one connection attempt met (in order, the raised one last), the one
    that says what to fix: nats-py reports a refused certificate or credential to its
    error callback, then raises a bare "Connection lost"."""
    assert errors, "a failed attempt has at least the error it raised"
    telling = [e for e in errors if connect_error_kind(e) in ("auth", "tls", "config")]
    return telling[0] if telling else errors[-1]


def _read_file(field: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_SECRET_MAX + 1)
    except OSError as exc:
        raise ConnectOptionsError(field, path, f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > _SECRET_MAX:
        raise ConnectOptionsError(field, path, f"larger than {_SECRET_MAX} bytes")
    return data


def _read_secret(field: str, path: str) -> str:
    """A password or token: the file's one line, trailing newline and spaces dropped."""
    data = _read_file(field, path)
    try:
        text = data.decode("utf-8").rstrip("\r\n \t")
    except UnicodeDecodeError as exc:
        raise ConnectOptionsError(field, path, "is not UTF-8 text") from exc
    if not text:
        raise ConnectOptionsError(field, path, "is empty")
    if "\n" in text or "\r" in text:
        raise ConnectOptionsError(field, path, "holds more than one line")
    return text


def _check_seed(path: str) -> None:
    seed = bytearray(_read_file("nkey_seed_file", path).strip())
    try:
        if not seed.startswith(b"SU"):
            raise ConnectOptionsError(
                "nkey_seed_file", path, "is not an NKey user seed (it must start with SU)"
            )
        key_pair = nkeys.from_seed(seed)
    except nkeys.NkeysError as exc:
        raise ConnectOptionsError("nkey_seed_file", path, "is not a valid NKey seed") from exc
    finally:
        seed[:] = bytes(len(seed))
    key_pair.wipe()


def _check_creds(path: str) -> None:
    data = _read_file("credentials", path)
    if _JWT_BEGIN not in data or _SEED_BEGIN not in data:
        raise ConnectOptionsError(
            "credentials",
            path,
            "is not a NATS .creds file (it needs a user JWT block and a user NKey seed block)",
        )


def _tls_context(auth: NatsAuth) -> ssl.SSLContext:
    """Verify the server against ``tls_ca_file`` (or the system CAs), present the client
    certificate when one is configured."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=auth.tls_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectOptionsError(
            "tls_ca_file", auth.tls_ca_file, f"not a usable CA bundle: {_ssl_reason(exc)}"
        ) from exc
    if auth.tls_cert_file is not None and auth.tls_key_file is not None:
        for field, path in (
            ("tls_cert_file", auth.tls_cert_file),
            ("tls_key_file", auth.tls_key_file),
        ):
            _read_file(field, path)  # names the missing or unreadable one
        try:
            ctx.load_cert_chain(auth.tls_cert_file, auth.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectOptionsError(
                "tls_cert_file",
                auth.tls_cert_file,
                f"certificate and tls_key_file {auth.tls_key_file} are not a usable pair: "
                f"{_ssl_reason(exc)}",
            ) from exc
    return ctx


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
