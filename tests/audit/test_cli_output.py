"""What ``cellos-audit`` prints: progress only on a terminal, summarized problems."""

from __future__ import annotations

import io

from audit.cli import _Progress, print_reports
from audit.prepare import prepare
from audit.verify import StreamVerifier
from tests.chains import ChainBuilder, new_signer


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_drawn_on_a_terminal_only() -> None:
    now = [0.0]
    tty, pipe = _Terminal(), io.StringIO()
    for out in (tty, pipe):
        progress = _Progress(out, clock=lambda: now[0])
        now[0] += 1.0
        progress(500, 1000)
        now[0] += 0.1
        progress(600, 1000)  # within half a second of the last draw: skipped
        progress.done()
    assert tty.getvalue() == "\rverified 500/1000 events (500/s)\x1b[K\r\x1b[K"
    assert pipe.getvalue() == ""


def test_many_problems_print_as_the_first_few_and_counts() -> None:
    mallory = new_signer()
    b = ChainBuilder(mallory)
    b.opened()
    for pid in range(20):
        b.guest(pid)
    verifier = StreamVerifier({})
    for i, payload in enumerate(b.payloads):
        verifier.add(prepare(payload, i, {}))
    out = io.StringIO()
    print_reports(verifier.finish(), out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("FAIL cell=cell-7 run=run-1 ")
    assert lines[0].endswith("TAMPERED at seq 1: unknown-key")
    assert sum(line.startswith("     - ") for line in lines) == 5
    assert "... and 18 more (all problems by reason: unknown-key 22, unsigned 1)" in lines[-2]
    assert lines[-1] == "1 chain(s), 0 verified, 1 failed (tampered 1)"
