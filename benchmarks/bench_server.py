"""Benchmark: `nbd-postcopy serve --file` against nbdkit's C `file` plugin, in one run, on one image.

Both servers run at once and are measured in turns. For each server and transport (Unix socket,
loopback TCP) it measures
  - sequential throughput: `nbdcopy URI null:`, best of --copies runs;
  - 4 KiB random-read latency at queue depth 1: python3-libnbd `pread`, the same client and the same
    page offsets for both servers, p50 and p99.
Then it prints the ratios ours/nbdkit against issue 2's targets (throughput >= 0.8x, p50 <= 2x) and
writes the tables to benchmarks/results/server.md and server*.csv.

    .venv/bin/python benchmarks/bench_server.py [--size-mib 256] [--samples 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.servers
from common import RESULTS_DIR, Table, machine_context, percentile, plot_bars, write_results  # noqa: E402

from tests.servers import SERVER_KINDS, TRANSPORTS, serve, write_image  # noqa: E402

PAGE = 4096
WARMUP_READS = 200
LATENCY_ROUND = 100  # reads on one server before the next takes its turn
THROUGHPUT_TARGET = 0.8  # ours / nbdkit, at least
P50_TARGET = 2.0  # ours / nbdkit, at most


@dataclass
class Measurement:
    kind: str
    transport: str
    throughput_mib_s: float
    p50_us: float
    p99_us: float


def nbdcopy_seconds(uri: str) -> float:
    """Wall-clock seconds of one `nbdcopy URI null:` (process start included)."""
    start = time.perf_counter()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return time.perf_counter() - start


def timed_pread(h: nbd.NBD, offset: int) -> float:
    """Microseconds of one 4 KiB `pread`."""
    start = time.perf_counter_ns()
    h.pread(PAGE, offset)
    return (time.perf_counter_ns() - start) / 1000


def measure(image: Path, size: int, offsets: list[int], copies: int) -> list[Measurement]:
    """Serve `image` with every server at once and measure them in turns, so that a change of load on
    the machine during the run hits all of them alike."""
    targets = [(kind, transport) for kind in SERVER_KINDS for transport in TRANSPORTS]
    best_seconds = {target: math.inf for target in targets}
    latencies: dict[tuple[str, str], list[float]] = {target: [] for target in targets}
    run_dir = Path(tempfile.mkdtemp(prefix="nbdpc-bench-", dir="/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            servers = {kind: stack.enter_context(serve(kind, run_dir, image=image, block_sizes=False)) for kind in SERVER_KINDS}
            uris = {(kind, transport): servers[kind].uri(transport) for kind, transport in targets}
            for _ in range(copies):
                for target in targets:
                    best_seconds[target] = min(best_seconds[target], nbdcopy_seconds(uris[target]))
            handles = {target: stack.enter_context(connected(uris[target])) for target in targets}
            for target in targets:
                for offset in offsets[:WARMUP_READS]:
                    handles[target].pread(PAGE, offset)
            for first in range(0, len(offsets), LATENCY_ROUND):
                for target in targets:
                    latencies[target] += [timed_pread(handles[target], o) for o in offsets[first : first + LATENCY_ROUND]]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return [
        Measurement(kind, transport, size / best_seconds[kind, transport] / 2**20,
                    percentile(latencies[kind, transport], 0.50), percentile(latencies[kind, transport], 0.99))
        for kind, transport in targets
    ]  # fmt: skip


@contextlib.contextmanager
def connected(uri: str) -> Iterator[nbd.NBD]:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        yield h
    finally:
        h.shutdown()


def tables(results: list[Measurement]) -> list[Table]:
    measured = Table(
        "Measurements",
        ["server", "transport", "nbdcopy MiB/s (best)", "4 KiB p50 µs", "4 KiB p99 µs"],
        [[m.kind, m.transport, m.throughput_mib_s, m.p50_us, m.p99_us] for m in results],
    )
    by_key = {(m.kind, m.transport): m for m in results}
    ratio_rows: list[list] = []
    for transport in TRANSPORTS:
        ours, reference = by_key["nbd-postcopy", transport], by_key["nbdkit", transport]
        throughput_ratio = ours.throughput_mib_s / reference.throughput_mib_s
        p50_ratio = ours.p50_us / reference.p50_us
        ratio_rows.append([
            transport,
            throughput_ratio, f">= {THROUGHPUT_TARGET}", "met" if throughput_ratio >= THROUGHPUT_TARGET else "MISSED",
            p50_ratio, f"<= {P50_TARGET}", "met" if p50_ratio <= P50_TARGET else "MISSED",
            ours.p99_us / reference.p99_us,
        ])  # fmt: skip
    ratios = Table(
        "Ratios",
        ["transport", "throughput ours/nbdkit", "target", "verdict", "p50 ours/nbdkit", "target", "verdict", "p99 ours/nbdkit"],
        ratio_rows,
    )
    return [measured, ratios]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="image size in MiB (default 256)")
    parser.add_argument("--samples", type=int, default=2000, help="4 KiB reads per latency measurement (default 2000)")
    parser.add_argument("--copies", type=int, default=3, help="nbdcopy runs per throughput measurement; the best counts (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random read offsets (default 1)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help=f"where to write server.md/.csv (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.samples < 1 or args.copies < 1:
        parser.error("--size-mib, --samples and --copies must be at least 1")

    size = args.size_mib * 2**20
    rng = random.Random(args.seed)
    offsets = [rng.randrange(size // PAGE) * PAGE for _ in range(args.samples)]
    image = Path(f"/dev/shm/nbdpc-bench-{uuid.uuid4().hex}.img")
    print(f"bench_server: {args.size_mib} MiB random image in /dev/shm, {args.samples} reads of 4 KiB, best of {args.copies} copies")
    try:
        write_image(image, size)
        results = measure(image, size, offsets, args.copies)
    finally:
        image.unlink(missing_ok=True)

    nbdkit_version = subprocess.run(["nbdkit", "--version"], capture_output=True, text=True).stdout.strip()
    notes = [
        machine_context(),
        f"image: {args.size_mib} MiB of random bytes on /dev/shm, served by `nbd-postcopy serve --file` and plain `{nbdkit_version} file --readonly`",
        "all servers run at once and are measured in turns (copies alternate; reads alternate every "
        f"{LATENCY_ROUND}), so load changes on the machine hit them alike",
        f"throughput: `nbdcopy URI null:` (default connections and requests), best of {args.copies}, process start included",
        f"latency: python3-libnbd `pread` of 4 KiB at {args.samples} random page offsets (seed {args.seed}), queue depth 1, after {WARMUP_READS} warm-up reads",
        f"targets (issue 2): throughput >= {THROUGHPUT_TARGET}x nbdkit file, 4 KiB p50 <= {P50_TARGET}x",
    ]
    result_tables = tables(results)
    print()
    for table in result_tables:
        print(table.markdown())
    for path in write_results("server", "Source page server: nbd-postcopy serve vs nbdkit file", notes, result_tables, args.results_dir):
        print(f"wrote {path}")
    labels = [f"{m.kind}\n{m.transport}" for m in results]
    plot = plot_bars(
        "server", "nbd-postcopy serve vs nbdkit file", labels,
        {"nbdcopy MiB/s": [m.throughput_mib_s for m in results], "4 KiB p50 µs": [m.p50_us for m in results]},
        args.results_dir,
    )  # fmt: skip
    if plot:
        print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
