"""Staging: make a live process's anonymous range "swapped out to the postcopy device".

`stage_range()` does, in order (docs/DESIGN.md, "Integrity hazards and their guards"):

1. validate the target, the range, the swap device (active, free slots, highest priority) and zswap;
2. move the target into a dedicated memcg, BEFORE any page is written (charges do not move here);
3. write a keyed marker into every page (the device learns slot -> guest page from these writes);
4. page the range out with process_madvise(MADV_PAGEOUT) and wait for the writeback;
5. purge the swap cache by reclaiming the memcg; pages it could not drop (pages touched before staging
   stay charged to their old memcg) get the per-CPU read-touch + MADV_PAGEOUT fallback, and a page that
   turns up in the swap cache again a moment later gets it once more (up to VERIFY_ATTEMPTS);
6. verify: every page is a swap entry (pagemap) of one swap type, and sampled slots of the device hold
   those pages' markers (which proves the type is the device's: /proc/swaps row order is not the swap
   type once a lower type was swapped off); none is present; none is in the swap cache (per page: the
   frame it had is no longer an unmapped swap-cache page of its memcg, per /proc/kpageflags and
   /proc/kpagecgroup; and the memcg's swapcached counter is 0); and the device's own map agrees when a
   control socket is given.

With the default `memcg_name="auto"` the memcg is temporary: afterwards the target is back in its own
memcg and the dedicated one is removed. With `"none"` (and with `"auto"` where cgroup v2 allows no memory-
controlled child, as in a systemd service) there is no dedicated memcg: the target stays where it is, and
step 5 reclaims from its memcg no more than that memcg has in the swap cache (memcg.InPlace). On failure
after the markers were written, the range is overwritten with zeros so that no marker can ever be read as
guest data, the target goes back to its memcg and the dedicated memcg is removed.
Staging destroys whatever the range held before; it is meant for fresh destination RAM.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..common import linux
from ..common.units import PAGE_SIZE
from ..device.control import ControlError, request
from ..device.markers import MarkerCodec
from . import attachment
from .memcg import Memcg, find_by_inode
from ..common.progress import Progress

log = logging.getLogger(__name__)

BATCH_PAGES = 256  # marker pages per process_vm_writev (1 MiB)
PAGEOUT_CHUNK_PAGES = 2048  # 8 MiB per process_madvise, for progress
MIN_HEADROOM_PAGES = 64  # free slots beyond the range: reclaim skips anon memory when swap is full
DEVICE_SAMPLES = 32  # pages whose slot is read back from the device
FALLBACK_ROUNDS = 4
VERIFY_ATTEMPTS = 10  # rounds of fallback for a page seen in the swap cache again after a round
WRITEBACK_TIMEOUT = 120.0
SETTLE_SECONDS = 1.0


class StagingError(Exception):
    """Staging failed or was refused; the message says which check and which pages."""


@dataclass
class StageReport:
    pid: int
    address: int
    pages: int
    device: str
    swap_type: int
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    fallback_pages: int = 0
    memcg_swapcached_bytes: int = 0
    memcg_collateral_bytes: int = 0  # staging in place: other memory of the memcg the purge paged out
    global_swapcached_pages: int = 0
    device_mapped: int | None = None

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        phases = ", ".join(f"{name} {secs:.2f}s" for name, secs in self.phases.items())
        text = (f"staged {self.pages} pages ({self.pages * PAGE_SIZE >> 20} MiB) of process {self.pid} at "
                f"{self.address:#x} onto {self.device} (swap type {self.swap_type}) in {self.seconds:.2f}s "
                f"({self.pages_per_second:,.0f} pages/s: {phases})")
        if self.fallback_pages:
            text += f"; {self.fallback_pages} pages needed the read-touch fallback"
        if self.memcg_collateral_bytes:
            text += (f"; the in-place purge also paged out {self.memcg_collateral_bytes >> 20} MiB of other memory "
                     "of the target's cgroup")
        if self.device_mapped is not None:
            text += f"; device maps {self.device_mapped} pages"
        return text


# --- validation -------------------------------------------------------------------------------------


def required_free_pages(pages: int) -> int:
    """Free swap slots staging needs: the range plus headroom for reclaim."""
    return pages + max(MIN_HEADROOM_PAGES, pages // 200)


def validate(pid: int, address: int, length: int, device: str) -> linux.SwapArea:
    """Check everything that can be checked before touching the target; returns the device's swap area."""
    if os.geteuid() != 0:
        raise StagingError("staging needs root (pagemap swap entries, memcg, process_madvise)")
    if address % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
        raise StagingError(f"address {address:#x} and length {length} must be positive multiples of {PAGE_SIZE}")
    try:
        holes = linux.uncovered_ranges(pid, address, length)
    except OSError as exc:
        raise StagingError(str(exc.strerror)) from None
    if holes:
        start, end = holes[0]
        raise StagingError(
            f"range {address:#x}-{address + length:#x} is not inside anonymous private writable mappings of "
            f"process {pid}: {start:#x}-{end:#x} is not (see /proc/{pid}/maps)")
    if linux.zswap_enabled():
        raise StagingError("zswap is enabled: pages would be compressed in RAM instead of written to the device "
                           "(echo N > /sys/module/zswap/parameters/enabled)")
    area = linux.find_swap(device)
    if area is None:
        raise StagingError(f"{device} is not an active swap device (not in /proc/swaps); attach it first "
                           "(scripts/setup-swap.sh attach)")
    pages = length // PAGE_SIZE
    need = required_free_pages(pages)
    if area.free_pages < need:
        raise StagingError(f"swap device {device} has {area.free_pages} free slots; staging {pages} pages needs "
                           f"{need} (the range plus headroom)")
    rivals = [a for a in linux.read_swaps() if a != area and a.priority >= area.priority]
    if rivals:
        names = ", ".join(f"{a.filename} (priority {a.priority})" for a in rivals)
        raise StagingError(f"swap device {device} has priority {area.priority} but {names} is at least as high: "
                           f"MADV_PAGEOUT would put pages there; swapon {device} with a higher priority")
    return area


