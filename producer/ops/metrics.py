"""Prometheus metrics and health endpoints on one small HTTP listener (`[metrics]`).

Nothing is counted twice: the pipeline already keeps its counters (per cell, in the spool,
the publisher, the probe scheduler), and :class:`ProducerCollector` reads them at scrape
time, so metrics cost the hot path nothing beyond the one histogram observation per
acknowledged event (``producer.stats.Histogram``).

Cardinality: labels are bounded by construction (reasons, event types, probe names and
failure kinds are fixed sets) except ``cell``. Per-cell series are exported for at most
``metrics.max_cell_labels`` cells (in cell id order); the counts of any further cells are
summed under ``cell="_other"``. Counters of a cell that is deregistered or suspended move
into process-wide totals, so the unlabelled totals never go backwards; the per-cell series
simply end.

``/healthz`` answers while the event loop does. ``/readyz`` is 200 only when the producer
has started (key loaded, cells bound), the spool accepts events, and the broker is
connected or the spool is still below half its bound (a short outage is not unreadiness;
a spool filling up without a broker is).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from producer import __version__
from producer.chain.cell import CellCounters
from producer.ops.logs import event
from producer.stats import Histogram
from schemas.events import CHAIN_KINDS, HOST_PROBES

if TYPE_CHECKING:
    from producer.ops.daemon import Producer

log = logging.getLogger(__name__)

PREFIX: Final = "cellos_producer_"
OTHER: Final = "_other"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def family_of(kind: str) -> str:
    """The event family of a type's last token (``process_spawned`` -> ``guest``)."""
    if kind in CHAIN_KINDS:
        return "chain"
    if kind in HOST_PROBES:
        return "host"
    return "guest"


