"""Firecracker metrics probe against a fake VMM: a real Unix-socket API server answering
``PUT /actions`` and a real FIFO (or file) carrying metrics lines in Firecracker's format.
No Firecracker binary can be installed here, so the fake stands in (tests/fixtures/fc).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probes.base import Io, Parse, ProbeContext
from probes.fc_metrics import (
    MAX_LINE,
    FcMetricsProbe,
    LatestLine,
    parse_metrics,
    parse_response_head,
    stringify_numbers,
)
from tests.probes.fake_vmm import METRICS_LINE, FakeVmm, fake_vmm

CTX = ProbeContext(cell_id="cell-1")


@pytest.fixture
async def vmm(directory: str) -> AsyncIterator[FakeVmm]:
    async with fake_vmm(directory) as server:
        yield server


async def test_flush_then_read_the_flushed_object(vmm: FakeVmm) -> None:
    probe = FcMetricsProbe(vmm.metrics_path, vmm.api_socket)
    try:
        reading = await probe.read(CTX)
    finally:
        probe.close()
    assert vmm.requests == [("PUT", "/actions", {"action_type": "FlushMetrics"})]
    assert reading.probe == "fc_metrics"
    assert reading.inputs == {"metricsPath": vmm.metrics_path, "apiSocket": vmm.api_socket}
    assert reading.output["discarded"] == 0
    metrics = reading.output["metrics"]
    expected = json.loads(METRICS_LINE)
    assert metrics["utc_timestamp_ms"] == str(expected["utc_timestamp_ms"] + 1)
    assert metrics["net"]["rx_bytes_count"] == "1284"
    assert metrics["block_rootfs"]["read_bytes"] == "409600"
    assert metrics.keys() == expected.keys()


async def test_each_reading_gets_its_own_flush(vmm: FakeVmm) -> None:
    probe = FcMetricsProbe(vmm.metrics_path, vmm.api_socket)
    try:
        stamps = [(await probe.read(CTX)).output["metrics"]["utc_timestamp_ms"] for _ in range(3)]
    finally:
        probe.close()
    base = json.loads(METRICS_LINE)["utc_timestamp_ms"]
    assert stamps == [str(base + n) for n in (1, 2, 3)]


async def test_only_the_latest_object_is_kept_and_the_rest_counted(vmm: FakeVmm) -> None:
    probe = FcMetricsProbe(vmm.metrics_path, vmm.api_socket)
    try:
        await probe.read(CTX)
        vmm.write_metrics()  # the VMM's own 60-second flush, between two readings
        vmm.write_metrics()
        reading = await probe.read(CTX)
    finally:
        probe.close()
    assert reading.output["discarded"] == 2
    base = json.loads(METRICS_LINE)["utc_timestamp_ms"]
    assert reading.output["metrics"]["utc_timestamp_ms"] == str(base + 4)


async def test_without_an_api_socket_nothing_new_is_null(vmm: FakeVmm) -> None:
    probe = FcMetricsProbe(vmm.metrics_path)
    try:
        assert (await probe.read(CTX)).output == {"metrics": None, "discarded": 0}
        vmm.write_metrics()
        assert (await probe.read(CTX)).output["metrics"] is not None
        assert (await probe.read(CTX)).output["metrics"] is None
    finally:
        probe.close()
    assert vmm.requests == []


async def test_a_partial_line_waits_for_its_newline(vmm: FakeVmm) -> None:
    probe = FcMetricsProbe(vmm.metrics_path)
    try:
        vmm.write_metrics(METRICS_LINE[:100])
        assert (await probe.read(CTX)).output["metrics"] is None
        vmm.write_metrics(METRICS_LINE[100:])
        reading = await probe.read(CTX)
    finally:
        probe.close()
    assert reading.output["metrics"] == stringify_numbers(json.loads(METRICS_LINE))


async def test_a_vmm_fault_is_io_with_the_status(vmm: FakeVmm) -> None:
    vmm.fault = "The requested operation is not supported before starting the microVM."
    probe = FcMetricsProbe(vmm.metrics_path, vmm.api_socket)
    try:
        with pytest.raises(Io) as info:
            await probe.read(CTX)
    finally:
        probe.close()
    assert info.value.returncode == 400
    assert info.value.reason == vmm.fault
    assert info.value.command == "PUT /actions FlushMetrics"


async def test_an_unreachable_api_socket_is_io(directory: str) -> None:
    os.mkfifo(f"{directory}/m")
    probe = FcMetricsProbe(f"{directory}/m", f"{directory}/no.sock")
    try:
        with pytest.raises(Io) as info:
            await probe.read(CTX)
    finally:
        probe.close()
    assert info.value.path == f"{directory}/no.sock"


async def test_a_missing_metrics_path_is_io(directory: str) -> None:
    with pytest.raises(Io) as info:
        await FcMetricsProbe(f"{directory}/none").read(CTX)
    assert info.value.path == f"{directory}/none"


async def test_a_metrics_path_that_is_a_directory_is_io(directory: str) -> None:
    with pytest.raises(Io):
        await FcMetricsProbe(directory).read(CTX)


async def test_a_regular_file_is_read_from_where_it_was_at_first(directory: str) -> None:
    async with fake_vmm(directory, fifo=False) as vmm:
        vmm.write_metrics()  # written before the probe existed: not reported
        probe = FcMetricsProbe(vmm.metrics_path, vmm.api_socket)
        try:
            first = await probe.read(CTX)
            assert first.output["discarded"] == 0
            base = json.loads(METRICS_LINE)["utc_timestamp_ms"]
            assert first.output["metrics"]["utc_timestamp_ms"] == str(base + 2)
            os.truncate(vmm.metrics_path, 0)  # e.g. rotated: start again from the top
            second = await probe.read(CTX)
            assert second.output["metrics"]["utc_timestamp_ms"] == str(base + 3)
        finally:
            probe.close()


async def test_garbage_from_the_vmm_is_parse(vmm: FakeVmm) -> None:
    probe = FcMetricsProbe(vmm.metrics_path)
    try:
        vmm.write_metrics(b"[1, 2]\n")
        with pytest.raises(Parse):
            await probe.read(CTX)
        # A line longer than MAX_LINE, in pipe-sized pieces: the buffer never holds it.
        chunk = b"x" * 32768
        for _ in range(MAX_LINE // len(chunk) + 2):
            vmm.write_metrics(chunk)
            try:
                assert (await probe.read(CTX)).output["metrics"] is None
            except Parse:
                break
        else:
            pytest.fail("an overlong line was not reported")
        vmm.write_metrics(chunk + b"\n" + METRICS_LINE)  # its end, then a good line
        reading = await probe.read(CTX)
        assert reading.output == {"metrics": parse_metrics(METRICS_LINE), "discarded": 0}
    finally:
        probe.close()


def test_numbers_become_decimal_strings_everywhere_else_unchanged() -> None:
    value = {"a": 18446744073709551615, "b": [1, 2.5, True, None, "s"], "c": {"d": -3}}
    assert stringify_numbers(value) == {
        "a": "18446744073709551615",
        "b": ["1", "2.5", True, None, "s"],
        "c": {"d": "-3"},
    }


def test_metrics_lines_that_are_not_objects_are_parse_errors() -> None:
    for line in (b"[]", b"nope", b'"s"', b'{"x": 1e400}'):
        with pytest.raises(Parse):
            parse_metrics(line)


def test_http_status_line() -> None:
    assert parse_response_head(b"HTTP/1.1 204 \r\nServer: Firecracker API") == (
        204,
        {"server": "Firecracker API"},
    )
    with pytest.raises(Parse):
        parse_response_head(b"SSH-2.0-OpenSSH")


@given(
    lines=st.lists(st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b), max_size=6),
    tail=st.binary(max_size=10).filter(lambda b: b"\n" not in b),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=8),
)
def test_latest_line_does_not_depend_on_how_the_stream_is_cut(
    lines: list[bytes], tail: bytes, cuts: list[int]
) -> None:
    stream = b"".join(line + b"\n" for line in lines) + tail
    splitter = LatestLine()
    start = 0
    for cut in [*sorted(c for c in cuts if c <= len(stream)), len(stream)]:
        splitter.feed(stream[start:cut])
        start = cut
    nonblank = [line for line in lines if line.strip()]
    expected = (nonblank[-1], len(nonblank) - 1) if nonblank else (None, 0)
    assert splitter.take() == expected
