"""``cellos-producer demo``: the whole pipeline on one machine, verified at the end.

An embedded nats-server (or ``--nats-url``), a fresh signing key, N registered cells with a
simulated guest agent each, a live per-cell view, then every chain sealed and read back
from JetStream and verified against the trust file the demo leaves in its data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from audit.cli import collect_reports, print_reports
from audit.keys import merge_trust
from producer.chain.signing import Signer, generate_key_file
from producer.guest.simulator import run_guest
from producer.guest.wire import encode_frame
from producer.ops.config import (
    CellSpec,
    ChainConfig,
    Config,
    LogConfig,
    MetricsConfig,
    NatsConfig,
    ProbesConfig,
    SigningConfig,
    SilenceConfig,
)
from producer.ops.daemon import Producer
from producer.ops.demo_host import DemoHost
from producer.ops.embedded import EmbeddedNats
from producer.ops.logs import setup_logging
from schemas.wire import Declaration


@dataclass(frozen=True)
class DemoOptions:
    cells: int = 3
    seconds: float = 20.0
    rate: float = 20.0
    nats_url: str | None = None
    data_dir: str | None = None
    mode: str = "adaptive"
    binary: bool = False


def _load_or_make_key(path: str) -> Signer:
    return Signer.load(path) if os.path.exists(path) else generate_key_file(path)


def demo_cell_ids(opts: DemoOptions, tag: str) -> list[str]:
    return [f"demo-{tag}-{i}" for i in range(1, opts.cells + 1)]


def demo_config(
    opts: DemoOptions,
    data_dir: str,
    url: str,
    key_file: str,
    tag: str,
    *,
    targets: dict[str, dict[str, Any]] | None = None,
) -> Config:
    cells = []
    for cell_id in demo_cell_ids(opts, tag):
        cell_dir = os.path.join(data_dir, "cells", cell_id)
        os.makedirs(cell_dir, exist_ok=True)
        cells.append(
            CellSpec(
                cell_id=cell_id,
                run_id=f"run-{tag}",
                spec_signature_hash="sha256:" + secrets.token_hex(32),
                vsock_uds_base=os.path.join(cell_dir, "vsock"),
                **(targets or {}).get(cell_id, {}),
            )
        )
    return Config(
        host_id="demo-host",
        data_dir=data_dir,
        nats=NatsConfig(url=url, mode="binary" if opts.binary else "structured"),
        signing=SigningConfig(key_file=key_file, mode=opts.mode),  # type: ignore[arg-type]
        chain=ChainConfig(checkpoint_every=200, checkpoint_interval_s=5.0),
        silence=SilenceConfig(window_ms=10_000),
        probes=ProbesConfig(interval_s=2.0, timeout_s=1.0),
        metrics=MetricsConfig(listen="127.0.0.1:0"),
        log=LogConfig(level="warning"),
        cells=tuple(cells),
    )


BAD_FRAMES: tuple[bytes, ...] = (
    encode_frame(Declaration(2, "process.spawned", 1, "sh", 1)),  # UnsupportedContentVersion
    encode_frame(Declaration(1, "process.teleported", 1, "sh", 1)),  # UnknownProbeSource
    (9000).to_bytes(4, "little"),  # FrameTooLarge: the producer closes this connection
)


async def _misbehave(path: str) -> None:
    """A second, broken client on the first cell every two seconds: its frames are counted
    as rejected by reason and never reach the chain, and the good guest is unaffected."""
    while True:
        await asyncio.sleep(2.0)
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_unix_connection(path)
            writer.write(b"".join(BAD_FRAMES))
            await writer.drain()
            writer.close()


class LiveView:
    """Per-cell counters once a second: redrawn in place on a terminal, one line otherwise."""

    def __init__(self, producer: Producer, out: object = sys.stdout) -> None:
        self._producer = producer
        self._tty = bool(getattr(sys.stdout, "isatty", lambda: False)())
        self._drawn = 0

    def draw(self, elapsed: float) -> None:
        registry, publisher = self._producer.registry, self._producer.publisher
        assert registry is not None and publisher is not None
        snaps = [c.snapshot() for c in registry.cells.values()]
        st = publisher.stats
        if not self._tty:
            total = sum(s["events"] for s in snaps)
            rejected = sum(sum(s["rejected"].values()) for s in snaps)
            host = sum(s["host_events"] for s in snaps)
            print(
                f"[{elapsed:5.1f}s] cells={len(snaps)} events={total} host_events={host} "
                f"acked={st.acked} rejected_frames={rejected} backlog={publisher.backlog}",
                flush=True,
            )
            return
        lines = [f"t={elapsed:5.1f}s  acked={st.acked}  backlog={publisher.backlog}"]
        lines.append(
            f"{'cell':<24}{'frames':>8}{'rejected':>10}{'host':>6}{'events':>8}{'signed':>8}"
        )
        for s in snaps:
            rejected = sum(s["rejected"].values())
            lines.append(
                f"{s['cell_id']:<24}{s['accepted']:>8}{rejected:>10}{s['host_events']:>6}"
                f"{s['events']:>8}{s['signed']:>8}"
            )
        if self._drawn:
            sys.stdout.write(f"\x1b[{self._drawn}A")
        sys.stdout.write("".join(line + "\x1b[K\n" for line in lines))
        sys.stdout.flush()
        self._drawn = len(lines)


async def run_demo(opts: DemoOptions) -> int:
    setup_logging("warning", "auto")
    data_dir = opts.data_dir or tempfile.mkdtemp(prefix="cellos-demo-")
    os.makedirs(data_dir, exist_ok=True)
    key_file = os.path.join(data_dir, "signing.key")
    signer = _load_or_make_key(key_file)
    trust_path = os.path.join(data_dir, "trust.json")
    merge_trust(trust_path, signer.kid, signer.public_raw)
    tag = secrets.token_hex(3)

    embedded: EmbeddedNats | None = None
    url = opts.nats_url
    if url is None:
        embedded = EmbeddedNats(store_dir=os.path.join(data_dir, "nats"))
        await embedded.start()
        url = embedded.url
    print(f"NATS: {url}{' (embedded)' if embedded else ''}   data dir: {data_dir}")
    host = DemoHost(data_dir)
    targets = host.setup(demo_cell_ids(opts, tag))
    for note in host.notes:
        print(f"host probes: {note}")
    config = demo_config(opts, data_dir, url, key_file, tag, targets=targets)
    producer = Producer(config, signer=signer)
    guests: list[asyncio.Task[object]] = []
    try:
        await producer.startup()
        assert producer.registry is not None
        print(f"signing key {signer.kid}, mode {opts.mode}; {opts.cells} cells registered")
        if producer.metrics_address is not None:
            address, port = producer.metrics_address
            print(f"metrics: http://{address}:{port}/metrics (health: /healthz, /readyz)")
        cells = list(producer.registry.cells.values())
        for i, cell in enumerate(cells):
            guests.append(
                asyncio.create_task(run_guest(cell.socket_path, rate=opts.rate, count=None, seed=i))
            )
        guests.append(asyncio.create_task(_misbehave(cells[0].socket_path)))
        host.start_activity()
        view = LiveView(producer)
        start = time.monotonic()
        with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
            while opts.seconds <= 0 or time.monotonic() - start < opts.seconds:
                await asyncio.sleep(
                    min(1.0, max(0.05, opts.seconds - (time.monotonic() - start)))
                    if opts.seconds > 0
                    else 1.0
                )
                view.draw(time.monotonic() - start)
    finally:
        rejected = (
            {c.cell_id: dict(c.counters.rejected) for c in producer.registry.cells.values()}
            if producer.registry is not None
            else {}
        )
        readings: dict[str, int] = {}
        for (_, probe), counts in (producer.probes.stats() if producer.probes else {}).items():
            readings[probe] = readings.get(probe, 0) + counts.readings
        for task in guests:
            task.cancel()
        for task in guests:
            with contextlib.suppress(BaseException):
                await task
        # The demo's cells end here: deregistering seals each chain (a plain stop would
        # only suspend them for the next start).
        if producer.registry is not None:
            for cell_id in list(producer.registry.cells):
                await producer.registry.deregister(cell_id)
        drained = producer.spool is not None and await producer.drain(15)
        await producer.shutdown()
        await host.close()
    print("chains sealed; all events acknowledged" if drained else "WARNING: not all acked")
    for cell_id, reasons in rejected.items():
        if reasons:
            listed = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items()))
            print(f"rejected frames on {cell_id} (counted, never published): {listed}")
    if readings:
        listed = ", ".join(f"{k}={v}" for k, v in sorted(readings.items()))
        print(f"host probe readings published as host.v1.* events: {listed}")
    reports = await collect_reports(
        url,
        trust={signer.kid: signer.public_raw},
        stream=config.nats.stream,
        subject_prefix=config.nats.subject_prefix,
        cells=[c.cell_id for c in config.cells],
    )
    print_reports(reports, sys.stdout)
    if embedded is not None:
        await embedded.stop()
    ok = drained and len(reports) == opts.cells and all(r.ok and r.sealed for r in reports)
    print(f"trust file for other verifiers: {trust_path}")
    print("DEMO OK: every chain verified and sealed" if ok else "DEMO FAILED")
    return 0 if ok else 1