class ProducerCollector(Collector):
    """Every metric of the producer, read from its live state at scrape time."""

    def __init__(self, producer: Producer, *, max_cell_labels: int) -> None:
        self._producer = producer
        self._max_cells = max_cell_labels

    def collect(self) -> Iterator[Metric]:
        p = self._producer
        info = GaugeMetricFamily(PREFIX + "build_info", "Producer version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from self._cells()
        yield from self._delivery()
        yield from self._probes()
        if p.spool is not None:
            chains = list(p.spool.chains.values())
            yield GaugeMetricFamily(
                PREFIX + "chains_open",
                "Chains not sealed (served, or suspended in the spool).",
                value=sum(not c.sealed for c in chains),
            )
            yield GaugeMetricFamily(
                PREFIX + "chains_draining",
                "Sealed chains whose events are not all acknowledged by JetStream yet.",
                value=sum(c.sealed and c.acked_seq < c.sequence for c in chains),
            )

    def _cells(self) -> Iterator[Metric]:
        registry = self._producer.registry
        cells = sorted(registry.cells.values(), key=lambda c: c.cell_id) if registry else []
        yield GaugeMetricFamily(PREFIX + "cells", "Cells served.", value=len(cells))
        accepted = CounterMetricFamily(
            PREFIX + "frames_accepted", "Guest frames accepted.", labels=["cell"]
        )
        rejected = CounterMetricFamily(
            PREFIX + "frames_rejected",
            "Guest frames rejected, by reason.",
            labels=["cell", "reason"],
        )
        refused = CounterMetricFamily(
            PREFIX + "guest_connections_refused",
            "Guest connections refused (the cell's connection limit).",
            labels=["cell"],
        )
        expired = CounterMetricFamily(
            PREFIX + "frame_deadline_exceeded",
            "Guest connections closed because a frame did not complete in time.",
            labels=["cell"],
        )
        other: dict[str, Any] = {"accepted": 0, "refused": 0, "expired": 0, "rejected": Counter()}
        for i, cell in enumerate(cells):
            c = cell.counters
            if i < self._max_cells:
                accepted.add_metric([cell.cell_id], c.accepted)
                refused.add_metric([cell.cell_id], cell.listener.refused)
                expired.add_metric([cell.cell_id], cell.listener.expired)
                for reason, n in sorted(c.rejected.items()):
                    rejected.add_metric([cell.cell_id, reason], n)
            else:
                other["accepted"] += c.accepted
                other["refused"] += cell.listener.refused
                other["expired"] += cell.listener.expired
                other["rejected"].update(c.rejected)
        if len(cells) > self._max_cells:
            accepted.add_metric([OTHER], other["accepted"])
            refused.add_metric([OTHER], other["refused"])
            expired.add_metric([OTHER], other["expired"])
            for reason, n in sorted(other["rejected"].items()):
                rejected.add_metric([OTHER, reason], n)
        yield from (accepted, rejected, refused, expired)

        totals = CellCounters()
        if registry is not None:
            for counters in (registry.retired, *(c.counters for c in cells)):
                totals.signed += counters.signed
                totals.silenced += counters.silenced
                totals.by_type.update(counters.by_type)
        events = CounterMetricFamily(
            PREFIX + "events", "Events sealed, by family and type.", labels=["family", "type"]
        )
        for kind, n in sorted(totals.by_type.items()):
            name = kind.replace(".", "_")
            events.add_metric([family_of(name), name], n)
        yield events
        yield CounterMetricFamily(
            PREFIX + "events_signed", "Events sealed with a signature.", value=totals.signed
        )
        yield CounterMetricFamily(
            PREFIX + "agents_silenced", "agent_silenced events fired.", value=totals.silenced
        )

    def _delivery(self) -> Iterator[Metric]:
        p = self._producer
        yield _histogram(
            PREFIX + "publish_latency_seconds",
            "From spooled to acknowledged by JetStream, per event.",
            [([], p.publish_latency)],
            [],
        )
        pub = p.publisher
        if pub is not None:
            st = pub.stats
            yield GaugeMetricFamily(
                PREFIX + "publish_inflight", "Published, awaiting PubAck.", value=pub.inflight
            )
            yield GaugeMetricFamily(
                PREFIX + "publish_backlog",
                "Events in the in-memory publish window (queued, in flight, retrying).",
                value=pub.backlog,
            )
            yield CounterMetricFamily(
                PREFIX + "publish_retries", "Publish retries.", value=st.retries
            )
            yield CounterMetricFamily(PREFIX + "publish_acked", "PubAcks received.", value=st.acked)
            yield CounterMetricFamily(
                PREFIX + "publish_duplicates",
                "Events JetStream (or a stored-check) reported as already stored.",
                value=st.duplicates,
            )
            yield GaugeMetricFamily(
                PREFIX + "broker_connected",
                "1 while connected to NATS.",
                value=1 if pub.connected else 0,
            )
        spool = p.spool
        if spool is not None:
            yield GaugeMetricFamily(
                PREFIX + "spool_events", "Spooled events not yet acknowledged.", value=spool.depth()
            )
            yield GaugeMetricFamily(PREFIX + "spool_bytes", "Spool size.", value=spool.live_bytes())
            yield GaugeMetricFamily(
                PREFIX + "spool_oldest_age_seconds",
                "Age of the oldest unacknowledged spooled event.",
                value=spool.oldest_age_s(),
            )
            yield GaugeMetricFamily(
                PREFIX + "spool_full",
                "1 while the spool refuses new events (bound, disk floor or write error).",
                value=0 if spool.has_space() else 1,
            )
            yield CounterMetricFamily(
                PREFIX + "spool_write_errors",
                "Failed spool writes (ENOSPC and the like).",
                value=spool.stats.write_errors,
            )

    def _probes(self) -> Iterator[Metric]:
        probes = self._producer.probes
        stats = probes.stats() if probes is not None else {}
        readings = CounterMetricFamily(
            PREFIX + "probe_readings", "Probe readings, by outcome.", labels=["probe", "outcome"]
        )
        errors = CounterMetricFamily(
            PREFIX + "probe_errors", "Failed probe readings, by kind.", labels=["probe", "kind"]
        )
        outcome: Counter[tuple[str, str]] = Counter()
        kinds: Counter[tuple[str, str]] = Counter()
        durations: dict[str, list[Histogram]] = {}
        for (_, probe), st in stats.items():
            outcome[(probe, "ok")] += st.readings
            outcome[(probe, "skipped")] += st.skipped
            outcome[(probe, "failed")] += sum(st.failures.values())
            for kind, n in st.failures.items():
                kinds[(probe, kind)] += n
            durations.setdefault(probe, []).append(st.duration)
        for labels, n in sorted(outcome.items()):
            readings.add_metric(list(labels), n)
        for labels, n in sorted(kinds.items()):
            errors.add_metric(list(labels), n)
        yield readings
        yield errors
        yield _histogram(
            PREFIX + "probe_duration_seconds",
            "How long probe readings took.",
            [([probe], _merged(hs)) for probe, hs in sorted(durations.items())],
            ["probe"],
        )


def _merged(histograms: Iterable[Histogram]) -> Histogram:
    items = list(histograms)
    out = Histogram(items[0].bounds)
    for h in items:
        out.counts = [a + b for a, b in zip(out.counts, h.counts, strict=True)]
        out.count += h.count
        out.total += h.total
    return out


def _histogram(
    name: str, doc: str, series: list[tuple[list[str], Histogram]], labels: list[str]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, hist in series:
        family.add_metric(values, hist.cumulative(), sum_value=hist.total)
    return family


def readiness(producer: Producer) -> dict[str, bool]:
    """The checks ``/readyz`` answers with; ready when all are true."""
    spool, publisher = producer.spool, producer.publisher
    below_alarm = spool is not None and spool.live_bytes() < spool.opts.max_bytes // 2
    return {
        "started": producer.started,
        "signing_key_loaded": producer.signer is not None,
        "spool_accepting": spool is not None and spool.has_space(),
        "broker_or_spool_headroom": (publisher is not None and publisher.connected) or below_alarm,
    }


def metrics_app(producer: Producer, *, max_cell_labels: int) -> web.Application:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProducerCollector(producer, max_cell_labels=max_cell_labels))

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(_: web.Request) -> web.Response:
        checks = readiness(producer)
        ready = all(checks.values())
        return web.Response(
            body=msgspec.json.encode({"ready": ready, "checks": checks}),
            status=200 if ready else 503,
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve_metrics(producer: Producer, listen: str, *, max_cell_labels: int) -> web.AppRunner:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``listen`` (``host:port``)."""
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(metrics_app(producer, max_cell_labels=max_cell_labels), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]") or None, int(port))
    await site.start()
    event(log, logging.INFO, "metrics_listening", listen=listen)
    return runner
