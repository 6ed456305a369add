"""Benchmark: restoring a saved VM, QEMU's ordinary way beside nbd-postcopy's lazy restore, in one run.

For each guest size the checker guest (memcheck in write mode) boots once and is saved twice, a moment
apart: `nbd-postcopy snapshot --keep-running` (device state + sparse RAM file), then, paused, a full
migration stream of device state and all RAM into one file (QEMU's own way: no x-ignore-shared). Then
each of these restores the guest into a fresh QEMU waiting with -incoming defer and anonymous RAM:
  - qemu -incoming: migrate-incoming from the full stream file (`exec:cat FILE`), then `cont`: the guest
    runs once QEMU has read every page, so time to resume = time until every page is local;
  - nbd-postcopy restore, no record: the lazy restore (verify, stage, arm, load device state, resume;
    pages on demand and by prefetch), which records the first demand faults in the snapshot;
  - nbd-postcopy restore, replay: the same snapshot again, the recorded working set prefetched first.
The table reports time to resume and until every page is local (both from the restore command, with
QEMU already waiting), the part of the former from sending the device state to the resume (for
nbd-postcopy, what is left once the device is attached, staged and armed, which can be done ahead), demand faults (in the first 2 s after the resume, and in all), and whether the
restored guest went on verifying its memory (a full OK pass, no FAIL). Results go to
benchmarks/results/restore.md and restore.csv.

    .venv/bin/python benchmarks/bench_restore.py [--sizes 256,1024] [--settle 3]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS_DIR, Table, machine_context, write_results  # noqa: E402

from nbd_postcopy.migration.restore import FIRST_SECONDS, RestoreOptions, restore  # noqa: E402
from nbd_postcopy.migration.snapshot import SnapshotOptions, save_migration_stream, snapshot  # noqa: E402
from nbd_postcopy.testbench.guest import GuestImage, PassOk, prepare_guest  # noqa: E402
from nbd_postcopy.testbench.vm import Vm, verified_after  # noqa: E402
from tests.swapdev import remove_run_dir  # noqa: E402

SWAP_LOCK = "/run/lock/nbd-postcopy-tests.lock"  # tests/conftest.py's swap_lock
GUEST_ARGS = "memcheck.seed=1234 memcheck.mode=write"

COLUMNS = [
    "method", "guest MiB", "time to resume ms", "device state to resume ms", "every page local s", f"demand faults first {FIRST_SECONDS:g} s",
    "demand faults", "pages prefetched", "saved on disk MiB", "guest verified",
]


def _allocated_mib(*paths: Path) -> float:
    return sum(os.stat(p).st_blocks * 512 for p in paths) / 2**20


def save(image: GuestImage, size_mib: int, run_dir: Path) -> tuple[Path, Path, float]:
    """Boot the guest and save it both ways; returns (snapshot dir, full stream file, snapshot pause ms)."""
    snap, stream = run_dir / "snapshot", run_dir / "full-stream"
    with Vm(image, run_dir, name="src", memory_mib=size_mib, ram="file", append=GUEST_ARGS, extra_qmp=1) as source:
        source.console.wait_for(PassOk, timeout=120 + size_mib / 10)
        report = snapshot(SnapshotOptions(source.extra_qmp_paths[0], snap, keep_running=True, quiet=True))
        source.qmp.set_capabilities(x_ignore_shared=False, events=True)  # QEMU's own way: RAM in the stream
        source.qmp.execute("stop")
        save_migration_stream(source.qmp, stream)
    return snap, stream, report.pause_ms


def run_qemu_incoming(image: GuestImage, size_mib: int, stream: Path, run_dir: Path, settle: float) -> list:
    with Vm(image, run_dir, name="qemu", memory_mib=size_mib, ram="ram", incoming=True, append=GUEST_ARGS) as vm:
        vm.qmp.set_capabilities(events=True)
        mark = vm.qmp.mark()
        started = time.monotonic()
        vm.qmp.migrate_incoming(f"exec:cat {shlex.quote(str(stream))}")
        status = vm.qmp.wait_migration(after=mark, timeout=600)
        if status != "completed":
            raise RuntimeError(f"QEMU's incoming migration {status}")
        if vm.qmp.status() != "running":
            vm.qmp.execute("cont")  # saved paused
        resumed = vm.qmp.wait_event("RESUME", after=mark, timeout=60).host_time - started
        verified = verified_after(vm, settle, timeout=120)
    return ["qemu -incoming (full stream file)", size_mib, resumed * 1000, resumed * 1000, resumed, 0, 0, 0,
            _allocated_mib(stream), verified]


def run_nbd_restore(image: GuestImage, size_mib: int, snap: Path, run_dir: Path, settle: float, replay: bool) -> list:
    """nbd-postcopy restore; holds the test suite's swap lock, so that it never shares swap with a test."""
    with open(SWAP_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        name = "replay" if replay else "norecord"
        with Vm(image, run_dir, name=name, memory_mib=size_mib, ram="ram", incoming=True, append=GUEST_ARGS,
                extra_qmp=1) as vm:
            report = restore(RestoreOptions(snap, vm.extra_qmp_paths[0], run_dir / f"rst-{name}", replay=replay,
                                            quiet=True))
            verified = verified_after(vm, settle, timeout=120)
    local = "n/a" if report.resume_to_local_seconds is None else report.to_resume_seconds + report.resume_to_local_seconds
    method = f"nbd-postcopy restore, replay of {report.replayed_pages} pages" if replay else \
        "nbd-postcopy restore, no record"
    return [method, size_mib, report.to_resume_seconds * 1000, report.load_to_resume_ms, local, report.pages_demand_first, report.pages_demand,
            report.pages_prefetch, _allocated_mib(snap / "ram", snap / "state"), verified]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256", help="guest sizes in MiB, comma-separated (e.g. 256,1024)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds a restored guest runs before judging")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    image = prepare_guest()
    rows: list[list] = []
    pauses: list[str] = []
    for size in sizes:
        run_dir = Path(tempfile.mkdtemp(prefix="nbdpc-bench-", dir="/var/tmp"))  # a disk, not tmpfs
        try:
            snap, stream, pause_ms = save(image, size, run_dir)
            pauses.append(f"{size} MiB: {pause_ms:.0f} ms")
            runs = [
                ("qemu -incoming (full stream file)", lambda: run_qemu_incoming(image, size, stream, run_dir, args.settle)),
                ("nbd-postcopy restore, no record",
                 lambda: run_nbd_restore(image, size, snap, run_dir, args.settle, replay=False)),
                ("nbd-postcopy restore, replay", lambda: run_nbd_restore(image, size, snap, run_dir, args.settle, replay=True)),
            ]
            for method, run in runs:
                try:
                    row = run()
                except Exception as exc:  # one failed method must not lose the other rows
                    row = [method, size] + ["n/a"] * (len(COLUMNS) - 3) + [f"FAILED: {exc}"]
                print(" | ".join(str(c) if not isinstance(c, float) else f"{c:.1f}" for c in row), flush=True)
                rows.append(row)
        except Exception as exc:
            rows.append(["(saving the guest)", size] + ["n/a"] * (len(COLUMNS) - 3) + [f"FAILED: {exc}"])
        finally:
            remove_run_dir(run_dir)  # (and any device a failed run left attached)

    notes = [
        f"{machine_context()}; load average at the end {os.getloadavg()[0]:.1f} (a shared machine: other jobs may "
        "have run beside this one)",
        "QEMU 7.2 TCG, one vCPU, guest = Debian cloud kernel + memcheck in write mode (fills most of RAM, verifies "
        "and rewrites it in a loop, so its whole RAM is its working set).",
        "Both saves are of the same running guest a moment apart: the snapshot with --keep-running, then the full "
        f"stream (device state and all RAM, no x-ignore-shared) while paused. Snapshot pause: {'; '.join(pauses)}.",
        "Times run from the restore command, with the destination QEMU already waiting (-incoming defer, "
        "memory-backend-ram); the files are in the page cache (written just before). nbd-postcopy's time to resume "
        "includes verifying the snapshot's checksums, attaching the swap device and staging, which could be done "
        "before the restore is asked for; device state to resume is the rest; every page local = the device holds every page "
        "(completion then pre-pages them into the guest).",
        f"Demand faults: pages fetched on demand, in the first {FIRST_SECONDS:g} s after the resume and in all. "
        "The first nbd-postcopy restore records the working set, the second replays it before the resume.",
    ]
    table = Table("Restore of the checker guest", COLUMNS, rows)
    for path in write_results("restore", "Restore: QEMU -incoming from a file vs nbd-postcopy lazy restore", notes,
                              [table], args.results_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
