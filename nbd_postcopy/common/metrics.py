"""Prometheus helpers shared by the source server and the destination device.

Every metric carries the `nbd_postcopy_` prefix and base units. Each component takes a
`CollectorRegistry` so that tests can read values back with `registry.get_sample_value(...)`.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from itertools import accumulate

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

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


class LatencyHistogram:
    """A histogram for the request paths, exposed as prometheus_client's Histogram is (NAME_bucket with
    `le`, NAME_count, NAME_sum). observe() is one bisect and two additions under one lock, where
    prometheus_client's walks its buckets in Python and takes a lock for each value it changes: 0.4
    against 1.1 µs in a loop, and a demand fetch, which runs on a thread that slept since the last one,
    pays several times that with cold caches."""

    def __init__(self, name: str, documentation: str, buckets=LATENCY_BUCKETS,
                 registry: CollectorRegistry | None = None):
        self.name, self.documentation = name, documentation
        self._bounds = tuple(float(bound) for bound in buckets)
        self._labels = [floatToGoString(bound) for bound in self._bounds] + ["+Inf"]
        self._counts = [0] * (len(self._bounds) + 1)  # per bucket, not cumulative
        self._sum = 0.0
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def observe(self, seconds: float) -> None:
        index = bisect_left(self._bounds, seconds)  # the first bucket whose bound is >= seconds
        with self._lock:
            self._counts[index] += 1
            self._sum += seconds

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> list[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], list(zip(self._labels, accumulate(counts))), total)
        return [family]
