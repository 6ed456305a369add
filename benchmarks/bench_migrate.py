"""Benchmark: live migration of the checker guest, QEMU's own postcopy beside nbd-postcopy, in one run.

For each guest size and workload (idle: the guest only reads its memory; write: it also rewrites a
slice of it every pass) both methods migrate the same guest on localhost, and the table reports
  - downtime (QEMU's own figure from the source's query-migrate),
  - switchover to resume (source STOP event to destination RESUME event, by the timestamps QEMU puts on them),
  - total time (QEMU's total-time for its postcopy; source release time for nbd-postcopy),
  - guest-visible stall: the largest gap between guest heartbeats (printed every ~50 ms) from the
    start of the migration until `--settle` seconds after it ended, on the host clock,
  - bytes moved (QEMU's stream, plus for nbd-postcopy the pages fetched from the page server),
  - whether the guest kept verifying its memory (OK passes, no FAIL) afterwards.
nbd-postcopy's total time runs from the migrate command until the source QEMU is released.

Then the ratios against issue 12's targets (nbd-postcopy total / QEMU postcopy total <= 1.5x, moonshot
<= 1.0x; nbd-postcopy's largest stall <= QEMU postcopy's, moonshot <= postcopy+preempt's), and for
nbd-postcopy, watched from outside by migrate_probe.py: the CPU seconds per GiB fetched of nbdkit (with
the plugin) and the page server from the switchover to the source's release, and the demand faults in
the first seconds after the guest resumed. Results go to benchmarks/results/migrate.md, migrate*.csv
and (with matplotlib) migrate.png: the heartbeat gaps over time around the switchover for each method,
and the total time per size.

    .venv/bin/python benchmarks/bench_migrate.py [--sizes 256,1024,4096] [--workloads idle,write] [--repeat N]

With --repeat N every method migrates each size and workload N times, the methods taking turns (their
order rotates from one repetition to the next), and the ratios compare medians: on a noisy machine one
migration per method can land anywhere in a wide spread (QEMU's own 1 GiB postcopy has taken 1.3 s in
one run and 5.6 s in another here).
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, Table, machine_context, met, steal_seconds, write_results  # noqa: E402
from migrate_probe import WINDOW, MigrationProbe, ProbeResult  # noqa: E402

from nbd_postcopy.testbench.guest import GuestImage, PassOk, prepare_guest  # noqa: E402
from nbd_postcopy.migration.migrate import MigrateOptions, migrate  # noqa: E402
from nbd_postcopy.testbench.vm import Vm, largest_gap, merged_heartbeats, postcopy_migrate, verified_after  # noqa: E402
from tests.swapdev import remove_run_dir  # noqa: E402

SWAP_LOCK = "/run/lock/nbd-postcopy-tests.lock"  # tests/conftest.py's swap_lock

COLUMNS = [
    "method", "guest MiB", "workload", "run", "downtime ms", "switchover to resume ms", "total ms",
    "largest stall ms", "bytes moved MiB", "guest verified", "switchover gap ms", "largest later gap ms",
    "steal ms",
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
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (seconds after the switchover, gap ms)
    probe: ProbeResult | None = None  # nbd-postcopy only
    fetched_pages: int = 0  # nbd-postcopy only: demand + prefetch
    steal_ms: float | str = "n/a"  # this machine's steal time (all CPUs) while the stall was measured
    run: int = 1  # which repetition (--repeat)

    def cells(self) -> list[str | int | float]:
        switchover, later = self.gap_split()
        return [self.method, self.size_mib, self.workload, self.run, self.downtime_ms, self.resume_ms,
                self.total_ms, self.stall_ms, self.moved_mib, self.verified, switchover, later, self.steal_ms]

    def gap_split(self) -> tuple[float | str, str]:
        """The heartbeat gap that spans the switchover (the first beat after the source stopped ends it),
        and the largest gap after it, with when it ended: the largest stall is one of the two."""
        after = [(t, gap) for t, gap in self.gaps if t >= 0]
        if not after:
            return "n/a", "n/a"
        if len(after) == 1:
            return after[0][1], "-"
        t, gap = max(after[1:], key=lambda item: item[1])
        return after[0][1], f"{gap:.0f} at {t:.1f} s"


def medians(runs: list[Row], size: int, workload: str, method: str) -> tuple[float, float, int] | None:
    """Median total and largest stall (ms) of a method's successful runs of one size and workload, and
    how many there were; None if none succeeded."""
    done = [r for r in runs if (r.size_mib, r.workload, r.method) == (size, workload, method)
            and not r.verified.startswith("FAILED")]
    if not done:
        return None
    return statistics.median(r.total_ms for r in done), statistics.median(r.stall_ms for r in done), len(done)


def switchover_gaps(runs: list[Row], size: int, workload: str) -> str:
    """Median switchover gap (ms) of each method, "ours / qemu / preempt"."""
    medians_ms = []
    for method in ("nbd-postcopy", "qemu postcopy", "qemu postcopy+preempt"):
        gaps = [gap for r in runs if (r.size_mib, r.workload, r.method) == (size, workload, method)
                and isinstance(gap := r.gap_split()[0], float)]
        medians_ms.append(f"{statistics.median(gaps):.0f}" if gaps else "n/a")
    return " / ".join(medians_ms)


def _guest_args(workload: str) -> str:
    return f"memcheck.seed=1234 memcheck.mode={workload}"


def _gaps(source: Vm, destination: Vm, start: float, end: float, switchover: float) -> list[tuple[float, float]]:
    """Every heartbeat gap in [start, end] as (arrival of the later beat - switchover in s, gap in ms); as in
    largest_gap(), `start` and `end` count as beats."""
    beats = merged_heartbeats(source.console, destination.console)
    times = [start, *(b.host_time for b in beats if start <= b.host_time <= end), end]
    return [(b - switchover, (b - a) * 1000) for a, b in zip(times, times[1:])]


def run_qemu_postcopy(image: GuestImage, size_mib: int, workload: str, run_dir: Path, settle: float,
                      preempt: bool = False) -> Row:
    """QEMU's own postcopy: postcopy-ram (userfaultfd), migrate-start-postcopy right after migrate, the
    background stream not throttled; with `preempt`, also postcopy-preempt (Peter Xu's series)."""
    method = "qemu postcopy+preempt" if preempt else "qemu postcopy"
    with Vm(image, run_dir, name="src", memory_mib=size_mib, ram="file", append=_guest_args(workload)) as source, \
         Vm(image, run_dir, name="dst", memory_mib=size_mib, ram="ram", incoming=True,
            append=_guest_args(workload)) as destination:
        source.console.wait_for(PassOk, timeout=120 + size_mib / 10)
        started, steal = time.monotonic(), steal_seconds()
        result = postcopy_migrate(source.qmp, destination.qmp, f"unix:{run_dir}/migrate.sock", preempt=preempt)
        verified = verified_after(destination, settle, source)
        ended, steal = time.monotonic(), steal_seconds() - steal
        stall = largest_gap(merged_heartbeats(source.console, destination.console), start=started, end=ended)
        return Row(method, size_mib, workload, result.downtime_ms,
                   result.switchover_to_resume_ms, result.total_time_ms, stall * 1000,
                   result.transferred_bytes / 2**20, verified,
                   gaps=_gaps(source, destination, started, ended, result.switchover_time), steal_ms=steal * 1000)


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
            started, steal = time.monotonic(), steal_seconds()
            work_dir = run_dir / "migrate"
            with MigrationProbe(work_dir, source.qmp, destination.qmp, destination.pid) as probe:
                report = migrate(MigrateOptions(source.extra_qmp_paths[0], destination.extra_qmp_paths[0],
                                                work_dir, quiet=True))
            verified = verified_after(destination, settle, source)
            ended, steal = time.monotonic(), steal_seconds() - steal
            stall = largest_gap(merged_heartbeats(source.console, destination.console), start=started, end=ended)
            fetched = report.pages_demand + report.pages_prefetch
            switchover = probe.result.stop_time or started
            return Row("nbd-postcopy", size_mib, workload, report.downtime_ms, report.switchover_to_resume_ms,
                       report.total_seconds * 1000, stall * 1000,
                       (report.device_state_bytes + fetched * 4096) / 2**20, verified,
                       gaps=_gaps(source, destination, started, ended, switchover), probe=probe.result,
                       fetched_pages=fetched, steal_ms=steal * 1000)


def run_qemu_postcopy_preempt(image: GuestImage, size_mib: int, workload: str, run_dir: Path, settle: float) -> Row:
    return run_qemu_postcopy(image, size_mib, workload, run_dir, settle, preempt=True)


METHODS = {
    "qemu postcopy": run_qemu_postcopy,
    "qemu postcopy+preempt": run_qemu_postcopy_preempt,
    "nbd-postcopy": run_nbd_postcopy,
}


def ratio_rows(runs: list[Row]) -> list[list[str | int | float]]:
    """Per size and workload: nbd-postcopy against QEMU postcopy (and preempt), with issue 12's targets;
    with several runs per method, their medians."""
    rows = []
    for size, workload in dict.fromkeys((r.size_mib, r.workload) for r in runs):
        ours, qemu, preempt = (medians(runs, size, workload, m)
                               for m in ("nbd-postcopy", "qemu postcopy", "qemu postcopy+preempt"))
        count = " / ".join("0" if m is None else str(m[2]) for m in (ours, qemu, preempt))
        if ours is None or qemu is None:  # every run of a method failed: show what there is
            rows.append([size, workload, count, "n/a" if ours is None else ours[0],
                         "n/a" if qemu is None else qemu[0], "n/a", "n/a (a method failed)",
                         "n/a" if ours is None else ours[1], "n/a" if qemu is None else qemu[1],
                         "n/a" if preempt is None else preempt[1], "n/a (a method failed)",
                         switchover_gaps(runs, size, workload)])
            continue
        total = ours[0] / qemu[0]
        stall_vs_qemu = ours[1] / qemu[1]
        stall_vs_preempt = "n/a" if preempt is None else ours[1] / preempt[1]
        rows.append([
            size, workload, count, ours[0], qemu[0], total,
            f"{met(total, 1.5)} (<= 1.5x); moonshot {met(total, 1.0)} (<= 1.0x)",
            ours[1], qemu[1], "n/a" if preempt is None else preempt[1],
            f"{met(stall_vs_qemu, 1.0)} (<= qemu postcopy, {stall_vs_qemu:.2f}x); moonshot "
            + ("n/a" if preempt is None else f"{met(stall_vs_preempt, 1.0)} (<= preempt, {stall_vs_preempt:.2f}x)"),
            switchover_gaps(runs, size, workload),
        ])  # fmt: skip
    return rows


RATIO_COLUMNS = [
    "guest MiB", "workload", "runs (ours / qemu / preempt)", "nbd-postcopy total ms", "qemu postcopy total ms", "total ratio", "total target",
    "nbd-postcopy stall ms", "qemu postcopy stall ms", "qemu preempt stall ms", "stall target",
    "switchover gap ms (ours / qemu / preempt)",
]
PROBE_COLUMNS = [
    "guest MiB", "workload", "run", "pages fetched", "GiB fetched", "nbdkit+plugin CPU s", "serve CPU s",
    "CPU s per GiB (nbdkit+serve)", "nbdfuse CPU s", f"window s (<= {WINDOW:g})",
    "demand pages", "prefetched pages", "demand share of fetched", "pages swapped in (pswpin)",
    "demand share of swapped in", "dst QEMU major faults", "demand pages at 0.5/1/1.5/2 s",
]


def probe_rows(runs: list[Row]) -> list[list[str | int | float]]:
    """nbd-postcopy's CPU per GiB fetched and its demand faults right after the switchover."""
    rows = []
    for run in runs:
        if run.probe is None:
            continue
        gib = run.fetched_pages * 4096 / 2**30
        cpu = run.probe.fetch_cpu()
        early = run.probe.early_faults()
        row: list[str | int | float] = [run.size_mib, run.workload, run.run, run.fetched_pages, gib]
        if cpu is None:
            row += ["n/a"] * 4
        else:
            ours = cpu["nbdkit"] + cpu["serve"]
            row += [cpu["nbdkit"], cpu["serve"], ours / gib if gib else "n/a", cpu["nbdfuse"]]
        if early is None:
            row += ["n/a"] * 8
        else:
            fetched = early["demand"] + early["prefetch"]
            row += [
                early["seconds"], early["demand"], early["prefetch"],
                f"{early['demand'] / fetched:.1%}" if fetched else "n/a", early["pswpin"],
                f"{early['demand'] / early['pswpin']:.1%}" if early["pswpin"] else "n/a",
                early["majflt"], " / ".join(str(n) for n in early["demand_by_half_second"]),
            ]  # fmt: skip
        rows.append(row)
    return rows


def plot(runs: list[Row], path: Path) -> Path | None:
    """Heartbeat gaps around the switchover, one panel per size and workload, and total time per size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = list(dict.fromkeys((r.size_mib, r.workload) for r in runs))
    workloads = list(dict.fromkeys(r.workload for r in runs))
    columns = min(3, len(keys) + 1)
    lines = math.ceil((len(keys) + 1) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(6 * columns, 4.2 * lines), squeeze=False)
    panels = list(axes.flat)
    colours = {method: f"C{i}" for i, method in enumerate(METHODS)}
    for axis, (size, workload) in zip(panels, keys):
        labelled = set()
        for run in runs:
            if (run.size_mib, run.workload) == (size, workload) and run.gaps:
                times, gaps = zip(*run.gaps)
                axis.step(times, gaps, where="pre", linewidth=1, color=colours[run.method], alpha=0.8,
                          label=None if run.method in labelled else run.method)
                labelled.add(run.method)
        axis.set_title(f"{size} MiB, {workload}: gaps between guest heartbeats")
        axis.set_xlabel("seconds after the source stopped")
        axis.set_ylabel("heartbeat gap (ms)")
        axis.set_xlim(left=-1)
        axis.legend(fontsize="small")
    axis = panels[len(keys)]
    sizes = sorted({r.size_mib for r in runs})
    for method in METHODS:
        for workload, style in zip(workloads, ("-", "--")):
            points = [(size, m[0] / 1000) for size in sizes
                      if (m := medians(runs, size, workload, method)) is not None]
            if points:
                axis.plot(*zip(*points), style, marker="o", color=colours[method], label=f"{method}, {workload}")
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [str(s) for s in sizes])
    axis.minorticks_off()
    axis.set_xlabel("guest MiB")
    axis.set_ylabel("total time (s)")
    axis.set_title("total time, median of the runs (nbd-postcopy: to source release)")
    axis.legend(fontsize="small")
    for axis in panels[len(keys) + 1:]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def run_one(method: str, image: GuestImage, size: int, workload: str, repetition: int, settle: float) -> Row:
    run_dir = Path(tempfile.mkdtemp(prefix="nbdpc-bench-", dir="/tmp"))
    try:
        result = METHODS[method](image, size, workload, run_dir, settle)
    except Exception as exc:  # one failed method must not lose the other rows
        result = Row(method, size, workload, *["n/a"] * 5, f"FAILED: {exc}")
    finally:
        remove_run_dir(run_dir)  # (and any device a failed run left attached)
    result.run = repetition
    print(" | ".join(str(c) if not isinstance(c, float) else f"{c:.1f}" for c in result.cells()), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256", help="guest sizes in MiB, comma-separated (e.g. 256,1024,4096)")
    parser.add_argument("--workloads", default="idle,write", help="idle, write or both, comma-separated")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds the migrated guest runs before judging")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="migrations per method, size and workload (methods take turns; ratios use medians)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    workloads = args.workloads.split(",")
    if unknown := set(workloads) - {"idle", "write"}:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))} (want idle, write)")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    image = prepare_guest()
    runs: list[Row] = []
    methods = list(METHODS)
    for size in sizes:
        for workload in workloads:
            for repetition in range(args.repeat):
                turn = repetition % len(methods)  # who goes first rotates
                for method in methods[turn:] + methods[:turn]:
                    runs.append(run_one(method, image, size, workload, repetition + 1, args.settle))

    table = Table("Migration of the checker guest", COLUMNS, [r.cells() for r in runs])
    ratios = Table("Against issue 12's targets", RATIO_COLUMNS, ratio_rows(runs))
    probes = Table("nbd-postcopy CPU and early faults",
                   PROBE_COLUMNS, probe_rows(runs))
    for extra in (ratios, probes):
        print(extra.markdown(), flush=True)
    notes = [
        f"{machine_context()}; load average at the end {os.getloadavg()[0]:.1f}",
        "command: .venv/bin/python benchmarks/bench_migrate.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "QEMU 7.2 TCG, one vCPU, guest = Debian cloud kernel + memcheck (fills most of RAM, verifies it in a loop).",
        "Source RAM: memory-backend-file,share=on on /dev/shm; destination: memory-backend-ram with -incoming defer.",
        "QEMU postcopy: migrate over a Unix socket, migrate-start-postcopy at once (pure postcopy, like "
        "nbd-postcopy), max-bandwidth 10 GiB/s instead of QEMU's default 128 MiB/s.",
        "Stall: largest host-clock gap between consecutive guest heartbeats (every ~50 ms) from the migrate "
        f"command until {args.settle:g} s after the migration ended, and then until the guest's next verification "
        "pass. It is either the switchover gap (the gap that the source's stop falls in: the guest's first burst "
        "of faults at the destination) or the largest later gap, shown with when it ended (seconds after the "
        "stop); steal is this machine's steal time over that window, all CPUs (/proc/stat): a VM's CPUs that its "
        "host did not run, which stalls every guest on it alike.",
        "Targets (issue 12): total time <= 1.5x QEMU postcopy (moonshot <= 1.0x); largest stall <= QEMU "
        "postcopy's (moonshot <= postcopy+preempt's), each against the same run.",
        "CPU: utime+stime from /proc/PID/stat of nbdkit (hosting plugin/postcopy.py) and of `nbd-postcopy serve`, "
        "taken at the source's QMP STOP event and at the last sample (every 50 ms) in which the page server was "
        "alive, i.e. at the source's release, before completion; per GiB of pages fetched (demand + prefetch). "
        "nbdkit's share includes answering the guest's swap-ins of pages already local in that window. nbdfuse "
        "beside it. "
        "QEMU's own CPU is not reported: under TCG it is the guest's vCPU, which one process figure cannot separate.",
        f"Early faults: from the first sample after the destination's RESUME event, for {WINDOW:g} s or until the "
        "prefetcher had every page (after that completion pre-pages and pswpin no longer counts the guest's "
        "touches), sampled every 0.1 s: the device's fetched_demand / fetched_prefetch counters; pswpin is "
        "system-wide pages read from swap devices, swap readahead included (the benchmark holds the test suite's "
        "swap lock), so 'demand share of swapped in' = demand-fetched pages / pages the kernel brought in from the "
        "device: the share of the guest's swap-ins (with readahead) that were not already local.",
    ]
    written = write_results("migrate", "Live migration: QEMU postcopy vs nbd-postcopy", notes,
                            [table, ratios, probes], args.results_dir)
    if picture := plot(runs, args.results_dir / "migrate.png"):
        written.append(picture)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
