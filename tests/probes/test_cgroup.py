"""cgroup probe: a real child cgroup on this host, and the other files from documentation.

This host runs cgroup v2 at /sys/fs/cgroup/unified in hybrid mode with no memory, pids
or io controller: a real cgroup there has ``cpu.stat`` (and pressure files) only. The
``_root`` tests use such a cgroup with a real process in it. The memory, pids and io
parsers are tested on files written by hand in the format the kernel documents
(tests/fixtures/cgroup/README.md), *not* recorded from a kernel.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from probes.base import Io, Parse, ProbeContext
from probes.cgroup import (
    FILES,
    CgroupProbe,
    parse_flat_keyed,
    parse_nested_keyed,
    parse_single,
    read_cgroup,
)
from tests.probes.kernel import cgroup, until

DOCUMENTED = Path(__file__).parents[1] / "fixtures" / "cgroup" / "documented"
CTX = ProbeContext(cell_id="cell-1")


def test_documented_files_parse_into_maps_of_decimal_strings() -> None:
    """Hand-written in the kernel's documented formats, not recorded (see module doc)."""
    output = read_cgroup(str(DOCUMENTED))
    assert output == {
        "memory.events": {
            "low": "0",
            "high": "12",
            "max": "3",
            "oom": "1",
            "oom_kill": "1",
            "oom_group_kill": "0",
        },
        "memory.current": "8441856",
        "memory.peak": "16777216",
        "cpu.stat": {
            "usage_usec": "1523000",
            "user_usec": "1000000",
            "system_usec": "523000",
            "nr_periods": "120",
            "nr_throttled": "4",
            "throttled_usec": "80000",
            "nr_bursts": "0",
            "burst_usec": "0",
        },
        "pids.events": {"max": "2"},
        "pids.current": "7",
        "io.stat": {
            "254:0": {
                "rbytes": "4096",
                "wbytes": "8192",
                "rios": "1",
                "wios": "2",
                "dbytes": "0",
                "dios": "0",
            },
            "8:16": {
                "rbytes": "18446744073709551615",
                "wbytes": "0",
                "rios": "0",
                "wios": "0",
                "dbytes": "0",
                "dios": "0",
            },
        },
        "absent": [],
    }


def test_absent_files_are_listed_not_errors(tmp_path: Path) -> None:
    """Hand-written files (see module doc); a kernel without memory.peak (before 5.19)."""
    for name in FILES:
        if name != "memory.peak":
            shutil.copy(DOCUMENTED / name, tmp_path / name)
    output = read_cgroup(str(tmp_path))
    assert output["absent"] == ["memory.peak"]
    assert "memory.peak" not in output and output["memory.current"] == "8441856"


async def test_a_missing_directory_is_io(tmp_path: Path) -> None:
    missing = str(tmp_path / "gone")
    with pytest.raises(Io) as info:
        await CgroupProbe(missing).read(CTX)
    assert info.value.path == missing and info.value.probe == "cgroup"


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_flat_keyed, "usage_usec\n"),
        (parse_flat_keyed, "usage_usec 12 13\n"),
        (parse_flat_keyed, "usage_usec -1\n"),
        (parse_flat_keyed, "usage_usec ²\n"),
        (parse_single, "max\n"),
        (parse_single, "1.5\n"),
        (parse_nested_keyed, "8:0 rbytes\n"),
        (parse_nested_keyed, "8:0 rbytes=x\n"),
    ],
)
def test_values_out_of_format_are_parse_errors(parse: object, text: str) -> None:
    with pytest.raises(Parse):
        parse(text, "f")  # type: ignore[operator]


def test_an_unreadable_file_is_io(tmp_path: Path) -> None:
    (tmp_path / "cpu.stat").mkdir()  # read() of a directory fails with EISDIR
    with pytest.raises(Io) as info:
        read_cgroup(str(tmp_path))
    assert info.value.path == f"{tmp_path}/cpu.stat"


async def test_a_real_cgroup_with_a_busy_process_root() -> None:
    with cgroup() as path:
        busy = subprocess.Popen(  # noqa: ASYNC220 - started once, reaped below
            [sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL
        )
        try:
            (path / "cgroup.procs").write_text(str(busy.pid))
            probe = CgroupProbe(str(path))
            first = await probe.read(CTX)
            assert first.probe == "cgroup" and first.inputs == {
                "path": str(path),
                "files": list(FILES),
            }
            # What this hybrid host's v2 hierarchy offers: cpu.stat only.
            assert first.output["absent"] == [name for name in FILES if name != "cpu.stat"]
            stat = first.output["cpu.stat"]
            assert {"usage_usec", "user_usec", "system_usec"} <= stat.keys()
            start = int(stat["usage_usec"])

            async def burned() -> bool:
                now = (await probe.read(CTX)).output["cpu.stat"]
                return int(now["usage_usec"]) >= start + 20_000

            await until(burned, "20 ms of CPU time charged to the cgroup")
        finally:
            busy.kill()
            busy.wait()
