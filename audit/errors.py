"""The audit library's one exception tree.

Consumers catch :class:`AuditError`; each error carries the facts needed to act on it as
attributes. Errors from nats-py, msgspec and cryptography are translated at the boundary
with ``raise ... from``.
"""

from __future__ import annotations


class AuditError(Exception):
    """Root of every error raised by the audit package."""


class CanonicalizationError(AuditError):
    """A value cannot be put into RFC 8785 canonical form (e.g. NaN, a non-string key)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class TrustFileError(AuditError):
    """A trust file (SPEC 5.4) cannot be read or does not have the expected shape."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"trust file {path}: {reason}")


class SourceError(AuditError):
    """The event source (NATS, JetStream, an export file) cannot be read."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class MessageError(AuditError):
    """A NATS message is not a CloudEvent in either binding mode."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ConnectOptionsError(AuditError):
    """A NATS security setting cannot be used: inconsistent settings, or a named file that
    is missing, unreadable or malformed. ``field`` is the setting (a ``[nats]`` key),
    ``path`` the file when one is involved; the message never quotes a file's content."""

    def __init__(self, field: str, path: str | None, reason: str) -> None:
        self.field = field
        self.path = path
        self.reason = reason
        where = f" ({path})" if path is not None else ""
        super().__init__(f"nats {field}{where}: {reason}")
