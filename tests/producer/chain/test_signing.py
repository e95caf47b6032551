from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from audit.errors import TrustFileError
from audit.keys import (
    b64url_decode,
    b64url_encode,
    kid_for,
    load_trust,
    merge_trust,
    verify_signature,
)
from producer.chain.signing import Signer, generate_key_file
from producer.errors import KeyFileError


def _write_key(path: Path, mode: int = 0o600) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(mode)
    return key


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---- key ids and encodings

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_kid_format_and_value() -> None:
    raw = bytes(range(32))
    kid = kid_for(raw)
    assert re.fullmatch(r"ed25519:[0-9a-f]{16}", kid)
    assert kid == "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
    assert kid_for(bytes(32)) != kid


def test_b64url_is_unpadded_urlsafe_and_strict() -> None:
    raw = b"\xfb\xff" + bytes(30)  # bytes whose standard base64 has '+' and '/'
    text = b64url_encode(raw)
    assert "=" not in text and "+" not in text and "/" not in text
    assert len(text) == 43
    assert b64url_decode(text, 32) == raw
    assert b64url_decode(text + "=", 32) is None  # padding
    assert b64url_decode(base64.b64encode(raw).decode().rstrip("="), 32) is None  # +/
    assert b64url_decode(text[:-1], 32) is None  # short
    assert b64url_decode(text, 33) is None  # wrong size
    # Same bytes, other spelling: 43 characters carry 258 bits, so the last character's
    # two low bits are unused; flipping one must not yield a second accepted spelling.
    respelled = text[:-1] + _ALPHABET[_ALPHABET.index(text[-1]) ^ 1]
    assert base64.urlsafe_b64decode(respelled + "=") == raw  # a lenient decoder agrees
    assert b64url_decode(respelled, 32) is None


