"""Prometheus metrics of the source server and the destination device.

Every metric carries the `nbd_postcopy_` prefix and base units. Each component takes a
`CollectorRegistry` so that tests can read values back with `registry.get_sample_value(...)`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

# Latency buckets from 10 microseconds to 1 second.
LATENCY_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
)


def parse_listen(spec: str) -> tuple[str, int]:
    """'HOST:PORT' (or ':PORT', meaning 127.0.0.1) -> (host, port)."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address must be HOST:PORT, got {spec!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve_metrics(spec: str, registry: CollectorRegistry):
    """Start the HTTP exposition endpoint for `registry` on a daemon thread."""
    host, port = parse_listen(spec)
    start_http_server(port, addr=host, registry=registry)


from prometheus_client import Counter, Gauge, Histogram  # noqa: E402  (DeviceMetrics)


class ServerMetrics:
    """Metrics of the source page server (`nbd-postcopy serve`)."""

    COMMANDS = ("read", "block_status", "cache")

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "nbd_postcopy_server_requests", "NBD requests received, by command", ["command"], registry=r
        )
        self.requests_by_command = {c: self.requests.labels(command=c) for c in self.COMMANDS}
        self.read_bytes = Counter("nbd_postcopy_server_read_bytes", "Bytes served to READ requests", registry=r)
        self.request_seconds = Histogram(
            "nbd_postcopy_server_request_seconds",
            "Time from receiving a request to queueing its reply (includes waiting for the freeze gate)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.clients = Gauge("nbd_postcopy_server_clients", "Connected NBD clients", registry=r)
        self.gate_open = Gauge("nbd_postcopy_server_gate_open", "1 once the freeze gate is open", registry=r)
        self.protocol_errors = Counter(
            "nbd_postcopy_server_protocol_errors", "Connections dropped for breaking the NBD protocol", registry=r
        )


class DeviceMetrics:
    """Metrics of the destination device (plugin/postcopy.py). Gauges read the device's state when
    scraped (see Device.watch_metrics); counters and the histogram are updated on the I/O paths."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.fault_seconds = Histogram(
            "nbd_postcopy_fault_seconds", "Time to serve a read that needed a demand fetch from the source",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.pages_fetched = Counter(
            "nbd_postcopy_pages_fetched", "Pages fetched from the source", ["reason"], registry=r
        )
        self.fetched_bytes = Counter("nbd_postcopy_fetched_bytes", "Bytes fetched from the source", registry=r)
        self.anomalies = Counter(
            "nbd_postcopy_anomalies", "Unexpected requests (e.g. reads of never-written slots)", ["kind"], registry=r
        )
        self.source_errors = Counter(
            "nbd_postcopy_source_errors", "Fetches that failed (source unavailable past the timeout, or an NBD error)",
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
        for reason in ("demand", "prefetch"):
            self.pages_fetched.labels(reason=reason)
        for kind in ("unmapped_read", "invalid_marker"):
            self.anomalies.labels(kind=kind)
