"""LatencyHistogram: exposed exactly as prometheus_client's Histogram with the same buckets is."""

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from nbd_postcopy.common.metrics import LATENCY_BUCKETS, LatencyHistogram

SECONDS = [0.0, 5e-6, 10e-6, 10.5e-6, 0.0004, 0.0005, 0.003, 0.9999, 1.0, 2.5, 7e-5]


def samples(registry: CollectorRegistry) -> list[str]:
    """The exposition's sample lines, without the _created one that only prometheus_client's has."""
    lines = generate_latest(registry).decode().splitlines()
    return [line for line in lines if line.startswith("x_seconds") and "_created" not in line]


def test_latency_histogram_is_exposed_as_prometheus_clients_histogram():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    cheap = LatencyHistogram("x_seconds", "help", registry=ours)
    reference = Histogram("x_seconds", "help", buckets=LATENCY_BUCKETS, registry=theirs)
    for seconds in SECONDS:
        cheap.observe(seconds)
        reference.observe(seconds)
    assert samples(ours) == samples(theirs)
    assert ours.get_sample_value("x_seconds_count") == len(SECONDS)
    assert ours.get_sample_value("x_seconds_bucket", {"le": "1e-05"}) == 3  # a bound is inside its bucket
    assert ours.get_sample_value("x_seconds_bucket", {"le": "1.0"}) == len(SECONDS) - 1


def test_an_unobserved_latency_histogram_reads_zero():
    registry = CollectorRegistry()
    LatencyHistogram("x_seconds", "help", registry=registry)
    assert registry.get_sample_value("x_seconds_count") == 0
    assert registry.get_sample_value("x_seconds_bucket", {"le": "+Inf"}) == 0
    assert registry.get_sample_value("x_seconds_sum") == 0
