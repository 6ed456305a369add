"""Benchmark: staging time per GiB and completion throughput, on real kernel swap.

Two tables, in one run:
  1. a plain swap device (sparse file in /var/tmp -> loop --direct-io=on -> mkswap): for each size, the
     time `stage_range()` takes (and its phases: markers, page-out, purge, verify), seconds per GiB,
     then `complete_range()` throughput;
  2. the postcopy transport (nbdkit -> nbdfuse -> loop direct I/O -> swap, attached by setup-swap.sh):
     completion throughput with plugin/postcopy.py and `nbd-postcopy serve` in three modes: prefetcher
     off (completion fetches every page from the source), prefetcher racing completion, and completion
     once the prefetcher has made every page local (how `nbd-postcopy migrate` runs it; the prefetch
     time is its own column), against the same transport backed by nbdkit's C `memory` plugin (which
     answers with the markers: the transport's own ceiling). Issue 4's target: plugin >= 0.8x memory.

    .venv/bin/python benchmarks/bench_staging.py [--sizes 256,1024] [--transport-mib 256] [--rounds 3] [--results-dir DIR]

It holds the test suite's swap lock for the whole run (MADV_PAGEOUT goes to the highest-priority swap
device), and every swap area, loop device, mount and process it makes is removed by the helpers it
reuses from the tests, even on failure. Results go to benchmarks/results/staging.md and staging*.csv.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, Table, machine_context, write_results  # noqa: E402

from nbd_postcopy.common.units import PAGE_SIZE  # noqa: E402
from nbd_postcopy.host.completion import complete_range  # noqa: E402
from nbd_postcopy.device.control import request  # noqa: E402
from nbd_postcopy.device.markers import MarkerCodec  # noqa: E402
from nbd_postcopy.host.staging import stage_range  # noqa: E402
from tests import servers  # noqa: E402
from tests.conftest import Processes  # noqa: E402
from tests.swapdev import attached_postcopy_swap, plain_swap_device  # noqa: E402
from tests.workload import Workload  # noqa: E402

SWAP_LOCK = "/run/lock/nbd-postcopy-tests.lock"
PLAIN_COLUMNS = ["MiB", "stage s", "stage s/GiB", "pages/s", "markers s", "pageout s", "purge s", "verify s",
                 "complete s", "complete MiB/s"]
TRANSPORT_COLUMNS = ["device", "MiB", "stage s", "prefetch s", "complete s", "complete MiB/s", "vs memory",
                     "MiB/s per round"]
MEMORY_LABEL = "nbdkit memory (C)"
TRANSPORT_MODES = [
    ("off", "plugin, prefetch off: completion fetches every page"),
    ("on", "plugin, prefetcher racing completion"),
    ("first", "plugin, completion after the prefetcher (as migrate does)"),
]


def plain_row(mib: int, codec: MarkerCodec, processes: Processes) -> list:
    with plain_swap_device(mib * 2 + 64) as device:
        work = Workload(processes, mib, "--fresh")
        staged = stage_range(work.pid, work.address, work.length, codec, device, quiet=True)
        completed = complete_range(work.pid, work.address, work.length, quiet=True)
        work.exit()
    gib = work.length / 2**30
    phases = staged.phases
    return [mib, staged.seconds, staged.seconds / gib, staged.pages_per_second, phases["markers"],
            phases["pageout"], phases["purge"], phases["verify"], completed.seconds,
            completed.brought_in * PAGE_SIZE / 2**20 / completed.seconds]


def wait_prefetched(control: str, timeout: float = 300.0) -> float:
    """Seconds until the plugin reports every page local (the prefetcher is done)."""
    started = time.monotonic()
    while not request(control, "status")["complete"]:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the prefetcher did not finish within {timeout:g}s")
        time.sleep(0.02)
    return time.monotonic() - started


def transport_run(label: str, mib: int, codec: MarkerCodec, keyfile: Path, run_dir: Path, processes: Processes,
                  source_uri: str | None, prefetch: str = "off") -> tuple[str, float, float | None, float]:
    """(label, stage seconds, prefetch seconds, complete seconds) on one attached device. `prefetch`:
    "off" (completion fetches every page), "on" (the prefetcher races completion) or "first"
    (completion starts once the prefetcher has made every page local, as `nbd-postcopy migrate` does)."""
    if source_uri is None:
        slots = mib * 256 + max(4096, mib * 256 // 32) + 1
        attach = attached_postcopy_swap(run_dir, {}, standin=f"memory size={slots * PAGE_SIZE}")
        control = None
    else:
        attach = attached_postcopy_swap(run_dir, {"source": source_uri, "size": mib << 20, "key": keyfile,
                                                  "prefetch": "off" if prefetch == "off" else "on"})
    with attach as swap:
        control = str(swap.control) if source_uri else None
        work = Workload(processes, mib, "--fresh")
        staged = stage_range(work.pid, work.address, work.length, codec, swap.device, control=control, quiet=True)
        prefetch_seconds = None
        if control:
            request(control, "arm")
            if prefetch == "first":
                prefetch_seconds = wait_prefetched(control)
        completed = complete_range(work.pid, work.address, work.length, quiet=True)
        work.exit()
    return label, staged.seconds, prefetch_seconds, completed.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024", help="plain-device range sizes in MiB (comma separated)")
    parser.add_argument("--transport-mib", type=int, default=256, help="range size for the transport table")
    parser.add_argument("--rounds", type=int, default=3,
                        help="transport runs per mode, interleaved; the table shows medians")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where staging.md and the CSVs go")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (swap, loop devices, memcg)")
    sizes = [int(s) for s in args.sizes.split(",") if s]

    run_dir = Path(tempfile.mkdtemp(prefix="nbdpc-b-", dir="/tmp"))
    keyfile = run_dir / "key"
    keyfile.write_bytes(os.urandom(32))
    codec = MarkerCodec.from_file(keyfile)
    processes = Processes()
    plain, transport = [], []
    with open(SWAP_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for mib in sizes:
                plain.append(plain_row(mib, codec, processes))
                print(f"plain {mib} MiB: staged in {plain[-1][1]:.2f}s, completed at {plain[-1][-1]:.0f} MiB/s",
                      file=sys.stderr)
            mib = args.transport_mib
            image = run_dir / "ram.img"
            servers.write_image(image, mib << 20)
            rounds: dict[str, list[tuple[float, float | None, float]]] = {}
            with servers.serve("nbd-postcopy", run_dir, image=image) as source:
                for _ in range(args.rounds):  # interleaved, so a slow moment of the machine hits every mode
                    modes = [(None, MEMORY_LABEL)] + TRANSPORT_MODES
                    for prefetch, label in modes:
                        uri = None if prefetch is None else source.uri("unix")
                        label, *times = transport_run(label, mib, codec, keyfile, run_dir, processes, uri,
                                                      prefetch or "off")
                        rounds.setdefault(label, []).append(tuple(times))
            baseline = mib / statistics.median(t[2] for t in rounds[MEMORY_LABEL])
            for label, times in rounds.items():
                stage_s = statistics.median(t[0] for t in times)
                prefetch_s = None if times[0][1] is None else statistics.median(t[1] for t in times)
                complete_s = statistics.median(t[2] for t in times)
                rate = mib / complete_s
                per_round = " / ".join(f"{mib / t[2]:.0f}" for t in times)
                transport.append([label, mib, stage_s, "-" if prefetch_s is None else prefetch_s, complete_s, rate,
                                  rate / baseline, per_round])
                print(f"{label}: completion {rate:.0f} MiB/s ({rate / baseline:.2f}x memory; rounds: {per_round})",
                      file=sys.stderr)
        finally:
            processes.stop_all()
            fcntl.flock(lock, fcntl.LOCK_UN)
            shutil.rmtree(run_dir, ignore_errors=True)

    tables = [Table("Staging and completion on a plain loop swap device", PLAIN_COLUMNS, plain),
              Table("Completion through the postcopy transport", TRANSPORT_COLUMNS, transport)]
    for table in tables:
        print(table.markdown())
    notes = [machine_context(),
             "Plain device: sparse file in /var/tmp, loop --direct-io=on, swapon -p 32000; workload memory is fresh "
             "(never touched), as an -incoming QEMU's.",
             "Transport: setup-swap.sh attach (nbdkit -> nbdfuse -> loop direct I/O); completion = "
             "process_madvise(MADV_WILLNEED) in 1 MiB chunks + read-touch; target plugin >= 0.8x memory.",
             f"Transport rows: the modes take turns in {args.rounds} rounds; times are medians over the rounds, "
             "the ratio is of medians. Prefetch s: from arming until every page was local."]
    for path in write_results("staging", "Staging and completion", notes, tables, args.results_dir):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
