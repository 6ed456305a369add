"""The Linux wrappers, against real processes (no swap needed), plus the progress bar and the memcg."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import threading

import pytest

from nbd_postcopy.common import linux
from nbd_postcopy.common.units import PAGE_SIZE
from nbd_postcopy.host.memcg import Memcg, task_memcg
from nbd_postcopy.common.progress import Progress
from tests.workload import Workload

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (pagemap PFNs, memcg)")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_pidfd_open_dead_process_says_so():
    with pytest.raises(OSError) as info:
        linux.pidfd_open(dead_pid())
    assert info.value.errno == errno.ESRCH
    assert "does not exist" in str(info.value)


def test_swap_entry_fields():
    entry = linux.PM_SWAP | (123456 << 5) | 3
    assert linux.is_swapped(entry) and not linux.is_present(entry)
    assert linux.swap_type(entry) == 3 and linux.swap_offset(entry) == 123456
    present = linux.PM_PRESENT | 0xABCDE
    assert linux.is_present(present) and linux.pfn(present) == 0xABCDE


def test_fast_pagemap_summaries():
    from array import array

    swapped = array("Q", [linux.PM_SWAP | (offset << 5) | 2 for offset in range(1, 1000)])
    assert linux.all_swapped_out(swapped) and linux.common_swap_type(swapped) == 2
    mixed = array("Q", swapped)
    mixed[500] = linux.PM_SWAP | (7 << 5) | 3
    assert linux.all_swapped_out(mixed) and linux.common_swap_type(mixed) is None
    mixed[10] = linux.PM_PRESENT | 0x1234
    assert not linux.all_swapped_out(mixed)
    mixed[10] = 0  # neither present nor swapped (never touched)
    assert not linux.all_swapped_out(mixed)


def test_parse_swaps():
    text = ("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
            "/dev/loop3                              partition\t1048572\t\t4096\t\t32767\n"
            "/var/tmp/my\\040swap                     file\t\t8188\t\t0\t\t-2\n")
    loop, file_ = linux.parse_swaps(text)
    assert loop == linux.SwapArea("/dev/loop3", "partition", 1048572, 4096, 32767)
    assert loop.size_pages == 262143 and loop.free_pages == 262143 - 1024
    assert file_.filename == "/var/tmp/my swap" and file_.priority == -2


def test_page_runs():
    assert linux.page_runs([5, 1, 2, 3, 9, 10]) == [(1, 3), (5, 1), (9, 2)]
    assert linux.page_runs([]) == []


def test_vmstat_and_zswap():
    counters = linux.vmstat("pswpin", "pswpout", "nr_swapcached")
    assert set(counters) == {"pswpin", "pswpout", "nr_swapcached"}
    with pytest.raises(OSError, match="no counter"):
        linux.vmstat("no_such_counter")
    assert isinstance(linux.zswap_enabled(), bool)


def test_vm_write_read_round_trip(processes):
    work = Workload(processes, 4, "--seed", "3")
    try:
        data = os.urandom(3 * PAGE_SIZE)
        linux.process_vm_writev(work.pid, data, work.address + PAGE_SIZE)
        back = bytearray(len(data))
        linux.process_vm_readv(work.pid, back, work.address + PAGE_SIZE)
        assert back == data
        with pytest.raises(OSError, match="process_vm_writev .* at 0x1000 in process"):
            linux.process_vm_writev(work.pid, data, 0x1000)
    finally:
        work.exit()


def test_uncovered_ranges(processes):
    work = Workload(processes, 4, "--fresh")
    try:
        assert linux.uncovered_ranges(work.pid, work.address, work.length) == []
        holes = linux.uncovered_ranges(work.pid, 0x1000, PAGE_SIZE)
        assert holes == [(0x1000, 0x2000)]
        code = next(m for m in linux.read_maps(work.pid) if "x" in m.perms)
        assert linux.uncovered_ranges(work.pid, code.start, PAGE_SIZE) == [(code.start, code.start + PAGE_SIZE)]
    finally:
        work.exit()


@root
def test_pagemap_present_and_fresh(processes):
    touched = Workload(processes, 2, "--seed", "1")
    fresh = Workload(processes, 2, "--fresh")
    try:
        with linux.Pagemap(touched.pid) as pagemap:
            entries = pagemap.entries(touched.address, touched.pages)
        assert all(linux.is_present(e) and linux.pfn(e) for e in entries)
        with linux.Pagemap(fresh.pid) as pagemap:
            entries = pagemap.entries(fresh.address, fresh.pages)
        assert not any(linux.is_present(e) or linux.is_swapped(e) for e in entries)
    finally:
        touched.exit()
        fresh.exit()


@root
def test_memcg_charges_pages_written_after_the_move(processes):
    """A fresh page written after the move is charged to the new memcg (kpagecgroup shows its inode)."""
    work = Workload(processes, 1, "--fresh")
    memcg, home = Memcg.for_target(work.pid)
    try:
        assert memcg.created and memcg.path.parent == home
        memcg.move(work.pid)
        assert task_memcg(work.pid)[1] == memcg.path
        linux.process_vm_writev(work.pid, b"x" * work.length, work.address)
        with linux.Pagemap(work.pid) as pagemap:
            frames = [linux.pfn(e) for e in pagemap.entries(work.address, work.pages)]
        assert set(linux.page_cgroups(frames)) == {memcg.inode}
        assert memcg.stat()["rss"] >= work.length
    finally:
        memcg.remove(home)
        work.exit()
    assert not memcg.path.exists()


def test_progress_quiet_off_a_terminal():
    out = io.StringIO()
    bar = Progress("copying", 100, stream=out)
    for _ in range(10):
        bar.advance(10)
    assert out.getvalue() == ""
    bar.finish("done")
    line = out.getvalue()
    assert line.startswith("copying: 100/100 pages in ") and "pages/s" in line and line.endswith("; done\n")
    silent = io.StringIO()
    Progress("x", 1, stream=silent, quiet=True).finish()
    assert silent.getvalue() == ""


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_on_a_terminal():
    out = FakeTty()
    bar = Progress("paging", 200, unit="pages", stream=out, interval=0)
    bar.update(50)
    assert out.getvalue().startswith("\rpaging [") and " 50/200 pages  25% " in out.getvalue()
    assert "ETA" in bar.line()
    bar.update(200)
    bar.finish()
    assert "\r\x1b[Kpaging: 200/200 pages in " in out.getvalue() and out.getvalue().endswith("pages/s)\n")


def test_drain_lru_batches_reaches_the_kernel():
    """move_pages(2) of our own page to its own node: the kernel drains every CPU's LRU batches first
    (this machine has NUMA, so the call must succeed here; staging relies on it between verify rounds)."""
    assert linux.drain_lru_batches() is True


def test_terminate_kills_what_ignores_sigterm():
    process = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert process.stdout.readline() == b"ready\n"
    linux.terminate(process, timeout=0.2)
    assert process.returncode == -9
    linux.terminate(process)  # a process already reaped: nothing to do


def test_cpu_lists_parse_and_format_as_the_kernel_writes_them():
    allowed = sorted(os.sched_getaffinity(0))
    assert linux.parse_cpu_list(str(allowed[0])) == {allowed[0]}
    assert linux.parse_cpu_list(linux.format_cpu_list(allowed)) == set(allowed)
    assert linux.format_cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert linux.format_cpu_list([3]) == "3"
    for bad, message in [("", "is not a CPU list"), ("1-", "is not a CPU list"), ("a", "is not a CPU list"),
                         ("-1", "is not a CPU list"), ("1-0", "the range runs backwards"),
                         ("4095", "CPU 4095 is not one this process may use")]:
        with pytest.raises(ValueError, match=message):
            linux.parse_cpu_list(bad)


def test_pin_this_thread_leaves_the_other_threads_alone():
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs two CPUs: on one, the pinned and the unpinned set are the same")
    seen = {}

    def pinned() -> None:
        linux.pin_this_thread(frozenset({min(allowed)}))
        seen["thread"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join()
    assert seen["thread"] == {min(allowed)}
    assert os.sched_getaffinity(0) == allowed


def test_wait_child_exit_tells_an_exit_from_a_timeout():
    process = subprocess.Popen([sys.executable, "-c", "import signal, time, os; "
                                "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.04), os._exit(3))); "
                                "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert process.stdout.readline() == b"ready\n"
    assert not linux.wait_child_exit(process, 0.05)  # still running
    linux.terminate(process)
    assert process.returncode == 3  # it exited on its own after SIGTERM, and was reaped
    assert linux.wait_child_exit(process, 0.1)  # reaped already: nothing to wait for
