"""A real stream of several chains, exported once, and altered copies with one fault each.

The stream is made by the real producer against a real nats-server: cell-1 run-1 (sealed),
cell-2 run-1 (sealed) and cell-1 run-2 (open, with recorded heads). Each fault is a
function from the pristine export to an altered one, with the verdict the verifier must
reach: which chain, which sequence, which reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from audit.canonical import canonical
from audit.consumer import Scope, export
from audit.digest import digest_of, format_sequence
from audit.source import Broker, ConnectOptions
from audit.verify import Reason, Verdict
from producer.chain.signing import Signer
from producer.guest.simulator import run_guest
from producer.ops.embedded import EmbeddedNats
from schemas.events import GUEST_TYPE
from tests.chains import new_signer
from tests.support import cell_spec, eventually, running_producer

FIRST, SECOND, OPEN = ("cell-1", "run-1"), ("cell-2", "run-1"), ("cell-1", "run-2")
PREFIX = "cellos.telemetry"


@dataclasses.dataclass
class Message:
    where: dict[str, Any]
    event: dict[str, Any]
    raw: bytes


@dataclasses.dataclass
class Export:
    """An export file taken apart: header, heads, and the messages in stream order."""

    header: dict[str, Any]
    heads: list[dict[str, Any]]
    messages: list[Message]

    @classmethod
    def parse(cls, data: bytes) -> Export:
        lines = [line for line in data.split(b"\n") if line]
        header = msgspec.json.decode(lines[0])["cellosExport"]
        heads = [
            msgspec.json.decode(x)["cellosHead"] for x in lines if x.startswith(b'{"cellosHead"')
        ]
        body = lines[1 + len(heads) :]
        messages = [
            Message(msgspec.json.decode(w)["cellosMessage"], msgspec.json.decode(e), e)
            for w, e in zip(body[::2], body[1::2], strict=True)
        ]
        return cls(header, heads, messages)

    def render(self) -> bytes:
        out = [b'{"cellosExport":' + msgspec.json.encode(self.header) + b"}"]
        out += [b'{"cellosHead":' + msgspec.json.encode(h) + b"}" for h in self.heads]
        for m in self.messages:
            out += [b'{"cellosMessage":' + msgspec.json.encode(m.where) + b"}", m.raw]
        return b"\n".join(out) + b"\n"

    def copy(self) -> Export:
        return Export(
            dict(self.header),
            [dict(h) for h in self.heads],
            [Message(dict(m.where), m.event, m.raw) for m in self.messages],
        )

    def chain(self, key: tuple[str, str]) -> list[int]:
        """Indexes of one chain's messages, in stream order."""
        return [
            i
            for i, m in enumerate(self.messages)
            if (m.event["data"]["cellId"], m.event["data"]["runId"]) == key
        ]

    def chain_id(self, key: tuple[str, str]) -> str:
        return str(self.messages[self.chain(key)[0]].event["id"]).rpartition("-")[0]

    def at(self, key: tuple[str, str], sequence: int) -> int:
        return next(
            i for i in self.chain(key) if int(self.messages[i].event["sequence"]) == sequence
        )

    def guest_at(self, key: tuple[str, str], skip: int = 3) -> int:
        """Index of a signed guest event some way into a chain."""
        guests = [
            i for i in self.chain(key) if self.messages[i].event["type"].startswith(GUEST_TYPE)
        ]
        return guests[skip]

    def replace(self, index: int, event: dict[str, Any]) -> None:
        self.messages[index] = Message(self.messages[index].where, event, canonical(event))


@dataclasses.dataclass
class Pristine:
    export: Export
    signer: Signer

    @property
    def trust(self) -> dict[str, bytes]:
        return {self.signer.kid: self.signer.public_raw}


def build(tmp: Path) -> Pristine:
    """Run the producer once and export the stream (with sync callers in mind)."""
    return asyncio.run(_build(tmp))