def _device_status(control: str) -> dict:
    try:
        status = request(control, "status")
    except ControlError as exc:
        raise StagingError(str(exc)) from None
    if "error" in status:
        raise StagingError(f"control socket {control}: {status['error']}")
    return status


# --- the steps --------------------------------------------------------------------------------------


@contextlib.contextmanager
def pinned_to(cpu: int) -> Iterator[None]:
    """Run on one CPU: the per-CPU LRU batches that hold freshly faulted pages are then drained by us."""
    before = frozenset(os.sched_getaffinity(0))
    linux.pin_this_thread(frozenset({cpu}))
    try:
        yield
    finally:
        linux.pin_this_thread(before)


def write_pages(pid: int, address: int, count: int, header_of: Callable[[int], bytes] | None,
                bar: Progress | None = None) -> None:
    """Write page i = `header_of(i)` followed by zeros to each of the `count` pages from `address`.

    With `header_of=None` every page is written with zeros. Batches go through process_vm_writev, or
    through /proc/PID/mem where that is not allowed.
    """
    batch = bytearray(BATCH_PAGES * PAGE_SIZE)  # stays zero apart from the headers written into it
    use_proc_mem = False
    for start in range(0, count, BATCH_PAGES):
        n = min(BATCH_PAGES, count - start)
        if header_of is not None:
            for k in range(n):
                header = header_of(start + k)
                batch[k * PAGE_SIZE:k * PAGE_SIZE + len(header)] = header
        data = memoryview(batch)[:n * PAGE_SIZE]
        target = address + start * PAGE_SIZE
        if not use_proc_mem:
            try:
                linux.process_vm_writev(pid, data, target)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOSYS):
                    raise
                use_proc_mem = True
        if use_proc_mem:
            linux.write_proc_mem(pid, data, target)
        if bar:
            bar.advance(n)


def touch_pages(pid: int, address: int, indices: list[int]) -> None:
    """Read the pages from outside (a fault from the target's point of view)."""
    for start, count in linux.page_runs(indices):
        linux.process_vm_readv(pid, bytearray(count * PAGE_SIZE), address + start * PAGE_SIZE)


def pageout(pidfd: int, address: int, indices: list[int], bar: Progress | None = None) -> None:
    for start, count in linux.page_runs(indices):
        for s in range(start, start + count, PAGEOUT_CHUNK_PAGES):
            n = min(PAGEOUT_CHUNK_PAGES, start + count - s)
            linux.process_madvise(pidfd, address + s * PAGE_SIZE, n * PAGE_SIZE, linux.MADV_PAGEOUT)
            if bar:
                bar.advance(n)


