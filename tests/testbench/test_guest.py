"""The test guest: kernel and initramfs preparation, the memory checker, and its console lines."""

from __future__ import annotations

import mmap
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from nbd_postcopy.testbench.guest import (
    Failure,
    Heartbeat,
    PassOk,
    Started,
    build_memcheck,
    expected_page,
    parse_console_line,
    prepare_guest,
)
from nbd_postcopy.testbench.vm import Vm, largest_gap

PAGE = 4096


@pytest.fixture(scope="module")
def guest_image():
    return prepare_guest()


@pytest.fixture
def memcheck(run_dir):
    return build_memcheck(run_dir / "memcheck")


# --- preparation ---------------------------------------------------------------------------------


def test_prepare_guest_is_cached_and_instant(guest_image):
    started = time.monotonic()
    again = prepare_guest()
    assert again == guest_image
    assert time.monotonic() - started < 1.0
    assert guest_image.kernel.name.startswith("vmlinuz-") and guest_image.kernel.stat().st_size > 1 << 20


def test_the_kernel_package_is_resolved_from_the_cloud_metapackage():
    from nbd_postcopy.testbench.guest import _versioned_kernel_package

    assert re.fullmatch(r"linux-image-[0-9][\w.+-]*-cloud-amd64", _versioned_kernel_package())


def test_initramfs_holds_init_busybox_memcheck_and_console(guest_image):
    listing = subprocess.run(
        f"zcat {guest_image.initramfs} | cpio -itv", shell=True, capture_output=True, text=True, check=True
    ).stdout
    names = {line.split()[-1]: line for line in listing.splitlines()}
    assert {"init", "bin/busybox", "bin/memcheck", "dev/console", "proc", "sys"} <= set(names)
    assert names["init"].startswith("-rwxr-xr-x")
    assert names["dev/console"].startswith("crw")


def test_memcheck_is_static(memcheck):
    headers = subprocess.run(["readelf", "-l", memcheck], capture_output=True, text=True, check=True).stdout
    assert "program interpreter" not in headers


# --- memcheck on the host --------------------------------------------------------------------------