def _strict_reference(text: str, size: int) -> bytes | None:
    """What canonical means, spelled slowly: decodes (alphabet, length) to ``size`` bytes
    that encode back to exactly ``text``."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        return None
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return raw if len(raw) == size and b64url_encode(raw) == text else None


@given(
    raw=st.binary(min_size=0, max_size=70),
    size=st.sampled_from([0, 1, 2, 3, 31, 32, 33, 64, 65]),
    edit=st.integers(min_value=-1, max_value=100),
    char=st.sampled_from([*_ALPHABET, "=", "+", "/", " ", "\n", "é"]),
)
def test_b64url_decode_accepts_exactly_the_canonical_spelling(
    raw: bytes, size: int, edit: int, char: str
) -> None:
    text = b64url_encode(raw)
    if 0 <= edit < len(text):  # one character replaced
        text = text[:edit] + char + text[edit + 1 :]
    elif edit >= 0 and edit % 2:  # one appended
        text += char
    assert b64url_decode(text, size) == _strict_reference(text, size)


@pytest.mark.parametrize("size", [1, 2, 3, 32, 64])
def test_every_spare_bit_pattern_of_the_last_character_is_refused(size: int) -> None:
    text = b64url_encode(bytes(size))  # ends in "A" when there are spare bits
    spellings = [text[:-1] + c for c in _ALPHABET]
    accepted = [t for t in spellings if b64url_decode(t, size) is not None]
    spare = (6 - 8 * size % 6) % 6
    assert len(accepted) == len(_ALPHABET) >> spare
    assert all(_strict_reference(t, size) is not None for t in accepted)


# ---- Signer


def test_load_round_trip_signs_verifiably(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    key = _write_key(path)
    signer = Signer.load(path)
    assert signer.public_raw == _raw(key)
    assert signer.kid == kid_for(_raw(key))
    assert base64.urlsafe_b64decode(signer.public_key_b64 + "=") == _raw(key)
    assert "=" not in signer.public_key_b64
    signature = signer.sign(b"payload")
    assert len(signature) == 86 and "=" not in signature
    key.public_key().verify(base64.urlsafe_b64decode(signature + "=="), b"payload")
    assert verify_signature(signer.public_raw, b"payload", signature)
    assert not verify_signature(signer.public_raw, b"payloaD", signature)


def test_configured_kid_overrides_default(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    _write_key(path)
    assert Signer.load(path, kid="prod-2024").kid == "prod-2024"
    with pytest.raises(ValueError):
        Signer.load(path, kid="")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o610, 0o601, 0o660])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.pem"
    _write_key(path, mode)
    with pytest.raises(KeyFileError) as info:
        Signer.load(path)
    assert info.value.path == str(path)
    assert f"{mode:04o}" in info.value.reason and "group or others" in info.value.reason


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.pem"
    _write_key(path, mode)
    assert Signer.load(path).kid.startswith("ed25519:")


def test_missing_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        Signer.load(tmp_path / "absent.pem")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not a PEM PKCS#8 private key"),
        (b"garbage\x00\xff", "not a PEM PKCS#8 private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a PEM"),
        (bytes(32), "not a PEM PKCS#8 private key"),  # a raw seed is not the format
    ],
)
def test_malformed_key_is_refused(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=reason):
        Signer.load(path)


def test_wrong_algorithm_and_encrypted_keys_are_refused(tmp_path: Path) -> None:
    ec = tmp_path / "ec.pem"
    ec.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ec.chmod(0o600)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        Signer.load(ec)
    enc = tmp_path / "enc.pem"
    enc.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    enc.chmod(0o600)
    with pytest.raises(KeyFileError, match="encrypted"):
        Signer.load(enc)


def test_directory_and_fifo_are_refused_without_hanging(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    for path in (directory, fifo):
        with pytest.raises(KeyFileError, match="regular file"):
            Signer.load(path)


# ---- generate_key_file


def test_generate_writes_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "new.pem"
    old = os.umask(0)  # with no umask to help, the mode must still be 0600
    try:
        signer = generate_key_file(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = Signer.load(path)
    assert loaded.public_raw == signer.public_raw and loaded.kid == signer.kid
    assert [p.name for p in tmp_path.iterdir()] == ["new.pem"]  # no temp file left


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(b"precious")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key_file(path)
    assert path.read_bytes() == b"precious"
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key_file(link)


def test_generate_racing_writers_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    results: list[object] = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        barrier.wait()
        try:
            results.append(generate_key_file(path).public_raw)
        except KeyFileError as exc:
            results.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, bytes)]
    assert len(winners) == 1
    assert Signer.load(path).public_raw == winners[0]
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]


def test_generate_never_exposes_the_key_to_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The key bytes only ever live in a file that was 0600 before they were written: the
    # temporary file is already 0600 and non-empty when it is linked into place.
    path = tmp_path / "k.pem"
    seen: list[tuple[int, int]] = []
    real_link = os.link

    def spy(src: str, dst: str) -> None:
        st = os.stat(src)
        seen.append((stat.S_IMODE(st.st_mode), st.st_size))
        real_link(src, dst)

    old = os.umask(0)
    try:
        monkeypatch.setattr(os, "link", spy)
        generate_key_file(path)
    finally:
        os.umask(old)
    assert len(seen) == 1 and seen[0][0] == 0o600 and seen[0][1] > 0


# ---- trust files


def test_trust_round_trip_and_merge_keeps_other_kids(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    a, b = _raw(Ed25519PrivateKey.generate()), _raw(Ed25519PrivateKey.generate())
    assert merge_trust(path, kid_for(a), a) is True
    assert load_trust(path) == {kid_for(a): a}
    assert merge_trust(path, "rotated-2025", b) is True
    assert load_trust(path) == {kid_for(a): a, "rotated-2025": b}
    assert merge_trust(path, "rotated-2025", b) is False  # idempotent
    document = json.loads(path.read_text())
    assert document == {kid_for(a): b64url_encode(a), "rotated-2025": b64url_encode(b)}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trust.json"]


def test_merge_refuses_a_different_key_under_a_known_kid(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    a, b = _raw(Ed25519PrivateKey.generate()), _raw(Ed25519PrivateKey.generate())
    merge_trust(path, "k1", a)
    before = path.read_bytes()
    with pytest.raises(TrustFileError, match="different public key"):
        merge_trust(path, "k1", b)
    assert path.read_bytes() == before


def test_merge_refuses_to_rewrite_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    path.write_text('{"k1": "not a key"}')
    with pytest.raises(TrustFileError):
        merge_trust(path, "k2", bytes(32))
    assert path.read_text() == '{"k1": "not a key"}'


def test_trust_file_accepts_cellos_shape(tmp_path: Path) -> None:
    raw = _raw(Ed25519PrivateKey.generate())
    path = tmp_path / "verify-keys.json"
    path.write_text(json.dumps({"cellos-prod": base64.urlsafe_b64encode(raw).decode().rstrip("=")}))
    assert load_trust(path) == {"cellos-prod": raw}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "not JSON"),
        ("{", "not JSON"),
        ("[]", "must map key ids"),
        ('{"k": 1}', "must map key ids"),
        ('{"k": "AAAA"}', "32-byte"),
        ('{"k": "' + "A" * 43 + '="}', "32-byte"),  # padded
        ('{"k": "' + "+" * 43 + '"}', "32-byte"),  # standard alphabet
        ('{"": "' + "A" * 43 + '"}', "empty key id"),
        ("{}", "lists no keys"),
    ],
)
def test_malformed_trust_files_are_refused(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "trust.json"
    path.write_text(content)
    with pytest.raises(TrustFileError, match=reason) as info:
        load_trust(path)
    assert info.value.path == str(path)


def test_missing_trust_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrustFileError, match="does not exist"):
        load_trust(tmp_path / "absent.json")


# ---- verify_signature


def test_verify_signature_rejects_everything_but_the_right_signature() -> None:
    key = Ed25519PrivateKey.generate()
    signer = Signer(key)
    other = _raw(Ed25519PrivateKey.generate())
    good = signer.sign(b"data")
    assert verify_signature(signer.public_raw, b"data", good)
    assert not verify_signature(other, b"data", good)
    assert not verify_signature(signer.public_raw, b"data", good + "=")
    assert not verify_signature(signer.public_raw, b"data", good[:-1])
    assert not verify_signature(signer.public_raw, b"data", "")
    assert not verify_signature(signer.public_raw, b"data", "!" * 86)
    flipped = bytearray(base64.urlsafe_b64decode(good + "=="))
    flipped[5] ^= 1
    assert not verify_signature(signer.public_raw, b"data", b64url_encode(bytes(flipped)))
    with pytest.raises(ValueError):
        verify_signature(b"short", b"data", good)
