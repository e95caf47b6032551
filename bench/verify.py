"""Benchmark: ``cellos-audit verify`` of a strictly signed stream, single process versus
worker processes.

A private nats-server gets a stream of ``--events`` guest events over ``--cells`` chains,
sealed and signed (every event) by the production sealer, plus each chain's recorded head.
Then ``cellos-audit verify`` runs as a child process once per mode, against the same
stream: in one process checking every signature directly (the baseline), in one process
with the default anchored checks, with worker processes (one per CPU; online they also
read the stream, each a range of it over its own connection) both ways, and ``--jsonl``
on an export of the stream. Each row gives events per
second (wall clock of the whole command, start-up included), the ratio to the baseline
measured in the same run, and the peak resident memory of the command and its worker
processes together (sampled from /proc). A benchmark: it never fails on its figures, only
if a verification fails.

    python bench/verify.py [--events 200000] [--cells 16] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats

from audit.keys import merge_trust
from producer.chain.events import (
    STRUCTURED_CONTENT_TYPE,
    ChainContext,
    Rfc3339Clock,
    chain_event,
    guest_event,
)
from producer.chain.sealer import ChainSealer
from producer.chain.signing import Signer, generate_key_file
from producer.delivery.heads import open_bucket
from producer.delivery.stream import ensure_stream
from producer.guest.simulator import frames
from producer.ops.embedded import EmbeddedNats
from schemas.heads import ChainHead

BIN = Path(sys.executable).parent
WINDOW = 4096


@dataclass
class Row:
    mode: str
    workers: str
    seconds: float
    max_rss_mb: float


async def fill(url: str, key_file: str, events: int, cells: int) -> Signer:
    """Publish ``events`` signed events over ``cells`` sealed chains, and their heads."""
    signer = generate_key_file(key_file)
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_stream(
        js,
        name="CELLOS_TELEMETRY",
        subject_prefix="cellos.telemetry",
        duplicate_window_s=600,
        create=True,
    )
    kv = await open_bucket(js, "CELLOS_CHAIN_HEADS")
    clock = Rfc3339Clock()
    chains = []
    for n in range(cells):
        ctx = ChainContext(
            "bench-host",
            f"cell-{n}",
            "run-1",
            "sha256:" + "ab" * 32,
            secrets.token_hex(8),
            "cellos.telemetry",
        )
        chains.append((ctx, ChainSealer(signer), frames(n)))
    sent = 0

    async def publish(ctx: ChainContext, sealer: ChainSealer, pending: object) -> None:
        nonlocal sent
        event = pending.event  # type: ignore[attr-defined]
        event["id"] = f"{ctx.chain_id}-{sealer.sequence + 1}"
        sealed = sealer.seal(event, sign=True)
        headers = {"Nats-Msg-Id": event["id"], "Content-Type": STRUCTURED_CONTENT_TYPE}
        await js.publish_async(pending.subject, sealed.payload, headers=headers)  # type: ignore[attr-defined]
        sent += 1
        if sent % WINDOW == 0:
            await js.publish_async_completed()

    for ctx, sealer, _ in chains:
        fields = {
            "hostId": "bench-host",
            "producerVersion": "bench",
            "signkid": signer.kid,
            "publicKey": signer.public_key_b64,
            "chainId": ctx.chain_id,
            "socketPath": "/dev/null",
            "probeTargets": {},
            "signingMode": "strict",
            "supersedes": None,
        }
        await publish(ctx, sealer, chain_event(ctx, "opened", clock.now(), fields))
    for i in range(events - 2 * cells):
        ctx, sealer, guest = chains[i % cells]
        await publish(ctx, sealer, guest_event(ctx, next(guest), clock.now()))
    for ctx, sealer, _ in chains:
        final = f"{sealer.sequence + 1:020d}"
        await publish(
            ctx,
            sealer,
            chain_event(
                ctx, "sealed", clock.now(), {"reason": "deregistered", "finalSequence": final}
            ),
        )
        head = ChainHead(
            cell_id=ctx.cell_id,
            run_id=ctx.run_id,
            chain_id=ctx.chain_id,
            sequence=sealer.sequence,
            digest=sealer.head_hash,
            event_id=f"{ctx.chain_id}-{sealer.sequence}",
            type="sealed",
            sealed=True,
        )
        await kv.put(head.key, msgspec.json.encode(head))
    await js.publish_async_completed()
    await nc.close()
    return signer


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, MB (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        rss = [int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:")]
        total += sum(rss)  # none for a process already exiting
        todo.extend(int(c) for c in children)
    return total / 1024


def timed(args: list[str]) -> tuple[float, float]:
    """Run a command to completion: (seconds, peak RSS in MB of it and its workers together,
    sampled every 0.1 s)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{' '.join(args)} failed:\n{err[-2000:]}")
    return seconds, peak


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--cells", type=int, default=16)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: CPUs)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="cellos-bench-verify-") as tmp:
        server = EmbeddedNats(Path(tmp) / "nats")
        asyncio.run(server.start())
        try:
            t0 = time.perf_counter()
            signer = asyncio.run(fill(server.url, f"{tmp}/signing.key", args.events, args.cells))
            print(
                f"stream filled: {args.events} events, {args.cells} chains "
                f"({time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
            trust = f"{tmp}/trust.json"
            merge_trust(trust, signer.kid, signer.public_raw)
            audit = [str(BIN / "cellos-audit")]
            online = [*audit, "verify", "--nats-url", server.url, "--trust", trust]
            export_file = f"{tmp}/export.jsonl"
            subprocess.run(
                [*audit, "export", "--nats-url", server.url, "--out", export_file],
                check=True,
                capture_output=True,
            )
            workers = [] if args.workers is None else ["--workers", str(args.workers)]
            shown = (
                str(args.workers) if args.workers is not None else str(len(os.sched_getaffinity(0)))
            )
            rows = [
                Row(
                    "online, 1 process, every signature",
                    "0",
                    *timed([*online, "--workers", "0", "--every-signature"]),
                ),
                Row("online, 1 process", "0", *timed([*online, "--workers", "0"])),
                Row(
                    "online, workers, every signature",
                    shown,
                    *timed([*online, *workers, "--every-signature"]),
                ),
                Row("online, workers", shown, *timed([*online, *workers])),
                Row(
                    "offline export, workers",
                    shown,
                    *timed([*audit, "verify", "--jsonl", export_file, "--trust", trust, *workers]),
                ),
            ]
        finally:
            asyncio.run(server.stop())
    base = args.events / rows[0].seconds
    print(f"\n{'mode':<38}{'workers':>8}{'events/s':>11}{'vs baseline':>13}{'max RSS':>10}")
    for row in rows:
        rate = args.events / row.seconds
        print(
            f"{row.mode:<36}{row.workers:>8}{rate:>11,.0f}{rate / base:>12.2f}x"
            f"{row.max_rss_mb:>8.0f} MB"
        )


if __name__ == "__main__":
    main()
