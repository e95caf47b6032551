"""A histogram cheap enough for the hot path: the metrics endpoint reads it at scrape time.

``prometheus_client``'s own Histogram takes a lock and walks its buckets per observation;
publish latency is observed once per event, tens of thousands of times a second, so the
counts are kept here (one ``bisect`` and two additions) and exported by a collector.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence


class Histogram:
    """Counts of observations per bucket (``le`` upper bounds, +Inf implied), and sum."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs as Prometheus expects, ending with ``+Inf``."""
        out = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out
