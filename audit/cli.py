"""``cellos-producer verify``: fetch chains from JetStream, verify, print one line per chain."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import msgspec
import nats
import nats.errors

from audit.connect import NatsAuth, connect_kwargs, telling_error
from audit.errors import SourceError
from audit.heads import read_heads
from audit.keys import load_trust
from audit.replay import fetch_history
from audit.verify import ChainReport, group_chains, verify_chain


async def collect_reports(
    nats_url: str,
    *,
    trust: dict[str, bytes],
    stream: str,
    subject_prefix: str,
    cells: list[str] | None = None,
    heads_bucket: str = "CELLOS_CHAIN_HEADS",
    auth: NatsAuth | None = None,
) -> list[ChainReport]:
    """Verify every chain found under the prefix (or only those of ``cells``), connecting
    with ``auth`` (the producer's own ``[nats]`` security settings, see audit.connect)."""
    kwargs = connect_kwargs(auth or NatsAuth())
    errors: list[BaseException] = []

    async def remember(exc: Exception) -> None:
        errors.append(exc)  # nats-py would print a traceback per attempt otherwise

    try:
        nc = await nats.connect(
            nats_url,
            connect_timeout=5,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            error_cb=remember,
            **kwargs,
        )
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        # What error_cb saw last is more specific than what connect raised, and a refused
        # credential or certificate (wherever it came) says best what to fix.
        cause = telling_error([exc, *errors])
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        raise SourceError(f"cannot connect to NATS at {nats_url}: {reason}") from exc
    try:
        subjects = [f"{subject_prefix}.{c}.>" for c in cells] if cells else [f"{subject_prefix}.>"]
        payloads: list[bytes] = []
        for subject in subjects:
            payloads.extend(await fetch_history(nc, stream=stream, subject=subject))
        heads = await read_heads(nc.jetstream(), heads_bucket)
    finally:
        await nc.close()
    chains = group_chains(payloads)
    reports = []
    for (cell_id, run_id), chain in sorted(chains.items()):
        recorded = [h for h in heads.values() if (h.cell_id, h.run_id) == (cell_id, run_id)]
        head = (recorded[0].sequence, recorded[0].digest) if recorded else None
        reports.append(verify_chain(chain, trust, head=head))
    return reports


def print_reports(reports: list[ChainReport], out: TextIO, *, as_json: bool = False) -> None:
    if as_json:
        out.write(msgspec.json.encode([_report_dict(r) for r in reports]).decode() + "\n")
        return
    for r in reports:
        status = "OK  " if r.ok else "FAIL"
        state = "sealed" if r.sealed else "open"
        out.write(
            f"{status} cell={r.cell_id} run={r.run_id} events={r.events} "
            f"seq={r.first_sequence}..{r.last_sequence} signed={r.signed} {state}"
            f"{f' gaps={len(r.gaps)}' if r.gaps else ''}"
            f"{f' unsigned_tail={r.unsigned_tail}' if r.unsigned_tail else ''}\n"
        )
        for problem in r.problems:
            out.write(f"     - {problem}\n")
    bad = sum(not r.ok for r in reports)
    out.write(f"{len(reports)} chain(s), {len(reports) - bad} verified, {bad} failed\n")


def _report_dict(r: ChainReport) -> dict[str, Any]:
    return msgspec.to_builtins(r)  # type: ignore[no-any-return]


async def verify_from_nats(
    nats_url: str,
    *,
    trust_path: str,
    stream: str,
    subject_prefix: str,
    cell: str | None,
    as_json: bool = False,
    auth: NatsAuth | None = None,
) -> int:
    trust = load_trust(trust_path)
    reports = await collect_reports(
        nats_url,
        trust=trust,
        stream=stream,
        subject_prefix=subject_prefix,
        cells=[cell] if cell else None,
        auth=auth,
    )
    print_reports(reports, sys.stdout, as_json=as_json)
    if not reports:
        print("no chains found", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in reports) else 1
