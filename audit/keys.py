"""Keys as consumers see them (SPEC 5.1, 5.4): key ids, base64url, signature checks and
trust files.

Trust file: a JSON object mapping key id to the base64url (unpadded) raw 32-byte Ed25519
public key, the shape CellOS uses for its verify-keys file, so one file serves both
verifiers. A trust file may list several keys (rotation): any listed key is accepted.

All writes go to a temporary file in the target directory that is then moved into place,
so a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from typing import Final

import msgspec
import nacl.bindings
import nacl.exceptions

from audit.errors import TrustFileError

PUBLIC_KEY_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
_MAX_TRUST_FILE: Final = 1024 * 1024
_TRUST_FILE_MODE: Final = 0o644
_B64URL_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def kid_for(public_raw: bytes) -> str:
    """The default key id (SPEC 5.1): stable for a key, short enough for every event."""
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:16]


def b64url_encode(raw: bytes) -> str:
    """Unpadded base64url, the form SPEC 5.1/5.4 fix for keys and signatures."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@functools.cache
def _canonical_b64url(size: int) -> re.Pattern[str]:
    """The one unpadded base64url spelling of any ``size`` bytes, as a pattern: whole
    characters, then, when ``8 * size`` is not a multiple of 6, one whose unused low bits
    are zero (every 16th character of the alphabet for 2 bits of data, every 4th for 4)."""
    whole, spare = divmod(8 * size, 6)
    last = f"[{re.escape(_B64URL_ALPHABET[:: 1 << (6 - spare)])}]" if spare else ""
    return re.compile(f"[A-Za-z0-9_-]{{{whole}}}{last}")


def is_b64url(text: str, size: int) -> bool:
    """Whether ``text`` is the one canonical unpadded base64url spelling of ``size`` bytes
    (no padding, no standard-alphabet characters, no stray low bits). Decoding is not
    needed to tell, and a verifier asks this of every signed event."""
    return _canonical_b64url(size).fullmatch(text) is not None


def b64url_decode(text: str, size: int) -> bytes | None:
    """Decode unpadded base64url of exactly ``size`` bytes, or None.

    Strict on purpose (:func:`is_b64url`): only the canonical spelling of a value is
    accepted, so a signature or key string cannot be re-spelled into different event bytes
    that still verify.
    """
    if not is_b64url(text, size):
        return None
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_signature(public_raw: bytes, data: bytes, signature_b64: str) -> bool:
    """Whether ``signature_b64`` is a valid Ed25519 signature of ``data`` under the key.

    A malformed signature string is simply not valid. A public key that is not 32 bytes
    raises ``ValueError``: that is a caller's bug, not a property of the signed data.
    """
    if len(public_raw) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_SIZE} bytes")
    signature = b64url_decode(signature_b64, SIGNATURE_SIZE)
    return signature is not None and verify_detached(public_raw, data, signature)


def verify_detached(public_raw: bytes, data: bytes, signature: bytes) -> bool:
    """Ed25519 verification of a raw 64-byte signature with libsodium (PyNaCl), which
    verifies in well under the time OpenSSL (``cryptography``) takes here; the verifier
    spends most of its CPU in this call."""
    try:
        nacl.bindings.crypto_sign_open(signature + data, public_raw)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def load_trust(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Read a trust file (SPEC 5.4): key id -> raw 32-byte public key.

    A file listing no key is refused: a verifier holding it would reject everything,
    which is almost certainly a deployment mistake worth a clear error.
    """
    where = os.fspath(path)
    trust = _read_trust(where, missing_ok=False)
    if not trust:
        raise TrustFileError(where, "lists no keys")
    return trust


def merge_trust(path: str | os.PathLike[str], kid: str, public_raw: bytes) -> bool:
    """Add ``kid`` -> ``public_raw`` to the trust file, creating it if needed.

    Other keys are kept, so a rotated-out key still verifies old chains. The same kid
    already naming a different key is refused: silently replacing it would make every
    chain signed by the old key fail to verify (or, worse, hide a key swap). Returns
    whether the file changed. Concurrent writers are not coordinated; each write is
    atomic, but two racing merges may lose one of the additions.
    """
    where = os.fspath(path)
    if len(public_raw) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_SIZE} bytes")
    if not kid:
        raise ValueError("a key id must not be empty")
    trust = _read_trust(where, missing_ok=True)
    known = trust.get(kid)
    if known == public_raw:
        return False
    if known is not None:
        raise TrustFileError(where, f"kid {kid!r} already names a different public key")
    trust[kid] = public_raw
    document = {k: b64url_encode(trust[k]) for k in sorted(trust)}
    _write_atomically(where, msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n")
    return True


def _read_trust(where: str, *, missing_ok: bool) -> dict[str, bytes]:
    try:
        with open(where, "rb") as f:
            data = f.read(_MAX_TRUST_FILE + 1)
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise TrustFileError(where, "does not exist") from None
    except OSError as exc:
        raise TrustFileError(where, f"cannot be read: {exc.strerror}") from exc
    if len(data) > _MAX_TRUST_FILE:
        raise TrustFileError(where, "is too large to be a trust file")
    try:
        document = msgspec.json.decode(data, type=dict[str, str])
    except msgspec.ValidationError as exc:
        raise TrustFileError(where, f"must map key ids to key strings: {exc}") from None
    except msgspec.DecodeError as exc:
        raise TrustFileError(where, f"is not JSON: {exc}") from None
    trust: dict[str, bytes] = {}
    for kid, encoded in document.items():
        if not kid:
            raise TrustFileError(where, "has an empty key id")
        raw = b64url_decode(encoded, PUBLIC_KEY_SIZE)
        if raw is None:
            raise TrustFileError(
                where, f"key {kid!r} is not an unpadded base64url 32-byte Ed25519 public key"
            )
        trust[kid] = raw
    return trust


def _write_atomically(where: str, data: bytes) -> None:
    try:
        put_file(where, data, mode=_TRUST_FILE_MODE, place=os.replace)
    except OSError as exc:
        raise TrustFileError(where, f"cannot be written: {exc.strerror}") from exc


def put_file(where: str, data: bytes, *, mode: int, place: Callable[[str, str], None]) -> None:
    """Write ``data`` to a synced temporary file of ``mode`` beside ``where``, then ``place``
    it there (``os.link`` or ``os.replace``): ``where`` only ever names a complete file.

    mkstemp opens with O_CREAT | O_EXCL at 0600, so the content is never more readable
    than that before ``fchmod``.
    """
    directory = os.path.dirname(os.path.abspath(where))
    fd, tmp = tempfile.mkstemp(prefix=".cellos-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        place(tmp, where)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Make a rename or link durable; best effort where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
