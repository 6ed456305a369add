"""Benchmark: demand fault latency through the plugin against added round-trip time to the source.

Runs in the kernel lab (Debian 12's own kernel under QEMU TCG, nbd_postcopy/testbench/lab.py), which
has netem and the kernel nbd transport: the page server sits in a network namespace of its own behind a
veth pair with `netem delay RTT`, the device is plugin/postcopy.py with the prefetcher off, attached by
`setup-swap.sh attach --transport nbd`, and each measured fault is one page read of a staged workload
(tests/lab/rtt.py). A fault should cost about one round trip plus a constant; the table gives the
25th percentile, median, p90 and minimum per added RTT, and the notes the least-squares fits.

    .venv/bin/python benchmarks/bench_rtt.py [--rtts 0,0.5,2,10] [--faults 40] [--mib 32] [--results-dir DIR]

On the host it boots the lab (about 2 to 3 minutes under TCG) and runs itself inside with `--inside`,
with the results directory shared writable at the same path. Results go to benchmarks/results/rtt.md,
rtt.csv and, when matplotlib is importable, rtt.png. The absolute numbers are TCG's (an emulated CPU
about 20 times slower than the host): the slope is the point, not the constant.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, Table, machine_context, percentile, write_results  # noqa: E402

from nbd_postcopy.device.markers import MarkerCodec  # noqa: E402
from nbd_postcopy.testbench.lab import in_lab, run_in_lab  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COLUMNS = ["added RTT ms", "faults", "p25 ms", "median ms", "p90 ms", "min ms", "median - RTT ms"]


def inside(args: argparse.Namespace) -> None:
    from tests.conftest import Processes
    from tests.lab.rtt import STRIDE, fit_line, measure_fault_latency

    rtts = [float(x) for x in args.rtts.split(",")]
    run_dir = Path(tempfile.mkdtemp(prefix="nbdpc-rtt-"))
    processes = Processes()
    try:
        key = run_dir / "key"
        key.write_bytes(os.urandom(32))
        latencies = measure_fault_latency(run_dir, processes, MarkerCodec.from_file(key), key, rtts,
                                          faults=args.faults, mib=args.mib, rounds=args.rounds)
    finally:
        processes.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)
    rows, medians, quartiles, fastest = [], [], [], []
    for rtt, seconds in latencies.items():
        ms = [s * 1000 for s in seconds]
        median = statistics.median(ms)
        medians.append((rtt, median))
        quartiles.append((rtt, percentile(ms, 0.25)))
        fastest.append((rtt, min(ms)))
        rows.append([rtt, len(ms), percentile(ms, 0.25), median, percentile(ms, 0.9), min(ms), median - rtt])
    slope, constant = fit_line(medians)
    low_slope, low_constant = fit_line(quartiles)
    min_slope, min_constant = fit_line(fastest)
    notes = [
        machine_context() + " (inside the kernel lab: QEMU TCG, 2 vCPUs)",
        f"{args.mib} MiB workload staged on the postcopy device (prefetch=off, kernel nbd transport); each fault "
        f"reads one page {STRIDE} pages from the last; netem delays the device's requests to the source by the RTT",
        f"least-squares fit of the medians: fault = {slope:.2f} x RTT + {constant:.2f} ms; of the 25th "
        f"percentiles: {low_slope:.2f} x RTT + {low_constant:.2f} ms; of the fastest faults (which a busy host "
        f"CPU cannot lower): {min_slope:.2f} x RTT + {min_constant:.2f} ms. Expected: one round trip per fault "
        "plus a constant that is mostly the emulated CPU; a busy host adds tens of ms of noise to the medians",
        f"the RTTs take turns in {args.rounds} rounds, so a change of load hits them alike",
    ]
    table = Table("Demand fault latency against added round-trip time", COLUMNS, rows)
    for path in write_results("rtt", "Fault latency against RTT (kernel lab)", notes, [table], args.results_dir):
        print(f"wrote {path}")
    plot = _plot(medians, fastest, (min_slope, min_constant), args.results_dir)
    if plot:
        print(f"wrote {plot}")
    print(f"fit of the medians: fault = {slope:.2f} x RTT + {constant:.2f} ms; "
          f"of the fastest: {min_slope:.2f} x RTT + {min_constant:.2f} ms")


def _plot(medians, fastest, fit: tuple[float, float], results_dir: Path) -> Path | None:
    """Medians and fastest faults against RTT, the fit of the fastest, and one round trip over its constant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    slope, constant = fit
    figure, axis = plt.subplots(figsize=(6, 4))
    xs = [x for x, _ in medians]
    axis.plot(xs, [y for _, y in medians], "o", label="median fault")
    axis.plot(xs, [y for _, y in fastest], "s", label="fastest fault")
    axis.plot(xs, [slope * x + constant for x in xs], "-", label=f"fastest: {slope:.2f} x RTT + {constant:.1f} ms")
    axis.plot(xs, [x + constant for x in xs], ":", label="one round trip + that constant")
    axis.set_xlabel("added round-trip time (ms)")
    axis.set_ylabel("demand fault (ms)")
    axis.set_title("Demand fault latency against RTT (kernel lab, TCG)")
    axis.legend()
    figure.tight_layout()
    path = results_dir / "rtt.png"
    figure.savefig(path)
    plt.close(figure)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtts", default="0,0.5,2,10", help="added round-trip times in ms (default 0,0.5,2,10)")
    parser.add_argument("--faults", type=int, default=40, help="measured faults per RTT (default 40)")
    parser.add_argument("--mib", type=int, default=32, help="staged workload size (default 32)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds the RTTs take turns in (default 4)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--time-limit", type=float, default=900, help="seconds the lab may take (default 900)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.results_dir = args.results_dir.resolve()
    if args.inside or in_lab():
        inside(args)
        return 0
    args.results_dir.mkdir(parents=True, exist_ok=True)
    argv = [REPO / ".venv" / "bin" / "python", Path(__file__).resolve(), "--inside", "--rtts", args.rtts,
            "--faults", args.faults, "--mib", args.mib, "--rounds", args.rounds, "--results-dir", args.results_dir]
    with tempfile.TemporaryDirectory(prefix="nbdpc-bench-rtt-") as scratch:  # the console is printed as it comes
        result = run_in_lab([str(a) for a in argv], time_limit=args.time_limit, cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "MPLCONFIGDIR": "/tmp"}, shares=[args.results_dir],
                            console_log=Path(scratch) / "console.log",
                            on_line=lambda line: print(f"lab: {line}", flush=True))
    if result.status != 0:
        print(f"bench_rtt: the run in the lab failed with status {result.status}", file=sys.stderr)
    return result.status


if __name__ == "__main__":
    sys.exit(main())