async def _build(tmp: Path) -> Pristine:
    async with (
        EmbeddedNats(tmp / "nats") as server,
        running_producer(server.url, cells=2, signing={"mode": "strict"}) as (p, signer, base),
    ):
        registry = p.registry
        assert registry is not None and p.publisher is not None and p.heads is not None
        for n, cell_id in enumerate(("cell-1", "cell-2")):
            cell = registry.cells[cell_id]
            await run_guest(cell.socket_path, rate=0, count=20, seed=n)
            await eventually(lambda cell=cell: cell.counters.accepted == 20)
            await registry.deregister(cell_id)
        again = msgspec.structs.replace(
            cell_spec(base, 1), run_id="run-2", vsock_uds_base=f"{base}/again"
        )
        cell = await registry.register(again)
        await run_guest(cell.socket_path, rate=0, count=12, seed=7)
        await eventually(lambda: cell.counters.accepted == 12)
        assert await p.drain(10)
        assert await p.heads.flush(10)
        path = tmp / "pristine.jsonl"
        async with await Broker.connect(ConnectOptions(url=server.url)) as broker:
            with path.open("wb") as out:
                await export(broker, Scope(), out)
    return Pristine(Export.parse(path.read_bytes()), signer)


def sign(event: dict[str, Any], signer: Signer) -> dict[str, Any]:
    """Re-sign an edited event as its producer (or an impostor) would."""
    body = {k: v for k, v in event.items() if k != "signature"}
    body["signkid"] = signer.kid
    body["signature"] = signer.sign(canonical(body))
    return body


def relink(event: dict[str, Any], previous: bytes, sequence: int, chain_id: str) -> dict[str, Any]:
    return {
        **event,
        "id": f"{chain_id}-{sequence}",
        "sequence": format_sequence(sequence),
        "prevhash": digest_of(previous),
    }


# --------------------------------------------------------------------------- the faults

Expected = tuple[tuple[str, str], Verdict, int | None, Reason | None]
"""(chain, verdict, first failing sequence, reason)."""
Fault = Callable[[Pristine], tuple[Export, Expected]]


def changed_data(p: Pristine) -> tuple[Export, Expected]:
    e = p.export.copy()
    i = e.guest_at(FIRST)
    event = msgspec.json.decode(e.messages[i].raw)
    event["data"]["guestPid"] += 1
    e.replace(i, event)
    return e, (FIRST, Verdict.TAMPERED, int(event["sequence"]), Reason.BAD_SIGNATURE)


def changed_attribute(p: Pristine) -> tuple[Export, Expected]:
    e = p.export.copy()
    i = e.guest_at(SECOND)
    event = msgspec.json.decode(e.messages[i].raw)
    event["time"] = "2020-01-01T00:00:00.000000Z"
    e.replace(i, event)
    return e, (SECOND, Verdict.TAMPERED, int(event["sequence"]), Reason.BAD_SIGNATURE)


def deleted_event(p: Pristine) -> tuple[Export, Expected]:
    e = p.export.copy()
    i = e.guest_at(FIRST, 5)
    sequence = int(e.messages[i].event["sequence"])
    del e.messages[i]
    return e, (FIRST, Verdict.TAMPERED, sequence, Reason.SEQUENCE_JUMP)


def swapped_events(p: Pristine) -> tuple[Export, Expected]:
    """Two neighbours exchange places in the history (sequence, id and links rewritten)."""
    e = p.export.copy()
    i = e.guest_at(SECOND, 4)
    j = e.at(SECOND, int(e.messages[i].event["sequence"]) + 1)
    a, b = msgspec.json.decode(e.messages[i].raw), msgspec.json.decode(e.messages[j].raw)
    for name in ("id", "sequence", "prevhash"):
        a[name], b[name] = b[name], a[name]
    subjects = e.messages[j].where["subject"], e.messages[i].where["subject"]
    e.replace(i, b)
    e.replace(j, a)
    e.messages[i].where["subject"], e.messages[j].where["subject"] = subjects
    return e, (SECOND, Verdict.TAMPERED, int(b["sequence"]), Reason.BAD_SIGNATURE)


def exact_duplicate(p: Pristine) -> tuple[Export, Expected]:
    e = p.export.copy()
    i = e.guest_at(FIRST)
    e.messages.insert(i + 4, e.messages[i])
    return e, (FIRST, Verdict.INTACT_SEALED, None, None)


def conflicting_duplicate(p: Pristine) -> tuple[Export, Expected]:
    e = p.export.copy()
    i = e.guest_at(FIRST)
    event = msgspec.json.decode(e.messages[i].raw)
    event["data"]["guestComm"] = "evil"
    e.messages.insert(i + 4, Message(e.messages[i].where, event, canonical(event)))
    return e, (FIRST, Verdict.TAMPERED, int(event["sequence"]), Reason.CONFLICTING_DUPLICATE)


