"""Benchmark: staging time per GiB and completion throughput, on real kernel swap.

Two tables, in one run:
  1. a plain swap device (sparse file in /var/tmp -> loop --direct-io=on -> mkswap): for each size, the
     time `stage_range()` takes (and its phases: markers, page-out, purge, verify), seconds per GiB,
     then `complete_range()` throughput;
  2. the postcopy transport (nbdkit -> nbdfuse -> loop direct I/O -> swap, attached by setup-swap.sh):
     completion throughput with plugin/postcopy.py fetching from `nbd-postcopy serve` (prefetcher off,
     then on) against the same transport backed by nbdkit's C `memory` plugin (which answers with the
     markers: the transport's own ceiling). Issue 4's target: plugin >= 0.8x memory.

    .venv/bin/python benchmarks/bench_staging.py [--sizes 256,1024] [--transport-mib 256] [--results-dir DIR]

It holds the test suite's swap lock for the whole run (MADV_PAGEOUT goes to the highest-priority swap
device), and every swap area, loop device, mount and process it makes is removed by the helpers it
reuses from the tests, even on failure. Results go to benchmarks/results/staging.md and staging*.csv.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, Table, machine_context, write_results  # noqa: E402

from nbd_postcopy import PAGE_SIZE  # noqa: E402
from nbd_postcopy.completion import complete_range  # noqa: E402
from nbd_postcopy.control import request  # noqa: E402
from nbd_postcopy.markers import MarkerCodec  # noqa: E402
from nbd_postcopy.staging import stage_range  # noqa: E402
from tests import servers  # noqa: E402
from tests.conftest import Processes  # noqa: E402
from tests.swapdev import attached_postcopy_swap, plain_swap_device  # noqa: E402
from tests.workload import Workload  # noqa: E402

SWAP_LOCK = "/run/lock/nbd-postcopy-tests.lock"
PLAIN_COLUMNS = ["MiB", "stage s", "stage s/GiB", "pages/s", "markers s", "pageout s", "purge s", "verify s",
                 "complete s", "complete MiB/s"]
TRANSPORT_COLUMNS = ["device", "MiB", "stage s", "complete s", "complete MiB/s", "vs memory"]


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


def transport_run(label: str, mib: int, codec: MarkerCodec, keyfile: Path, run_dir: Path,
                  processes: Processes, source_uri: str | None, prefetch: str = "off") -> tuple[str, float, float]:
    """(label, stage seconds, complete seconds) on one attached device."""
    if source_uri is None:
        slots = mib * 256 + max(4096, mib * 256 // 32) + 1
        attach = attached_postcopy_swap(run_dir, {}, standin=f"memory size={slots * PAGE_SIZE}")
        control = None
    else:
        attach = attached_postcopy_swap(run_dir, {"source": source_uri, "size": mib << 20, "key": keyfile,
                                                  "prefetch": prefetch})
    with attach as swap:
        control = str(swap.control) if source_uri else None
        work = Workload(processes, mib, "--fresh")
        staged = stage_range(work.pid, work.address, work.length, codec, swap.device, control=control, quiet=True)
        if control:
            request(control, "arm")
        completed = complete_range(work.pid, work.address, work.length, quiet=True)
        work.exit()
    return label, staged.seconds, completed.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024", help="plain-device range sizes in MiB (comma separated)")
    parser.add_argument("--transport-mib", type=int, default=256, help="range size for the transport table")
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
            runs = [transport_run("nbdkit memory (C)", mib, codec, keyfile, run_dir, processes, None)]
            with servers.serve("nbd-postcopy", run_dir, image=image) as source:
                for prefetch in ("off", "on"):
                    runs.append(transport_run(f"plugin, prefetch {prefetch}", mib, codec, keyfile, run_dir,
                                              processes, source.uri("unix"), prefetch))
            baseline = mib / runs[0][2]
            for label, stage_s, complete_s in runs:
                rate = mib / complete_s
                transport.append([label, mib, stage_s, complete_s, rate, rate / baseline])
                print(f"{label}: completion {rate:.0f} MiB/s ({rate / baseline:.2f}x memory)", file=sys.stderr)
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
             "process_madvise(MADV_WILLNEED) in 1 MiB chunks + read-touch; target plugin >= 0.8x memory."]
    for path in write_results("staging", "Staging and completion", notes, tables, args.results_dir):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
