"""Chain arithmetic every consumer needs (SPEC 4, 5.2): digests and sequence numbers."""

from __future__ import annotations

import hashlib
import re
from typing import Final

SEQUENCE_DIGITS: Final = 20
MAX_SEQUENCE: Final = 10**SEQUENCE_DIGITS - 1
DIGEST_PREFIX: Final = "sha256:"
DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")


def digest_of(payload: bytes) -> str:
    """The chain digest (SPEC 5.2) of canonical event bytes."""
    return DIGEST_PREFIX + hashlib.sha256(payload).hexdigest()


def format_sequence(sequence: int) -> str:
    """The ``sequence`` attribute: decimal, zero-padded to 20 digits (SPEC 4)."""
    return f"{sequence:020d}"
