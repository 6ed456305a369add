#!/usr/bin/env python3
"""Benchmark of the destination device (plugin/postcopy.py in nbdkit), in one run on this machine:

1. 4 KiB demand-read latency at queue depth 1, client -> nbdkit+plugin -> `nbd-postcopy serve`, all
   over loopback TCP; every read is of a mapped, not yet local slot, so each one is a real demand
   fetch. Beside it, measured the same way (python3-libnbd, the same pause between reads, warm-up reads
   first): the reference, nbdkit's C `memory` plugin (one hop); the architectural floor of any design
   with a separate source, nbdkit's C `nbd` plugin in front of nbdkit memory (two hops, no Python); the
   same C `nbd` plugin in front of `nbd-postcopy serve` (the source server's share); and
   `nbd-postcopy serve` alone. These rows and the prefetch-off plugin take turns in --rounds rounds; each
   reports the median of its per-round p50 and p99.
2. The same demand reads while the prefetcher runs flat out (one run after the rounds, started once it
   fetches pages; reads go to the far end of the sweep, so they are still demand fetches), each followed
   by a read of a page the prefetcher has already made local (what most swap-ins right after a switchover are).
3. The plugin's own memory (RssAnon) after staging every page, at several guest sizes, beside the mapped files (RssFile: the page file that staging warms).
4. Demand swap-in through the kernel (needs root; holds the test suite's swap lock): a process's fresh
   memory staged onto the real swap device (loop + nbdfuse + nbdkit + plugin, prefetch off, fetching
   from `nbd-postcopy serve` on a Unix socket; demand-store=off, as in a migration, and once more with
   demand-store=on), then touched one page at a time at random with
   --think-us between touches, each first touch timed (a major fault): p50/p99, beside the SAME kernel
   path with nbdkit's C `nbd` plugin in front of nbdkit's C `memory` plugin (two hops, no Python). Two
   more rows: the plugin with its prefetcher, touched once every page is local (what most swap-ins right
   after a switchover are), beside nbdkit's C `memory` plugin alone (one hop).
5. CPU seconds per GiB fetched (utime + stime, /proc/PID/stat): nbdkit with the plugin plus
   `nbd-postcopy serve` while the prefetcher pulls a whole staged device with nothing else running,
   beside nbdkit's C nbd -> nbdkit memory chain moving the same bytes to `nbdcopy ... null:`.

Targets (issue 3): p50 <= 2x the C memory plugin; p99 with prefetch running <= 2x p99 idle;
about 8 bytes of state per guest page. Issue 12: through-the-kernel swap-in p50 <= 1.5x the C two-hop
chain; CPU per GiB fetched at most half of the committed figure, reported beside the C chain.

    .venv/bin/python benchmarks/bench_device.py [--guest-mib 1024] [--reads 1000] [--think-us 1000] [--rounds 3]
        [--rss-sizes 256,1024,4096] [--swapin-mib 128] [--touches 500] [--swapin-rounds 5] [--bulk-mib 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
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

sys.path.insert(0, str(REPO / "benchmarks"))
from common import RESULTS_DIR, Cell, Table, cpu_seconds, machine_context, met, percentile, write_results  # noqa: E402
from nbd_postcopy.common.linux import terminate  # noqa: E402
from nbd_postcopy.common.units import PAGE_SIZE as P  # noqa: E402
from nbd_postcopy.device.control import request  # noqa: E402
from nbd_postcopy.device.markers import MarkerCodec  # noqa: E402

PLUGIN = REPO / "plugin" / "postcopy.py"
SERVE_ARGV = [sys.executable, "-m", "nbd_postcopy.cli", "serve"]  # this checkout's, with no venv on PATH
CHUNK = 8 << 20  # bytes per staging write
SPACING = 300  # slots between two measured reads (more than a fault's prefetch neighbourhood)
WARM_UP = 200  # unmeasured reads before each row's measured reads in a round

# Rows of the latency table
MEMORY = "nbdkit memory (C)"  # the reference of issue 3's target: one hop, all C
SERVE = "nbd-postcopy serve alone"  # one hop to the source page server
FLOOR = "nbdkit nbd (C) -> nbdkit memory (C): two hops, no Python"  # the floor of any design with a separate source
PROXIED = "nbdkit nbd (C) -> nbd-postcopy serve"  # the source page server's share of a demand fetch
IDLE = "postcopy, prefetch off"
BUSY = "postcopy, prefetcher running"
BUSY_LOCAL = "postcopy, prefetcher running, page already local"


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
    """A process we start, ready once it listens on TCP `port`; stopped by PID at the end."""
    with started(argv, log) as proc:
        wait_tcp(port, proc)
        yield proc


@contextlib.contextmanager
def started(argv: list, log: Path):
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        terminate(proc)


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


def busy_latencies(handle: nbd.NBD, control: Path, offsets: list[int], think: float,
                   rng: random.Random) -> tuple[list[float], list[float], int]:
    """While the prefetcher runs: each demand read at `offsets` is followed, `think` apart, by a read of a
    random slot in the lower quarter of what the prefetcher has already fetched (its sweep starts at slot
    1): a read of a local page, which is what most of a guest's swap-ins right after the switchover are.
    A status read after each pair tells whether that read was a demand fetch after all (the prefetcher
    also fetches around each demand read, so its count runs ahead of the sweep); such reads are left out.
    Returns (demand latencies, local latencies, local reads left out)."""
    demand, local = [], []
    status = request(str(control), "status")
    left_out = 0
    for offset in offsets:
        demand += latencies(handle, [offset], think)
        sample = latencies(handle, [rng.randrange(1, max(2, status["fetched_prefetch"] // 4)) * P], think)
        before, status = status["fetched_demand"], request(str(control), "status")
        if status["fetched_demand"] - before == 1:  # only the demand read's own fetch
            local += sample
        else:
            left_out += 1
    return demand, local, left_out


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


def status_kib(pid: int, field: str) -> int:
    """A size from /proc/PID/status (VmRSS, RssAnon, RssFile), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def nbd_proxy_argv(port: int, upstream_port: int) -> list:
    """nbdkit's C `nbd` plugin forwarding every request to the NBD server on `upstream_port`."""
    return ["nbdkit", "-f", "-p", port, "-i", "127.0.0.1", "nbd", "hostname=127.0.0.1", f"port={upstream_port}"]


