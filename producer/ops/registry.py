"""Cell registration (SPEC 2, 3, 5.2, 7): bind before boot, open or continue the chain,
suspend on a stop, seal on the way out.

A registration (cell id + run id) owns one chain. When the spool already holds an open chain
for it, that chain continues (``resumed``); when the spool knows nothing of it, a new chain
opens, naming the chain it replaces (``supersedes``) if the spool was lost and the broker
remembers one. A sealed run stays sealed: registering it again is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from probes.scheduler import ProbeScheduler, probes_for
from producer.aio import cancel_and_wait
from producer.chain.cell import CellCounters, CellRuntime, CellSettings
from producer.chain.events import ChainContext, Rfc3339Clock
from producer.chain.signing import Signer
from producer.chain.signpolicy import SigningPolicy
from producer.delivery.spool import ChainState, Spool
from producer.errors import RegistrationError
from producer.guest.listener import VsockRouter, bind_unix_socket, serve_unix
from producer.ops.config import CellSpec, Config, socket_path, validate_cell
from producer.ops.logs import event

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 60.0
"""How often the counters of every cell, the spool and the publisher are logged."""

SupersedesLookup = Callable[[str, str], Awaitable[dict[str, Any] | None]]
"""``(cell_id, run_id) -> supersedes`` for a new chain of a registration whose state may
have been lost (from the broker's recorded heads), or None."""

StatsHook = Callable[[], None]
SEALED_KEPT = 1000
"""Deregistered cells remembered for status queries."""


class Registry:
    """The cells this host is serving, keyed by cell id."""

    def __init__(
        self,
        config: Config,
        *,
        signer: Signer,
        policy: SigningPolicy,
        spool: Spool,
        vsock: VsockRouter | None = None,
        wall: Rfc3339Clock | None = None,
        mono: Callable[[], float] = time.monotonic,
        lookup: SupersedesLookup | None = None,
        on_stats: StatsHook | None = None,
        probes: ProbeScheduler | None = None,
    ) -> None:
        self.config = config
        self.cells: dict[str, CellRuntime] = {}
        self.signer = signer
        self._policy = policy
        self._spool = spool
        self._vsock = vsock
        self._wall = wall or Rfc3339Clock()
        self._mono = mono
        self._lookup = lookup
        self._on_stats = on_stats
        self.probes = probes
        self.sealed: dict[str, CellRuntime] = {}
        """Recently deregistered cells, oldest first (bounded), for status queries."""
        self.retired = CellCounters()
        """Counters of cells no longer served, so process-wide totals never go back."""
        self._lock = asyncio.Lock()
        self._ticker: asyncio.Task[None] | None = None
        self._settings = CellSettings(
            host_id=config.host_id,
            signing_mode=config.signing.mode,
            checkpoint_every=config.chain.checkpoint_every,
            checkpoint_interval_s=config.chain.checkpoint_interval_s,
            silence_window_ms=config.silence.window_ms,
            drop_newest=config.spool.full_policy == "drop_newest",
            frame_timeout_s=config.listener.frame_timeout_s,
            log_interval_s=config.listener.log_interval_s,
        )

    # -- registration -----------------------------------------------------------------------

    def bind(self, spec: CellSpec) -> socket.socket:
        """Validate ``spec`` against the cells served and bind its socket (not yet served)."""
        validate_cell(spec, port=self.config.listener.port)
        if spec.cell_id in self.cells:
            raise RegistrationError(spec.cell_id, "already registered", conflict=True)
        if self._spool.was_sealed(spec.cell_id, spec.run_id):
            raise RegistrationError(
                spec.cell_id,
                f"run {spec.run_id!r} was already sealed; use a new run_id",
                field="run_id",
                conflict=True,
            )
        path = socket_path(spec, self.config.listener.port)
        for other in self.cells.values():
            if other.socket_path == path:
                raise RegistrationError(
                    spec.cell_id,
                    f"socket {path} already belongs to cell {other.cell_id!r}",
                    field="vsock_uds_base",
                    conflict=True,
                )
            if spec.vsock_cid is not None and other.spec.vsock_cid == spec.vsock_cid:
                raise RegistrationError(
                    spec.cell_id,
                    f"vsock CID {spec.vsock_cid} belongs to {other.cell_id!r}",
                    field="vsock_cid",
                    conflict=True,
                )
        listen = self.config.listener
        return bind_unix_socket(path, mode=listen.socket_mode, cell_id=spec.cell_id)

    def bind_all(self, specs: Sequence[CellSpec]) -> list[socket.socket]:
        """Bind every socket before any chain is touched: a start that cannot serve all its
        cells changes nothing (SPEC 7). On failure every socket bound so far is released."""
        bound: list[tuple[str, socket.socket]] = []
        try:
            seen: set[str] = set()
            for spec in specs:
                if spec.cell_id in seen:
                    raise RegistrationError(spec.cell_id, "listed twice")
                seen.add(spec.cell_id)
                bound.append((socket_path(spec, self.config.listener.port), self.bind(spec)))
        except BaseException:
            for path, sock in bound:
                sock.close()
                _remove_socket(path)
            raise
        return [sock for _, sock in bound]

    async def start(
        self, spec: CellSpec, sock: socket.socket, *, source: str = "config"
    ) -> CellRuntime:
        """Open or continue the cell's chain and serve its bound socket."""
        path = socket_path(spec, self.config.listener.port)
        try:
            async with self._lock:
                if spec.cell_id in self.cells:
                    raise RegistrationError(spec.cell_id, "already registered", conflict=True)
                cell = await self._runtime(spec, path, source)
                await serve_unix(cell.listener, sock)
                self.cells[spec.cell_id] = cell
                if self._vsock is not None and spec.vsock_cid is not None:
                    self._vsock.by_cid[spec.vsock_cid] = cell.listener
                if self.probes is not None:
                    self.probes.add_cell(spec.cell_id, probes_for(spec))
        except BaseException:
            sock.close()
            _remove_socket(path)
            raise
        event(
            log,
            logging.INFO,
            "cell_registered",
            cell_id=spec.cell_id,
            run_id=spec.run_id,
            chain_id=cell.ctx.chain_id,
            continued=cell.chain.sequence > 1,
            socket=path,
        )
        return cell

    async def register(self, spec: CellSpec, *, source: str = "api") -> CellRuntime:
        """Bind the cell's socket, open its chain and start reading. The socket exists when
        this returns, so the VM may boot right after."""
        return await self.start(spec, self.bind(spec), source=source)

    async def start_all(self, specs: Sequence[CellSpec], socks: Sequence[socket.socket]) -> None:
        """Start every bound cell; chains whose registration is gone are then sealed."""
        for spec, sock in zip(specs, socks, strict=True):
            await self.start(spec, sock)
        await self.seal_unregistered()

    async def _runtime(self, spec: CellSpec, path: str, source: str) -> CellRuntime:
        spool = self._spool
        restored = self._restorable(spec)
        for other in spool.open_chains():
            same_cell = other.identity.cell_id == spec.cell_id
            if same_cell and other is not restored and not self._served(other):
                # The cell came back under another run: its old registration is gone.
                await self._seal_orphan(other, "removed_from_config")
        if restored is not None:
            cell = self._make(spec, restored)
            cell.resume_chain(
                socket_path=path,
                previous_stop_at=restored.last_event_at,
                clean=spool.recovered_clean,
            )
            self._declare_recovery_losses(cell)
            return cell
        supersedes = None
        if spool.fresh and self._lookup is not None:
            supersedes = await self._lookup(spec.cell_id, spec.run_id)
        chain = spool.open_chain(
            chain_id=secrets.token_hex(8),
            cell_id=spec.cell_id,
            run_id=spec.run_id,
            spec_signature_hash=spec.spec_signature_hash,
            opened_at=self._wall.now(),
            spec=msgspec.to_builtins(spec),
            source=source,
        )
        cell = self._make(spec, chain)
        cell.open_chain(socket_path=path, supersedes=supersedes)
        return cell

    def _restorable(self, spec: CellSpec) -> ChainState | None:
        for chain in self._spool.open_chains():
            ident = chain.identity
            if (ident.cell_id, ident.run_id) == (spec.cell_id, spec.run_id):
                if ident.spec_signature_hash != spec.spec_signature_hash:
                    raise RegistrationError(
                        spec.cell_id,
                        f"run {spec.run_id!r} continues chain {ident.chain_id} registered "
                        f"with spec_signature_hash {ident.spec_signature_hash}; a run cannot "
                        "change its spec (use a new run_id)",
                        field="spec_signature_hash",
                        conflict=True,
                    )
                return chain
        return None

    def _served(self, chain: ChainState) -> bool:
        return any(c.chain is chain for c in self.cells.values())

    def _make(self, spec: CellSpec, chain: ChainState) -> CellRuntime:
        ident = chain.identity
        ctx = ChainContext(
            host_id=self.config.host_id,
            cell_id=ident.cell_id,
            run_id=ident.run_id,
            spec_signature_hash=ident.spec_signature_hash,
            chain_id=ident.chain_id,
            subject_prefix=self.config.nats.subject_prefix,
        )
        return CellRuntime(
            spec,
            ctx,
            chain,
            signer=self.signer,
            policy=self._policy,
            spool=self._spool,
            settings=self._settings,
            max_connections=self.config.listener.max_connections_per_cell,
            wall=self._wall,
            mono=self._mono,
        )

    def _declare_recovery_losses(self, cell: CellRuntime) -> None:
        loss = self._spool.losses.pop(cell.chain.idx, None)
        if loss is not None:
            cell.declare_gap("spool_damaged", loss)

    async def seal_unregistered(self) -> None:
        """Seal every open chain in the spool that no served cell continues: its cell was
        dropped from the configuration (SPEC 5.3, ``removed_from_config``)."""
        for chain in self._spool.open_chains():
            if not self._served(chain) and chain.identity.source == "config":
                await self._seal_orphan(chain, "removed_from_config")

    async def _seal_orphan(self, chain: ChainState, reason: str) -> None:
        """Continue a chain whose cell is not served (no socket) only to seal it."""
        spec = msgspec.convert(chain.identity.spec, CellSpec)
        cell = self._make(spec, chain)
        cell.resume_chain(
            socket_path="",
            previous_stop_at=chain.last_event_at,
            clean=self._spool.recovered_clean,
        )
        self._declare_recovery_losses(cell)
        await cell.seal(reason, grace_s=0.0)
        event(
            log,
            logging.INFO,
            "chain_sealed_unregistered",
            cell_id=chain.identity.cell_id,
            run_id=chain.identity.run_id,
            chain_id=chain.identity.chain_id,
            reason=reason,
        )

    async def deregister(
        self, cell_id: str, reason: str = "deregistered", *, grace_s: float = 5.0
    ) -> CellRuntime:
        """Stop the listener, spool what was read, seal the chain, remove the socket file.

        ``grace_s`` bounds the wait for spool room (see :meth:`CellRuntime.seal`). The
        sealed cell is remembered for a while (:attr:`sealed`) so its draining can be
        watched."""
        async with self._lock:
            cell = self.cells.pop(cell_id, None)
            if cell is None:
                raise RegistrationError(cell_id, "not registered")
            await self._unserve(cell)
            await cell.seal(reason, grace_s=grace_s)
            _remove_socket(cell.socket_path)
            self.sealed[cell_id] = cell
            while len(self.sealed) > SEALED_KEPT:
                del self.sealed[next(iter(self.sealed))]
        event(log, logging.INFO, "cell_sealed", reason=reason, **cell.snapshot())
        return cell

    async def suspend_all(self, *, grace_s: float = 5.0) -> None:
        """A producer stop: every cell stops reading and spools what it read, all within one
        ``grace_s``. Chains stay open for the next start to continue."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        async with self._lock:
            for cell in list(self.cells.values()):
                await self._unserve(cell)
                await cell.suspend(grace_s=max(0.0, deadline - loop.time()))
                _remove_socket(cell.socket_path)
                event(log, logging.INFO, "cell_suspended", **cell.snapshot())
            self.cells.clear()

    def rekey(self, signer: Signer) -> None:
        """From now on every chain is signed with ``signer``."""
        self.signer = signer
        for cell in self.cells.values():
            cell.rekey(signer)

    async def _unserve(self, cell: CellRuntime) -> None:
        """Stop routing to the cell (its vsock CID, its probes); keep its totals."""
        retired, c = self.retired, cell.counters
        retired.signed += c.signed
        retired.silenced += c.silenced
        retired.by_type.update(c.by_type)
        if self._vsock is not None and cell.spec.vsock_cid is not None:
            self._vsock.by_cid.pop(cell.spec.vsock_cid, None)
        if self.probes is not None:
            await self.probes.remove_cell(cell.cell_id)

    # -- periodic duties --------------------------------------------------------------------

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
            self._spool.poll_space()
            for cell in list(self.cells.values()):
                try:
                    await cell.run_tick()
                except Exception:  # one cell's trouble must not stop the others' duties
                    log.exception("cell_tick_failed", extra={"fields": {"cell_id": cell.cell_id}})
            if loop.time() >= next_stats:
                next_stats = loop.time() + STATS_INTERVAL_S
                self._log_stats()

    def _log_stats(self) -> None:
        """One line per cell with its counters, then the spool's and the publisher's: what an
        operator greps for when a guest's telemetry looks thin."""
        for cell in self.cells.values():
            event(log, logging.INFO, "cell_stats", **cell.snapshot())
        spool = self._spool
        event(
            log,
            logging.INFO,
            "spool_stats",
            depth=spool.depth(),
            bytes=spool.live_bytes(),
            oldest_age_s=round(spool.oldest_age_s(), 3),
            full=not spool.has_space(),
        )
        if self._on_stats is not None:
            self._on_stats()


def _remove_socket(path: str) -> None:
    """Remove the cell's socket file, and only if it is still a socket."""
    if not path:
        return
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
