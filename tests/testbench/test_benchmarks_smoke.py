"""Keep the benchmarks runnable: each runs once with tiny sizes (the numbers are not checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_benchmark(script: str, *args, timeout: float) -> None:
    """Run benchmarks/SCRIPT with the venv's Python; it must exit 0 (its output is the failure message)."""
    argv = [sys.executable, BENCHMARKS / script, *args]
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_bench_server_smoke(run_dir: Path):
    run_benchmark("bench_server.py", "--size-mib", "8", "--samples", "50", "--copies", "1", "--results-dir", run_dir, timeout=300)
    assert "| nbd-postcopy | unix |" in (run_dir / "server.md").read_text()
    assert (run_dir / "server.csv").exists() and (run_dir / "server-ratios.csv").exists()


@pytest.mark.slow
@pytest.mark.root
def test_bench_staging_smoke(run_dir: Path):
    # No swap_lock fixture here: the benchmark takes the same lock itself.
    run_benchmark("bench_staging.py", "--sizes", "16", "--transport-mib", "16", "--results-dir", run_dir, timeout=600)
    assert "| nbdkit memory (C) | 16 |" in (run_dir / "staging.md").read_text()


@pytest.mark.slow
@pytest.mark.root
def test_bench_migrate_smoke(run_dir: Path):
    # No swap_lock fixture here: the benchmark takes the same lock itself for its nbd-postcopy rows.
    run_benchmark("bench_migrate.py", "--sizes", "128", "--workloads", "idle", "--settle", "0.5",
                  "--results-dir", run_dir, timeout=600)
    table = (run_dir / "migrate.md").read_text()
    assert "FAILED" not in table, table
    for method in ("qemu postcopy", "qemu postcopy+preempt", "nbd-postcopy"):
        assert f"| {method} | 128 | idle | 1 |" in table
    assert "### Against issue 12's targets" in table and "| 128 | idle | 1 / 1 / 1 |" in table.split("issue 12's targets")[1]
    assert "CPU s per GiB (nbdkit+serve)" in table
    assert (run_dir / "migrate.png").exists()


@pytest.mark.slow
def test_bench_device_smoke(run_dir: Path):
    run_benchmark("bench_device.py", "--guest-mib", "16", "--reads", "20", "--rss-sizes", "16,32",
                  "--swapin-mib", "0", "--bulk-mib", "16", "--results-dir", run_dir, timeout=300)
    table = (run_dir / "device.md").read_text()
    for row in ("nbdkit memory (C)", "nbdkit nbd (C) -> nbdkit memory (C): two hops, no Python", "postcopy, prefetch off"):
        assert f"| {row} |" in table
    assert "| nbdkit + plugin (prefetcher) <- nbd-postcopy serve, Unix socket |" in table


@pytest.mark.slow
@pytest.mark.root
def test_bench_device_swapin_smoke(run_dir: Path):
    # No swap_lock fixture here: the benchmark takes the same lock itself for the swap-in rows.
    run_benchmark("bench_device.py", "--guest-mib", "0", "--rss-sizes", "", "--swapin-mib", "16",
                  "--touches", "50", "--swapin-rounds", "1", "--bulk-mib", "0", "--results-dir", run_dir, timeout=300)
    table = (run_dir / "device.md").read_text()
    for row in ("postcopy: loop + nbdfuse + nbdkit + plugin (prefetch off, demand-store off) -> serve",
                "postcopy, page stored before the answer (demand-store on)",
                "C floor: loop + nbdfuse + nbdkit nbd (C) -> nbdkit memory (C)",
                "postcopy, page already local: loop + nbdfuse + nbdkit + plugin (prefetched)",
                "C one hop: loop + nbdfuse + nbdkit memory (C)"):
        assert f"| {row} |" in table


@pytest.mark.slow
@pytest.mark.root
def test_bench_two_hosts_smoke(run_dir: Path):
    # No swap_lock fixture here: the benchmark takes the same lock itself for its nbd-postcopy rows.
    run_benchmark("bench_two_hosts.py", "--sizes", "128", "--links", "1gbit", "--settle", "0.5",
                  "--results-dir", run_dir, timeout=900)
    table = (run_dir / "two_hosts.md").read_text()
    assert "FAILED" not in table, table
    for method in ("qemu postcopy", "qemu postcopy+preempt", "nbd-postcopy", "nbd-postcopy, prefetch <= 80% of link"):
        assert f"| {method} | 1gbit | 128 | write |" in table
    assert (run_dir / "two_hosts.csv").exists()


@pytest.mark.slow
@pytest.mark.root
def test_bench_restore_smoke(run_dir: Path):
    # No swap_lock fixture here: the benchmark takes the same lock itself for its nbd-postcopy rows.
    run_benchmark("bench_restore.py", "--sizes", "128", "--settle", "0.5", "--results-dir", run_dir, timeout=900)
    table = (run_dir / "restore.md").read_text()
    assert "FAILED" not in table, table
    for method in ("qemu -incoming (full stream file)", "nbd-postcopy restore, no record",
                   "nbd-postcopy restore, replay of"):
        assert f"| {method}" in table
    assert (run_dir / "restore.csv").exists()


def test_bench_migrate_compares_medians_of_repeated_runs():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_migrate
    finally:
        sys.path.remove(str(BENCHMARKS))

    def row(method: str, total: float, stall: float, verified: str = "yes"):
        return bench_migrate.Row(method, 256, "idle", 1.0, 1.0, total, stall, 1.0, verified)

    runs = [row("nbd-postcopy", 700, 300), row("nbd-postcopy", 900, 250), row("nbd-postcopy", 600, 280),
            row("qemu postcopy", 400, 100), row("qemu postcopy", 500, 200),
            row("qemu postcopy", 9000, 9000, "FAILED: a crash")]
    assert bench_migrate.medians(runs, 256, "idle", "nbd-postcopy") == (700, 280, 3)
    assert bench_migrate.medians(runs, 256, "idle", "qemu postcopy") == (450, 150, 2)  # the failed run left out
    [ratios] = bench_migrate.ratio_rows(runs)
    assert ratios[:6] == [256, "idle", "3 / 2 / 0", 700, 450, 700 / 450]
    assert ratios[7:10] == [280, 150, "n/a"]


def test_bench_migrate_tells_the_switchover_gap_from_later_ones():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_migrate
    finally:
        sys.path.remove(str(BENCHMARKS))

    gaps = [(-0.1, 50.0), (0.2, 210.0), (0.25, 50.0), (2.1, 180.0), (2.15, 50.0)]  # (s after the stop, ms)
    run = bench_migrate.Row("nbd-postcopy", 256, "idle", 1.0, 1.0, 500, 210, 1.0, "yes", gaps=gaps, steal_ms=20.0)
    assert run.gap_split() == (210.0, "180 at 2.1 s")
    assert run.cells()[-3:] == [210.0, "180 at 2.1 s", 20.0]
    assert bench_migrate.Row("qemu postcopy", 256, "idle", 1.0, 1.0, 1, 1, 1.0, "yes").gap_split() == ("n/a", "n/a")
    assert bench_migrate.switchover_gaps([run], 256, "idle") == "210 / n/a / n/a"
