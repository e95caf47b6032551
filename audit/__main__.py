"""``cellos-audit`` and ``python -m audit``: the entry point, kept apart from :mod:`audit.cli`
so that it acts before nats-py is imported.

nats-py imports aiohttp when it is imported, for WebSocket URLs alone, and that import is
about 40 % of what a ``cellos-audit`` process spends starting. ``verify`` starts several such
processes: the command, and reading workers, which run this module again with the command's
arguments (multiprocessing hands them over before it imports the main module). So unless an
argument names a ``ws://`` or ``wss://`` URL, the command makes aiohttp unimportable, which
nats-py takes as "no WebSocket support" (docs/benchmarks.md has the figures). A program
that imports the library keeps its own imports.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

_WEBSOCKET_SCHEMES = ("ws://", "wss://")


def wants_websocket(argv: Sequence[str]) -> bool:
    """Whether any argument names a WebSocket URL (``--nats-url ws://...``, or a list)."""
    return any(scheme in arg.lower() for arg in argv for scheme in _WEBSOCKET_SCHEMES)


if "aiohttp" not in sys.modules and not wants_websocket(sys.argv[1:]):
    sys.modules["aiohttp"] = None  # type: ignore[assignment]  # import raises ImportError


def main() -> int:
    from audit.cli import main as run  # noqa: PLC0415 (after the decision above)

    return run()


if __name__ == "__main__":
    sys.exit(main())
