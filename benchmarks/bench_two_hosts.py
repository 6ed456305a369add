"""Benchmark: migration between two hosts over an emulated link, QEMU's own postcopy beside nbd-postcopy.

Three network namespaces on this machine, source -- router -- destination (tests/netns.py routed_hosts):
the router forwards, and a tbf at the link rate on its egress towards each end is the bottleneck, so the
ends' own root qdiscs stay free for `migrate --prefetch-bandwidth`. The QEMUs run in the end namespaces.
For each link rate, guest size and workload, on the same link and the same guest, in one run:
  - qemu postcopy: postcopy-ram over TCP from the source namespace to the destination's, switched to
    postcopy at once, the background stream not throttled (nbd_postcopy.testbench.vm.postcopy_migrate);
  - qemu postcopy+preempt: the same with postcopy-preempt;
  - nbd-postcopy: `nbd-postcopy receive` in the destination namespace, `nbd-postcopy migrate --to` in the
    source's;
  - nbd-postcopy with `--prefetch-bandwidth` at --prefetch-fraction of the link rate.
Columns: downtime (QEMU's figure), total time (QEMU's total-time; nbd-postcopy: migrate command to source
released), the largest guest stall (host-clock gap between guest heartbeats, as bench_migrate.py), demand
fault latency p50 / p99 (nbd-postcopy: the histogram bounds `migrate --to` reports; QEMU: n/a), the bytes and
packets the link carried towards the destination during the migration and the packets it dropped, and whether
the guest went on verifying its memory.
Results go to benchmarks/results/two_hosts.md and .csv (and two_hosts.png with matplotlib).

    .venv/bin/python benchmarks/bench_two_hosts.py [--links 1gbit,10gbit] [--sizes 256] [--workloads write]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import RESULTS_DIR, Table, machine_context, plot_bars, write_results  # noqa: E402

from nbd_postcopy.source.shaping import parse_rate  # noqa: E402
from nbd_postcopy.testbench.guest import GuestImage, PassOk, prepare_guest  # noqa: E402
from nbd_postcopy.testbench.vm import Vm, largest_gap, merged_heartbeats, postcopy_migrate, verified_after  # noqa: E402
from tests.netns import RoutedHosts, routed_hosts  # noqa: E402
from tests.swapdev import remove_run_dir  # noqa: E402

SWAP_LOCK = "/run/lock/nbd-postcopy-tests.lock"  # tests/conftest.py's swap_lock
CLI = [sys.executable, "-m", "nbd_postcopy.cli"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
MIGRATION_TIMEOUT = 600.0

COLUMNS = [
    "method", "link", "guest MiB", "workload", "downtime ms", "total ms", "largest stall ms",
    "fault p50 ms", "fault p99 ms", "bytes moved MiB", "link packets", "link drops",
    "guest verified",
]


@dataclass
class Case:
    hosts: RoutedHosts
    link: str  # as given, e.g. 1gbit
    image: GuestImage
    size_mib: int
    workload: str
    run_dir: Path
    settle: float
    port: int  # a fresh TCP port for this run

    def vms(self, extra_qmp: int) -> tuple[Vm, Vm]:
        append = f"memcheck.seed=1234 memcheck.mode={self.workload}"
        return (Vm(self.image, self.run_dir, name="src", memory_mib=self.size_mib, ram="file", append=append,
                   extra_qmp=extra_qmp, wrapper=self.hosts.source.enter),
                Vm(self.image, self.run_dir, name="dst", memory_mib=self.size_mib, ram="ram", incoming=True,
                   append=append, extra_qmp=extra_qmp, wrapper=self.hosts.destination.enter))

    def sent(self) -> tuple[int, int, int]:
        return self.hosts.sent_to_destination()

    def row(self, method: str, downtime, total, stall, p50, p99, before: tuple[int, int, int],
            after: tuple[int, int, int], verified: str) -> list:
        moved, packets, drops = (a - b for a, b in zip(after, before))
        return [method, self.link, self.size_mib, self.workload, _or_na(downtime), _or_na(total), stall * 1000,
                _or_na(p50), _or_na(p99), moved / 2**20, packets, drops, verified]


def _or_na(value: float | None) -> float | str:
    return "n/a" if value is None else float(value)


def _boot(source: Vm, size_mib: int) -> None:
    source.console.wait_for(PassOk, timeout=120 + size_mib / 10)


# --- QEMU's own postcopy ---------------------------------------------------------------------------


def run_qemu_postcopy(case: Case, preempt: bool = False) -> list:
    source, destination = case.vms(extra_qmp=0)
    with source, destination:
        _boot(source, case.size_mib)
        before = case.sent()
        started = time.monotonic()
        result = postcopy_migrate(source.qmp, destination.qmp, f"tcp:{case.hosts.destination.address}:{case.port}",
                                  preempt=preempt, timeout=MIGRATION_TIMEOUT)
        after = case.sent()
        verified = verified_after(destination, case.settle, source)
        stall = largest_gap(merged_heartbeats(source.console, destination.console), start=started,
                            end=time.monotonic())
        method = "qemu postcopy+preempt" if preempt else "qemu postcopy"
        return case.row(method, result.downtime_ms, result.total_time_ms, stall, None, None, before, after,
                        verified)


def run_qemu_postcopy_preempt(case: Case) -> list:
    return run_qemu_postcopy(case, preempt=True)


# --- nbd-postcopy: receive + migrate --to ----------------------------------------------------------

REPORT = {
    "downtime": re.compile(r"^downtime \(QEMU\):\s+([\d.]+) ms", re.M),
    "total": re.compile(r"^total to source release:\s+([\d.]+) s", re.M),
    "faults": re.compile(r"^fault latency p50 / p99:\s+<= ([\d.]+) ms / <= ([\d.]+) ms", re.M),
}


def _stop(proc: subprocess.Popen | None) -> None:
    """Ctrl-C (both commands clean up on SIGINT: swap, shaping, page server), then SIGKILL, by PID; a command
    that needed SIGKILL may leave its children (page server, nbdkit supervisor): they are killed by PID too."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
        return
    except subprocess.TimeoutExpired:
        pass
    children = _children(proc.pid)
    proc.kill()
    proc.wait(10)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _children(pid: int) -> list[int]:
    """The PIDs of `pid`'s descendants."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _wait_for_line(path: Path, text: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {path.read_text(errors='replace')[-500:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} not in {path.name} within {timeout:g}s")
        time.sleep(0.05)


def run_nbd_postcopy(case: Case, prefetch_bandwidth: int | None = None, label: str = "nbd-postcopy") -> list:
    """Holds the test suite's swap lock while it runs, so that it never shares swap with a running test."""
    src, dst = case.hosts.source, case.hosts.destination
    shaping = ["--prefetch-bandwidth", f"{prefetch_bandwidth}bit"] if prefetch_bandwidth else []
    receiver = sender = None
    with open(SWAP_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        source, destination = case.vms(extra_qmp=1)
        with source, destination:
            try:
                _boot(source, case.size_mib)
                receive_log, send_log = case.run_dir / "receive.log", case.run_dir / "send.log"
                with open(receive_log, "wb") as out:
                    receiver = subprocess.Popen(
                        [*dst.enter, *CLI, "receive", "--qmp", str(destination.extra_qmp_paths[0]), "--listen",
                         f"tcp:{dst.address}:{case.port}", "--work-dir", str(case.run_dir / "rcv")],
                        stdout=out, stderr=subprocess.STDOUT, env=ENV)
                _wait_for_line(receive_log, "waiting for a sender", receiver)
                before = case.sent()
                started = time.monotonic()
                with open(send_log, "wb") as out:
                    sender = subprocess.Popen(
                        [*src.enter, *CLI, "migrate", "--source-qmp", str(source.extra_qmp_paths[0]), "--to",
                         f"tcp:{dst.address}:{case.port}", *shaping, "--work-dir", str(case.run_dir / "snd")],
                        stdout=out, stderr=subprocess.STDOUT, env=ENV)
                if sender.wait(MIGRATION_TIMEOUT) != 0:
                    raise RuntimeError(f"migrate --to exited {sender.returncode}: "
                                       f"{send_log.read_text(errors='replace')[-500:]}")
                after = case.sent()
                if receiver.wait(120) != 0:
                    raise RuntimeError(f"receive exited {receiver.returncode}: "
                                       f"{receive_log.read_text(errors='replace')[-500:]}")
                report = send_log.read_text(errors="replace")
                if shaping and "prefetch replies capped at" not in report:
                    raise RuntimeError("migrate --to did not say it shaped prefetch replies")
                source.wait_exit(10)
                verified = verified_after(destination, case.settle, source)
                stall = largest_gap(merged_heartbeats(source.console, destination.console), start=started,
                                    end=time.monotonic())
            finally:
                _stop(sender)
                _stop(receiver)
        downtime, total, faults = (REPORT[key].search(report) for key in ("downtime", "total", "faults"))
        return case.row(label, float(downtime[1]) if downtime else None, float(total[1]) * 1000 if total else None,
                        stall, float(faults[1]) if faults else None, float(faults[2]) if faults else None,
                        before, after, verified)


def _methods(link_rate: int, fraction: float) -> dict:
    capped = int(link_rate * fraction)
    label = f"nbd-postcopy, prefetch <= {fraction:.0%} of link"
    return {
        "qemu postcopy": run_qemu_postcopy,
        "qemu postcopy+preempt": run_qemu_postcopy_preempt,
        "nbd-postcopy": run_nbd_postcopy,
        label: lambda case: run_nbd_postcopy(case, capped, label),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--links", default="1gbit", help="link rates, comma-separated (e.g. 1gbit,10gbit)")
    parser.add_argument("--sizes", default="256", help="guest sizes in MiB, comma-separated")
    parser.add_argument("--workloads", default="write", help="idle, write or both, comma-separated")
    parser.add_argument("--prefetch-fraction", type=float, default=0.8,
                        help="--prefetch-bandwidth as a fraction of the link rate (default 0.8)")
    parser.add_argument("--queue-ms", type=float, default=20.0, help="the link's queue, in ms of data (default 20)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds the migrated guest runs before judging")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    try:
        links = {text: parse_rate(text) for text in args.links.split(",")}
    except ValueError as exc:
        parser.error(str(exc))
    sizes = [int(s) for s in args.sizes.split(",")]
    workloads = args.workloads.split(",")
    if unknown := set(workloads) - {"idle", "write"}:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))} (want idle, write)")
    if not 0 < args.prefetch_fraction < 1:
        parser.error("--prefetch-fraction must be between 0 and 1")

    image = prepare_guest()
    rows: list[list] = []
    port = 7800
    for link, rate in links.items():
        with routed_hosts(rate, args.queue_ms) as hosts:
            for size in sizes:
                for workload in workloads:
                    for method, run in _methods(rate, args.prefetch_fraction).items():
                        port += 1
                        run_dir = Path(tempfile.mkdtemp(prefix="nbdpc-bench-", dir="/tmp"))
                        try:
                            row = run(Case(hosts, link, image, size, workload, run_dir, args.settle, port))
                        except Exception as exc:  # one failed method must not lose the other rows
                            row = [method, link, size, workload] + ["n/a"] * (len(COLUMNS) - 5) + [f"FAILED: {exc}"]
                        finally:
                            remove_run_dir(run_dir)  # (and any device a failed run left attached)
                        print(" | ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in row), flush=True)
                        rows.append(row)

    given = argv if argv is not None else sys.argv[1:]
    command = shlex.join([".venv/bin/python", "benchmarks/bench_two_hosts.py", *map(str, given)])
    notes = [
        f"Command: `{command}`",
        f"{machine_context()}; load average at the end {os.getloadavg()[0]:.1f}. The machine's 2 CPUs are shared "
        "with other jobs and both QEMUs (TCG) run on them: expect noise, compare rows of one run only.",
        "QEMU 7.2 TCG, one vCPU, guest = Debian cloud kernel + memcheck (fills most of RAM, verifies it in a loop; "
        "write: also rewrites 1/16 of it per pass).",
        f"Link: network namespaces source -- router -- destination joined by veth pairs; tbf on the router's "
        f"egress towards each end at the link rate, queue {args.queue_ms:g} ms of data; no added delay (this "
        "kernel has no netem, and the optional userspace delay relay is not built): RTT is the veths' own, "
        "well under 1 ms.",
        "QEMU postcopy: migrate over TCP between the namespaces, migrate-start-postcopy at once, max-bandwidth "
        "10 GiB/s (the link is the limit). nbd-postcopy: `receive` in the destination namespace, `migrate --to` "
        "in the source's, no TLS; the capped row adds `--prefetch-bandwidth` (HTB on the source's interface).",
        "Total: QEMU's total-time; nbd-postcopy: from the migration (after the destination staged its RAM) to the "
        "source QEMU's release, as `migrate --to` reports it. Stall: largest host-clock gap between guest "
        f"heartbeats (every ~50 ms) from the migrate command until {args.settle:g} s after the migration ended. "
        "Fault p50/p99: upper bounds of the device's fault latency histogram buckets; QEMU reports none.",
        "Bytes moved, link packets and drops: what the link towards the destination carried and dropped (the "
        "router's tbf counters: packets after segmentation, Ethernet headers included) from the migrate "
        "command to the end of the migration: QEMU's stream, or device state + page replies + NBD/TCP/IP/"
        "Ethernet overhead + retransmissions. nbd-postcopy's bytes beyond the guest's nonzero pages are, as far "
        "as checked (once, with ss: the prefetch connection alone sent 264 MiB for 237 MiB of nonzero pages, "
        "no retransmissions), pages fetched twice: a page in a prefetch batch still in flight is demand-fetched "
        "too when the guest touches it, and the later copy is dropped.",
    ]
    table = Table("Migration between two hosts over an emulated link", COLUMNS, rows)
    for path in write_results("two_hosts", "Migration between two hosts: QEMU postcopy vs nbd-postcopy", notes,
                              [table], args.results_dir):
        print(f"wrote {path}")
    measured = [r for r in rows if isinstance(r[6], float) and isinstance(r[5], float)]
    if measured:
        several = len({tuple(r[1:4]) for r in measured}) > 1
        labels = [r[0].replace(", ", "\n") + (f"\n{r[1]} {r[2]} MiB {r[3]}" if several else "") for r in measured]
        plot = plot_bars("two_hosts", "Migration between two hosts over an emulated link", labels,
                         {"largest guest stall (ms)": [r[6] for r in measured],
                          "total time (ms)": [r[5] for r in measured]}, args.results_dir)
        if plot is not None:
            print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
