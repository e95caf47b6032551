"""The audit library's one exception tree.

Consumers catch :class:`AuditError`; each error carries the facts needed to act on it as
attributes. Errors from nats-py, msgspec and cryptography are translated at the boundary
with ``raise ... from``.
"""

from __future__ import annotations


class AuditError(Exception):
    """Root of every error raised by the audit package.

    Errors pickle with their fields (a worker process's error reaches the caller as the
    same type), although their constructors take the fields rather than the message.
    """

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[AuditError], args: tuple[object, ...], fields: dict[str, object]
) -> AuditError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(fields)
    return error


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


class EventError(AuditError):
    """A message does not decode into the contract's types (or into an SDK event)."""

    def __init__(self, stream_seq: int | None, reason: str) -> None:
        self.stream_seq = stream_seq
        self.reason = reason
        where = f"stream seq {stream_seq}: " if stream_seq is not None else ""
        super().__init__(f"{where}{reason}")


class NotFoundError(SourceError):
    """A stream (or bucket) the caller named does not exist."""

    def __init__(self, what: str, name: str) -> None:
        self.what = what
        self.name = name
        super().__init__(f"{what} {name} not found")


class AccessDeniedError(SourceError):
    """The NATS user may not publish (or subscribe) to a subject the operation needs:
    typically an auditor scoped to one cell asking for another."""

    def __init__(self, subject: str, action: str) -> None:
        self.subject = subject
        self.action = action
        super().__init__(f"not permitted: {action} ({subject}); check this user's permissions")


class ExportFormatError(SourceError):
    """An export or JSON-lines file is not in the expected shape."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        self.path = path
        self.line = line
        super().__init__(f"{path}:{line}: {reason}")