def idle_slots(pages: int) -> list[int]:
    """The slots the prefetch-off plugin is read at: the whole device (no sweep makes any slot local),
    spaced as for the prefetching run."""
    return list(range(1, pages + 1, SPACING))


Row = tuple[nbd.NBD, list[list[int]], list[list[int]]]  # handle, warm-up offsets per round, measured offsets per round


def interleaved(rows: dict[str, Row], rounds: int, think: float) -> dict[str, list[tuple[float, float]]]:
    """(p50, p99) of every row in every round; the rows take turns, in an order that rotates each round,
    so that a change of load on the machine hits all alike."""
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in rows}
    labels = list(rows)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            handle, warm_up, measured = rows[label]
            latencies(handle, warm_up[r])
            results[label].append(summary(latencies(handle, measured[r], think)))
    return results


def wait_prefetching(control: Path, timeout: float = 30.0) -> None:
    """Wait until the prefetcher fetches pages (after arming it first asks the source for zero pages)."""
    deadline = time.monotonic() + timeout
    while request(str(control), "status")["fetched_prefetch"] == 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the prefetcher fetched nothing in {timeout:g}s")
        time.sleep(0.005)


def median_round(per_round: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p50 for p50, _ in per_round), statistics.median(p99 for _, p99 in per_round)


