"""Export files: a cell's (or the stream's) history in one JSON-lines file that verifies
offline.

Every line is one JSON object. Event lines are the published events byte for byte
(structured mode; binary-mode messages in their rebuilt canonical form), so a bare
``replay --format jsonl`` output is already a valid input. An export adds, in lines whose
one key says what they are:

- first, ``{"cellosExport": {...}}``: stream, subject prefix, cell (or null), the stream
  sequences the export covers, whether the stream's retention limits had removed older
  messages, and when it was made;
- then ``{"cellosHead": {...}}`` per recorded chain head (read before the events, as an
  online verifier does);
- then, before each event line, ``{"cellosMessage": {"streamSeq": N, "subject": S,
  "storedAt": T}}``: where that event was stored, so an event moved to another cell's
  subject is caught offline too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, Final

import msgspec

from audit.errors import ExportFormatError
from audit.events import Received, rfc3339
from schemas.heads import ChainHead

EXPORT_VERSION: Final = 1


class ExportHeader(msgspec.Struct, frozen=True, rename="camel", kw_only=True):
    version: int = EXPORT_VERSION
    stream: str
    subject_prefix: str
    cell: str | None
    first_seq: int
    """The first stream sequence the export covers."""
    last_seq: int
    trimmed: bool
    """The stream's first retained sequence was above 1 (retention limits removed older
    messages), or the export starts after the stream's start: chains may begin later."""
    exported_at: str


class _Where(msgspec.Struct, frozen=True, rename="camel", kw_only=True):
    stream_seq: int | None = None
    subject: str | None = None
    stored_at: str | None = None


class _Line(
    msgspec.Struct,
    frozen=True,
    rename={"header": "cellosExport", "head": "cellosHead", "where": "cellosMessage"},
):
    header: ExportHeader | None = None
    head: ChainHead | None = None
    where: _Where | None = None


_line: Final = msgspec.json.Decoder(_Line)
_encode: Final = msgspec.json.encode
_MARK: Final = b'{"cellos'


class ExportWriter:
    """Writes an export to a binary file object."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def _write(self, line: bytes) -> None:
        self._out.write(line + b"\n")

    def header(self, header: ExportHeader) -> None:
        self._write(b'{"cellosExport":' + _encode(header) + b"}")

    def head(self, head: ChainHead) -> None:
        self._write(b'{"cellosHead":' + _encode(head) + b"}")

    def message(self, message: Received) -> None:
        where = _Where(
            stream_seq=message.stream_seq,
            subject=message.subject,
            stored_at=rfc3339(message.stored_ns) if message.stored_ns is not None else None,
        )
        self._write(b'{"cellosMessage":' + _encode(where) + b"}")
        self._write(message.raw)


class ExportReader:
    """Reads an export (or a bare JSON-lines file of events) line by line: the header and
    heads come first, the messages one at a time (bounded memory)."""

    def __init__(self, path: str, lines: Iterator[bytes]) -> None:
        self._path = path
        self._lines = lines
        self._number = 0
        self.header: ExportHeader | None = None
        self.heads: dict[str, ChainHead] = {}
        self._first: bytes | None = None
        self._read_preamble()

    def _next(self) -> bytes | None:
        for raw in self._lines:
            self._number += 1
            line = raw.rstrip(b"\r\n")
            if line.strip():
                return line
        return None

    def _meta(self, line: bytes) -> _Line | None:
        """The annotation a line carries, or None for an event line."""
        if not line.startswith(_MARK):
            return None
        try:
            return _line.decode(line)
        except msgspec.DecodeError as exc:
            raise ExportFormatError(self._path, self._number, f"bad annotation: {exc}") from exc

    def _read_preamble(self) -> None:
        while (line := self._next()) is not None:
            meta = self._meta(line)
            if meta is None or meta.where is not None:
                self._first = line
                return
            if meta.header is not None:
                if meta.header.version != EXPORT_VERSION:
                    raise ExportFormatError(
                        self._path, self._number, f"export version {meta.header.version}"
                    )
                self.header = meta.header
            elif meta.head is not None:
                self.heads[meta.head.chain_id] = meta.head

    def messages(self) -> Iterator[Received]:
        where: _Where | None = None
        line = self._first
        self._first = None
        while line is not None:
            meta = self._meta(line)
            if meta is not None and meta.where is not None:
                where = meta.where
            elif meta is not None:
                raise ExportFormatError(self._path, self._number, "annotation among the events")
            else:
                yield Received(
                    raw=line,
                    subject=where.subject if where else None,
                    stream_seq=where.stream_seq if where else None,
                )
                where = None
            line = self._next()
