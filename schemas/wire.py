"""The guest agent's declaration (SPEC 2.2), the only shape that crosses the vsock."""

from __future__ import annotations

from typing import Final

import msgspec

from schemas.events import GUEST_SOURCES

PROBE_SOURCES: Final = frozenset(GUEST_SOURCES)
"""The kinds the guest agent may declare (docs/protocol.md, "Guest frames")."""

CONTENT_VERSION: Final = 1
MAX_BODY: Final = 4096


class Declaration(msgspec.Struct, frozen=True, gc=False):
    """One decoded guest frame. Wire names are snake_case; nothing here names a cell."""

    content_version: int
    probe_source: str
    guest_pid: int
    guest_comm: str
    guest_monotonic_ns: int
