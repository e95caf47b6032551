"""Real host objects for the demo's cells, so ``make demo`` shows host probe series too.

As root, each demo cell gets what a real host gives a Firecracker cell: a network namespace
with an nftables table of counter rules (and loopback traffic through it), a cgroup v2
directory with a busy process in it, and a TAP device. The VMM itself is simulated: a
metrics file the demo appends Firecracker-format lines to. Without root, or without a
tool, the demo says which probe it could not set up and why, and runs without it.
Everything created is removed by :meth:`DemoHost.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

BUSY_LOOP: Final = "import time\nwhile True:\n    sum(range(20000))\n    time.sleep(0.05)"
"""The cell's stand-in workload: a little CPU, so cpu.stat moves."""
CGROUP_ROOTS: Final = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
NFT_RULES: Final = """
table inet {table} {{
    counter dns {{ }}
    chain output {{
        type filter hook output priority 0; policy accept;
        udp dport 53 counter name dns
        ip daddr 127.0.0.1 icmp type echo-request counter accept
        meta l4proto udp counter accept
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        ip protocol icmp counter accept
        tcp dport 22 counter drop
    }}
}}
"""


@dataclass
class CellHost:
    """One demo cell's host objects, as ``CellSpec`` probe targets."""

    targets: dict[str, Any] = field(default_factory=dict)
    netns: str | None = None
    cgroup: Path | None = None
    tap: str | None = None
    metrics: Path | None = None
    busy: subprocess.Popen[bytes] | None = None


class DemoHost:
    """Sets up and tears down the demo cells' host objects (best effort, says why not)."""

    def __init__(self, work_dir: str, *, workload: bool = True) -> None:
        """``workload=False`` leaves out the stand-in tenant (busy process, ping traffic),
        for measuring what probing costs rather than what a simulated guest does."""
        self._dir = Path(work_dir)
        self._workload = workload
        self.cells: dict[str, CellHost] = {}
        self.notes: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []

    def setup(self, cell_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Create each cell's objects; returns its probe targets (CellSpec fields)."""
        root = os.geteuid() == 0
        if not root:
            self.notes.append(
                "nftables, cgroup and tap_link probes need root to create real namespaces, "
                "cgroups and TAP devices: not run (run the demo as root to see them)"
            )
        for i, cell_id in enumerate(cell_ids):
            host = self.cells[cell_id] = CellHost()
            tag = f"cpd{secrets.token_hex(2)}{i}"
            if root:
                self._netns(host, tag)
                self._cgroup(host, tag)
                self._tap(host, tag)
            self._metrics(host, cell_id)
        return {cell_id: host.targets for cell_id, host in self.cells.items()}

    def _netns(self, host: CellHost, tag: str) -> None:
        if shutil.which("nft") is None or shutil.which("ip") is None:
            self._note("nftables", "`nft`/`ip` not installed (make test installs them)")
            return
        if not _ok("ip", "netns", "add", tag):
            self._note("nftables", f"`ip netns add {tag}` failed")
            return
        host.netns = tag
        _ok("ip", "-n", tag, "link", "set", "lo", "up")
        table = f"cell_{tag}"
        rules = NFT_RULES.format(table=table)
        if not _ok("ip", "netns", "exec", tag, "nft", "-f", "-", stdin=rules):
            self._note("nftables", "loading the demo table failed")
            return
        host.targets.update(nft_family="inet", nft_table=table, netns=f"/run/netns/{tag}")

    def _cgroup(self, host: CellHost, tag: str) -> None:
        root = next((r for r in CGROUP_ROOTS if (r / "cgroup.procs").exists()), None)
        if root is None:
            self._note("cgroup", "no cgroup v2 hierarchy mounted")
            return
        path = root / tag
        try:
            path.mkdir()
            host.cgroup = path
            if self._workload:
                host.busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
                (path / "cgroup.procs").write_text(str(host.busy.pid))
        except OSError as exc:
            self._note("cgroup", f"cannot create {path}: {exc.strerror}")
            return
        host.targets["cgroup_path"] = str(path)

    def _tap(self, host: CellHost, tag: str) -> None:
        if shutil.which("ip") is None or not _ok("ip", "tuntap", "add", "dev", tag, "mode", "tap"):
            self._note("tap_link", "cannot create a TAP device")
            return
        host.tap = tag
        _ok("ip", "link", "set", tag, "up")
        host.targets["tap_iface"] = tag

    def _metrics(self, host: CellHost, cell_id: str) -> None:
        path = self._dir / f"{cell_id}.fc-metrics"
        path.write_text("")
        host.metrics = path
        host.targets["fc_metrics_path"] = str(path)

    def _note(self, probe: str, why: str) -> None:
        line = f"{probe} probe: {why}"
        if line not in self.notes:
            self.notes.append(line)

    def start_activity(self) -> None:
        """Traffic through each namespace and Firecracker-format metrics lines: what makes
        the counter series move in the live view."""
        loop = asyncio.get_running_loop()
        for host in self.cells.values():
            self._tasks.append(loop.create_task(_activity(host, traffic=self._workload)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        for host in self.cells.values():
            if host.busy is not None:
                host.busy.kill()
                host.busy.wait()
            if host.cgroup is not None:
                for _ in range(200):
                    with contextlib.suppress(OSError):
                        host.cgroup.rmdir()
                        break
                    await asyncio.sleep(0.01)
            if host.tap is not None:
                _ok("ip", "tuntap", "del", "dev", host.tap, "mode", "tap")
            if host.netns is not None:
                _ok("ip", "netns", "del", host.netns)


async def _activity(host: CellHost, *, traffic: bool) -> None:
    n = 0
    while True:
        n += 1
        if traffic and host.netns is not None:
            await asyncio.to_thread(
                _ok,
                "ip",
                "netns",
                "exec",
                host.netns,
                "ping",
                "-c",
                "3",
                "-i",
                "0.2",
                "-q",
                "127.0.0.1",
            )
        if host.metrics is not None:
            line = {
                "utc_timestamp_ms": n,
                "vcpu": {"exit_io_out": 17 * n},
                "net": {"tx_bytes_count": 1500 * n},
            }
            with host.metrics.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
        await asyncio.sleep(1.0)


def _ok(*args: str, stdin: str | None = None) -> bool:
    try:
        subprocess.run(
            list(args), input=stdin, text=True, check=True, capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True
