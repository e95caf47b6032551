"""Which events get a signature (SPEC 5.1): pure decisions, the clock is passed in.

Strict mode signs everything. Adaptive mode signs every event while signing is cheap
relative to the load, and thins signatures out under bursts instead of letting Ed25519
(tens of microseconds per event) cap the pipeline:

* chain events (opened/checkpoint/gap/sealed) are always signed;
* an event is forced to be signed when ``max_unsigned`` events before it went unsigned, or
  the oldest of them is ``max_unsigned_ms`` old;
* otherwise the last event of a batch (what one read of the socket produced) is signed
  when the host-wide signing budget has a token. At ordinary rates every batch is a single
  event and the budget never runs dry, so every event is signed; under a burst batches
  grow and only their ends, plus the forced ones, cost a signature.

A tail left unsigned when a chain goes quiet is covered by the caller with a signed
checkpoint within ``max_unsigned_ms`` (see ``CellRuntime``), so the bound holds even if no
further event arrives.
"""

from __future__ import annotations

from dataclasses import dataclass


class SignBudget:
    """Token bucket of signatures per second shared by every chain of the host.

    The rate is a fraction of one core's worth of signatures (measured at startup), so
    signing can never take more than that fraction of the event loop's time.
    """

    __slots__ = ("_last", "burst", "rate", "tokens")

    def __init__(self, rate_per_s: float, burst: float, now_s: float) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self.tokens = burst
        self._last = now_s

    def take(self, now_s: float) -> bool:
        elapsed = now_s - self._last
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self._last = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(slots=True)
class UnsignedRun:
    """Per chain: how many consecutive events are not yet covered by a signature."""

    count: int = 0
    since_s: float = 0.0


class SigningPolicy:
    __slots__ = ("budget", "max_unsigned", "max_unsigned_s", "strict")

    def __init__(
        self,
        *,
        strict: bool,
        max_unsigned: int,
        max_unsigned_ms: int,
        budget: SignBudget | None,
    ) -> None:
        self.strict = strict
        self.max_unsigned = max_unsigned
        self.max_unsigned_s = max_unsigned_ms / 1000.0
        self.budget = budget

    def decide(self, run: UnsignedRun, *, control: bool, last_in_batch: bool, now_s: float) -> bool:
        """Whether the next event of the chain whose unsigned run is ``run`` gets signed."""
        if self.strict or control or self.budget is None:
            return True
        if run.count >= self.max_unsigned:
            return True
        if run.count and now_s - run.since_s >= self.max_unsigned_s:
            return True
        return last_in_batch and self.budget.take(now_s)

    @staticmethod
    def record(run: UnsignedRun, *, signed: bool, now_s: float) -> None:
        if signed:
            run.count = 0
        else:
            if run.count == 0:
                run.since_s = now_s
            run.count += 1

    def cover_due(self, run: UnsignedRun, now_s: float) -> float | None:
        """Seconds until an unsigned tail must be covered, or None if nothing is unsigned.

        Half the bound is left as slack for the covering event's own trip through the
        loop.
        """
        if not run.count:
            return None
        return max(0.0, run.since_s + self.max_unsigned_s / 2 - now_s)
