"""Completion on real kernel swap: stage a workload on a plain loop swap device, then bring it all back in."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_postcopy.common import linux
from nbd_postcopy.common.units import PAGE_SIZE
from nbd_postcopy.host.completion import CompletionError, complete_range
from nbd_postcopy.device.markers import MarkerCodec
from nbd_postcopy.host.memcg import V1_ROOT, Memcg, task_memcg
from nbd_postcopy.host.staging import stage_range
from tests.swapdev import REPO, marker_image, plain_swap_device
from tests.servers import write_image as servers_image
from tests.workload import Workload, seeded_contents

KSM = "/sys/kernel/mm/ksm"
KHUGEPAGED = "/sys/kernel/mm/transparent_hugepage/khugepaged"
LIMIT_MEMCG = "nbd-postcopy-test-limit"

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (swap, memcg)")]


def swapped_pages(work: Workload) -> int:
    with linux.Pagemap(work.pid) as pagemap:
        return sum(linux.is_swapped(e) for e in pagemap.entries(work.address, work.pages))


@pytest.mark.slow
def test_complete_brings_every_page_in(plain_swap, processes, run_dir, codec):
    work = Workload(processes, 64, "--fresh")
    stage_range(work.pid, work.address, work.length, codec, plain_swap, quiet=True)
    assert swapped_pages(work) == work.pages
    pswpin = linux.vmstat("pswpin")["pswpin"]
    out = io.StringIO()

    report = complete_range(work.pid, work.address, work.length, stream=out)

    assert report.swapped_at_start == work.pages and report.brought_in == work.pages
    assert linux.vmstat("pswpin")["pswpin"] - pswpin >= work.pages
    assert report.pswpin >= work.pages
    assert swapped_pages(work) == 0
    line = out.getvalue()
    assert line.startswith("completing: 16384/16384 pages in ") and "pages/s)" in line and line.count("\n") == 1
    # Nothing is read from the device any more: the workload's reads are all minor faults now...
    pswpin = linux.vmstat("pswpin")["pswpin"]
    image = marker_image(codec, work.pages, run_dir / "markers")
    assert work.command(f"verify-image {image}")["mismatched_pages"] == 0
    assert linux.vmstat("pswpin")["pswpin"] - pswpin < work.pages // 100
    work.exit()


@pytest.mark.slow
def test_complete_skips_what_is_already_in_and_respects_the_rate_cap(plain_swap, processes, codec):
    work = Workload(processes, 16, "--fresh")
    stage_range(work.pid, work.address, work.length, codec, plain_swap, quiet=True)
    assert work.command("touch")["pages"] == work.pages  # the workload faults everything in itself
    report = complete_range(work.pid, work.address, work.length, quiet=True)
    assert report.swapped_at_start == 0 and report.brought_in == 0

    restaged = Workload(processes, 8, "--fresh")
    stage_range(restaged.pid, restaged.address, restaged.length, codec, plain_swap, quiet=True)
    rate = 16 << 20  # 8 MiB at 16 MiB/s: about half a second
    report = complete_range(restaged.pid, restaged.address, restaged.length, chunk_bytes=256 << 10,
                            rate_bytes=rate, quiet=True)
    assert report.brought_in == restaged.pages and swapped_pages(restaged) == 0
    assert report.seconds >= 0.8 * (restaged.length - (256 << 10) * 5) / rate
    work.exit()
    restaged.exit()


def test_complete_refuses_bad_input(processes):
    work = Workload(processes, 1, "--fresh")
    with pytest.raises(CompletionError, match="multiples of 4096"):
        complete_range(work.pid, work.address + 1, PAGE_SIZE, quiet=True)
    with pytest.raises(CompletionError, match="chunk size"):
        complete_range(work.pid, work.address, PAGE_SIZE, chunk_bytes=100, quiet=True)
    with pytest.raises(CompletionError, match=r"0x1000-0x2000 is not inside anonymous private writable mappings"):
        complete_range(work.pid, 0x1000, PAGE_SIZE, quiet=True)
    work.exit()
    with pytest.raises(CompletionError, match=rf"process {work.pid} does not exist"):
        complete_range(work.pid, work.address, PAGE_SIZE, quiet=True)


@pytest.mark.slow
def test_complete_command_line(plain_swap, processes, codec):
    work = Workload(processes, 16, "--fresh")
    stage_range(work.pid, work.address, work.length, codec, plain_swap, quiet=True)
    result = subprocess.run(
        [REPO / ".venv" / "bin" / "nbd-postcopy", "complete", "--pid", str(work.pid), "--address", hex(work.address),
         "--length", str(work.length), "--chunk-mib", "0.5"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "completing: 4096/4096 pages" in result.stderr
    assert "brought in 4096 of 4096 swapped pages" in result.stderr and "MiB/s" in result.stderr
    assert swapped_pages(work) == 0
    work.exit()


@pytest.mark.slow
def test_stage_arm_complete_detach_on_the_real_device(swap_lock, processes, run_dir, codec):
    """The administrator's flow: `nbd-postcopy stage` (records the target), arm, demand faults, then
    `setup-swap.sh detach`, which completes (fetching every page not yet local) and tears down. The
    workload then holds the source image byte for byte, and nothing is left (the fixture fails on
    leftovers). Prefetch is off, so the touched pages are surely demand faults: a prefetcher can pull a
    64 MiB image before the first touch."""
    from nbd_postcopy.device.control import request
    from tests import servers
    from tests.swapdev import attached_postcopy_swap, in_proc_swaps, run_setup_swap

    mib = 64
    image = run_dir / "ram.img"
    servers.write_image(image, mib << 20)
    with servers.serve("nbd-postcopy", run_dir, image=image) as source:
        keys = {"source": source.uri("unix"), "size": mib << 20, "key": run_dir / "key", "prefetch": "off"}
        with attached_postcopy_swap(run_dir, keys) as swap:
            work = Workload(processes, mib, "--fresh")
            staged = subprocess.run(
                [REPO / ".venv" / "bin" / "nbd-postcopy", "stage", "--pid", str(work.pid), "--address",
                 hex(work.address), "--length", str(work.length), "--key", run_dir / "key", "--device",
                 swap.device, "--control", swap.control],
                capture_output=True, text=True, timeout=300)
            assert staged.returncode == 0, staged.stderr
            assert (swap.state_dir / "target").read_text() == (
                f"target_pid={work.pid}\ntarget_address={work.address:#x}\ntarget_length={work.length}\n")
            assert request(str(swap.control), "arm")["armed"]
            pswpin = linux.vmstat("pswpin")["pswpin"]
            assert work.command("touch 64")["pages"] == work.pages // 64  # every 64th page
            assert request(str(swap.control), "status")["fetched_demand"] >= work.pages // 64

            detach = run_setup_swap("detach", swap.name, timeout=300, env={
                "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"})
            assert detach.returncode == 0, detach.stdout + detach.stderr
            assert "brought in" in detach.stdout + detach.stderr
            assert not in_proc_swaps(swap.device)
            assert linux.vmstat("pswpin")["pswpin"] - pswpin >= work.pages
            assert swapped_pages(work) == 0
            assert work.command(f"verify-image {image}")["mismatched_pages"] == 0
            work.exit()


# --- after completion the pages are ordinary anonymous memory: KSM, THP and ordinary swap work --------


@contextlib.contextmanager
def sysfs_values(values: dict[str, str]) -> Iterator[None]:
    """Set sysfs knobs for the block and restore every one of them in `finally`."""
    saved = {}
    try:
        for path, value in values.items():
            saved[path] = Path(path).read_text().strip()
            Path(path).write_text(value)
        yield
    finally:
        for path, value in reversed(saved.items()):
            Path(path).write_text(value)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.1)


@contextlib.contextmanager
def completed_on_real_device(run_dir: Path, processes, codec: MarkerCodec, image: Path, *workload_options: str,
                             memcg_name: str = "auto"):
    """A workload staged onto the real postcopy device serving `image`, armed and completed.

    Yields (workload, swap); the workload outlives the device (the `processes` fixture ends it).
    Depends: swap_lock in the caller, run_dir, processes.
    """
    from nbd_postcopy.device.control import request
    from tests import servers
    from tests.swapdev import attached_postcopy_swap

    length = image.stat().st_size
    with servers.serve("nbd-postcopy", run_dir, image=image) as source:
        keys = {"source": source.uri("unix"), "size": length, "key": run_dir / "key"}
        with attached_postcopy_swap(run_dir, keys) as swap:
            work = Workload(processes, length >> 20, "--fresh", *workload_options)
            stage_range(work.pid, work.address, work.length, codec, swap.device, control=str(swap.control),
                        memcg_name=memcg_name, quiet=True)
            request(str(swap.control), "arm")
            report = complete_range(work.pid, work.address, work.length, control=str(swap.control), quiet=True)
            assert report.device_complete and swapped_pages(work) == 0
            yield work, swap


@pytest.mark.slow
def test_ksm_merges_pages_after_they_came_in(swap_lock, processes, run_dir, codec):
    distinct = 256
    image = run_dir / "ram.img"
    image.write_bytes(seeded_contents(5, 64 << 20, distinct))
    with completed_on_real_device(run_dir, processes, codec, image, "--mergeable", f"--distinct={distinct}") as (work, _):
        merging = Path(f"/proc/{work.pid}/ksm_merging_pages")
        assert int(merging.read_text()) == 0
        with sysfs_values({f"{KSM}/pages_to_scan": "5000", f"{KSM}/sleep_millisecs": "10", f"{KSM}/run": "1"}):
            wait_until(lambda: int(merging.read_text()) >= work.pages - 2 * distinct, 120, "KSM merging")
        assert work.command(f"verify-image {image}")["mismatched_pages"] == 0


@pytest.mark.slow
def test_khugepaged_collapses_the_range_after_completion(swap_lock, processes, run_dir, codec):
    image = run_dir / "ram.img"
    servers_image(image, 64 << 20)
    with completed_on_real_device(run_dir, processes, codec, image, "--hugepage") as (work, _):
        assert work.command("smaps")["AnonHugePages"] == 0  # staged and swapped in as 4 KiB pages
        with sysfs_values({f"{KHUGEPAGED}/scan_sleep_millisecs": "10", f"{KHUGEPAGED}/alloc_sleep_millisecs": "10"}):
            wait_until(lambda: work.command("smaps")["AnonHugePages"] > 0, 120, "khugepaged collapsing the range")
        assert work.command(f"verify-image {image}")["mismatched_pages"] == 0


@pytest.mark.slow
def test_ordinary_swap_keeps_working(swap_lock, processes, run_dir, codec):
    """New data paged out while the postcopy device is still attached lands in its overlay and comes back
    exact; after detach, a memcg limit pushes the range out to an ordinary swap device and back."""
    from nbd_postcopy.device.control import request

    image = run_dir / "ram.img"
    servers_image(image, 32 << 20)
    limited = None
    with plain_swap_device(128, priority=100) as ordinary:
        try:
            # Staged in a named memcg, the range stays charged there: its limit then applies to it.
            with completed_on_real_device(run_dir, processes, codec, image, memcg_name=LIMIT_MEMCG) as (work, swap):
                limited = Memcg(*task_memcg(work.pid), created=True)
                work.command("fill 11")
                overlay_before = request(str(swap.control), "status")["overlay_pages"]
                pidfd = linux.pidfd_open(work.pid)
                try:
                    linux.process_madvise(pidfd, work.address, work.length, linux.MADV_PAGEOUT)
                finally:
                    os.close(pidfd)
                wait_until(lambda: request(str(swap.control), "status")["overlay_pages"] - overlay_before
                           >= work.pages // 2, 60, "the page-out reaching the device's overlay")
                assert linux.find_swap(ordinary).used_kib == 0
                limited.purge()  # out of the swap cache: the reads below come from the device's overlay
                assert work.command("verify-seed")["mismatched_pages"] == 0
                # leaving the block detaches the postcopy device (swapoff reads anything left back in)
            pswpout = linux.vmstat("pswpout")["pswpout"]
            (limited.path / "memory.limit_in_bytes").write_text(str(8 << 20))
            assert linux.vmstat("pswpout")["pswpout"] - pswpout >= work.pages // 2
            assert linux.find_swap(ordinary).used_kib > 0
            assert work.command("verify-seed")["mismatched_pages"] == 0
        finally:
            if limited is not None:
                work.exit()
                limited.remove(V1_ROOT)
