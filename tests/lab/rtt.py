"""Demand fault latency through the plugin against added round-trip time, inside the kernel lab.

    with Processes() ... : latencies = measure_fault_latency(run_dir, processes, codec, key_file, rtts_ms=[0, 2, 10])

The page server (`nbd-postcopy serve`) runs in a network namespace of its own, reached over a veth pair
whose host end has `tc qdisc ... netem delay D`: every request to the source waits D more, so D is the
added round-trip time. The destination is the real device (plugin/postcopy.py, prefetcher off, kernel nbd
transport, attached by setup-swap.sh) holding a staged workload; after arming, the test process reads
single pages of the workload with process_vm_readv, each a demand fault that the plugin answers by
fetching from the source. Pages are `STRIDE` apart, beyond the kernel's swap readahead, so every read is
a fault of its own. Used by tests/lab/test_netem.py and benchmarks/bench_rtt.py.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from nbd_postcopy.common import linux
from nbd_postcopy.common.units import PAGE_SIZE
from nbd_postcopy.device.control import request
from nbd_postcopy.device.markers import MarkerCodec
from nbd_postcopy.host.staging import stage_range
from tests import servers
from tests.swapdev import attached_postcopy_swap
from tests.workload import Workload

SOURCE_NS = "nbdpc-lab-src"
HOST_IF, SOURCE_IF = "nbdpc-h", "nbdpc-s"
HOST_ADDR, SOURCE_ADDR = "10.231.0.1", "10.231.0.2"  # only inside the lab guest, which has no network card
PORT = 10809
STRIDE = 32  # pages between two measured faults: more than the swap readahead window (8 pages)
WARMUP = 1  # faults after each RTT change that are not counted


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def source_namespace() -> Iterator[None]:
    """A network namespace for the source, joined to this one by a veth pair; removed (with the pair) after."""
    _ip("netns", "add", SOURCE_NS)
    try:
        _ip("link", "add", HOST_IF, "type", "veth", "peer", "name", SOURCE_IF, "netns", SOURCE_NS)
        _ip("addr", "add", f"{HOST_ADDR}/24", "dev", HOST_IF)
        _ip("link", "set", HOST_IF, "up")
        _ip("-n", SOURCE_NS, "addr", "add", f"{SOURCE_ADDR}/24", "dev", SOURCE_IF)
        _ip("-n", SOURCE_NS, "link", "set", SOURCE_IF, "up")
        _ip("-n", SOURCE_NS, "link", "set", "lo", "up")
        yield
    finally:
        subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)
        subprocess.run(["ip", "netns", "del", SOURCE_NS], capture_output=True)


def set_added_rtt(ms: float) -> None:
    """Delay everything this side sends to the source by `ms` milliseconds (netem on the veth's host end)."""
    subprocess.run(["tc", "qdisc", "replace", "dev", HOST_IF, "root", "netem", "delay", f"{ms}ms"],
                   check=True, capture_output=True, text=True)


def added_rtt_qdisc() -> str:
    return subprocess.run(["tc", "qdisc", "show", "dev", HOST_IF], capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def page_server(processes, image: Path, log: Path, timeout: float = 120.0) -> Iterator[str]:
    """`nbd-postcopy serve --file IMAGE` inside the source namespace; yields its URI once it accepts."""
    with open(log, "wb") as out:
        proc = processes.start(
            ["ip", "netns", "exec", SOURCE_NS, sys.executable, "-m", "nbd_postcopy.cli", "serve", "--file", image,
             "--listen", f"tcp:{SOURCE_ADDR}:{PORT}", "--export", "ram"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the page server exited with {proc.returncode}: {log.read_text(errors='replace')}")
        with socket.socket() as sock:
            if sock.connect_ex((SOURCE_ADDR, PORT)) == 0:
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page server did not listen within {timeout}s")
        time.sleep(0.1)
    yield f"nbd://{SOURCE_ADDR}:{PORT}/ram"


def time_faults(pid: int, address: int, pages: Sequence[int], image: bytes) -> list[float]:
    """Read each page of process `pid` (a demand fault) and return how long each took, in seconds.

    Every page must be swapped out before and must read back as the image's page.
    """
    with linux.Pagemap(pid) as pagemap:
        entries = [pagemap.entries(address + i * PAGE_SIZE, 1)[0] for i in pages]
    if not all(linux.is_swapped(e) for e in entries):
        raise AssertionError(f"pages {list(pages)} are not all swapped out before the measurement")
    buffer = bytearray(PAGE_SIZE)
    seconds = []
    for index in pages:
        started = time.perf_counter()
        linux.process_vm_readv(pid, buffer, address + index * PAGE_SIZE)
        seconds.append(time.perf_counter() - started)
        if buffer != image[index * PAGE_SIZE:(index + 1) * PAGE_SIZE]:
            raise AssertionError(f"page {index} read back wrong after its fault")
    return seconds


def measure_fault_latency(run_dir: Path, processes, codec: MarkerCodec, key_file: Path, rtts_ms: Sequence[float],
                          faults: int = 20, mib: int = 16, rounds: int = 3) -> dict[float, list[float]]:
    """Fault latencies (seconds) at each added RTT (ms), `faults` per RTT in all.

    The RTTs take turns in `rounds` rounds (order rotating), each after WARMUP uncounted faults, so that a
    change of load on the (shared, emulated) CPU hits every RTT alike.
    """
    pages = mib << 20 >> 12
    per_round = -(-faults // rounds)
    needed = len(rtts_ms) * rounds * (per_round + WARMUP)
    if needed > pages // STRIDE:
        raise ValueError(f"{mib} MiB holds {pages // STRIDE} pages {STRIDE} apart; {needed} faults need more")
    image_path = run_dir / "ram.img"
    servers.write_image(image_path, mib << 20)
    image = image_path.read_bytes()
    results: dict[float, list[float]] = {rtt: [] for rtt in rtts_ms}
    with source_namespace(), page_server(processes, image_path, run_dir / "source.log") as uri:
        keys = {"source": uri, "size": mib << 20, "key": key_file, "prefetch": "off"}
        with attached_postcopy_swap(run_dir, keys, transport="nbd") as swap:
            work = Workload(processes, mib, "--fresh")
            stage_range(work.pid, work.address, work.length, codec, swap.device, control=str(swap.control),
                        quiet=True)
            request(str(swap.control), "arm")
            targets = iter(range(0, pages, STRIDE))
            try:
                for round_ in range(rounds):
                    for rtt in rtts_ms[round_ % len(rtts_ms):] + rtts_ms[:round_ % len(rtts_ms)]:
                        set_added_rtt(rtt)
                        count = min(per_round, faults - len(results[rtt]))
                        time_faults(work.pid, work.address, [next(targets) for _ in range(WARMUP)], image)
                        results[rtt] += time_faults(work.pid, work.address, [next(targets) for _ in range(count)],
                                                    image)
            finally:
                set_added_rtt(0)
                work.proc.kill()  # its swap slots are freed: swapoff has nothing left to fetch
                work.proc.wait()
    return results


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y against x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    return slope, mean_y - slope * mean_x

