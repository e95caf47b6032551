"""The tamper suite: a real producer's stream, exported, altered one fault at a time, and
verified offline (the export) and online (republished into a real nats-server). Each fault
must be flagged on the right chain, at the right sequence, for the right reason, and the
other chains and the pristine copies must verify as they are."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from nats.js.api import KeyValueConfig

from audit.consumer import READ_CHUNK, Scope, export, verify_file, verify_stream
from audit.message import STRUCTURED_CONTENT_TYPE, binary_headers, binary_payload
from audit.source import Broker, ConnectOptions
from audit.verify import ChainReport, Verdict
from producer.delivery.stream import stream_config
from producer.ops.embedded import EmbeddedNats
from tests.audit.tamper import FAULTS, PRISTINE, Expected, Export, Pristine, build

CLI = Path(sys.executable).parent / "cellos-audit"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    return build(tmp_path_factory.mktemp("tamper"))


def _offline(
    data: bytes, trust: dict[str, bytes], workers: int = 0, *, every: bool = False
) -> list[ChainReport]:
    lines = data.splitlines(keepends=True)
    result = verify_file("export", lines, trust, workers=workers, every_signature=every)
    return asyncio.run(result).reports


def _by_chain(reports: list[ChainReport]) -> dict[tuple[str, str], ChainReport]:
    chains = {(str(r.cell_id), str(r.run_id)): r for r in reports}
    assert len(chains) == len(reports) == len(PRISTINE), reports
    return chains


def _judge(reports: list[ChainReport], expected: Expected) -> None:
    chain, verdict, sequence, reason = expected
    chains = _by_chain(reports)
    report = chains[chain]
    assert report.verdict == verdict, report
    if sequence is None:
        assert report.first_problem is None, report.problems
    else:
        assert report.first_problem is not None, report
        assert (report.first_problem.sequence, report.first_problem.reason) == (sequence, reason), (
            report.problems
        )
    for other, r in chains.items():
        if other != chain:
            assert r.verdict == PRISTINE[other] and r.ok, (other, r.problems)


def test_the_pristine_export_verifies(pristine: Pristine) -> None:
    reports = _offline(pristine.export.render(), pristine.trust)
    assert {k: r.verdict for k, r in _by_chain(reports).items()} == PRISTINE
    assert all(r.ok and r.problems == [] and r.signed == r.events for r in reports)


@pytest.mark.parametrize("every", [False, True], ids=["anchored", "every-signature"])
@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_flagged_offline(pristine: Pristine, fault: str, every: bool) -> None:
    altered, expected = FAULTS[fault](pristine)
    _judge(_offline(altered.render(), pristine.trust, every=every), expected)


def test_worker_processes_find_what_one_process_finds(pristine: Pristine) -> None:
    for fault in ("changed-data", "spliced", "resigned-untrusted"):
        altered, expected = FAULTS[fault](pristine)
        data = altered.render()
        inline = _offline(data, pristine.trust, every=True)
        parallel = _offline(data, pristine.trust, 2)
        assert parallel == inline
        _judge(parallel, expected)


def test_an_untrusted_trust_file_fails_every_chain(pristine: Pristine) -> None:
    from tests.chains import new_signer

    other = new_signer()
    reports = _offline(pristine.export.render(), {other.kid: other.public_raw})
    assert all(r.verdict == Verdict.TAMPERED for r in reports)
    assert all(r.first_problem and r.first_problem.reason == "unknown-key" for r in reports)


# --------------------------------------------------------------------------- online


async def _publish(url: str, altered: Export, *, binary: bool = False, **limits: int) -> None:
    """Put an export back into a fresh stream (and heads bucket), message by message."""
    async with await Broker.connect(ConnectOptions(url=url)) as broker:
        js = broker.nc.jetstream()
        await js.add_stream(stream_config().evolve(**limits))
        kv = await js.create_key_value(KeyValueConfig(bucket="CELLOS_CHAIN_HEADS", direct=True))
        for head in altered.heads:
            key = f"{head['cellId']}.{head['runId']}.{head['chainId']}"
            await kv.put(key, msgspec.json.encode(head))
        for m in altered.messages:
            if binary:
                await js.publish(
                    m.where["subject"], binary_payload(m.event), headers=binary_headers(m.event)
                )
            else:
                headers = {"Content-Type": STRUCTURED_CONTENT_TYPE}
                await js.publish(m.where["subject"], m.raw, headers=headers)


async def _online(
    url: str,
    trust: dict[str, bytes],
    scope: Scope = Scope(),  # noqa: B008
    *,
    workers: int = 0,
    read_chunk: int = READ_CHUNK,
) -> list[ChainReport]:
    async with await Broker.connect(ConnectOptions(url=url)) as broker:
        found = await verify_stream(broker, scope, trust, workers=workers, read_chunk=read_chunk)
        return found.reports


@pytest.mark.parametrize("fault", FAULTS)
async def test_each_fault_is_flagged_online(
    pristine: Pristine, nats_server: EmbeddedNats, fault: str
) -> None:
    altered, expected = FAULTS[fault](pristine)
    await _publish(nats_server.url, altered)
    _judge(await _online(nats_server.url, pristine.trust), expected)


@pytest.mark.parametrize("fault", ["deleted-event", "swapped-events", "spliced", "cut-tail"])
async def test_worker_processes_reading_ranges_find_what_one_reader_finds(
    pristine: Pristine, nats_server: EmbeddedNats, fault: str
) -> None:
    """Workers that read the stream in ranges of about 7 messages (boundaries inside
    every chain, and inside the altered stretch) see every message once, in order."""
    altered, expected = FAULTS[fault](pristine)
    await _publish(nats_server.url, altered)
    one = await _online(nats_server.url, pristine.trust)
    ranged = await _online(nats_server.url, pristine.trust, workers=2, read_chunk=7)
    assert ranged == one
    _judge(ranged, expected)
    # one cell's messages are spread over the stream: a range ends between two of them
    cell = Scope(cell="cell-1")
    one = await _online(nats_server.url, pristine.trust, cell)
    assert await _online(nats_server.url, pristine.trust, cell, workers=2, read_chunk=7) == one


async def test_the_pristine_stream_verifies_in_binary_mode_too(
    pristine: Pristine, nats_server: EmbeddedNats
) -> None:
    await _publish(nats_server.url, pristine.export, binary=True)
    reports = await _online(nats_server.url, pristine.trust)
    assert {k: r.verdict for k, r in _by_chain(reports).items()} == PRISTINE
    one = await _online(nats_server.url, pristine.trust, Scope(cell="cell-1"))
    assert {(r.cell_id, r.run_id) for r in one} == {("cell-1", "run-1"), ("cell-1", "run-2")}


async def test_history_trimmed_by_limits_is_not_tampering(
    pristine: Pristine, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    messages = pristine.export.messages
    await _publish(nats_server.url, pristine.export, max_msgs=len(messages) - 5)
    retained: dict[tuple[str, str], int | None] = {key: None for key in PRISTINE}
    for m in messages[5:]:
        key = (m.event["data"]["cellId"], m.event["data"]["runId"])
        if any(
            x.event["data"]["cellId"] == key[0] and x.event["data"]["runId"] == key[1]
            for x in messages[:5]
        ):
            retained[key] = retained[key] or int(m.event["sequence"])
    assert retained[("cell-1", "run-1")], "the trim must cut into the first chain"
    reports = _by_chain(await _online(nats_server.url, pristine.trust))
    assert {k: r.retained_from for k, r in reports.items()} == retained
    assert {k: r.verdict for k, r in reports.items()} == PRISTINE
    assert all(r.ok for r in reports.values())
    # and the same offline, from an export of the trimmed stream
    path = tmp_path / "trimmed.jsonl"
    async with await Broker.connect(ConnectOptions(url=nats_server.url)) as broker:
        with path.open("wb") as out:
            await export(broker, Scope(), out)
    lines = path.read_bytes().splitlines(keepends=True)
    offline = _by_chain((await verify_file("t", lines, pristine.trust, workers=0)).reports)
    assert {k: r.retained_from for k, r in offline.items()} == retained
    assert {k: r.verdict for k, r in offline.items()} == PRISTINE


async def test_a_hole_is_tampering_when_nothing_was_trimmed(
    pristine: Pristine, nats_server: EmbeddedNats
) -> None:
    altered = pristine.export.copy()
    del altered.messages[:5]  # the same five events, but the stream was never trimmed
    await _publish(nats_server.url, altered)
    first = _by_chain(await _online(nats_server.url, pristine.trust))[("cell-1", "run-1")]
    assert first.verdict == Verdict.TAMPERED and first.retained_from is None
    assert first.first_problem is not None and first.first_problem.sequence == 1


# --------------------------------------------------------------------------- the CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_verdicts_and_exit_codes(pristine: Pristine, tmp_path: Path) -> None:
    trust = tmp_path / "trust.json"
    from audit.keys import merge_trust

    merge_trust(trust, pristine.signer.kid, pristine.signer.public_raw)
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_bytes(pristine.export.render())
    altered, (_, _, sequence, reason) = FAULTS["changed-data"](pristine)
    bad.write_bytes(altered.render())

    ok = _cli("verify", "--jsonl", str(good), "--trust", str(trust))
    assert ok.returncode == 0, ok
    assert "3 chain(s), 3 verified, 0 failed" in ok.stdout
    assert ok.stderr == ""  # no progress line when not on a terminal

    sealed = _cli("verify", "--jsonl", str(good), "--trust", str(trust), "--require-sealed")
    assert sealed.returncode == 1, sealed
    assert "open (intact to head seq" in sealed.stdout and "--require-sealed" in sealed.stdout

    failed = _cli("verify", "--jsonl", str(bad), "--trust", str(trust))
    assert failed.returncode == 1, failed
    assert f"TAMPERED at seq {sequence}: {reason}" in failed.stdout, failed.stdout
    assert "Traceback" not in failed.stderr
