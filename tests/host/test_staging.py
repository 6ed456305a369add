"""Staging on real kernel swap: a plain loop swap device, real workload processes, nothing mocked."""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import subprocess
from pathlib import Path

import pytest

from nbd_postcopy.common import linux
from nbd_postcopy.common.units import PAGE_SIZE
from nbd_postcopy.host.completion import CompletionError, complete_range
from nbd_postcopy.device.markers import MarkerCodec
from nbd_postcopy.host.memcg import AUTO_PREFIX, task_memcg
from nbd_postcopy.host.staging import StagingError, stage_range
from tests.swapdev import marker_image, plain_swap_device
from tests.workload import Workload

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (swap, memcg)")]

REPO = Path(__file__).resolve().parents[2]
def assert_all_swapped(work: Workload, swap_type: int) -> None:
    with linux.Pagemap(work.pid) as pagemap:
        entries = pagemap.entries(work.address, work.pages)
    assert not [i for i, e in enumerate(entries) if linux.is_present(e)]
    assert not [i for i, e in enumerate(entries) if not linux.is_swapped(e)]
    assert {linux.swap_type(e) for e in entries} == {swap_type}


def no_auto_memcg_left(pid: int, home: Path) -> bool:
    return task_memcg(pid)[1] == home and not list(home.glob(AUTO_PREFIX + "*"))


@pytest.mark.slow
@pytest.mark.parametrize("contents", ["--fresh", "--seed=7"], ids=["fresh", "touched-before"])
def test_stage_then_every_read_is_a_real_swap_in(plain_swap, processes, run_dir, codec, contents):
    """Fresh memory (like an -incoming QEMU's) and memory touched before staging (charged to the old memcg,
    so the purge needs the read-touch fallback) both end up entirely on the device, out of the swap cache."""
    work = Workload(processes, 64, contents)
    home = task_memcg(work.pid)[1]
    out = io.StringIO()
    report = stage_range(work.pid, work.address, work.length, codec, plain_swap, stream=out)

    assert report.pages == work.pages and report.seconds > 0
    assert_all_swapped(work, report.swap_type)
    assert report.memcg_swapcached_bytes == 0
    assert no_auto_memcg_left(work.pid, home)
    assert linux.find_swap(plain_swap).used_kib * 1024 >= work.length
    assert "writing markers: 16384/16384 pages" in out.getvalue()
    assert "paging out: 16384/16384 pages" in out.getvalue()
    if contents == "--fresh":
        assert report.fallback_pages == 0

    # Every page reads back its marker from the device: a real swap-in each (a plain device has no source).
    image = marker_image(codec, work.pages, run_dir / "markers")
    pswpin = linux.vmstat("pswpin")["pswpin"]
    assert work.command(f"verify-image {image}")["mismatched_pages"] == 0
    assert linux.vmstat("pswpin")["pswpin"] - pswpin >= work.pages
    work.exit()


@pytest.mark.slow
def test_stage_in_place_without_a_dedicated_memcg(plain_swap, processes, run_dir, codec):
    """--memcg none (what auto falls back to in a cgroup v2 leaf): the target never moves, nothing is
    created, and every page leaves the swap cache (cgroup v1: through the read-touch fallback alone; v2:
    memory.reclaim first, the fallback for the rest)."""
    work = Workload(processes, 16, "--fresh")
    version, home = task_memcg(work.pid)
    report = stage_range(work.pid, work.address, work.length, codec, plain_swap, memcg_name="none", quiet=True)

    if version == 1:
        assert report.fallback_pages == work.pages  # no bounded reclaim on v1: every page took the fallback
    assert_all_swapped(work, report.swap_type)
    assert no_auto_memcg_left(work.pid, home)
    pswpin = linux.vmstat("pswpin")["pswpin"]
    assert work.command(f"verify-image {marker_image(codec, work.pages, run_dir / 'markers')}")["mismatched_pages"] == 0
    assert linux.vmstat("pswpin")["pswpin"] - pswpin >= work.pages
    work.exit()


