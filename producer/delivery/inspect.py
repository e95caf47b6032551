"""Reading a spool without touching it, for ``cellos-producer spool stats|check``.

An operator asks this while the daemon runs or after it stopped: how much is waiting, how
old is the oldest, which cells are behind, what state each chain is in, and whether every
byte on disk is intact. Nothing is locked, written or moved; damage is reported, not
repaired (the daemon's own recovery does that at its next start).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import msgspec

from audit.digest import digest_of
from producer.delivery import records as rec
from producer.delivery.spool import (
    STATE_FILE,
    ChainIdentity,
    ChainState,
    SpoolSnapshot,
    segment_indexes,
    segment_path,
)
from producer.errors import SpoolError


class ChainReport(msgspec.Struct, kw_only=True):
    idx: int
    cell_id: str
    run_id: str
    chain_id: str
    source: str
    sequence: int
    acked: int
    unacked: int
    sealed: bool
    last_event_at: str | None


class SegmentReport(msgspec.Struct, kw_only=True):
    name: str
    bytes: int
    records: int
    events: int
    damaged_bytes: int


class SpoolReport(msgspec.Struct, kw_only=True):
    directory: str
    state: str
    """``ok``, ``missing`` (no state file: a spool never stopped cleanly or brand new) or
    ``damaged``."""
    clean_stop: bool
    stopped_at: str | None
    bytes: int
    unacked: int
    oldest_unacked_at: str | None
    segments: list[SegmentReport]
    chains: list[ChainReport]
    backlog_by_cell: dict[str, int]
    problems: list[str] = msgspec.field(default_factory=list)
    quarantined: list[str] = msgspec.field(default_factory=list)


class _Time(msgspec.Struct):
    time: str = ""


_time = msgspec.json.Decoder(_Time)


@dataclass
class _Walk:
    chains: dict[int, ChainState] = field(default_factory=dict)
    first_unacked_at: str | None = None
    problems: list[str] = field(default_factory=list)


def inspect_spool(directory: str) -> SpoolReport:
    """Describe the spool in ``directory``; raises :class:`SpoolError` if there is none."""
    if not os.path.isdir(directory):
        raise SpoolError(directory, "no spool here (is --data-dir right?)")
    walk = _Walk()
    snap, state = _read_state(directory, walk)
    for chain in snap.chains:
        walk.chains[chain.idx] = chain
    segments = [_segment(directory, i, walk) for i in sorted(segment_indexes(directory))]
    chains = []
    backlog: dict[str, int] = {}
    for idx, chain in sorted(walk.chains.items()):
        ident = chain.identity
        behind = max(0, chain.sequence - chain.acked_seq)
        if behind:
            backlog[ident.cell_id] = backlog.get(ident.cell_id, 0) + behind
        chains.append(
            ChainReport(
                idx=idx,
                cell_id=ident.cell_id,
                run_id=ident.run_id,
                chain_id=ident.chain_id,
                source=ident.source,
                sequence=chain.sequence,
                acked=chain.acked_seq,
                unacked=behind,
                sealed=chain.sealed,
                last_event_at=chain.last_event_at,
            )
        )
    quarantine = os.path.join(directory, "quarantine")
    return SpoolReport(
        directory=directory,
        state=state,
        clean_stop=snap.clean,
        stopped_at=snap.stopped_at,
        bytes=sum(s.bytes for s in segments),
        unacked=sum(c.unacked for c in chains),
        oldest_unacked_at=walk.first_unacked_at,
        segments=segments,
        chains=chains,
        backlog_by_cell=backlog,
        problems=walk.problems,
        quarantined=sorted(os.listdir(quarantine)) if os.path.isdir(quarantine) else [],
    )


def _read_state(directory: str, walk: _Walk) -> tuple[SpoolSnapshot, str]:
    path = os.path.join(directory, STATE_FILE)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return SpoolSnapshot(), "missing"
    except OSError as exc:
        raise SpoolError(path, f"cannot read: {exc.strerror}") from exc
    try:
        return msgspec.json.decode(data, type=SpoolSnapshot), "ok"
    except msgspec.DecodeError as exc:
        walk.problems.append(f"{STATE_FILE}: not a valid state file ({exc})")
        return SpoolSnapshot(), "damaged"


def _segment(directory: str, index: int, walk: _Walk) -> SegmentReport:
    path = segment_path(directory, index)
    name = os.path.basename(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        walk.problems.append(f"{name}: cannot read ({exc.strerror})")
        return SegmentReport(name=name, bytes=0, records=0, events=0, damaged_bytes=0)
    records = events = damaged = 0
    for item in rec.scan(data, final=True):
        if isinstance(item, rec.Damage):
            damaged += item.end - item.offset
            walk.problems.append(
                f"{name}: {item.end - item.offset} damaged bytes at offset {item.offset} "
                f"(about {item.records} record(s))"
            )
            continue
        records += 1
        if item.kind == rec.KIND_OPEN:
            ident = msgspec.json.decode(item.body, type=ChainIdentity)
            walk.chains.setdefault(ident.idx, ChainState(identity=ident))
        elif item.kind == rec.KIND_ACK:
            for idx, acked in msgspec.json.decode(item.body, type=list[tuple[int, int]]):
                if idx in walk.chains:
                    chain = walk.chains[idx]
                    chain.acked_seq = max(chain.acked_seq, acked)
        else:
            events += 1
            _event(name, item, walk)
    return SegmentReport(
        name=name, bytes=len(data), records=records, events=events, damaged_bytes=damaged
    )


def _event(name: str, item: rec.Record, walk: _Walk) -> None:
    ev = rec.decode_event(item.body)
    chain = walk.chains.get(ev.chain)
    if chain is None:
        walk.problems.append(f"{name}: event of unknown chain {ev.chain} (its OPEN was lost)")
        return
    if ev.sequence > chain.sequence:
        if ev.sequence != chain.sequence + 1 and chain.sequence:
            walk.problems.append(
                f"{name}: chain {chain.identity.chain_id} jumps from seq {chain.sequence} "
                f"to {ev.sequence}"
            )
        chain.sequence = ev.sequence
        chain.head_hash = digest_of(ev.payload)
        chain.last_event_at = _time.decode(ev.payload).time or chain.last_event_at
        chain.sealed = chain.sealed or bool(item.flags & rec.SEALED)
    if ev.sequence > chain.acked_seq and walk.first_unacked_at is None:
        walk.first_unacked_at = _time.decode(ev.payload).time or None
