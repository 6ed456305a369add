#!/usr/bin/env python3
"""Benchmark of the destination device (plugin/postcopy.py in nbdkit), in one run on this machine:

1. 4 KiB demand-read latency at queue depth 1, client -> nbdkit+plugin -> `nbd-postcopy serve`, all
   over loopback TCP; every read is of a mapped, not yet local slot, so each one is a real demand
   fetch. Reference: nbdkit's C `memory` plugin on the same socket type.
2. The same while the prefetcher runs flat out (reads go to the far end of the sweep, so they are
   still demand fetches).
3. The plugin's resident memory (VmRSS) after staging every page, at several guest sizes.

Targets (issue 3): p50 <= 2x the C memory plugin; p99 with prefetch running <= 2x p99 idle;
about 8 bytes of state per guest page.

    .venv/bin/python benchmarks/bench_device.py [--guest-mib 1024] [--reads 1000] [--think-us 1000] [--rss-sizes 256,1024,4096]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import RESULTS_DIR, Table, machine_context, write_results  # noqa: E402
from nbd_postcopy import PAGE_SIZE as P  # noqa: E402
from nbd_postcopy.control import request  # noqa: E402
from nbd_postcopy.markers import MarkerCodec  # noqa: E402

PLUGIN = REPO / "plugin" / "postcopy.py"
CHUNK = 8 << 20  # bytes per staging write
SPACING = 300  # slots between two measured reads (more than a fault's prefetch neighbourhood)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_tcp(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port}")
        time.sleep(0.05)


@contextlib.contextmanager
def process(argv: list, port: int, log: Path):
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_tcp(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def connect(port: int) -> nbd.NBD:
    handle = nbd.NBD()
    handle.connect_tcp("127.0.0.1", str(port))
    return handle


def latencies(handle: nbd.NBD, offsets: list[int], think: float = 0.0) -> list[float]:
    """Latency of a 4 KiB read at each offset, one at a time, `think` seconds apart (a guest computes
    between faults; the prefetcher works in those gaps)."""
    out = []
    for offset in offsets:
        started = time.perf_counter()
        handle.pread(P, offset)
        out.append(time.perf_counter() - started)
        if think:
            time.sleep(think)
    return out


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1e6, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6


def stage_all(handle: nbd.NBD, codec: MarkerCodec, pages: int) -> None:
    """Slot s holds guest page s - 1: marker pages written in big chunks."""
    per_chunk = CHUNK // P
    for first in range(0, pages, per_chunk):
        count = min(per_chunk, pages - first)
        handle.pwrite(b"".join(codec.page(g) for g in range(first, first + count)), (first + 1) * P)


def plugin_argv(port: int, source_port: int, pages: int, key: Path, control: Path, work: Path, *extra: str) -> list:
    return [
        "nbdkit", "-f", "-p", port, "-i", "127.0.0.1", "python", PLUGIN,
        f"source=nbd://127.0.0.1:{source_port}/", f"pages={pages}", f"key={key}", f"control={control}",
        f"cache-dir={work}", *extra,
    ]  # fmt: skip


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def bench_latency(work: Path, guest_mib: int, reads: int, think: float) -> Table:
    pages = guest_mib * 256
    image = work / "ram.img"
    with open(image, "wb") as f:
        for _ in range(guest_mib):
            f.write(os.urandom(1 << 20))
    key = work / "key"
    key.write_bytes(os.urandom(32))
    codec = MarkerCodec(key.read_bytes())
    rng = random.Random(42)

    # reference: nbdkit's C memory plugin, filled with data
    port = free_port()
    with process(["nbdkit", "-f", "-p", port, "-i", "127.0.0.1", "memory", f"{guest_mib}M"], port, work / "memory.log"):
        handle = connect(port)
        for offset in range(0, pages * P, CHUNK):
            handle.pwrite(os.urandom(CHUNK), offset)
        memory_offsets = [rng.randrange(pages) * P for _ in range(reads)]
        latencies(handle, memory_offsets[:200])
        memory = summary(latencies(handle, memory_offsets, think))  # same pause: waking up costs both alike
        handle.shutdown()

    # Slots in the upper half (the prefetcher's sweep starts at slot 1), spaced wider than the
    # neighbourhood a fault makes the prefetcher fetch, in random order: each read is a demand fetch.
    slots = list(range(pages // 2, pages + 1, SPACING))
    rng.shuffle(slots)
    offsets = [slot * P for slot in slots[:reads]]
    source_port = free_port()
    source = ["nbd-postcopy", "serve", "--file", image, "--listen", f"tcp:127.0.0.1:{source_port}"]
    with process(source, source_port, work / "source.log"):
        results = {}
        for mode in ("idle", "prefetching"):
            port = free_port()
            control = work / f"ctl-{mode}.sock"
            extra = ["prefetch=off"] if mode == "idle" else []
            with process(plugin_argv(port, source_port, pages, key, control, work, *extra), port, work / f"plugin-{mode}.log"):
                handle = connect(port)
                stage_all(handle, codec, pages)
                request(str(control), "arm")
                samples = latencies(handle, offsets, think)
                status = request(str(control), "status")
                results[mode] = summary(samples)
                results[mode + " demand"] = status["fetched_demand"]
                results[mode + " prefetched"] = status["fetched_prefetch"]
                handle.shutdown()

    print(f"4 KiB read latency at QD1 over loopback TCP, {guest_mib} MiB guest, {len(offsets)} reads {think * 1e3:g} ms apart:")
    print(f"  nbdkit memory (C)                  p50 {memory[0]:7.1f} us   p99 {memory[1]:7.1f} us")
    idle, busy = results["idle"], results["prefetching"]
    print(f"  postcopy demand fetch, idle        p50 {idle[0]:7.1f} us   p99 {idle[1]:7.1f} us")
    print(f"  postcopy demand fetch, prefetching p50 {busy[0]:7.1f} us   p99 {busy[1]:7.1f} us")
    print(
        f"  (reads that were demand fetches: idle {results['idle demand']}, prefetching "
        f"{results['prefetching demand']}; pages prefetched meanwhile: {results['prefetching prefetched']})"
    )
    print(f"  ratio p50 idle / memory: {idle[0] / memory[0]:.2f}x (target <= 2x)")
    print(f"  ratio p99 prefetching / idle: {busy[1] / idle[1]:.2f}x (target <= 2x)")
    p50_ratio, p99_ratio = idle[0] / memory[0], busy[1] / idle[1]
    return Table(
        f"4 KiB read latency at queue depth 1, loopback TCP, {guest_mib} MiB guest, {len(offsets)} reads",
        ["device", "p50 µs", "p99 µs", "demand fetches", "pages prefetched meanwhile"],
        [
            ["nbdkit memory (C)", memory[0], memory[1], "-", "-"],
            ["postcopy, prefetch off", idle[0], idle[1], results["idle demand"], 0],
            ["postcopy, prefetcher running", busy[0], busy[1], results["prefetching demand"],
             results["prefetching prefetched"]],
            [f"ratios: p50 idle / memory {p50_ratio:.2f}x (target <= 2x, "
             f"{'met' if p50_ratio <= 2 else 'missed'}); p99 prefetching / idle {p99_ratio:.2f}x (target <= 2x, "
             f"{'met' if p99_ratio <= 2 else 'missed'})", "", "", "", ""],
        ],
    )


def bench_rss(work: Path, sizes_mib: list[int]) -> Table:
    key = work / "key"
    key.write_bytes(os.urandom(32))
    codec = MarkerCodec(key.read_bytes())
    print("plugin resident memory (VmRSS) after staging every page:")
    rows = []
    first = None  # (pages, KiB staged) of the smallest size: the slope from it is the cost per page
    for mib in sizes_mib:
        pages = mib * 256
        image = work / "sparse.img"
        with open(image, "wb") as f:
            f.truncate(mib << 20)
        source_port = free_port()
        source = ["nbd-postcopy", "serve", "--file", image, "--listen", f"tcp:127.0.0.1:{source_port}"]
        with process(source, source_port, work / "source-rss.log"):
            port = free_port()
            control = work / "ctl-rss.sock"
            with process(plugin_argv(port, source_port, pages, key, control, work, "prefetch=off"), port, work / "plugin-rss.log") as proc:
                before = rss_kib(proc.pid)
                handle = connect(port)
                stage_all(handle, codec, pages)
                handle.shutdown()
                after = rss_kib(proc.pid)
                assert request(str(control), "status")["mapped"] == pages
        image.unlink()
        if first is None:
            first = (pages, after)
            slope = ""
        else:
            slope = f", {(after - first[1]) * 1024 / (pages - first[0]):.2f} bytes per extra guest page"
        print(f"  {mib:6d} MiB guest ({pages} pages): {before / 1024:6.1f} MiB at start, {after / 1024:6.1f} MiB staged{slope}")
        per_page = "" if pages == first[0] else round((after - first[1]) * 1024 / (pages - first[0]), 2)
        rows.append([mib, pages, before / 1024, after / 1024, per_page])
    return Table("Plugin resident memory after staging every page (target: about 8 bytes per guest page)",
                 ["guest MiB", "pages", "VmRSS at start MiB", "VmRSS staged MiB", "bytes per extra guest page"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guest-mib", type=int, default=1024, help="guest size for the latency runs (0: skip them)")
    parser.add_argument("--reads", type=int, default=1000, help="at most; also bounded by guest size / 600 slots")
    parser.add_argument("--think-us", type=float, default=1000, help="pause between two measured demand reads")
    parser.add_argument("--rss-sizes", default="256,1024,4096", help="guest sizes in MiB for the RSS measurement")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where device.md and its CSVs go")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nbdpc-bench-", dir="/var/tmp"))
    tables = []
    try:
        if args.guest_mib:
            tables.append(bench_latency(work, args.guest_mib, args.reads, args.think_us / 1e6))
        tables.append(bench_rss(work, [int(s) for s in args.rss_sizes.split(",") if s]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    notes = [
        machine_context(),
        "demand reads: libnbd -> nbdkit + plugin/postcopy.py -> nbd-postcopy serve, every read a real demand "
        f"fetch of a mapped, not yet local slot, {args.think_us:g} µs apart; reference: nbdkit's C memory plugin",
        "targets (issue 3): p50 <= 2x the C memory plugin; p99 with the prefetcher running <= 2x p99 idle",
    ]
    for path in write_results("device", "Destination device: plugin/postcopy.py vs nbdkit memory", notes, tables,
                              args.results_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
