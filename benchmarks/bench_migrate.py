"""Benchmark: live migration of the checker guest, QEMU's own postcopy beside nbd-postcopy, in one run.

For each guest size and workload (idle: the guest only reads its memory; write: it also rewrites a
slice of it every pass) both methods migrate the same guest on localhost, and the table reports
  - downtime (QEMU's own figure from the source's query-migrate),
  - switchover to resume (source STOP event to destination RESUME event, on the host clock),
  - total time (QEMU's total-time for its postcopy; source release time for nbd-postcopy),
  - guest-visible stall: the largest gap between guest heartbeats (printed every ~50 ms) from the
    start of the migration until `--settle` seconds after it ended, on the host clock,
  - bytes moved (QEMU's stream, plus for nbd-postcopy the pages fetched from the page server),
  - whether the guest kept verifying its memory (OK passes, no FAIL) afterwards.
nbd-postcopy's total time runs from the migrate command until the source QEMU is released.
Results go to benchmarks/results/migrate.md and migrate.csv.

    .venv/bin/python benchmarks/bench_migrate.py [--sizes 256,1024] [--workloads idle,write]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS_DIR, Table, machine_context, write_results  # noqa: E402

from nbd_postcopy.testbench.guest import Failure, GuestImage, PassOk, prepare_guest  # noqa: E402
from nbd_postcopy.migration.migrate import MigrateOptions, migrate  # noqa: E402
from nbd_postcopy.testbench.vm import Vm, largest_gap, merged_heartbeats, postcopy_migrate  # noqa: E402

SWAP_LOCK = "/run/lock/nbd-postcopy-tests.lock"  # tests/conftest.py's swap_lock

COLUMNS = [
    "method", "guest MiB", "workload", "downtime ms", "switchover to resume ms", "total ms",
    "largest stall ms", "bytes moved MiB", "guest verified",
]


@dataclass
class Row:
    method: str
    size_mib: int
    workload: str
    downtime_ms: float
    resume_ms: float
    total_ms: float
    stall_ms: float
    moved_mib: float
    verified: str

    def cells(self) -> list[str | int | float]:
        return [self.method, self.size_mib, self.workload, self.downtime_ms, self.resume_ms, self.total_ms,
                self.stall_ms, self.moved_mib, self.verified]


def _guest_args(workload: str) -> str:
    return f"memcheck.seed=1234 memcheck.mode={workload}"


def _verify_after(source: Vm, destination: Vm, settle: float) -> str:
    """Let the migrated guest run `settle` seconds; "yes" if it completed a pass and nothing failed."""
    mark = destination.console.mark()
    time.sleep(settle)
    destination.console.wait_for(PassOk, after=mark, timeout=60)
    failures = source.console.events(Failure) + destination.console.events(Failure)
    return "yes" if not failures else f"NO: {failures[0].line}"


def run_qemu_postcopy(image: GuestImage, size_mib: int, workload: str, run_dir: Path, settle: float,
                      preempt: bool = False) -> Row:
    """QEMU's own postcopy: postcopy-ram (userfaultfd), migrate-start-postcopy right after migrate, the
    background stream not throttled; with `preempt`, also postcopy-preempt (Peter Xu's series)."""
    method = "qemu postcopy+preempt" if preempt else "qemu postcopy"
    with Vm(image, run_dir, name="src", memory_mib=size_mib, ram="file", append=_guest_args(workload)) as source, \
         Vm(image, run_dir, name="dst", memory_mib=size_mib, ram="ram", incoming=True,
            append=_guest_args(workload)) as destination:
        source.console.wait_for(PassOk, timeout=120 + size_mib / 10)
        started = time.monotonic()
        result = postcopy_migrate(source.qmp, destination.qmp, f"unix:{run_dir}/migrate.sock", preempt=preempt)
        verified = _verify_after(source, destination, settle)
        stall = largest_gap(merged_heartbeats(source.console, destination.console), start=started,
                            end=time.monotonic())
        return Row(method, size_mib, workload, result.downtime_ms,
                   (result.resume_time - result.switchover_time) * 1000, result.total_time_ms, stall * 1000,
                   result.transferred_bytes / 2**20, verified)


def run_nbd_postcopy(image: GuestImage, size_mib: int, workload: str, run_dir: Path, settle: float) -> Row:
    """nbd-postcopy (nbd_postcopy.migration.migrate): device state through QEMU with x-ignore-shared, RAM through swap.

    Holds the test suite's swap lock while it runs, so that it never shares swap with a running test.
    """
    with open(SWAP_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with Vm(image, run_dir, name="src", memory_mib=size_mib, ram="file", append=_guest_args(workload),
                extra_qmp=1) as source, \
             Vm(image, run_dir, name="dst", memory_mib=size_mib, ram="ram", incoming=True,
                append=_guest_args(workload), extra_qmp=1) as destination:
            source.console.wait_for(PassOk, timeout=120 + size_mib / 10)
            started = time.monotonic()
            report = migrate(MigrateOptions(source.extra_qmp_paths[0], destination.extra_qmp_paths[0],
                                            run_dir / "migrate", quiet=True))
            verified = _verify_after(source, destination, settle)
            stall = largest_gap(merged_heartbeats(source.console, destination.console), start=started,
                                end=time.monotonic())
            return Row("nbd-postcopy", size_mib, workload, report.downtime_ms, report.switchover_to_resume_ms,
                       report.total_seconds * 1000, stall * 1000,
                       (report.device_state_bytes + (report.pages_demand + report.pages_prefetch) * 4096) / 2**20,
                       verified)


def run_qemu_postcopy_preempt(image: GuestImage, size_mib: int, workload: str, run_dir: Path, settle: float) -> Row:
    return run_qemu_postcopy(image, size_mib, workload, run_dir, settle, preempt=True)


METHODS = {
    "qemu postcopy": run_qemu_postcopy,
    "qemu postcopy+preempt": run_qemu_postcopy_preempt,
    "nbd-postcopy": run_nbd_postcopy,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256", help="guest sizes in MiB, comma-separated (e.g. 256,1024)")
    parser.add_argument("--workloads", default="idle,write", help="idle, write or both, comma-separated")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds the migrated guest runs before judging")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    workloads = args.workloads.split(",")
    if unknown := set(workloads) - {"idle", "write"}:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))} (want idle, write)")

    image = prepare_guest()
    rows: list[list[str | int | float]] = []
    for size in sizes:
        for workload in workloads:
            for method, run in METHODS.items():
                run_dir = Path(tempfile.mkdtemp(prefix="nbdpc-bench-", dir="/tmp"))
                try:
                    row = run(image, size, workload, run_dir, args.settle).cells()
                except Exception as exc:  # one failed method must not lose the other rows
                    row = [method, size, workload] + ["n/a"] * (len(COLUMNS) - 4) + [f"FAILED: {exc}"]
                finally:
                    shutil.rmtree(run_dir, ignore_errors=True)
                print(" | ".join(str(c) if not isinstance(c, float) else f"{c:.1f}" for c in row), flush=True)
                rows.append(row)

    notes = [
        f"{machine_context()}; load average at the end {os.getloadavg()[0]:.1f}",
        "QEMU 7.2 TCG, one vCPU, guest = Debian cloud kernel + memcheck (fills most of RAM, verifies it in a loop).",
        "Source RAM: memory-backend-file,share=on on /dev/shm; destination: memory-backend-ram with -incoming defer.",
        "QEMU postcopy: migrate over a Unix socket, migrate-start-postcopy at once (pure postcopy, like "
        "nbd-postcopy), max-bandwidth 10 GiB/s instead of QEMU's default 128 MiB/s.",
        "Stall: largest host-clock gap between consecutive guest heartbeats (every ~50 ms) from the migrate "
        f"command until {args.settle:g} s after the migration ended.",
    ]
    table = Table("Migration of the checker guest", COLUMNS, rows)
    for path in write_results("migrate", "Live migration: QEMU postcopy vs nbd-postcopy", notes, [table], args.results_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
