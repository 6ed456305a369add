"""A demand fault costs about one round trip to the source plus a constant: netem adds 0, 0.5, 2 and 10 ms of
round-trip time between the device and the page server (two network namespaces, a veth pair), and the
median fault latency through the plugin rises by about that much. The measurement is benchmarks/bench_rtt.py's
(tests/lab/rtt.py), run here with few faults; its table is checked loosely, on the fastest
fault per RTT."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.root]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_rtt.py"
RTTS_MS = [0, 0.5, 2, 10]


def test_a_demand_fault_costs_about_one_round_trip_plus_a_constant(swap_lock, run_dir):
    bench = subprocess.run(
        [sys.executable, BENCH, "--inside", "--rtts", ",".join(map(str, RTTS_MS)), "--faults", "40", "--rounds", "4",
         "--mib", "24", "--results-dir", run_dir], capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    with open(run_dir / "rtt.csv") as table:
        rows = {float(row["added RTT ms"]): row for row in csv.DictReader(table)}
    assert sorted(rows) == RTTS_MS
    assert "least-squares fit of the medians" in (run_dir / "rtt.md").read_text()
    fastest = {rtt: float(row["min ms"]) for rtt, row in rows.items()}
    shape = "fastest fault ms by added RTT ms: " + ", ".join(f"{rtt}: {ms:.1f}" for rtt, ms in fastest.items())

    # A busy host CPU (TCG, other test runs) only ever adds time to a fault, and adds a lot (tens of ms),
    # so the medians can hide a 10 ms step; the fastest fault of each RTT is what noise cannot lower.
    # Every measured fault paid at least one round trip...
    assert fastest[10] >= 10 and fastest[2] >= 2, shape
    # ...and about one: over the constant (the fastest fault less its RTT, of the smaller RTTs), 10 ms more
    # RTT costs more than half a round trip and less than two and a half.
    constant = min(ms - rtt for rtt, ms in fastest.items() if rtt < 10)
    assert 5 < fastest[10] - constant < 25, f"{shape}; constant {constant:.1f} ms"
