"""Prometheus metrics of the destination device (the nbdkit plugin)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily

from ..common.metrics import LatencyHistogram

REASONS = ("demand", "prefetch")


class FetchCounters:
    """Pages and bytes fetched from the source: counted by the device in plain integers under its own lock,
    on every fetch, and read when scraped (`read` returns ({reason: pages}, bytes); Device.watch_metrics
    sets it). A prometheus_client counter per fetch cost the demand path two more locked updates."""

    def __init__(self, registry: CollectorRegistry):
        self.read: Callable[[], tuple[dict[str, int], int]] = lambda: (dict.fromkeys(REASONS, 0), 0)
        registry.register(self)

    def describe(self) -> list[CounterMetricFamily]:
        return self._families(dict.fromkeys(REASONS, 0), 0)

    def collect(self) -> list[CounterMetricFamily]:
        return self._families(*self.read())

    @staticmethod
    def _families(pages: dict[str, int], fetched_bytes: int) -> list[CounterMetricFamily]:
        by_reason = CounterMetricFamily("nbd_postcopy_pages_fetched", "Pages fetched from the source",
                                        labels=["reason"])
        for reason in REASONS:
            by_reason.add_metric([reason], pages[reason])
        return [by_reason, CounterMetricFamily("nbd_postcopy_fetched_bytes", "Bytes fetched from the source",
                                               value=fetched_bytes)]


class DeviceMetrics:
    """Metrics of the destination device (plugin/postcopy.py). Gauges and the fetch counters read the
    device's state when scraped (see Device.watch_metrics); the other counters and the histogram are
    updated where things happen."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.fault_seconds = LatencyHistogram(
            "nbd_postcopy_fault_seconds", "Time to serve a read that needed a demand fetch from the source",
            registry=r,
        )
        self.fetches = FetchCounters(r)
        self.anomalies = Counter(
            "nbd_postcopy_anomalies", "Unexpected requests (e.g. reads of never-written slots)", ["kind"], registry=r
        )
        self.source_errors = Counter(
            "nbd_postcopy_source_errors", "Fetches that failed (source unavailable past the timeout, or an NBD error)",
            registry=r,
        )
        self.source_refusals = Counter(
            "nbd_postcopy_source_refusals", "Connections refused because the server is not the same source "
            "(another instance id or TLS certificate)", registry=r,
        )
        self.reconnects = Counter(
            "nbd_postcopy_source_reconnects", "Times the demand connection to the source came back after a loss",
            registry=r,
        )
        self.outage_seconds = Counter(
            "nbd_postcopy_source_outage_seconds", "Time the demand connection to the source was down (ended outages)",
            registry=r,
        )
        self.pages_mapped = Gauge("nbd_postcopy_pages_mapped", "Slots that hold a guest page", registry=r)
        self.pages_remaining = Gauge(
            "nbd_postcopy_pages_remaining", "Mapped pages not yet local (still needed from the source)", registry=r
        )
        self.overlay_pages = Gauge("nbd_postcopy_overlay_pages", "Slots holding written data (overlay)", registry=r)
        self.overlay_bytes = Gauge("nbd_postcopy_overlay_bytes", "Bytes of overlay data", registry=r)
        self.source_connected = Gauge(
            "nbd_postcopy_source_connected", "1 while the demand connection to the source is up", registry=r
        )
        self.prefetch_progress = Gauge(
            "nbd_postcopy_prefetch_progress_ratio", "Fraction of mapped pages that are local", registry=r
        )
        self.complete = Gauge(
            "nbd_postcopy_complete", "1 once every mapped page is local (the source can be released)", registry=r
        )
        self.armed = Gauge("nbd_postcopy_armed", "1 once reads of mapped slots fetch from the source", registry=r)
        for kind in ("unmapped_read", "invalid_marker"):
            self.anomalies.labels(kind=kind)