def test_memcheck_passes_on_host(memcheck):
    out = subprocess.run([memcheck, "mib=4", "seed=9", "passes=3", "mode=write"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert "MEMCHECK start mib=4 pages=1024 seed=9 mode=write" in out
    assert re.findall(r"OK pass=(\d+)", out) == ["1", "2", "3"]
    assert "FAIL" not in out


def _start_memcheck(memcheck: Path, processes, seed: int) -> tuple[subprocess.Popen, int]:
    proc = processes.start([memcheck, "mib=4", f"seed={seed}"], stdout=subprocess.PIPE, text=True)
    start = proc.stdout.readline()
    buffer = int(re.search(r"buffer=(0x[0-9a-f]+)", start).group(1), 16)
    while not proc.stdout.readline().startswith("OK pass="):
        pass
    return proc, buffer


def test_python_pattern_matches_memcheck(memcheck, processes):
    proc, buffer = _start_memcheck(memcheck, processes, seed=42)
    with open(f"/proc/{proc.pid}/mem", "rb") as mem:
        for page in (0, 1, 517, 1023):
            mem.seek(buffer + page * PAGE)
            assert mem.read(PAGE) == expected_page(42, page)


def test_memcheck_reports_a_corrupted_page(memcheck, processes):
    proc, buffer = _start_memcheck(memcheck, processes, seed=5)
    with open(f"/proc/{proc.pid}/mem", "r+b") as mem:
        mem.seek(buffer + 300 * PAGE + 8 * 7)
        mem.write((0xDEADBEEF).to_bytes(8, "little"))
    while not (line := proc.stdout.readline()).startswith("FAIL"):
        assert line, "memcheck exited without reporting the corruption"
    assert line.startswith("FAIL page=300 word=7 expected=0x")
    assert line.rstrip().endswith("got=0x00000000deadbeef")


def test_patterns_differ_by_seed_page_and_generation():
    page = expected_page(1, 5)
    assert page != expected_page(2, 5) and page != expected_page(1, 6) and page != expected_page(1, 5, 1)
    assert page != bytes(PAGE) and len(page) == PAGE


# --- console lines ---------------------------------------------------------------------------------


def test_parse_console_lines():
    assert parse_console_line("HEARTBEAT 42 t=12.345", 1.0) == Heartbeat(42, 12.345, 1.0)
    assert parse_console_line("[  3.1] noise OK pass=7", 2.0) == PassOk(7, 2.0)
    assert parse_console_line("FAIL pass=3 bad_pages=2", 3.0) == Failure("FAIL pass=3 bad_pages=2", 3.0)
    assert parse_console_line("MEMCHECK start mib=4 pages=1024 seed=9 mode=write buffer=0x1", 4.0) == Started(
        4, 1024, 9, "write", 4.0
    )
    assert parse_console_line("[    0.5] Linux version 6.1", 5.0) is None


def test_largest_gap():
    beats = [Heartbeat(i, 0.0, t) for i, t in enumerate([1.0, 1.05, 1.1, 1.6, 1.65])]
    assert largest_gap(beats) == pytest.approx(0.5)
    assert largest_gap(beats, start=0.0) == pytest.approx(1.0)
    assert largest_gap(beats, start=1.0, end=1.3) == pytest.approx(0.2)
    assert largest_gap([]) == 0.0


# --- the guest under QEMU --------------------------------------------------------------------------


@pytest.mark.slow
def test_guest_boots_and_verifies_memory(guest_image, run_dir):
    with Vm(guest_image, run_dir, name="boot", memory_mib=128, append="memcheck.seed=11 memcheck.mode=write") as vm:
        started = vm.console.wait_for(Started, timeout=30)[0]
        assert started.seed == 11 and started.mode == "write" and started.mib >= 32
        passes = vm.console.wait_for(PassOk, count=3, timeout=60)
        assert [p.number for p in passes] == [1, 2, 3]
        vm.console.wait_for(Heartbeat, count=5, timeout=10)  # (on a fast host 3 passes take under 0.25 s)
        beats = vm.console.events(Heartbeat)
        assert len(beats) >= 5
        assert [b.counter for b in beats] == list(range(1, len(beats) + 1))
        assert all(0 < b.guest_time - a.guest_time < 0.5 for a, b in zip(beats, beats[1:]))
        assert vm.console.events(Failure) == []
    assert vm.process.poll() is not None


@pytest.mark.slow
def test_guest_reports_a_page_corrupted_from_the_host(guest_image, run_dir):
    seed, page = 77, 1000
    with Vm(guest_image, run_dir, name="corrupt", memory_mib=128, append=f"memcheck.seed={seed}") as vm:
        vm.console.wait_for(PassOk, timeout=60)
        mark = vm.console.mark()
        fd = os.open(vm.ram_file, os.O_RDWR)
        try:
            with mmap.mmap(fd, 0) as ram:
                wanted = expected_page(seed, page)
                offset = ram.find(wanted[:64])
                assert offset >= 0 and offset % PAGE == 0, "checker page not found in the guest's RAM file"
                assert ram[offset:offset + PAGE] == wanted
                ram[offset + 16:offset + 24] = b"\xff" * 8
        finally:
            os.close(fd)
        failure = vm.console.wait_for(Failure, after=mark, timeout=30)[0]
        assert failure.line.startswith(f"FAIL page={page} word=2 ")
        assert failure.line.endswith("got=0xffffffffffffffff")
        summary = vm.console.wait_for(Failure, count=2, after=mark, timeout=30)[1]
        assert re.match(r"FAIL pass=\d+ bad_pages=1$", summary.line)
    assert not vm.ram_file.exists()
