"""A demand fault costs about one round trip to the source plus a constant: netem adds 0, 0.5, 2 and 10 ms of
round-trip time between the device and the page server (two network namespaces, a veth pair), and the
median fault latency through the plugin rises by about that much. The numbers are benchmarks/bench_rtt.py's."""

from __future__ import annotations

import statistics

import pytest

from tests.lab.rtt import fit_line, measure_fault_latency

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.root]

RTTS_MS = [0, 0.5, 2, 10]


def test_a_demand_fault_costs_about_one_round_trip_plus_a_constant(swap_lock, processes, run_dir, codec):
    latencies = measure_fault_latency(run_dir, processes, codec, run_dir / "key", RTTS_MS, faults=15)
    medians = {rtt: statistics.median(seconds) * 1000 for rtt, seconds in latencies.items()}
    slope, constant = fit_line(list(medians.items()))
    shape = f"median fault ms by added RTT ms: {medians}; fit: {slope:.2f} x RTT + {constant:.2f} ms"
    # Loose on purpose (TCG, a shared CPU): one round trip per fault, not zero and not several.
    assert 0.6 < slope < 1.8, shape
    assert constant > 0, shape
    assert medians[10] > medians[2] > medians[0], shape
    assert medians[10] - medians[0] > 6, shape
