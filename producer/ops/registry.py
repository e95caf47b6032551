"""Cell registration (SPEC 2, 3): bind before boot, open the chain, seal on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable

from producer.aio import cancel_and_wait
from producer.chain.cell import CellRuntime, CellSettings
from producer.chain.events import ChainContext, Rfc3339Clock
from producer.chain.signing import Signer
from producer.chain.signpolicy import SigningPolicy
from producer.delivery.publisher import Publisher
from producer.errors import RegistrationError
from producer.guest.listener import VsockRouter, bind_unix_socket, serve_unix
from producer.ops.config import CellSpec, Config, socket_path, validate_cell

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 60.0
"""How often the counters of every cell and of the publisher are logged."""

SEALED_RUNS_KEPT = 100_000
"""How many sealed (cell, run) pairs this process remembers to refuse re-registration."""


class Registry:
    """The cells this host is serving, keyed by cell id.

    A cell id can be registered again after it is deregistered, but not with a run id this
    process already sealed: a chain is one registration (SPEC 5.2) and a second chain under
    the same ``cellId``/``runId`` would look like a forked history to a verifier.
    """

    def __init__(
        self,
        config: Config,
        *,
        signer: Signer,
        policy: SigningPolicy,
        publisher: Publisher,
        vsock: VsockRouter | None = None,
        wall: Rfc3339Clock | None = None,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.cells: dict[str, CellRuntime] = {}
        self._signer = signer
        self._policy = policy
        self._publisher = publisher
        self._vsock = vsock
        self._wall = wall or Rfc3339Clock()
        self._mono = mono
        self._sealed_runs: dict[tuple[str, str], None] = {}  # insertion-ordered, bounded
        self._lock = asyncio.Lock()
        self._ticker: asyncio.Task[None] | None = None
        self._settings = CellSettings(
            binary_mode=config.nats.mode == "binary",
            checkpoint_every=config.chain.checkpoint_every,
            checkpoint_interval_s=config.chain.checkpoint_interval_s,
            silence_window_ms=config.silence.window_ms,
            drop_newest=config.queue.spool_full_policy == "drop_newest",
        )

    async def register(self, spec: CellSpec) -> CellRuntime:
        """Bind the cell's socket, open its chain and start reading. The socket exists when
        this returns, so the VM may boot right after."""
        validate_cell(spec, port=self.config.listener.port)
        async with self._lock:
            if spec.cell_id in self.cells:
                raise RegistrationError(spec.cell_id, "already registered")
            if (spec.cell_id, spec.run_id) in self._sealed_runs:
                raise RegistrationError(
                    spec.cell_id, f"run {spec.run_id!r} was already sealed; use a new run_id"
                )
            listen = self.config.listener
            path = socket_path(spec, listen.port)
            for other in self.cells.values():
                if other.socket_path == path:
                    raise RegistrationError(
                        spec.cell_id, f"socket {path} already belongs to cell {other.cell_id!r}"
                    )
                if spec.vsock_cid is not None and other.spec.vsock_cid == spec.vsock_cid:
                    raise RegistrationError(
                        spec.cell_id, f"vsock CID {spec.vsock_cid} belongs to {other.cell_id!r}"
                    )
            sock = bind_unix_socket(path, mode=listen.socket_mode, cell_id=spec.cell_id)
            ctx = ChainContext(
                host_id=self.config.host_id,
                cell_id=spec.cell_id,
                run_id=spec.run_id,
                spec_signature_hash=spec.spec_signature_hash,
                chain_id=secrets.token_hex(8),
                subject_prefix=self.config.nats.subject_prefix,
            )
            cell = CellRuntime(
                spec,
                ctx,
                signer=self._signer,
                policy=self._policy,
                publisher=self._publisher,
                settings=self._settings,
                max_connections=listen.max_connections_per_cell,
                wall=self._wall,
                mono=self._mono,
            )
            try:
                await cell.open(
                    host_id=self.config.host_id,
                    socket_path=path,
                    signing_mode=self.config.signing.mode,
                )
                await serve_unix(cell.listener, sock)
            except BaseException:
                sock.close()
                _remove_socket(path)
                raise
            self.cells[spec.cell_id] = cell
            if self._vsock is not None and spec.vsock_cid is not None:
                self._vsock.by_cid[spec.vsock_cid] = cell.listener
        log.info(
            "cell_registered",
            extra={
                "fields": {
                    "cell_id": spec.cell_id,
                    "run_id": spec.run_id,
                    "chain_id": ctx.chain_id,
                    "socket": path,
                }
            },
        )
        return cell

    async def deregister(
        self, cell_id: str, reason: str = "deregistered", *, grace_s: float = 5.0
    ) -> None:
        """Stop the listener, queue what was read, seal the chain, remove the socket file.

        ``grace_s`` bounds the wait for queue room (see :meth:`CellRuntime.seal`)."""
        async with self._lock:
            cell = self.cells.pop(cell_id, None)
            if cell is None:
                raise RegistrationError(cell_id, "not registered")
            if self._vsock is not None and cell.spec.vsock_cid is not None:
                self._vsock.by_cid.pop(cell.spec.vsock_cid, None)
            await cell.seal(reason, grace_s=grace_s)
            self._sealed_runs[(cell_id, cell.ctx.run_id)] = None
            if len(self._sealed_runs) > SEALED_RUNS_KEPT:
                del self._sealed_runs[next(iter(self._sealed_runs))]
            _remove_socket(cell.socket_path)
        log.info("cell_sealed", extra={"fields": {"reason": reason, **cell.snapshot()}})

    async def deregister_all(self, reason: str, *, grace_s: float = 5.0) -> None:
        """Seal every cell, all within one ``grace_s`` however many cells there are."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        for cell_id in list(self.cells):
            with contextlib.suppress(RegistrationError):
                remaining = max(0.0, deadline - loop.time())
                await self.deregister(cell_id, reason, grace_s=remaining)

    def start_ticker(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    async def stop_ticker(self) -> None:
        await cancel_and_wait(self._ticker)
        self._ticker = None

    async def _tick_loop(self) -> None:
        # A tenth of the silence window keeps agent_silenced within 10% of its deadline.
        period = min(1.0, self.config.silence.window_ms / 10_000)
        loop = asyncio.get_running_loop()
        next_stats = loop.time() + STATS_INTERVAL_S
        while True:
            await asyncio.sleep(period)
            for cell in list(self.cells.values()):
                try:
                    await cell.run_tick()
                except Exception:  # one cell's trouble must not stop the others' duties
                    log.exception("cell_tick_failed", extra={"fields": {"cell_id": cell.cell_id}})
            if loop.time() >= next_stats:
                next_stats = loop.time() + STATS_INTERVAL_S
                self._log_stats()

    def _log_stats(self) -> None:
        """One line per cell with its counters, and one for the publisher: what an operator
        greps for when a guest's telemetry looks thin (rejects by reason, drops, backlog)."""
        for cell in self.cells.values():
            log.info("cell_stats", extra={"fields": cell.snapshot()})
        st = self._publisher.stats
        log.info(
            "publisher_stats",
            extra={
                "fields": {
                    "acked": st.acked,
                    "duplicates": st.duplicates,
                    "retries": st.retries,
                    "timeouts": st.timeouts,
                    "error_replies": st.error_replies,
                    "reconnects": st.reconnects,
                    "backlog": self._publisher.backlog,
                }
            },
        )


def _remove_socket(path: str) -> None:
    """Remove the cell's socket file, and only if it is still a socket."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
