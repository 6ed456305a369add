"""SourceClient against the real `nbd-postcopy serve` and nbdkit (a reference peer): pipelining from
many threads, reconnecting through server restarts, and timeouts."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nbd_postcopy.client import SourceClient, SourceError, SourceUnavailable
from nbd_postcopy.sources import MAX_SCAN_DATA

from .conftest import wait_for_path

SIZE = 8 << 20
PAGE = 4096


@pytest.fixture
def image(run_dir: Path) -> tuple[Path, bytes]:
    """8 MiB of random data with a zero run at pages 64..127. Name: run_dir/ram.img  Scope: function"""
    data = bytearray(os.urandom(SIZE))
    data[64 * PAGE : 128 * PAGE] = bytes(64 * PAGE)
    path = run_dir / "ram.img"
    path.write_bytes(data)
    return path, bytes(data)


def start_server(processes, run_dir: Path, kind: str, image: Path, *extra) -> tuple[subprocess.Popen, Path]:
    sock = run_dir / f"{kind}.sock"
    if kind == "nbd-postcopy":
        argv = [sys.executable, "-m", "nbd_postcopy.cli", "serve", "--file", image, "--export", "ram",
                "--listen", f"unix:{sock}", *extra]
    else:  # the reference, written by others
        argv = ["nbdkit", "--foreground", "--readonly", "--exit-with-parent", "--unix", sock, "file", image]
    proc = processes.start(argv, stderr=subprocess.DEVNULL)
    wait_for_path(sock, proc=proc)
    return proc, sock


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # a crash: no goodbye, the socket file stays behind
    proc.wait(10)


@pytest.mark.parametrize("kind", ["nbd-postcopy", "nbdkit"])
def test_reads_and_block_status(processes, run_dir, image, kind):
    path, data = image
    _, sock = start_server(processes, run_dir, kind, path)
    client = SourceClient(f"nbd+unix:///ram?socket={sock}", name="test")
    try:
        assert client.size == SIZE and client.connected
        assert client.read(0, PAGE) == data[:PAGE]
        assert client.read(SIZE - 10, 10) == data[-10:]
        ranges = [(random.randrange(SIZE // PAGE) * PAGE, PAGE) for _ in range(300)] + [(0, SIZE)]
        for (offset, length), got in zip(ranges, client.read_many(ranges)):
            assert got == data[offset : offset + length]
        extents = client.block_status(0, SIZE)
        assert sum(n for n, _ in extents) <= SIZE
        if kind == "nbd-postcopy":
            # one answer scans at most MAX_SCAN_DATA bytes of data: the rest needs another request
            (data_length, _), (hole, hole_flags), (rest, rest_flags) = extents
            assert (data_length, hole, hole_flags, rest_flags) == (64 * PAGE, 64 * PAGE, 3, 0)
            assert min(SIZE, MAX_SCAN_DATA) <= 128 * PAGE + rest <= SIZE
        with pytest.raises(ValueError, match="outside the source"):
            client.read(SIZE - 1, 2)
    finally:
        client.close()
    assert not client.connected


def test_pipelined_reads_from_many_threads(processes, run_dir, image):
    path, data = image
    _, sock = start_server(processes, run_dir, "nbd-postcopy", path)
    client = SourceClient(f"nbd+unix:///ram?socket={sock}")
    failures = []

    def worker(seed: int):
        rng = random.Random(seed)
        for _ in range(200):
            offset, length = rng.randrange(SIZE - 70000), rng.randint(1, 65536)
            if client.read(offset, length, timeout=10) != data[offset : offset + length]:
                failures.append((offset, length))

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        client.close()
    assert failures == []


def test_source_error_is_raised_with_its_errno(processes, run_dir):
    sock = run_dir / "err.sock"
    proc = processes.start(["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock, "--filter=error",
                            "memory", "1M", "error-pread=EPERM", "error-pread-rate=100%"], stderr=subprocess.DEVNULL)
    wait_for_path(sock, proc=proc)
    client = SourceClient(f"nbd+unix:///?socket={sock}")
    try:
        with pytest.raises(SourceError) as info:
            client.read(0, PAGE)
        assert info.value.errno == 1
        assert client.connected  # an error reply is not a lost connection
    finally:
        client.close()


def test_server_restart_during_an_outage(processes, run_dir, image):
    path, data = image
    proc, sock = start_server(processes, run_dir, "nbd-postcopy", path)
    states = []
    client = SourceClient(f"nbd+unix:///ram?socket={sock}", on_state=lambda up, why: states.append((up, why)))
    try:
        assert client.read(0, PAGE) == data[:PAGE]
        kill(proc)
        results, errors = [], []

        def reader(offset: int):
            try:
                results.append((offset, client.read(offset, PAGE, timeout=20)))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(i * PAGE * 7,)) for i in range(10)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the reads are issued while nothing listens
        assert not client.connected and not results
        start_server(processes, run_dir, "nbd-postcopy", path)
        for t in threads:
            t.join(30)
        assert errors == []
        assert sorted(results) == [(i * PAGE * 7, data[i * PAGE * 7 : i * PAGE * 7 + PAGE]) for i in range(10)]
        assert states[0][0] is False and states[-1][0] is True
    finally:
        client.close()


def test_requests_in_flight_are_resent_after_reconnect(processes, run_dir, image):
    path, data = image
    proc, sock = start_server(processes, run_dir, "nbd-postcopy", path, "--gate", "closed")
    client = SourceClient(f"nbd+unix:///ram?socket={sock}")
    try:
        result = {}
        reader = threading.Thread(target=lambda: result.update(data=client.read_many([(0, PAGE), (PAGE, PAGE)],
                                                                                     timeout=20)))
        reader.start()
        time.sleep(0.3)  # both requests now wait behind the closed gate
        kill(proc)
        start_server(processes, run_dir, "nbd-postcopy", path)
        reader.join(30)
        assert result["data"] == [data[:PAGE], data[PAGE : 2 * PAGE]]
    finally:
        client.close()


def test_outage_longer_than_the_timeout_is_source_unavailable(processes, run_dir, image):
    path, _ = image
    proc, sock = start_server(processes, run_dir, "nbd-postcopy", path)
    client = SourceClient(f"nbd+unix:///ram?socket={sock}", name="demand")
    try:
        kill(proc)
        started = time.monotonic()
        with pytest.raises(SourceUnavailable, match=f"demand: no reply from nbd\\+unix:///ram\\?socket={sock} "
                                                    "within 0.5s"):
            client.read(0, PAGE, timeout=0.5)
        assert 0.5 <= time.monotonic() - started < 3
    finally:
        client.close()


def test_no_server_at_start_is_source_unavailable(run_dir):
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="cannot connect to .* within 0.3s"):
        SourceClient(f"nbd+unix:///?socket={run_dir}/nothing.sock", connect_timeout=0.3)
    assert time.monotonic() - started < 2


def test_close_wakes_waiting_callers(processes, run_dir, image):
    path, _ = image
    start_server(processes, run_dir, "nbd-postcopy", path, "--gate", "closed")
    client = SourceClient(f"nbd+unix:///ram?socket={run_dir}/nbd-postcopy.sock")
    errors = []

    def reader():
        try:
            client.read(0, PAGE, timeout=20)
        except SourceUnavailable as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.3)  # the read waits behind the closed gate
    client.close()
    thread.join(5)
    assert not thread.is_alive() and errors and "closed" in errors[0]
    with pytest.raises(SourceUnavailable, match="is closed"):
        client.read(0, PAGE)
