"""The ``cellos-audit`` entry point leaves aiohttp out unless a WebSocket URL needs it, in the
command and in the worker processes it spawns."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from audit.__main__ import wants_websocket

ROOT = Path(__file__).resolve().parents[2]

# What the console script does (``from audit.__main__ import main``), then what a verify
# worker does: a spawned process that imports nats-py to read.
_SCRIPT = textwrap.dedent(
    """
    import concurrent.futures, multiprocessing, sys
    from audit.__main__ import main

    def loaded():
        import nats.aio.transport
        return "aiohttp.client" in sys.modules, nats.aio.transport.aiohttp is not None

    if __name__ == "__main__":
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            print(loaded(), pool.submit(loaded).result())
    """
)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["verify", "--nats-url", "nats://127.0.0.1:4222"], False),
        (["verify", "--nats-url", "tls://a:4222,nats://b:4222"], False),
        (["verify", "--jsonl", "events.jsonl", "--trust", "t.json"], False),
        ([], False),
        (["verify", "--nats-url", "ws://127.0.0.1:8080"], True),
        (["verify", "--nats-url=WSS://relay:443"], True),
        (["cells", "--nats-url", "nats://a:4222,wss://b:443"], True),
    ],
)
def test_websocket_urls_are_recognized(argv: list[str], expected: bool) -> None:
    assert wants_websocket(argv) is expected


@pytest.mark.parametrize(
    ("url", "loaded"),
    [("nats://127.0.0.1:4222", False), ("ws://127.0.0.1:8080", True)],
)
def test_aiohttp_is_imported_only_for_websocket_urls(
    tmp_path: Path, url: str, loaded: bool
) -> None:
    script = tmp_path / "cellos-audit"
    script.write_text(_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), "verify", "--nats-url", url],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout, however it is installed
    )
    assert done.returncode == 0, done.stderr
    # the command, then its worker: (aiohttp imported, nats-py has WebSocket support)
    assert done.stdout.strip() == f"{(loaded, loaded)} {(loaded, loaded)}"
