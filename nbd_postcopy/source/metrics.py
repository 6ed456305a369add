"""Prometheus metrics of the source page server (`nbd-postcopy serve`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..common.metrics import LatencyHistogram


class ServerMetrics:
    """Metrics of the source page server (`nbd-postcopy serve`)."""

    COMMANDS = ("read", "block_status", "cache")
    REFUSALS = ("limit", "handshake_timeout", "incomplete_request", "idle_timeout")

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "nbd_postcopy_server_requests", "NBD requests received, by command", ["command"], registry=r
        )
        self.requests_by_command = {c: self.requests.labels(command=c) for c in self.COMMANDS}
        self.read_bytes = Counter("nbd_postcopy_server_read_bytes", "Bytes served to READ requests", registry=r)
        self.request_seconds = LatencyHistogram(
            "nbd_postcopy_server_request_seconds",
            "Time from receiving a request to queueing its reply (includes waiting for the freeze gate)",
            registry=r,
        )
        self.clients = Gauge("nbd_postcopy_server_clients", "Connected NBD clients", registry=r)
        self.gate_open = Gauge("nbd_postcopy_server_gate_open", "1 once the freeze gate is open", registry=r)
        self.refused_connections = Counter(
            "nbd_postcopy_server_connections_refused", "Connections closed for breaking a limit, by reason",
            ["reason"], registry=r,
        )
        self.refused = {reason: self.refused_connections.labels(reason=reason) for reason in self.REFUSALS}
        self.backlog_bytes = Gauge(
            "nbd_postcopy_server_backlog_bytes", "Reply bytes accepted but not yet sent, all connections", registry=r
        )
        self.protocol_errors = Counter(
            "nbd_postcopy_server_protocol_errors", "Connections dropped for breaking the NBD protocol", registry=r
        )
