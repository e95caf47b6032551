"""The recorded chain head (SPEC 5.3): what the producer keeps outside the stream so a
verifier can tell a truncated tail from a quiet cell."""

from __future__ import annotations

import msgspec


class ChainHead(msgspec.Struct, frozen=True, rename="camel", kw_only=True):
    """The value stored under ``<cellId>.<runId>``."""

    cell_id: str
    run_id: str
    chain_id: str
    sequence: int
    digest: str
    event_id: str
    type: str
    sealed: bool = False

    @property
    def key(self) -> str:
        return f"{self.cell_id}.{self.run_id}"
