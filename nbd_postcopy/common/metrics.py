"""Prometheus helpers shared by the source server and the destination device.

Every metric carries the `nbd_postcopy_` prefix and base units. Each component takes a
`CollectorRegistry` so that tests can read values back with `registry.get_sample_value(...)`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

from .units import ListenAddress, parse_listen

# Latency buckets from 10 microseconds to 1 second.
LATENCY_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
)


def parse_metrics_listen(spec: str) -> ListenAddress:
    """Where to serve metrics: TCP only, 'HOST:PORT' or ':PORT' (127.0.0.1). ValueError if not that."""
    return parse_listen(spec, kinds=("tcp",))


def serve_metrics(spec: str | ListenAddress, registry: CollectorRegistry):
    """Start the HTTP exposition endpoint for `registry` on a daemon thread ('HOST:PORT' or parsed)."""
    address = spec if isinstance(spec, ListenAddress) else parse_metrics_listen(spec)
    start_http_server(address.port, addr=address.host, registry=registry)