@pytest.mark.slow
def test_stage_command_line(plain_swap, processes, run_dir, codec):
    work = Workload(processes, 16, "--fresh")
    result = subprocess.run(
        [REPO / ".venv" / "bin" / "nbd-postcopy", "stage", "--pid", str(work.pid), "--address", hex(work.address),
         "--length", "16M", "--key", run_dir / "key", "--device", plain_swap],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"staged 4096 pages (16 MiB) of process {work.pid}" in result.stderr and "pages/s" in result.stderr
    with linux.Pagemap(work.pid) as pagemap:
        assert all(linux.is_swapped(e) for e in pagemap.entries(work.address, work.pages))
    work.exit()


# --- refusals: each leaves the target untouched -----------------------------------------------------


def refused(work: Workload, codec: MarkerCodec, device: str, match: str, **overrides) -> None:
    home = task_memcg(work.pid)[1]
    args = dict(pid=work.pid, address=work.address, length=work.length)
    args.update(overrides)
    with pytest.raises(StagingError, match=match):
        stage_range(args["pid"], args["address"], args["length"], codec, device, quiet=True)
    assert no_auto_memcg_left(work.pid, home)
    with linux.Pagemap(work.pid) as pagemap:
        assert not any(linux.is_swapped(e) for e in pagemap.entries(work.address, work.pages))


@pytest.mark.slow
def test_refuses_when_another_swap_device_has_priority(swap_lock, processes, codec):
    work = Workload(processes, 4, "--fresh")
    with plain_swap_device(32, priority=100) as low, plain_swap_device(32, priority=200) as high:
        refused(work, codec, low, rf"priority 100 but {high} \(priority 200\) is at least as high")
    work.exit()


@pytest.mark.slow
def test_refuses_a_device_too_small(swap_lock, processes, codec):
    work = Workload(processes, 64, "--fresh")
    with plain_swap_device(32) as small:
        refused(work, codec, small, r"has \d+ free slots; staging 16384 pages needs \d+ \(the range plus headroom\)")
    work.exit()


@pytest.mark.slow
def test_refuses_bad_targets(plain_swap, processes, codec):
    work = Workload(processes, 4, "--fresh")
    refused(work, codec, plain_swap, r"0x1000-0x2000 is not inside anonymous private writable mappings",
            address=0x1000, length=PAGE_SIZE)
    refused(work, codec, plain_swap, r"is not inside anonymous private writable mappings",
            length=work.length + 64 * PAGE_SIZE)
    refused(work, codec, plain_swap, r"must be positive multiples of 4096", address=work.address + 1)
    with pytest.raises(StagingError, match=r"/dev/null is not an active swap device"):
        stage_range(work.pid, work.address, work.length, codec, "/dev/null", quiet=True)
    work.exit()
    gone = work.pid
    with pytest.raises(StagingError, match=rf"process {gone} does not exist"):
        stage_range(gone, work.address, work.length, codec, plain_swap, quiet=True)


def test_command_line_refusal_is_one_clear_line(run_dir):
    key = run_dir / "key"
    key.write_bytes(os.urandom(32))
    result = subprocess.run(
        [REPO / ".venv" / "bin" / "nbd-postcopy", "stage", "--pid", str(os.getpid()), "--address", "0x1000",
         "--length", "4K", "--key", key, "--device", "/dev/null"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("nbd-postcopy stage: error: ") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


# --- end to end on the real postcopy device --------------------------------------------------------


@pytest.mark.slow
def test_staged_workload_reads_the_source_image_through_real_swap_ins(swap_lock, processes, run_dir, codec):
    """Source image of random data -> nbd-postcopy serve -> plugin device attached as swap -> workload staged
    -> device armed: every byte the workload reads equals the source, each page a real swap-in that the
    device fetched on demand."""
    from nbd_postcopy.device.control import request
    from tests import servers
    from tests.swapdev import attached_postcopy_swap

    mib = 64
    image = run_dir / "ram.img"
    servers.write_image(image, mib << 20)
    with servers.serve("nbd-postcopy", run_dir, image=image) as source:
        keys = {"source": source.uri("unix"), "size": mib << 20, "key": run_dir / "key", "prefetch": "off"}
        with attached_postcopy_swap(run_dir, keys) as swap:
            work = Workload(processes, mib, "--fresh")
            # Probes at swapon time (blkid) read a few never-written slots; count only what comes after.
            anomalies = request(str(swap.control), "status")["anomalies"]
            report = stage_range(work.pid, work.address, work.length, codec, swap.device,
                                 control=str(swap.control), quiet=True)
            assert report.device_mapped == work.pages
            assert_all_swapped(work, report.swap_type)
            with pytest.raises(CompletionError, match="is not armed"):  # it would read markers in
                complete_range(work.pid, work.address, work.length, control=str(swap.control), quiet=True)
            assert request(str(swap.control), "arm")["armed"]

            pswpin = linux.vmstat("pswpin")["pswpin"]
            assert work.command(f"verify-image {image}")["mismatched_pages"] == 0
            swapped_in = linux.vmstat("pswpin")["pswpin"] - pswpin
            status = request(str(swap.control), "status")
            assert swapped_in >= work.pages
            assert status["fetched_demand"] == work.pages and status["fetched_prefetch"] == 0
            assert status["remaining"] == 0 and status["complete"] and status["anomalies"] == anomalies
            work.exit()


@pytest.mark.slow
def test_a_failed_verify_zeroes_the_range_and_restores_the_memcg(swap_lock, processes, run_dir, codec):
    """A device whose map disagrees (it already holds another range) fails the cross-check: the error says
    so and what state is left, the range holds zeros (no marker can be read as data), the memcg is gone."""
    from tests import servers
    from tests.swapdev import attached_postcopy_swap

    image = run_dir / "ram.img"
    servers.write_image(image, 16 << 20)
    with servers.serve("nbd-postcopy", run_dir, image=image) as source:
        keys = {"source": source.uri("unix"), "size": 16 << 20, "key": run_dir / "key"}
        with attached_postcopy_swap(run_dir, keys) as swap:
            first = Workload(processes, 16, "--fresh")
            stage_range(first.pid, first.address, first.length, codec, swap.device, control=str(swap.control),
                        quiet=True)
            second = Workload(processes, 8, "--fresh")
            home = task_memcg(second.pid)[1]
            with pytest.raises(StagingError) as info:
                stage_range(second.pid, second.address, second.length, codec, swap.device,
                            control=str(swap.control), quiet=True)
            message = str(info.value)
            assert "verify: the device maps 6144 guest pages but 2048 were staged" in message
            assert "state left: the range was overwritten with zeros" in message
            assert f"process {second.pid} is back in memcg {home}" in message
            assert no_auto_memcg_left(second.pid, home)
            assert second.command("checksum")["sha256"] == hashlib.sha256(bytes(second.length)).hexdigest()
            first.exit()
            second.exit()


@pytest.mark.parametrize("fails_at", ["view", "memcg", "move"])
def test_stage_range_closes_what_it_opened_on_every_exit(monkeypatch, fails_at):
    """The cleanups, without a swap device: each step fails in turn; the undo (once the memcg is there)
    runs first, then the pagemap view closes, then the pidfd: the last opened first."""
    from nbd_postcopy.host import staging

    events, pidfds = [], []
    real_pidfd_open = linux.pidfd_open

    def is_open(fd: int) -> bool:
        try:
            os.fstat(fd)
            return True
        except OSError:
            return False

    def pidfd_open(pid):
        pidfds.append(real_pidfd_open(pid))
        return pidfds[-1]

    class View:
        def __init__(self, *args):
            if fails_at == "view":
                raise OSError(5, "view failed")

        def close(self):
            events.append(f"close view, pidfd {'open' if is_open(pidfds[0]) else 'closed'}")

    class FakeMemcg:
        def move(self, pid):
            raise OSError(5, "move failed")

    def for_target(pid, name):
        if fails_at == "memcg":
            raise OSError(5, "memcg failed")
        return FakeMemcg(), Path("/home")

    monkeypatch.setattr(staging, "validate", lambda *args: None)
    monkeypatch.setattr(staging.linux, "pidfd_open", pidfd_open)
    monkeypatch.setattr(staging, "_Pages", View)
    monkeypatch.setattr(staging.Memcg, "for_target", staticmethod(for_target))
    monkeypatch.setattr(staging, "_undo", lambda *args: events.append("undo") or "state left: nothing was changed")
    with pytest.raises(StagingError, match=f"{fails_at} failed"):
        stage_range(os.getpid(), 0x10000, PAGE_SIZE, MarkerCodec(b"k" * 32), "/dev/null")
    assert not is_open(pidfds[0])
    assert events == {"view": [], "memcg": ["close view, pidfd open"],
                      "move": ["undo", "close view, pidfd open"]}[fails_at]


def test_a_shmem_page_is_swap_backed_but_not_swap_cache():
    """The kpageflags bits the swap-cache check reads: a shared anonymous page (shmem, like the O_DIRECT
    buffer the verify step reads into) is swap-backed and not swap cache. Testing the swap-backed bit for
    the swap-cache one took such a page, in a frame the page-out had freed, for a straggler."""
    import mmap
    from nbd_postcopy.host.staging import _unmapped_swap_cache

    buf = mmap.mmap(-1, PAGE_SIZE)  # MAP_SHARED | MAP_ANONYMOUS: shmem
    try:
        buf[0] = 1
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))  # the temporary export ends here
        with linux.Pagemap(os.getpid()) as pagemap:
            flags = linux.page_flags([linux.pfn(pagemap.entries(address, 1)[0])])[0]
    finally:
        buf.close()
    assert flags >> linux.KPF_SWAPBACKED & 1 and not flags >> linux.KPF_SWAPCACHE & 1
    assert not _unmapped_swap_cache(flags & ~(1 << linux.KPF_MMAP))
    swap_cache = 1 << linux.KPF_SWAPCACHE  # a THP's tail page in the swap cache shows no KPF_SWAPBACKED
    assert _unmapped_swap_cache(swap_cache) and not _unmapped_swap_cache(swap_cache | 1 << linux.KPF_MMAP)
