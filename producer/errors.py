"""The producer's one exception tree.

Every error a caller may want to handle derives from :class:`ProducerError` and carries
the facts needed to act on it as attributes, so callers never parse messages. Errors from
third-party libraries (nats-py, cryptography, msgspec) are translated at the boundary with
``raise ... from``.
"""

from __future__ import annotations


class ProducerError(Exception):
    """Root of every error raised by the producer package."""


class ConfigError(ProducerError):
    """A configuration value is missing, unknown or invalid; ``key`` names it (dotted path)."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"config key {key!r}: {reason}")


class KeyFileError(ProducerError):
    """The signing key file is missing, malformed or readable by others."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"signing key {path}: {reason}")


class RegistrationError(ProducerError):
    """A cell registration was refused (bad id, duplicate, socket cannot be bound).

    ``field`` names the registration field at fault when one is (``vsock_uds_base``);
    ``conflict`` says the request is fine but clashes with what is registered or sealed
    (HTTP 409 rather than 400 on the control API).
    """

    def __init__(
        self, cell_id: str, reason: str, *, field: str | None = None, conflict: bool = False
    ) -> None:
        self.cell_id = cell_id
        self.reason = reason
        self.field = field
        self.conflict = conflict
        super().__init__(f"cell {cell_id!r}: {reason}")


class ChainError(ProducerError):
    """An event cannot be sealed into its chain (malformed envelope, no signer for a signed
    event, sequence space exhausted, inconsistent restored head). The chain is unchanged."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class SpoolError(ProducerError):
    """The write-ahead spool cannot be opened, written or read; ``path`` names what."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"spool {path}: {reason}")


class BrokerError(ProducerError):
    """Base for problems talking to NATS / JetStream."""


class StreamConfigError(BrokerError):
    """The JetStream stream exists but cannot keep the delivery promise (SPEC 6)."""

    def __init__(self, stream: str, problems: list[str]) -> None:
        self.stream = stream
        self.problems = problems
        super().__init__(f"stream {stream}: " + "; ".join(problems))


class PublishError(BrokerError):
    """JetStream refused a message in a way retrying will not fix."""

    def __init__(self, subject: str, msg_id: str, reason: str) -> None:
        self.subject = subject
        self.msg_id = msg_id
        self.reason = reason
        super().__init__(f"publish {subject} ({msg_id}): {reason}")


class EmbeddedServerError(BrokerError):
    """The embedded nats-server could not be found or started."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