def cut_tail(p: Pristine) -> tuple[Export, Expected]:
    e = p.export.copy()
    chain = e.chain(SECOND)
    last_kept = int(e.messages[chain[-4]].event["sequence"])
    for i in reversed(chain[-3:]):
        del e.messages[i]
    return e, (SECOND, Verdict.TRUNCATED, last_kept + 1, Reason.TRUNCATED)


def cut_tail_without_head(p: Pristine) -> tuple[Export, Expected]:
    e, _ = cut_tail(p)
    chain_id = p.export.chain_id(SECOND)
    e.heads = [h for h in e.heads if h["chainId"] != chain_id]
    return e, (SECOND, Verdict.UNANCHORED, None, None)


def spliced(p: Pristine) -> tuple[Export, Expected]:
    """cell-2's event fitted into cell-1's chain (id, sequence and link rewritten)."""
    e = p.export.copy()
    i = e.guest_at(FIRST)
    target = e.messages[i]
    sequence = int(target.event["sequence"])
    previous = e.messages[e.at(FIRST, sequence - 1)].raw
    donor = msgspec.json.decode(e.messages[e.guest_at(SECOND)].raw)
    e.messages[i] = Message(
        target.where,
        donor,
        canonical(relink(donor, previous, sequence, e.chain_id(FIRST))),
    )
    return e, (FIRST, Verdict.TAMPERED, sequence, Reason.SPLICED)


def moved_subject(p: Pristine) -> tuple[Export, Expected]:
    e = p.export.copy()
    i = e.guest_at(SECOND)
    m = e.messages[i]
    m.where["subject"] = m.where["subject"].replace(".cell-2.", ".cell-1.")
    return e, (SECOND, Verdict.TAMPERED, int(m.event["sequence"]), Reason.WRONG_SUBJECT)


def resigned_untrusted(p: Pristine) -> tuple[Export, Expected]:
    e = p.export.copy()
    i = e.guest_at(OPEN)
    event = msgspec.json.decode(e.messages[i].raw)
    event["data"]["guestComm"] = "mallory"
    e.replace(i, sign(event, new_signer()))
    return e, (OPEN, Verdict.TAMPERED, int(event["sequence"]), Reason.UNKNOWN_KEY)


def after_seal(p: Pristine) -> tuple[Export, Expected]:
    """A validly signed, properly linked event after the seal."""
    e = p.export.copy()
    chain = e.chain(SECOND)
    sealed = e.messages[chain[-1]]
    sequence = int(sealed.event["sequence"]) + 1
    guest = e.messages[e.guest_at(SECOND)]
    extra = sign(relink(guest.event, sealed.raw, sequence, e.chain_id(SECOND)), p.signer)
    e.messages.insert(chain[-1] + 1, Message(dict(guest.where), extra, canonical(extra)))
    return e, (SECOND, Verdict.TAMPERED, sequence, Reason.AFTER_SEAL)


def forged_opened(p: Pristine) -> tuple[Export, Expected]:
    """A validly signed ``opened`` continuing the open chain, as if it started again."""
    e = p.export.copy()
    chain = e.chain(OPEN)
    last = e.messages[chain[-1]]
    sequence = int(last.event["sequence"]) + 1
    opened = e.messages[chain[0]]
    event = sign(relink(opened.event, last.raw, sequence, e.chain_id(OPEN)), p.signer)
    e.messages.append(Message(opened.where, event, canonical(event)))
    return e, (OPEN, Verdict.TAMPERED, sequence, Reason.RESTARTED)


FAULTS: dict[str, Fault] = {
    f.__name__.replace("_", "-"): f
    for f in (
        changed_data,
        changed_attribute,
        deleted_event,
        swapped_events,
        exact_duplicate,
        conflicting_duplicate,
        cut_tail,
        cut_tail_without_head,
        spliced,
        moved_subject,
        resigned_untrusted,
        after_seal,
        forged_opened,
    )
}

PRISTINE: dict[tuple[str, str], Verdict] = {
    FIRST: Verdict.INTACT_SEALED,
    SECOND: Verdict.INTACT_SEALED,
    OPEN: Verdict.INTACT_OPEN,
}
