"""The recorded chain head (SPEC 5.3): what the producer keeps outside the stream so a
verifier can tell a truncated tail from a quiet cell."""

from __future__ import annotations

import msgspec


class ChainHead(msgspec.Struct, frozen=True, rename="camel", kw_only=True):
    """The value stored under ``<cellId>.<runId>.<chainId>``: one key per chain, so an
    auditor allowed to read one cell's keys reads that cell's heads and nothing else."""

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
        return head_key(self.cell_id, self.run_id, self.chain_id)


def head_key(cell_id: str, run_id: str, chain_id: str) -> str:
    """The bucket key of a chain's recorded head."""
    return f"{cell_id}.{run_id}.{chain_id}"
