"""Two asyncio idioms every long-lived component here needs, written once."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def wait_set(flag: asyncio.Event, grace_s: float | None) -> bool:
    """Wait for ``flag`` up to ``grace_s`` seconds (None: forever); whether it got set."""
    try:
        await asyncio.wait_for(flag.wait(), grace_s)
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel background tasks and wait until they have finished unwinding."""
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    for task in live:
        with contextlib.suppress(asyncio.CancelledError):
            await task
