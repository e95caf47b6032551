"""The producer's Ed25519 signing key (SPEC 5.1).

Key file format: the private key as unencrypted PKCS#8 in PEM (``-----BEGIN PRIVATE
KEY-----``), exactly what ``cryptography`` and ``openssl genpkey -algorithm ed25519`` write.
It is a standard, self-describing container that operators can inspect and convert with
stock tools, and a raw 32-byte seed would be indistinguishable from any other 32 bytes.
The file is unencrypted because the daemon starts unattended; its protection is the file
mode, so a file that grants anything to group or others is refused rather than used: a
key that others could have read must be assumed copied.

Key ids, base64url, verification and trust files are what consumers need too, so they
live in :mod:`audit.keys`.
"""

from __future__ import annotations

import os
import stat
from typing import Final

import nacl.bindings
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit.keys import SIGNATURE_SIZE, b64url_encode, kid_for, put_file
from producer.errors import KeyFileError

_MAX_KEY_FILE: Final = 64 * 1024


class Signer:
    """The producer's private key with the id and public form that events carry."""

    __slots__ = ("_secret", "kid", "public_key_b64", "public_raw")

    def __init__(self, private_key: Ed25519PrivateKey, kid: str | None = None) -> None:
        self.public_raw: Final = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.kid: Final = kid if kid is not None else kid_for(self.public_raw)
        if not self.kid:
            raise ValueError("a configured key id must not be empty")
        self.public_key_b64: Final = b64url_encode(self.public_raw)
        seed = private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        # Signing runs per event in strict mode: libsodium (PyNaCl) signs in about two thirds
        # of the time OpenSSL (cryptography) takes here, with identical bytes (Ed25519 is
        # deterministic). cryptography keeps the key file format and verification.
        self._secret: Final = nacl.bindings.crypto_sign_seed_keypair(seed)[1]

    def sign(self, data: bytes) -> str:
        """Ed25519 over ``data``, as unpadded base64url (the event's ``signature``)."""
        return b64url_encode(nacl.bindings.crypto_sign(data, self._secret)[:SIGNATURE_SIZE])

    @classmethod
    def load(cls, path: str | os.PathLike[str], kid: str | None = None) -> Signer:
        """Load a key file (format in the module docstring); ``kid`` overrides the default.

        Permissions are checked on the opened descriptor, so the file judged is the file
        read even if the path is swapped meanwhile.
        """
        where = os.fspath(path)
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang startup; it is then
            # refused below as not a regular file.
            fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise KeyFileError(where, "does not exist") from None
        except OSError as exc:
            raise KeyFileError(where, f"cannot be opened: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(where, "is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise KeyFileError(
                    where,
                    f"mode {mode:04o} grants access to group or others (chmod 600 it, "
                    "and replace the key if others may have read it)",
                )
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(_MAX_KEY_FILE + 1)
        except OSError as exc:
            raise KeyFileError(where, f"cannot be read: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if len(data) > _MAX_KEY_FILE:
            raise KeyFileError(where, "is too large to be a key file")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise KeyFileError(where, "is encrypted; an unencrypted PKCS#8 key is needed") from None
        except (ValueError, UnsupportedAlgorithm):
            raise KeyFileError(where, "is not a PEM PKCS#8 private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(where, f"holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key, kid)


def generate_key_file(path: str | os.PathLike[str], kid: str | None = None) -> Signer:
    """Create a new key file with mode 0600 and return its signer; never overwrites.

    The key is written and synced under a temporary name created 0600 with O_EXCL, then
    hard-linked to ``path``: the link fails if ``path`` exists (no overwrite, even racing
    another writer), and ``path`` only ever names a complete key.
    """
    where = os.fspath(path)
    if os.path.lexists(where):
        raise KeyFileError(where, "already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # link, not replace: it fails if ``where`` appeared meanwhile
        put_file(where, pem, mode=0o600, place=os.link)
    except FileExistsError:
        raise KeyFileError(where, "already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyFileError(where, f"cannot be written: {exc.strerror}") from exc
    return Signer(key, kid)