def wait_for_writeback(memcg: Memcg, include_global: bool, timeout: float = WRITEBACK_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pending = memcg.writeback_bytes()
        if include_global:
            pending += linux.vmstat("nr_writeback")["nr_writeback"]
        if pending == 0:
            return
        if time.monotonic() > deadline:
            raise StagingError(f"swap writeback did not finish within {timeout:.0f}s ({pending} still pending)")
        time.sleep(0.005)


class Frames:
    """Per page of the range: the frame (PFN) it had when last seen present and the memcg it was charged to.

    Two flat arrays (16 bytes per page), so ranges of hundreds of GiB stay affordable; 0 = not recorded.
    """

    def __init__(self, pages: int):
        self.pfn = array("Q", bytes(8 * pages))
        self.memcg = array("Q", bytes(8 * pages))

    def charged_elsewhere(self, memcg_inode: int) -> int:
        """How many recorded pages are charged to another memcg than `memcg_inode`."""
        return sum(1 for cg in self.memcg if cg and cg != memcg_inode)


class _Pages:
    """Page-level view of the staged range through pagemap, kpageflags and kpagecgroup."""

    SCAN_PAGES = 65536  # pages looked at per pass of the swap-cache check (bounds its memory)

    def __init__(self, pid: int, address: int, pages: int):
        self.address = address
        self.pages = pages
        self.pagemap = linux.Pagemap(pid)

    def entries(self):
        return self.pagemap.entries(self.address, self.pages)

    def record_frames(self, frames: Frames, indices: Iterable[int] | None = None) -> None:
        """Record the frame and memcg of the present pages among `indices` (all pages by default)."""
        entries = self.entries()
        indices = range(self.pages) if indices is None else list(indices)  # a range slices lazily
        for start in range(0, len(indices), self.SCAN_PAGES):
            present = [i for i in indices[start:start + self.SCAN_PAGES] if linux.is_present(entries[i])]
            pfns = [linux.pfn(entries[i]) for i in present]
            for i, pfn, cg in zip(present, pfns, linux.page_cgroups(pfns)):
                frames.pfn[i] = pfn
                frames.memcg[i] = cg

    def still_in_swap_cache(self, frames: Frames) -> list[int]:
        """Pages whose recorded frame is still an unmapped swap-cache page charged to the same memcg.

        A page keeps its frame while it sits in the swap cache, so this is a per-page check. It errs on the
        safe side: a frame freed and reused for another unmapped swap-cache page of that memcg (swap
        readahead of a neighbour) reads as still cached. Compaction moving a swap-cache page is the one
        way to miss it, which the memcg's swapcached counter catches.
        """
        cached = []
        for start in range(0, self.pages, self.SCAN_PAGES):
            recorded = [i for i in range(start, min(start + self.SCAN_PAGES, self.pages)) if frames.pfn[i]]
            flags = linux.page_flags([frames.pfn[i] for i in recorded])
            candidates = [i for i, f in zip(recorded, flags) if _unmapped_swap_cache(f)]
            now = linux.page_cgroups([frames.pfn[i] for i in candidates])
            # memcg 0: unknown when recorded (a THP's tail page reports none), so any memcg matches
            cached += [i for i, cg in zip(candidates, now) if cg == frames.memcg[i] or not frames.memcg[i]]
        return cached

    def close(self) -> None:
        self.pagemap.close()


def _unmapped_swap_cache(flags: int) -> bool:
    """A /proc/kpageflags word of an unmapped swap-cache page.

    The bit is KPF_SWAPCACHE (13). Testing bit 14 (KPF_SWAPBACKED) instead took a shmem page (unmapped and
    swap-backed: a frame that the page-out freed and another process of the same memcg reused for one)
    for a straggler that never left the swap cache (docs/DESIGN.md, "Swap cache after staging"). The
    tail pages of a swapped-out THP show KPF_SWAPCACHE but not KPF_SWAPBACKED, so only bit 13 counts.
    """
    return bool(flags >> linux.KPF_SWAPCACHE & 1 and not flags >> linux.KPF_MMAP & 1)


def _describe(indices: list[int], address: int) -> str:
    shown = ", ".join(f"{i} ({address + i * PAGE_SIZE:#x})" for i in indices[:8])
    more = f" and {len(indices) - 8} more" if len(indices) > 8 else ""
    return f"{len(indices)} pages: {shown}{more}"


def stage_range(pid: int, address: int, length: int, codec: MarkerCodec, device: str, *,
                control: str | None = None, memcg_name: str = "auto", quiet: bool = False,
                stream: TextIO | None = None) -> StageReport:
    """Stage [address, address+length) of process `pid` onto swap device `device`. See the module doc."""
    started = time.monotonic()
    area = validate(pid, address, length, device)
    pages = length // PAGE_SIZE
    report = StageReport(pid, address, pages, device, swap_type=-1)
    if control:
        status = _device_status(control)
        if status.get("armed"):
            raise StagingError(f"the device behind {control} is armed: staging reads would fetch from the source; "
                               "stage onto a freshly attached device")
    with contextlib.ExitStack() as cleanup:  # closes what it opened, last first, however staging ends
        try:
            pidfd = linux.pidfd_open(pid)
        except OSError as exc:
            raise StagingError(exc.strerror) from None
        cleanup.callback(os.close, pidfd)

        clock = [time.monotonic()]

        def phase(name: str) -> None:
            now = time.monotonic()
            report.phases[name] = now - clock[0]
            clock[0] = now

        phase("validate")
        try:
            view = _Pages(pid, address, pages)
        except OSError as exc:
            raise StagingError(exc.strerror or str(exc)) from None
        cleanup.callback(view.close)
        try:
            memcg, home = Memcg.for_target(pid, memcg_name)
        except OSError as exc:
            raise StagingError(exc.strerror or str(exc)) from None
        cpus = sorted(os.sched_getaffinity(0))
        written = False
        try:
            memcg.move(pid)
            with pinned_to(cpus[0]):
                bar = Progress("writing markers", pages, quiet=quiet, stream=stream)
                written = True
                write_pages(pid, address, pages, codec.header, bar)
                bar.finish()
                phase("markers")
                frames = Frames(pages)
                view.record_frames(frames)
                foreign = frames.charged_elsewhere(memcg.inode)
                if foreign:
                    log.info("%d pages were touched before staging and stay charged to another memcg", foreign)
                if memcg.in_place:
                    log.info("staging in place in memcg %s (no dedicated memcg)", memcg.path)
                bar = Progress("paging out", pages, quiet=quiet, stream=stream)
                pageout(pidfd, address, list(range(pages)), bar)
                bar.finish()
            wait_for_writeback(memcg, include_global=bool(foreign) or memcg.in_place)
            phase("pageout")
            memcg.purge()
            whole_range_done = False
            for attempt in range(VERIFY_ATTEMPTS):
                leftovers = _leftovers(view, frames)
                if not leftovers and not whole_range_done and _settled_swapcached(memcg):
                    leftovers = _unseen_stragglers(memcg, pages)
                    whole_range_done = bool(leftovers)
                if leftovers:
                    report.fallback_pages += len(leftovers)
                    _fallback(pid, pidfd, address, view, memcg, leftovers, cpus, frames)
                if attempt == 0:
                    phase("purge")
                _verify_mapping(view, report, area, codec)
                # A straggler can turn up in the swap cache a moment after the fallback found none: look again.
                cached = _leftovers(view, frames)
                if not cached:
                    break
                log.info("verify: %d pages still in the swap cache; fallback again", len(cached))
                time.sleep(0.1 * (attempt + 1))  # give per-CPU LRU batches time to drain before the next round
                linux.drain_lru_batches()  # and drain them on every CPU (docs/DESIGN.md, "Swap cache after staging")
            else:
                hint = ("; staging in place on cgroup v1 has only the read-touch fallback, which needs swap less "
                        "than half full: stage with --memcg auto" if memcg.in_place and memcg.version == 1 else "")
                raise StagingError(f"verify: still in the swap cache after {VERIFY_ATTEMPTS} attempts (a touch would "
                                   f"not reach the device): {_describe(cached, address)}{hint}")
            _verify_counters(report, memcg, frames)
            if control:
                report.device_mapped = _check_device_map(control, pages)
            phase("verify")
        except BaseException as exc:
            state = _undo(pid, address, pages, written, memcg, home, memcg_name)
            if isinstance(exc, OSError):
                raise StagingError(f"{exc.strerror or exc}; {state}") from exc
            if isinstance(exc, StagingError):
                raise StagingError(f"{exc}; {state}") from exc
            raise
    if memcg_name == "auto":
        memcg.remove(home)  # only a memcg staging made (not the target's own, in place)
    report.seconds = time.monotonic() - started
    return report


def _leftovers(view: _Pages, frames: Frames, settle: float = SETTLE_SECONDS) -> list[int]:
    """Pages still present, not swapped, or whose frame is still in the swap cache.

    A few pages leave the swap cache a moment after the writeback ends (per-CPU batches draining), so
    this polls for up to `settle` seconds before it reports any.
    """
    deadline = time.monotonic() + settle
    while True:
        entries = view.entries()
        bad = set(view.still_in_swap_cache(frames))
        if not linux.all_swapped_out(entries):
            bad.update(i for i in range(view.pages) if linux.is_present(entries[i]) or not linux.is_swapped(entries[i]))
        if not bad or time.monotonic() > deadline:
            return sorted(bad)
        time.sleep(0.02)


def _unseen_stragglers(memcg: Memcg, pages: int) -> list[int]:
    """The memcg counts swap-cache pages that no recorded frame shows: pages that moved to other frames
    after they were recorded (khugepaged collapsing them into a THP, compaction). A dedicated memcg is
    purged again; if that is not enough, or in place, every page of the range gets the fallback (once).
    Returns the pages to fall back on: none, or all of them."""
    memcg.purge()
    if not _settled_swapcached(memcg):
        return []
    log.info("memcg %s counts %d bytes in the swap cache that no recorded frame shows: the fallback takes "
             "every page", memcg.path, memcg.swapcached_bytes())
    return list(range(pages))


def _fallback(pid: int, pidfd: int, address: int, view: _Pages, memcg: Memcg, pages: list[int],
              cpus: list[int], frames: Frames) -> None:
    """Read-touch + MADV_PAGEOUT the pages on each CPU in turn, until none is left in the swap cache.

    A touch that misses the swap cache would start swap readahead, which leaves unmapped copies of the
    neighbours in the swap cache where MADV_PAGEOUT cannot reach them. So MADV_WILLNEED (which reads
    exactly the pages asked for) brings any missing page in first, and the touch always hits.
    `frames` is updated with the frames the touched pages have now.
    """
    for _ in range(FALLBACK_ROUNDS):
        for cpu in cpus:
            if not pages:
                return
            with pinned_to(cpu):
                for start, count in linux.page_runs(pages):
                    linux.process_madvise(pidfd, address + start * PAGE_SIZE, count * PAGE_SIZE, linux.MADV_WILLNEED)
                touch_pages(pid, address, pages)
                view.record_frames(frames, pages)
                pageout(pidfd, address, pages)
            wait_for_writeback(memcg, include_global=True)
            linux.drain_lru_batches()
            memcg.purge()
            pages = _leftovers(view, frames)
            log.info("fallback on CPU %d: %d pages left", cpu, len(pages))


def _verify_mapping(view: _Pages, report: StageReport, area: linux.SwapArea, codec: MarkerCodec) -> None:
    """Every page is a swap entry on the device and none is present; sets report.swap_type."""
    entries = view.entries()
    address = view.address
    if not linux.all_swapped_out(entries):
        present = [i for i in range(view.pages) if linux.is_present(entries[i])]
        if present:
            raise StagingError(f"verify: still resident after page-out: {_describe(present, address)}")
        missing = [i for i in range(view.pages) if not linux.is_swapped(entries[i])]
        raise StagingError(f"verify: not a swap entry (pagemap bit 62 clear): {_describe(missing, address)}")
    swap_type = linux.common_swap_type(entries)
    if swap_type is None:
        types: dict[int, list[int]] = {}
        for i in range(view.pages):
            types.setdefault(linux.swap_type(entries[i]), []).append(i)
        detail = "; ".join(f"type {t}: {_describe(p, address)}" for t, p in sorted(types.items()))
        raise StagingError(f"verify: pages went to more than one swap device: {detail}")
    report.swap_type = swap_type
    beyond = [i for i in range(view.pages) if linux.swap_offset(entries[i]) > area.size_pages]
    if beyond:
        raise StagingError(f"verify: swap offsets beyond the size of {area.filename}, so the pages are on another "
                           f"device: {_describe(beyond, address)}")
    step = max(1, (view.pages - 1) // (DEVICE_SAMPLES - 1))
    for i in sorted({*range(0, view.pages, step), view.pages - 1}):
        slot = linux.swap_offset(entries[i])
        found = codec.parse(linux.read_direct(area.filename, slot * PAGE_SIZE))
        if found != i:
            what = "no marker" if found is None else f"the marker of page {found}"
            raise StagingError(f"verify: page {i} is in swap slot {slot} of type {report.swap_type}, but that slot "
                               f"of {area.filename} holds {what}: the pages are not on this device")


def _verify_counters(report: StageReport, memcg: Memcg, frames: Frames) -> None:
    """The memcg counters agree that nothing is left in the swap cache.

    Weaker evidence than the per-page check (memcg statistics are flushed lazily, so a handful of pages
    can hide in them), but it also covers a swap-cache page that compaction moved to another frame.
    """
    report.memcg_swapcached_bytes = _settled_swapcached(memcg)
    report.memcg_collateral_bytes = memcg.collateral_bytes
    report.global_swapcached_pages = linux.vmstat("nr_swapcached")["nr_swapcached"]
    if report.memcg_swapcached_bytes:
        shared = (" (staged in place: that count may include other processes' pages; make sure nothing else in "
                  "that memcg uses swap, or stage in a dedicated memcg with --memcg)") if memcg.in_place else ""
        raise StagingError(f"verify: memcg {memcg.path} still has {report.memcg_swapcached_bytes} bytes in the "
                           f"swap cache after reclaim{shared}")
    _verify_other_memcgs(frames, exclude=memcg.inode, version=memcg.version)


def _settled_swapcached(memcg: Memcg) -> int:
    """The memcg's swapcached bytes, waiting up to SETTLE_SECONDS for them to reach 0."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while (cached := memcg.swapcached_bytes()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return cached


def _verify_other_memcgs(frames: Frames, exclude: int, version: int) -> None:
    """Pages touched before staging are charged to a memcg other than the one staging used (`exclude`,
    checked by _verify_counters). A swap-cache copy of one of them would be charged there too, so that
    memcg's swapcached counter must be 0 (it may include other processes' pages: then this check cannot
    tell, and says so)."""
    for inode in set(frames.memcg) - {0, exclude}:
        path = find_by_inode(version, inode)
        if path is None:
            log.warning("pages of the range are charged to a memcg that no longer exists (inode %d): "
                        "its swap cache cannot be checked", inode)
            continue
        cached = _settled_swapcached(Memcg(version, path, created=False))
        if cached:
            count = sum(1 for cg in frames.memcg if cg == inode)
            raise StagingError(
                f"verify: {count} pages of the range are charged to memcg {path} (touched before staging), "
                f"which has {cached} bytes in the swap cache: some may be pages of the range "
                "(make sure nothing else in that memcg uses swap, or stage in a dedicated memcg with --memcg)")


def record_target(device: str, pid: int, address: int, length: int) -> Path | None:
    """Tell `setup-swap.sh detach` what to complete: write STATE/target for the attachment of `device`.

    Returns the file written, or None when `device` is not a registered attachment (see attachment.py).
    """
    return attachment.record_target(device, attachment.Target(pid, address, length))


def _check_device_map(control: str, pages: int) -> int:
    status = _device_status(control)
    mapped = int(status.get("mapped", -1))
    if mapped != pages:
        raise StagingError(f"verify: the device maps {mapped} guest pages but {pages} were staged "
                           f"(control socket {control})")
    return mapped


def _undo(pid: int, address: int, pages: int, written: bool, memcg: Memcg, home, memcg_name: str) -> str:
    """Best-effort undo after a failure; returns a sentence saying what state remains."""
    notes = []
    if written:
        try:
            write_pages(pid, address, pages, None)
            notes.append("the range was overwritten with zeros (its old contents are gone)")
        except OSError as exc:
            notes.append(f"the range could NOT be zeroed ({exc.strerror or exc}): it may still hold markers")
    if memcg.in_place:
        notes.append(f"process {pid} stayed in memcg {home}")
    elif memcg_name == "auto":
        try:
            memcg.remove(home)
            notes.append(f"process {pid} is back in memcg {home}")
        except OSError as exc:
            notes.append(str(exc.strerror or exc))
    else:
        notes.append(f"process {pid} stays in memcg {memcg.path}")
    return "state left: " + ("; ".join(notes) if notes else "nothing was changed")