def bench_latency(work: Path, guest_mib: int, reads: int, think: float, rounds: int) -> Table:
    pages = guest_mib * 256
    image = work / "ram.img"
    with open(image, "wb") as f:
        for _ in range(guest_mib):
            f.write(os.urandom(1 << 20))
    key = work / "key"
    key.write_bytes(os.urandom(32))
    codec = MarkerCodec(key.read_bytes())
    rng = random.Random(42)

    # The reference rows read the same random pages every round.
    reference_offsets = [rng.randrange(pages) * P for _ in range(reads)]
    reference_warm_up = reference_offsets[:WARM_UP]
    # Prefetch off: each round reads its own share of the slots (a slot is a demand fetch only once),
    # and warms up on slots halfway between them (demand fetches too, never measured).
    slots = idle_slots(pages)
    rng.shuffle(slots)
    idle_offsets = [slot * P for slot in slots[: reads * rounds]]
    idle_warm_up = [(slot + SPACING // 2) * P for slot in slots if slot + SPACING // 2 <= pages]
    # Prefetching: slots in the upper half (the prefetcher's sweep starts at slot 1), spaced wider than
    # the neighbourhood a fault makes the prefetcher fetch, in random order: each read is a demand fetch.
    slots = list(range(pages // 2, pages + 1, SPACING))
    rng.shuffle(slots)
    offsets = [slot * P for slot in slots[:reads]]

    source_port = free_port()
    source = [*SERVE_ARGV, "--file", image, "--listen", f"tcp:127.0.0.1:{source_port}"]
    with process(source, source_port, work / "source.log"):
        with contextlib.ExitStack() as servers:
            memory_port = free_port()
            memory_argv = ["nbdkit", "-f", "-p", memory_port, "-i", "127.0.0.1", "memory", f"{guest_mib}M"]
            servers.enter_context(process(memory_argv, memory_port, work / "memory.log"))
            floor_port, proxy_port, plugin_port = free_port(), free_port(), free_port()
            servers.enter_context(process(nbd_proxy_argv(floor_port, memory_port), floor_port, work / "floor.log"))
            servers.enter_context(process(nbd_proxy_argv(proxy_port, source_port), proxy_port, work / "proxy.log"))
            control = work / "ctl-idle.sock"
            argv = plugin_argv(plugin_port, source_port, pages, key, control, work, "prefetch=off")
            servers.enter_context(process(argv, plugin_port, work / "plugin-idle.log"))

            memory_client = connect(memory_port)
            for offset in range(0, pages * P, CHUNK):
                memory_client.pwrite(os.urandom(CHUNK), offset)
            plugin_client = connect(plugin_port)
            stage_all(plugin_client, codec, pages)
            request(str(control), "arm")
            reference = ([reference_warm_up] * rounds, [reference_offsets] * rounds)
            rows = {
                MEMORY: (memory_client, *reference),
                SERVE: (connect(source_port), *reference),
                FLOOR: (connect(floor_port), *reference),
                PROXIED: (connect(proxy_port), *reference),
                IDLE: (plugin_client, [idle_warm_up[r::rounds][:WARM_UP] for r in range(rounds)],
                       [idle_offsets[r::rounds] for r in range(rounds)]),
            }  # fmt: skip
            before = request(str(control), "status")
            per_round = interleaved(rows, rounds, think)
            after = request(str(control), "status")
            warm_ups = sum(len(warm_up) for warm_up in rows[IDLE][1])  # demand fetches too
            idle_demand = after["fetched_demand"] - before["fetched_demand"] - warm_ups
            for handle, _, _ in rows.values():
                handle.shutdown()

        port = free_port()
        control = work / "ctl-prefetching.sock"
        with process(plugin_argv(port, source_port, pages, key, control, work), port, work / "plugin-prefetching.log"):
            handle = connect(port)
            stage_all(handle, codec, pages)
            request(str(control), "arm")
            wait_prefetching(control)
            demand, local, left_out = busy_latencies(handle, control, offsets, think, rng)
            busy, busy_local = summary(demand), summary(local)
            status = request(str(control), "status")
            busy_demand, busy_prefetched = status["fetched_demand"], status["fetched_prefetch"]
            handle.shutdown()

    medians = {label: median_round(values) for label, values in per_round.items()}
    memory, floor, proxied, idle = medians[MEMORY], medians[FLOOR], medians[PROXIED], medians[IDLE]
    p50_ratio, p99_ratio = idle[0] / memory[0], busy[1] / idle[1]
    floor_ratio, ours_ratio, proxied_ratio = floor[0] / memory[0], idle[0] / floor[0], proxied[0] / floor[0]
    print(f"4 KiB read latency at QD1 over loopback TCP, {guest_mib} MiB guest, reads {think * 1e3:g} ms apart "
          f"(median of {rounds} interleaved rounds, but one run with the prefetcher running):")
    for label, (p50, p99) in medians.items():
        each = " ".join(f"{p50:.0f}" for p50, _ in per_round[label])
        print(f"  {label:58} p50 {p50:7.1f} us   p99 {p99:7.1f} us   (p50 per round: {each})")
    print(f"  {BUSY:58} p50 {busy[0]:7.1f} us   p99 {busy[1]:7.1f} us")
    print(f"  {BUSY_LOCAL:58} p50 {busy_local[0]:7.1f} us   p99 {busy_local[1]:7.1f} us")
    print(
        f"  (reads that were demand fetches: prefetch off {idle_demand} of {len(idle_offsets)}; prefetching "
        f"{busy_demand} for {len(offsets)} demand reads and {len(offsets)} meant to be of local pages, of which "
        f"{left_out} were not and are left out; pages prefetched meanwhile: {busy_prefetched})"
    )
    print(f"  ratio p50 idle / memory: {p50_ratio:.2f}x (target <= 2x)")
    print(f"  ratio p50 two-C-hop floor / memory: {floor_ratio:.2f}x; idle / floor: {ours_ratio:.2f}x; "
          f"C nbd -> serve / floor: {proxied_ratio:.2f}x")
    print(f"  ratio p99 prefetching / idle: {p99_ratio:.2f}x (target <= 2x)")

    def round_row(label: str, hops: int, demand: Cell = "-", prefetched: Cell = "-") -> list[Cell]:
        reads_all = sum(len(measured) for measured in rows[label][2])
        each = " / ".join(f"{p50:.0f}" for p50, _ in per_round[label])
        return [label, hops, *medians[label], each, f"{reads_all} in {rounds}", demand, prefetched]

    return Table(
        f"4 KiB read latency at queue depth 1, loopback TCP, {guest_mib} MiB guest, reads {think * 1e6:g} µs apart",
        ["device", "network hops", "p50 µs", "p99 µs", "p50 per round µs", "reads in rounds", "demand fetches",
         "pages prefetched meanwhile"],
        [
            round_row(MEMORY, 1),
            round_row(SERVE, 1),
            round_row(FLOOR, 2),
            round_row(PROXIED, 2),
            round_row(IDLE, 2, idle_demand, 0),
            [BUSY, 2, *busy, "-", f"{len(offsets)} in 1", busy_demand, busy_prefetched],
            [BUSY_LOCAL, 2, *busy_local, "-", f"{len(local)} in 1", f"0 ({left_out} reads that fetched left out)",
             "as above"],
            [f"ratios of p50: idle / memory {p50_ratio:.2f}x (target <= 2x, {'met' if p50_ratio <= 2 else 'missed'}); "
             f"two-C-hop floor / memory {floor_ratio:.2f}x; idle / floor {ours_ratio:.2f}x; C nbd -> serve / floor "
             f"{proxied_ratio:.2f}x; of p99: prefetching / idle {p99_ratio:.2f}x (target <= 2x, "
             f"{'met' if p99_ratio <= 2 else 'missed'})", "", "", "", "", "", "", ""],
        ],
    )  # fmt: skip


def bench_rss(work: Path, sizes_mib: list[int]) -> Table:
    """The plugin's own memory (RssAnon: its heap, where the slot map and bitmaps live) after staging, and
    beside it the page file's pages it maps (in RssFile: staging warms the page file, docs/DESIGN.md)."""
    key = work / "key"
    key.write_bytes(os.urandom(32))
    codec = MarkerCodec(key.read_bytes())
    print("plugin memory after staging every page (RssAnon: its own; RssFile: mapped files, the warmed page file "
          "among them):")
    rows = []
    first = None  # (pages, RssAnon KiB staged) of the smallest size: the slope from it is the cost per page
    for mib in sizes_mib:
        pages = mib * 256
        image = work / "sparse.img"
        with open(image, "wb") as f:
            f.truncate(mib << 20)
        source_port = free_port()
        source = [*SERVE_ARGV, "--file", image, "--listen", f"tcp:127.0.0.1:{source_port}"]
        with process(source, source_port, work / "source-rss.log"):
            port = free_port()
            control = work / "ctl-rss.sock"
            with process(plugin_argv(port, source_port, pages, key, control, work, "prefetch=off"), port, work / "plugin-rss.log") as proc:
                before = status_kib(proc.pid, "RssAnon")
                handle = connect(port)
                stage_all(handle, codec, pages)
                handle.shutdown()
                after = status_kib(proc.pid, "RssAnon")
                mapped_files = status_kib(proc.pid, "RssFile")
                status = request(str(control), "status")
                assert status["mapped"] == pages
        image.unlink()
        if first is None:
            first = (pages, after)
            slope = ""
        else:
            slope = f", {(after - first[1]) * 1024 / (pages - first[0]):.2f} bytes per extra guest page"
        print(f"  {mib:6d} MiB guest ({pages} pages): RssAnon {before / 1024:6.1f} MiB at start, {after / 1024:6.1f} MiB "
              f"staged{slope}; RssFile {mapped_files / 1024:.1f} MiB ({status['page_file_warmed']} page file pages "
              "warmed)")
        per_page = "" if pages == first[0] else round((after - first[1]) * 1024 / (pages - first[0]), 2)
        rows.append([mib, pages, before / 1024, after / 1024, per_page, mapped_files / 1024, status["page_file_warmed"]])
    return Table("Plugin memory after staging every page (target: about 8 bytes per guest page of its own)",
                 ["guest MiB", "pages", "RssAnon at start MiB", "RssAnon staged MiB", "bytes per extra guest page",
                  "RssFile staged MiB (mapped files: the warmed page file, libraries)", "page file pages warmed"], rows)


# --- 4. demand swap-in through the kernel --------------------------------------------------------------

SWAP_LOCK = "/run/lock/nbd-postcopy-tests.lock"  # tests/conftest.py's swap_lock
TOUCHER = REPO / "benchmarks" / "toucher.py"
TOUCH_SPACING = 32  # pages between two touched pages: beyond the swap readahead window (vm.page-cluster)
TOUCH_WARM_UP = 20  # unmeasured first touches of each run
# The demand path as a migration takes it: the prefetcher stores the page afterwards, so the fetch keeps no
# copy (demand-store=off); the prefetcher itself is off so that the touched pages are still remote.
KERNEL_POSTCOPY = "postcopy: loop + nbdfuse + nbdkit + plugin (prefetch off, demand-store off) -> serve"
# The same with the page stored before the answer (demand-store=on, the default with prefetch=off).
KERNEL_STORED = "postcopy, page stored before the answer (demand-store on)"
KERNEL_FLOOR = "C floor: loop + nbdfuse + nbdkit nbd (C) -> nbdkit memory (C)"
# What most of the guest's swap-ins right after a switchover are (benchmarks/results/migrate.md, probe
# columns): pages the prefetcher already made local, which still take the whole kernel path.
KERNEL_LOCAL = "postcopy, page already local: loop + nbdfuse + nbdkit + plugin (prefetched)"
KERNEL_ONE_HOP = "C one hop: loop + nbdfuse + nbdkit memory (C)"


class Toucher:
    """benchmarks/toucher.py: fresh anonymous memory that times its own first touches."""

    def __init__(self, processes, mib: int):
        self.proc = processes.start([sys.executable, TOUCHER, "--mib", mib], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.proc.stdout.readline() or "{}")
        if "pid" not in hello:
            raise RuntimeError(f"toucher did not start (exit status {self.proc.poll()})")
        self.pid, self.address, self.length = hello["pid"], hello["address"], hello["length"]

    def time(self, pages: list[int], think_us: float) -> list[float]:
        self.proc.stdin.write(f"time {think_us} {','.join(map(str, pages))}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["us"]

    def major_faults(self) -> int:
        return int(Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[9])

    def exit(self) -> None:
        self.proc.stdin.write("exit\n")
        self.proc.stdin.close()
        self.proc.wait(30)


def wait_socket(path: Path, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {path}")
        time.sleep(0.05)


def swapin_run(label: str, run_dir: Path, processes, mib: int, pages: list[int], think_us: float,
               keys: dict | None, standin: str | None, codec: MarkerCodec) -> tuple[list[float], int, int]:
    """Stage a fresh toucher onto the device, arm it (postcopy; with the prefetcher on, wait until every
    page is local), time the first touches of `pages` after TOUCH_WARM_UP unmeasured ones; (latencies µs,
    their major faults, their demand-fetched pages or -1)."""
    from nbd_postcopy.host.staging import stage_range
    from tests.swapdev import attached_postcopy_swap

    with attached_postcopy_swap(run_dir, keys or {}, standin=standin) as swap:
        toucher = Toucher(processes, mib)
        control = str(swap.control) if keys else None
        stage_range(toucher.pid, toucher.address, toucher.length, codec, swap.device, control=control, quiet=True)
        if control:
            request(control, "arm")
            while keys.get("prefetch") != "off" and not request(control, "status")["complete"]:
                time.sleep(0.01)
        toucher.time(pages[:TOUCH_WARM_UP], think_us)
        faults = toucher.major_faults()
        demand = request(control, "status")["fetched_demand"] if control else 0
        measured = toucher.time(pages[TOUCH_WARM_UP:], think_us)
        faults = toucher.major_faults() - faults
        demand = request(control, "status")["fetched_demand"] - demand if control else -1
        toucher.exit()
    print(f"  {label}: p50 {percentile(measured, 0.5):.0f} µs, p99 {percentile(measured, 0.99):.0f} µs "
          f"({len(measured)} touches, {faults} major faults)", flush=True)
    return measured, faults, demand


def bench_swapin(mib: int, touches: int, think_us: float, rounds: int) -> Table:
    from tests import servers
    from tests.conftest import Processes

    pages_all = list(range(0, mib * 256, TOUCH_SPACING))
    random.Random(7).shuffle(pages_all)
    pages = pages_all[: touches + TOUCH_WARM_UP]
    run_dir = Path(tempfile.mkdtemp(prefix="nbdpc-b-", dir="/tmp"))  # short: Unix sockets live here
    processes = Processes()
    results: dict[str, list[tuple[list[float], int, int]]] = {
        KERNEL_POSTCOPY: [], KERNEL_STORED: [], KERNEL_FLOOR: [], KERNEL_LOCAL: [], KERNEL_ONE_HOP: []}
    page_cluster = Path("/proc/sys/vm/page-cluster").read_text().strip()
    print(f"demand swap-in through the kernel, {mib} MiB staged, {touches} touches {think_us:g} µs apart "
          f"(vm.page-cluster {page_cluster}):", flush=True)
    try:
        keyfile = run_dir / "key"
        keyfile.write_bytes(os.urandom(32))
        codec = MarkerCodec.from_file(keyfile)
        image = run_dir / "ram.img"
        servers.write_image(image, mib << 20)
        slots = mib * 256 + max(4096, mib * 256 // 32) + 1
        memory_socket = run_dir / "memory.sock"
        memory = processes.start(["nbdkit", "-f", "-U", memory_socket, "memory", f"size={slots * P}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_socket(memory_socket, memory)
        with open(SWAP_LOCK, "w") as lock, servers.serve("nbd-postcopy", run_dir, image=image) as source:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keys = {"source": source.uri("unix"), "size": mib << 20, "key": keyfile, "prefetch": "off"}
            runs = {KERNEL_POSTCOPY: ({**keys, "demand-store": "off"}, None), KERNEL_STORED: (keys, None),
                    KERNEL_FLOOR: (None, f"nbd socket={memory_socket}"),
                    KERNEL_LOCAL: ({**keys, "prefetch": "on"}, None),
                    KERNEL_ONE_HOP: (None, f"memory size={slots * P}")}
            for r in range(rounds):  # taking turns, in an order that rotates, so a change of load hits all alike
                order = list(runs)
                for label in order[r % len(order):] + order[: r % len(order)]:
                    results[label].append(swapin_run(label, run_dir, processes, mib, pages, think_us, *runs[label],
                                                     codec))
    finally:
        processes.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)

    rows: list[list[Cell]] = []
    p50s = {}
    for label, per_round in results.items():
        p50s[label] = statistics.median(percentile(lat, 0.5) for lat, _, _ in per_round)
        p99 = statistics.median(percentile(lat, 0.99) for lat, _, _ in per_round)
        each = " / ".join(f"{percentile(lat, 0.5):.0f}" for lat, _, _ in per_round)
        faults = " / ".join(str(f) for _, f, _ in per_round)
        demand = " / ".join(str(d) for _, _, d in per_round) if label.startswith("postcopy") else "-"
        rows.append([label, p50s[label], p99, each, f"{touches} x {len(per_round)}", faults, demand])
    ratio = p50s[KERNEL_POSTCOPY] / p50s[KERNEL_FLOOR]
    local_ratio = p50s[KERNEL_LOCAL] / p50s[KERNEL_ONE_HOP]
    print(f"  ratio p50 postcopy / C floor: {ratio:.2f}x (target <= 1.5x, {met(ratio, 1.5)}); "
          f"local page / C one hop: {local_ratio:.2f}x", flush=True)
    rows.append([f"ratio of p50: postcopy / C floor {ratio:.2f}x (issue 12 target <= 1.5x, {met(ratio, 1.5)})",
                 "", "", "", "", "", ""])
    stored_ratio = p50s[KERNEL_STORED] / p50s[KERNEL_FLOOR]
    rows.append([f"ratio of p50: page stored before the answer / C floor {stored_ratio:.2f}x (demand-store=on, the "
                 "default with prefetch=off)", "", "", "", "", "", ""])
    rows.append([f"ratio of p50: page already local / C one hop {local_ratio:.2f}x (no target: the floor of a "
                 "swap-in right after the switchover)", "", "", "", "", "", ""])
    rows.append([f"{mib} MiB staged, touches {think_us:g} µs apart, {TOUCH_SPACING} pages apart, "
                 f"vm.page-cluster {page_cluster}", "", "", "", "", "", ""])
    return Table("Demand swap-in through the kernel (first touch of a staged page)",
                 ["path", "p50 µs", "p99 µs", "p50 per round µs", "touches", "major faults per round",
                  "demand fetches per round"], rows)


# --- 5. CPU seconds per GiB fetched ---------------------------------------------------------------------


def repeated_image(path: Path, mib: int) -> None:
    """MIB of non-zero data (one random MiB repeated: nothing here compresses or dedupes)."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) or 0.0 for pid in pids)


def bench_cpu(work: Path, mib: int) -> Table:
    """nbdkit + plugin + serve CPU while the prefetcher pulls a staged device, beside the C two-hop chain."""
    pages = mib * 256
    image = work / "bulk.img"
    repeated_image(image, mib)
    key = work / "key-bulk"
    key.write_bytes(os.urandom(32))
    codec = MarkerCodec(key.read_bytes())
    rows: list[list[Cell]] = []
    print(f"CPU per GiB fetched, {mib} MiB:", flush=True)
    with contextlib.ExitStack() as stack:
        source_socket, plugin_socket, control = work / "bulk-src.sock", work / "bulk-plugin.sock", work / "ctl-bulk.sock"
        serve = stack.enter_context(unix_process(
            [*SERVE_ARGV, "--file", image, "--listen", f"unix:{source_socket}"], source_socket,
            work / "bulk-source.log"))
        plugin = stack.enter_context(unix_process(
            ["nbdkit", "-f", "-U", plugin_socket, "python", PLUGIN, f"source=nbd+unix:///?socket={source_socket}",
             f"pages={pages}", f"key={key}", f"control={control}", f"cache-dir={work}"],
            plugin_socket, work / "bulk-plugin.log"))  # fmt: skip
        handle = nbd.NBD()
        handle.connect_unix(str(plugin_socket))
        stage_all(handle, codec, pages)
        before = (cpu_seconds(plugin.pid), cpu_seconds(serve.pid))
        started = time.monotonic()
        request(str(control), "arm")
        while not (status := request(str(control), "status"))["complete"]:
            if time.monotonic() - started > 600:
                raise TimeoutError("the prefetcher did not finish within 600s")
            time.sleep(0.01)
        seconds = time.monotonic() - started
        plugin_cpu, serve_cpu = cpu_seconds(plugin.pid) - before[0], cpu_seconds(serve.pid) - before[1]
        handle.shutdown()
        fetched = status["fetched_prefetch"] + status["fetched_demand"]
        gib = fetched * P / 2**30
        ours = (plugin_cpu + serve_cpu) / gib
        rows.append(["nbdkit + plugin (prefetcher) <- nbd-postcopy serve, Unix socket", fetched * P / 2**20, seconds,
                     fetched * P / 2**20 / seconds, f"{plugin_cpu:.2f} + {serve_cpu:.2f}", ours])
    with contextlib.ExitStack() as stack:
        memory_socket, front_socket = work / "bulk-memory.sock", work / "bulk-front.sock"
        memory = stack.enter_context(unix_process(["nbdkit", "-f", "-U", memory_socket, "memory", f"{mib}M"],
                                                  memory_socket, work / "bulk-memory.log"))
        front = stack.enter_context(unix_process(["nbdkit", "-f", "-U", front_socket, "nbd", f"socket={memory_socket}"],
                                                 front_socket, work / "bulk-front.log"))
        handle = nbd.NBD()
        handle.connect_unix(str(memory_socket))
        with open(image, "rb") as f:
            for offset in range(0, mib << 20, CHUNK):
                handle.pwrite(f.read(CHUNK), offset)
        handle.shutdown()
        before = (cpu_seconds(front.pid), cpu_seconds(memory.pid))
        started = time.monotonic()
        subprocess.run(["nbdcopy", "--connections=1", f"nbd+unix:///?socket={front_socket}", "null:"], check=True)
        seconds = time.monotonic() - started
        front_cpu, memory_cpu = cpu_seconds(front.pid) - before[0], cpu_seconds(memory.pid) - before[1]
        floor = (front_cpu + memory_cpu) / (mib / 1024)
        rows.append(["C floor: nbdkit nbd (C) <- nbdkit memory (C), Unix socket, nbdcopy --connections=1 to null:",
                     mib, seconds, mib / seconds, f"{front_cpu:.2f} + {memory_cpu:.2f}", floor])
    for label, moved, seconds, rate, split, per_gib in rows:
        print(f"  {label}: {moved:.0f} MiB in {seconds:.2f} s ({rate:.0f} MiB/s), CPU {split} s = {per_gib:.2f} s/GiB",
              flush=True)
    print(f"  ratio CPU per GiB postcopy / C floor: {ours / floor:.1f}x", flush=True)
    rows.append([f"ratio of CPU per GiB: postcopy / C floor {ours / floor:.1f}x (issue 12: postcopy at most half of "
                 "the committed figure before the change)", "", "", "", "", ""])
    rows.append([f"a whole {mib} MiB device, nothing else running", "", "", "", "", ""])
    return Table("CPU seconds per GiB fetched",
                 ["path", "MiB moved", "seconds", "MiB/s", "CPU s (first + second process)", "CPU s per GiB"], rows)


@contextlib.contextmanager
def unix_process(argv: list, path: Path, log: Path):
    """A process we start, ready once it listens on the Unix socket `path`; stopped by PID at the end."""
    with started(argv, log) as proc:
        wait_socket(path, proc)
        yield proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guest-mib", type=int, default=1024, help="guest size for the latency runs (0: skip them)")
    parser.add_argument("--reads", type=int, default=1000,
                        help="reads per row and round; the plugin rows read at most one slot in 300 (prefetch off: "
                             "shared among the rounds; prefetching: of the upper half)")
    parser.add_argument("--think-us", type=float, default=1000, help="pause between two measured reads")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the reference rows and the prefetch-off plugin (median reported)")
    parser.add_argument("--rss-sizes", default="256,1024,4096", help="guest sizes in MiB for the RSS measurement")
    parser.add_argument("--swapin-mib", type=int, default=128,
                        help="range staged for the through-the-kernel swap-in (0: skip it; needs root)")
    parser.add_argument("--touches", type=int, default=500, help="measured first touches per path and round")
    parser.add_argument("--swapin-rounds", type=int, default=5,
                        help="rounds in which the four kernel paths take turns (median reported; the p50 of a single "
                             "round swings by a third on a shared machine)")
    parser.add_argument("--bulk-mib", type=int, default=1024, help="device size for the CPU per GiB runs (0: skip)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where device.md and its CSVs go")
    args = parser.parse_args()
    if args.swapin_mib and os.geteuid() != 0:
        parser.error("the through-the-kernel swap-in needs root (or --swapin-mib 0)")
    if args.swapin_mib and args.touches + TOUCH_WARM_UP > args.swapin_mib * 256 // TOUCH_SPACING:
        parser.error(f"--swapin-mib {args.swapin_mib} has room for at most "
                     f"{args.swapin_mib * 256 // TOUCH_SPACING - TOUCH_WARM_UP} touches")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.guest_mib and len(idle_slots(args.guest_mib * 256)) < args.rounds:
        parser.error(f"--guest-mib {args.guest_mib} has too few slots to read for {args.rounds} rounds")
    work = Path(tempfile.mkdtemp(prefix="nbdpc-bench-", dir="/var/tmp"))
    tables = []
    try:
        if args.guest_mib:
            tables.append(bench_latency(work, args.guest_mib, args.reads, args.think_us / 1e6, args.rounds))
        tables.append(bench_rss(work, [int(s) for s in args.rss_sizes.split(",") if s]))
        if args.swapin_mib:
            tables.append(bench_swapin(args.swapin_mib, args.touches, args.think_us, args.swapin_rounds))
        if args.bulk_mib:
            tables.append(bench_cpu(work, args.bulk_mib))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    notes = [
        machine_context(),
        "demand reads: libnbd -> nbdkit + plugin/postcopy.py -> nbd-postcopy serve, every read a real demand "
        f"fetch of a mapped, not yet local slot, {args.think_us:g} µs apart; reference: nbdkit's C memory plugin",
        "architectural floor: nbdkit's C nbd plugin in front of nbdkit memory, two network hops with no Python, "
        "as a demand fetch has; the same C nbd plugin in front of nbd-postcopy serve (serving the image the plugin "
        "fetches from) shows the source server's share; all read random pages with the same client and pause",
        f"method: the first five rows take turns in {args.rounds} rounds (order rotating each round); in each round "
        f"a row gets {WARM_UP} warm-up reads, then its measured reads; p50 and p99 are the median over the rounds. "
        "The prefetch-off plugin is staged once, each round reads its own share of its slots and warms up on other "
        "slots (a slot is a demand fetch only once). The prefetcher-running rows are one run after the rounds, "
        "without warm-up (its prefetcher makes slots local as it goes), started once the prefetcher fetches pages "
        "(not while it still asks the source which pages are zero); each demand read there is followed by a read "
        "of a random page in the lower quarter of what the prefetcher has fetched, kept as a local read only if "
        "the device's demand fetch count says it fetched nothing",
        "targets (issue 3): p50 <= 2x the C memory plugin; p99 with the prefetcher running <= 2x p99 idle",
        "swap-in through the kernel: a process (benchmarks/toucher.py) maps fresh memory, which is staged "
        "(host/staging.py stage_range) onto the device attached as tests/swapdev.py does (nbdkit under the "
        "supervisor -> nbdfuse -> losetup --direct-io=on -> swapon), the plugin with prefetch=off fetching from "
        "nbd-postcopy serve over a Unix socket, with demand-store=off as in a migration (the prefetcher stores "
        "the page afterwards) and, in a row of its own, demand-store=on (the page stored before the answer, the "
        "default with prefetch=off); the C floor is the same attachment with nbdkit's nbd plugin "
        "(socket=) in front of nbdkit memory (the stand-in plugin of NBD_POSTCOPY_NBDKIT_PLUGIN, mkswap'd). "
        f"Touched pages are {TOUCH_SPACING} pages apart (beyond swap readahead) in random order, the first "
        f"{TOUCH_WARM_UP} unmeasured; each touch is timed in the process around a one-byte read (a major "
        "fault). Beside them, the plugin with its prefetcher once every page is local, and nbdkit's C memory "
        f"plugin alone (the floor right after a switchover). The five paths take turns in {args.swapin_rounds} rounds "
        "(in a rotating order); p50/p99 are medians over the rounds. Target (issue 12): postcopy p50 <= 1.5x the C "
        "floor",
        "CPU per GiB: utime+stime (/proc/PID/stat) of nbdkit (with plugin/postcopy.py) and nbd-postcopy serve from "
        "arming a staged device (staged through NBD writes, no kernel) until the prefetcher reports every page "
        "local, per GiB fetched; beside it nbdkit nbd (C) and nbdkit memory (C) while nbdcopy --connections=1 "
        "reads the same number of bytes through them to null: (the consumer's own CPU, nbdcopy, not counted; "
        "the prefetcher's is, inside nbdkit)",
    ]
    notes.insert(1, "command: .venv/bin/python benchmarks/bench_device.py " + (" ".join(sys.argv[1:]) or "(the defaults)"))
    for path in write_results("device", "Destination device: plugin/postcopy.py vs nbdkit memory", notes, tables,
                              args.results_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
