"""Operational logs: one line per meaningful event, machine-readable unless a human watches.

Under systemd or a container runtime stderr goes to a collector, which wants one JSON
object per line (``ts``, ``level``, ``logger``, ``event`` and the event's fields); on a
terminal the same records render as ``key=value`` text. Both are plain stdlib ``logging``
so third-party libraries (nats-py, asyncio) land in the same stream and format.

An event is a short snake_case name plus fields::

    log = get_logger(__name__)
    event(log, logging.INFO, "cell_registered", cell_id=spec.cell_id, run_id=spec.run_id)
    # equivalent: log.info("cell_registered", extra={"fields": {"cell_id": ..., ...}})

Values that are not JSON types are written as ``str(value)``. Fields are values named by
the caller, never whole objects, so keys and payloads cannot leak by accident. Guest
strings such as ``guest_comm`` may contain anything; both formats escape control
characters so a guest cannot forge log lines.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from collections.abc import Mapping
from typing import Final, TextIO

import msgspec

__all__ = ["JsonFormatter", "TextFormatter", "event", "get_logger", "setup_logging"]

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_RESERVED: Final = frozenset({"ts", "level", "logger", "event", "exc"})
_ENCODER: Final = msgspec.json.Encoder(enc_hook=str)

# The handler setup_logging installed last, so a second call replaces it instead of
# doubling every line.
_installed: logging.Handler | None = None


def get_logger(name: str) -> logging.Logger:
    """A stdlib logger; exists so every module imports logging helpers from one place."""
    return logging.getLogger(name)


def event(logger: logging.Logger, level: int, name: str, /, **fields: object) -> None:
    """Log event ``name`` with ``fields`` at ``level`` (``logging.INFO`` etc.).

    Positional-only parameters leave every keyword free for a field name.
    """
    if logger.isEnabledFor(level):
        # stacklevel=2 attributes the record to the caller, not to this helper.
        logger.log(level, name, extra={"fields": fields}, stacklevel=2)


def _timestamp(record: logging.LogRecord) -> str:
    when = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """The record's fields, renamed where they would shadow a fixed key."""
    raw = getattr(record, "fields", None)
    if not isinstance(raw, Mapping):
        return {}
    return {(f"field_{k}" if k in _RESERVED else str(k)): v for k, v in raw.items()}


def _exception(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    parts = []
    if record.exc_info:
        parts.append(formatter.formatException(record.exc_info))
    elif record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return "\n".join(parts) or None


class JsonFormatter(logging.Formatter):
    """One JSON object per record, newline-free, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update(_fields(record))
        exc = _exception(self, record)
        if exc is not None:
            line["exc"] = exc
        try:
            return _ENCODER.encode(line).decode()
        except (TypeError, ValueError):
            # e.g. a dict with non-string keys: degrade to text rather than lose the line.
            return _ENCODER.encode({k: _plain(v) for k, v in line.items()}).decode()


def _plain(value: object) -> object:
    return value if isinstance(value, str | int | float | bool | None) else str(value)


def _text_value(value: object) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = _ENCODER.encode(value).decode()
        except (TypeError, ValueError):
            text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "='):
        return text
    # JSON string quoting escapes quotes and control characters.
    return _ENCODER.encode(text).decode()


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger event k=v ...`` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.isprintable():
            message = _ENCODER.encode(message).decode()
        parts = [_timestamp(record), f"{record.levelname:<7}", record.name, message]
        parts.extend(f"{k}={_text_value(v)}" for k, v in _fields(record).items())
        line = " ".join(parts)
        exc = _exception(self, record)
        return f"{line}\n{exc}" if exc is not None else line


def setup_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Route all logging to ``stream`` (default: stderr) in the chosen format.

    ``level`` and ``fmt`` take the values of ``log.level`` / ``log.format``; ``"auto"``
    means text when ``stream`` is a terminal. Safe to call again, e.g. after loading the
    config, and replaces the previous setup rather than adding to it.
    """
    global _installed  # noqa: PLW0603 - logging configuration is process-global by nature
    if level.lower() not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(_LEVELS)}")
    if fmt not in ("auto", "json", "text"):
        raise ValueError(f"unknown log format {fmt!r}; expected auto, json or text")
    target = sys.stderr if stream is None else stream
    if fmt == "auto":
        isatty = getattr(target, "isatty", None)
        fmt = "text" if isatty is not None and isatty() else "json"
    handler = logging.StreamHandler(target)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        _installed.close()
    root.addHandler(handler)
    root.setLevel(_LEVELS[level.lower()])
    _installed = handler
