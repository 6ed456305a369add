"""A demand fault costs about one round trip to the source plus a constant: netem adds 0, 0.5, 2 and 10 ms of
round-trip time between the device and the page server (two network namespaces, a veth pair), and the
median fault latency through the plugin rises by about that much. The measurement is benchmarks/bench_rtt.py's
(tests/lab/rtt.py), run here with few faults; its table is checked loosely, on the 25th percentiles."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.rtt import fit_line

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.root]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_rtt.py"
RTTS_MS = [0, 0.5, 2, 10]


def test_a_demand_fault_costs_about_one_round_trip_plus_a_constant(swap_lock, run_dir):
    bench = subprocess.run(
        [sys.executable, BENCH, "--inside", "--rtts", ",".join(map(str, RTTS_MS)), "--faults", "16", "--rounds", "4",
         "--mib", "16", "--results-dir", run_dir], capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    with open(run_dir / "rtt.csv") as table:
        rows = list(csv.DictReader(table))
    # The 25th percentile: a busy host CPU (TCG, other test runs) only ever adds time to a fault.
    low = {float(row["added RTT ms"]): float(row["p25 ms"]) for row in rows}
    assert sorted(low) == RTTS_MS
    assert "least-squares fit of the medians" in (run_dir / "rtt.md").read_text()

    slope, constant = fit_line(list(low.items()))
    shape = f"p25 fault ms by added RTT ms: {low}; fit: {slope:.2f} x RTT + {constant:.2f} ms"
    # Loose on purpose (TCG, a shared CPU): one round trip per fault, not zero and not several.
    assert 0.5 < slope < 2.0, shape
    assert constant > 0, shape
    assert low[10] - low[0] > 5 and low[10] - low[2] > 4, shape
