"""TAP link probe against a real TAP device, attached the way Firecracker attaches one.

The test holds the TAP's ``/dev/net/tun`` descriptor itself: frames it writes there are
what the host receives from the "guest" (``rx``), frames the host sends out of the TAP
(through a packet socket bound to it) and the test reads back are ``tx``. IPv6 is off on
the device, so the only frames are the test's own and the counters must grow by exactly
what was sent.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import pytest

from probes.base import Io, Parse, ProbeContext
from probes.tap_link import TapLinkProbe, parse_carrier
from tests.probes.kernel import attach_tap, ethernet_frame, run, tap, until

CTX = ProbeContext(cell_id="cell-1")
FRAME = 120


async def wait_state(probe: TapLinkProbe, operstate: str, carrier: bool | None) -> None:
    """Link state changes reach sysfs through the kernel's link watch, a moment later."""

    async def reached() -> bool:
        output = (await probe.read(CTX)).output
        return (output["operstate"], output["carrier"]) == (operstate, carrier)

    await until(reached, f"operstate {operstate}, carrier {carrier}")


async def counters(probe: TapLinkProbe) -> dict[str, Any]:
    output = (await probe.read(CTX)).output
    return {d: {k: int(v) for k, v in output[d].items()} for d in ("rx", "tx")}


async def test_state_and_counters_follow_a_real_tap_root() -> None:
    with tap() as name:
        probe = TapLinkProbe(name)
        reading = await probe.read(CTX)
        assert reading.probe == "tap_link" and reading.inputs == {"iface": name}
        # Administratively down: the kernel refuses to say whether there is a carrier.
        assert (reading.output["operstate"], reading.output["carrier"]) == ("down", None)
        assert set(reading.output["rx"]) == {"packets", "bytes", "errors", "dropped"}

        run("ip", "link", "set", name, "up")
        await wait_state(probe, "down", False)  # up, but no VMM holds the TAP

        fd = attach_tap(name)
        try:
            await wait_state(probe, "up", True)
            before = await counters(probe)
            for _ in range(4):
                os.write(fd, ethernet_frame(FRAME))
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as out:
                out.bind((name, 0))
                for _ in range(3):
                    out.send(ethernet_frame(FRAME))

            async def counted() -> bool:
                # tun counts a transmitted frame when its reader (the VMM) takes it.
                with contextlib.suppress(BlockingIOError):
                    while os.read(fd, 2048):
                        pass
                now = await counters(probe)
                return now["rx"]["packets"] >= before["rx"]["packets"] + 4 and (
                    now["tx"]["packets"] >= before["tx"]["packets"] + 3
                )

            await until(counted, "the frames to be counted")
            after = await counters(probe)
            assert after["rx"]["packets"] - before["rx"]["packets"] == 4
            assert after["rx"]["bytes"] - before["rx"]["bytes"] == 4 * FRAME
            assert after["tx"]["packets"] - before["tx"]["packets"] == 3
            assert after["tx"]["bytes"] - before["tx"]["bytes"] == 3 * FRAME
            assert after["rx"]["errors"] == after["tx"]["errors"] == 0
        finally:
            os.close(fd)
        await wait_state(probe, "down", False)  # the VMM went away

        run("ip", "link", "set", name, "down")
        await wait_state(probe, "down", None)
    with pytest.raises(Io) as info:
        await probe.read(CTX)
    assert info.value.path == f"/sys/class/net/{name}"


async def test_a_missing_interface_is_io() -> None:
    with pytest.raises(Io) as info:
        await TapLinkProbe("cpt-none0").read(CTX)
    assert info.value.probe == "tap_link" and info.value.path == "/sys/class/net/cpt-none0"


def test_carrier_values() -> None:
    assert (parse_carrier("1\n"), parse_carrier("0\n"), parse_carrier(None)) == (
        True,
        False,
        None,
    )
    with pytest.raises(Parse):
        parse_carrier("2\n")
