"""The destination device: a swap area whose slots hold guest pages fetched from the migration source.

Slot 0 is the swap header; slots 1 .. pages + headroom hold guest pages or written data. The device
learns which slot holds which guest page from the staging writes: a page carrying a valid keyed marker
maps its slot to that guest page; any other write is data, kept exactly in the overlay.

Reads, per slot:
    slot 0 ............................ the swap header (or what was written over it)
    overlay ........................... the stored data
    mapped, not armed ................. the slot's marker page again (staging-time read: never fetch
                                        before arming, the source may not be frozen yet)
    mapped, armed, local .............. the stored page (fetched earlier, or known zero)
    mapped, armed, not local .......... a demand fetch from the source: one round trip for the whole
                                        request, coalesced into runs of consecutive guest pages
    unmapped .......................... zeros (an anomaly unless the slot was trimmed)

State costs about 4.6 bytes per slot: `array('I')` slot -> guest page + 1 and a few bitmaps. Page data
(overlay and fetched pages) lives in one sparse, already-unlinked file indexed by slot, so the process
stays small and the OS page cache holds the data. A trim only forgets (the kernel discards every swap
slot it frees); a slot's old bytes are punched out when a marker maps it again, because a slot waiting
for its page must be a hole: a known zero page is read from it. No nbdkit imports: the plugin is a thin
shell.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
import uuid as uuid_module
from array import array
from collections.abc import Callable, Generator, Sequence
from typing import NamedTuple, Protocol

from ..common.units import PAGE_SIZE
from . import swapheader
from ..common.linux import FileView, punch_hole
from ..nbd.zeros import zero_runs
from .markers import HEADER_SIZE, MarkerCodec, looks_like_marker
from .metrics import DeviceMetrics

log = logging.getLogger("nbd_postcopy.device.device")

DEFAULT_TIMEOUT = 60.0  # seconds a read waits for an unavailable source before failing with EIO
DEFAULT_CACHE_DIR = "/var/tmp"
MIN_HEADROOM = 4096  # pages (16 MiB)
ZERO_PAGE = bytes(PAGE_SIZE)
MARKER_TAIL = bytes(PAGE_SIZE - HEADER_SIZE)  # a marker page is zero after its header
BLOCK_STATUS_CHUNK = 1 << 30  # bytes asked per NBD_CMD_BLOCK_STATUS when learning zero pages
STATE_ZERO = 2  # NBD base:allocation flag: the range reads as zeros
LOCK_BATCH = 1024  # slots handled per lock hold by big writes, trims and scans, so reads are not held up
SETTLE_CHUNK = 256  # slots per lock hold when zero pages are settled (a few word operations each)
SETTLE_YIELD = 16  # chunks between two pauses of the settling thread, so waiting reads get the lock
ANOMALY_LOG_LIMIT = 20  # log lines about anomalies before only counting them
WARM_CHUNK = 2048  # slots (8 MiB) of the page file brought into memory per call while staging
_NO_SLOTS = array("I", bytes(4 * LOCK_BATCH))


def default_headroom(pages: int) -> int:
    """Spare slots beyond the guest: reclaim ignores anonymous memory when swap has no free slot."""
    return max(pages // 32, MIN_HEADROOM)


class PageSource(Protocol):
    """What the device needs from a source connection (nbd_postcopy.nbd.client.SourceClient). Reads give
    exactly the bytes asked for, or raise."""

    size: int
    connected: bool

    def read_many_into(self, ranges: Sequence[tuple[int, int]], views: Sequence[memoryview], timeout: float) -> None: ...

    def block_status(self, offset: int, length: int, timeout: float) -> list[tuple[int, int]]: ...


class DeviceIOError(Exception):
    """A request the device cannot serve: the plugin answers it with EIO."""


class Run(NamedTuple):
    """`count` consecutive slots from `slot` holding consecutive guest pages from `guest`."""

    slot: int
    guest: int
    count: int


class Bitmap:
    """A fixed-size bitmap in a bytearray (1 bit per index)."""

    __slots__ = ("bits", "size")
    _NONZERO = re.compile(b"[^\x00]")
    _NOT_FULL = re.compile(b"[^\xff]")

    def __init__(self, size: int):
        self.size = size
        self.bits = bytearray((size + 7) // 8)

    def get(self, i: int) -> bool:
        return bool(self.bits[i >> 3] & (1 << (i & 7)))

    def set(self, i: int) -> None:
        self.bits[i >> 3] |= 1 << (i & 7)

    def clear(self, i: int) -> None:
        self.bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def set_range(self, start: int, end: int) -> None:
        """Set bits start .. end-1 (whole bytes at once)."""
        self._fill(start, end, True)

    def clear_range(self, start: int, end: int) -> None:
        self._fill(start, end, False)

    def _fill(self, start: int, end: int, value: bool) -> None:
        """Bits start .. end-1 to `value`: masks on the first and last byte, whole bytes between (the
        prefetcher's runs start at odd slots, so bit-by-bit edges cost it a dozen calls per run)."""
        if start >= end:
            return
        first, last = start >> 3, (end - 1) >> 3
        head = (0xFF << (start & 7)) & 0xFF  # bits of the first byte from `start` on
        tail = (2 << ((end - 1) & 7)) - 1  # bits of the last byte up to end-1
        bits = self.bits
        if first == last:
            head &= tail
        elif last - first > 1:
            bits[first + 1 : last] = (b"\xff" if value else b"\0") * (last - first - 1)
        if value:
            bits[first] |= head
            if first != last:
                bits[last] |= tail
        else:
            bits[first] &= ~head & 0xFF
            if first != last:
                bits[last] &= ~tail & 0xFF

    def count(self, start: int, end: int) -> int:
        """How many bits in [start, end) are set."""
        return self.word(start, end - start).bit_count() if start < end else 0

    def word(self, start: int, count: int) -> int:
        """Bits start .. start+count-1 as one integer: bit k is index start+k (beyond the end: 0)."""
        raw = int.from_bytes(self.bits[start >> 3 : (start + count + 7) >> 3], "little")
        return (raw >> (start & 7)) & ((1 << count) - 1)

    def clear_word(self, start: int, mask: int) -> None:
        """Clear index start+k for every bit k set in `mask`."""
        if mask:
            first, last = start >> 3, (start + mask.bit_length() + 7) >> 3
            raw = int.from_bytes(self.bits[first:last], "little") & ~(mask << (start & 7))
            self.bits[first:last] = raw.to_bytes(last - first, "little")

    def find(self, start: int, end: int) -> int:
        """The first set index in [start, end), or -1."""
        return self._find(start, end, True, self._NONZERO)

    def find_clear(self, start: int, end: int) -> int:
        """The first clear index in [start, end), or -1."""
        return self._find(start, end, False, self._NOT_FULL)

    def _find(self, start: int, end: int, value: bool, other_byte: re.Pattern) -> int:
        """The first index in [start, end) whose bit is `value`; `other_byte` matches a byte holding one."""
        end = min(end, self.size)
        while start < end:
            if start & 7 == 0:
                match = other_byte.search(self.bits, start >> 3, (end + 7) >> 3)
                if match is None:
                    return -1
                start = match.start() << 3
                if start >= end:
                    return -1
            if self.get(start) == value:
                return start
            start += 1
        return -1


class PageStore:
    """Page data by slot in one sparse file that is already unlinked (nothing is left behind).

    Reads copy out of a read-only mapping of the file, made on the first read: reads come from NBD
    requests, so after nbdkit has locked its memory (FileView stays unlocked either way, but a mapping
    made before mlockall(MCL_CURRENT) would be read in whole and pinned). Writes and hole punches use
    the file, which the mapping shows at once (one page cache)."""

    def __init__(self, directory: str, slots: int):
        try:
            self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create the page cache file in {directory}: {exc.strerror}") from exc
        self.size = slots * PAGE_SIZE
        os.ftruncate(self.fd, self.size)
        self._file_view: FileView | None = None
        self._map_lock = threading.Lock()

    def read_into(self, view: memoryview, slot: int) -> None:
        start = slot * PAGE_SIZE
        file_view = self.view()
        if file_view.populate(start, len(view)):
            view[:] = file_view.view[start : start + len(view)]
        elif os.preadv(self.fd, [view], start) != len(view):  # (it reports an I/O error as OSError)
            raise DeviceIOError(f"short read from the page cache file at slot {slot}")

    def view(self) -> FileView:
        """The read-only mapping of the page file, made on first use."""
        return self._file_view or self._map()

    def _map(self) -> FileView:
        with self._map_lock:
            if self._file_view is None:
                self._file_view = FileView(self.fd, self.size)
            return self._file_view

    def write(self, slot: int, data) -> None:
        if os.pwrite(self.fd, data, slot * PAGE_SIZE) != len(data):
            raise DeviceIOError(f"short write to the page cache file at slot {slot}")

    def punch(self, slot: int, count: int = 1) -> None:
        try:
            punch_hole(self.fd, slot * PAGE_SIZE, count * PAGE_SIZE)
        except OSError as exc:
            raise OSError(exc.errno, f"page cache file: {exc.strerror}") from exc

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def bring_in(self, slot: int, count: int) -> bool:
        """Put the page cache pages of `count` slots from `slot` in memory (holes read as clean zero
        pages), through the unlocked mapping. False if the kernel refused."""
        return self.view().populate(slot * PAGE_SIZE, count * PAGE_SIZE)

    def close(self) -> None:
        if self._file_view is not None:
            self._file_view.close()
        os.close(self.fd)


class PageFileWarmer:
    """Brings the page file's pages into memory for the slots that staging maps, before the switchover.

    The prefetcher's writes into the page file land in fresh page cache, and on a host that backs a VM's
    memory only when it is first touched (free page reporting), that first touch cost up to 4.5 s per
    GiB, most of the prefetcher's CPU at 4 GiB, inside the migration's window (docs/DESIGN.md, "The page
    file is warmed while staging"). One thread, started by the first range (a write request: after nbdkit
    has forked and locked its memory), takes ranges from a queue and brings them in, WARM_CHUNK slots a
    call; it stops at arming, when the guest's own swap-ins need the CPU."""

    def __init__(self, store: PageStore):
        self._store = store
        self._ranges: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.warmed = 0  # slots brought in

    def want(self, start: int, end: int) -> None:
        """Bring slots [start, end) in, soon."""
        if self._stopped.is_set():
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="page-file-warmer", daemon=True)
                self._thread.start()
        self._ranges.put((start, end))

    def stop(self, timeout: float | None = None) -> None:
        self._stopped.set()
        self._ranges.put(None)
        if timeout is not None and self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._ranges.get()) is not None and not self._stopped.is_set():
            start, end = item
            for slot in range(start, end, WARM_CHUNK):
                if self._stopped.is_set():
                    return
                count = min(WARM_CHUNK, end - slot)
                if not self._store.bring_in(slot, count):
                    log.info("bringing the page file into memory stopped: the kernel refused at slot %d", slot)
                    return
                self.warmed += count


def page_span(offset: int, length: int) -> tuple[int, int, int]:
    """(first slot, number of slots, offset within the first slot) of a non-empty byte range."""
    first = offset // PAGE_SIZE
    return first, (offset + length - 1) // PAGE_SIZE - first + 1, offset - first * PAGE_SIZE


def coalesce(pairs: Sequence[tuple[int, int]]) -> list[Run]:
    """Group (slot, guest) pairs, in slot order, into runs of consecutive slots and guest pages."""
    runs: list[Run] = []
    for slot, guest in pairs:
        if runs:
            last = runs[-1]
            if slot == last.slot + last.count and guest == last.guest + last.count:
                runs[-1] = last._replace(count=last.count + 1)
                continue
        runs.append(Run(slot, guest, 1))
    return runs


class Device:
    """Slot map, page store and read/write/trim semantics of the postcopy swap device (thread-safe)."""

    def __init__(
        self,
        pages: int,
        codec: MarkerCodec,
        *,
        headroom: int | None = None,
        cache_dir: str = DEFAULT_CACHE_DIR,
        timeout: float = DEFAULT_TIMEOUT,
        label: str = "",
        swap_uuid: uuid_module.UUID | None = None,
        metrics: DeviceMetrics | None = None,
        warm: bool = False,
        demand_store: bool = True,
    ):
        if pages < 1:
            raise ValueError(f"pages must be at least 1, got {pages}")
        self.pages = pages
        self.headroom = default_headroom(pages) if headroom is None else headroom
        self.slots = 1 + pages + self.headroom
        if self.slots > 1 << 32:
            raise ValueError(f"{self.slots} slots do not fit a swap area (at most 2**32 pages)")
        self.size = self.slots * PAGE_SIZE
        self.timeout = timeout
        self.codec = codec
        self.swap_uuid = swap_uuid or uuid_module.uuid4()
        self.header = swapheader.build(self.slots, self.swap_uuid, label)
        self.metrics = metrics or DeviceMetrics()

        self._lock = threading.Lock()
        self._guest = array("I", bytes(4 * self.slots))  # slot -> guest page + 1; 0 = unmapped
        self._overlay = Bitmap(self.slots)  # the slot holds written data
        self._pending = Bitmap(self.slots)  # mapped and not local yet
        self._touched = Bitmap(self.slots)  # ever written or trimmed (reads of others are anomalies)
        self._has_data = Bitmap(self.slots)  # the page file may hold bytes here (else it is a hole)
        self._storing = Bitmap(self.slots)  # fetched pages being written to the page file, outside the lock
        self._demand_unstored = Bitmap(self.slots)  # fetched on demand but not stored (demand_store off)
        self._stored = threading.Condition(self._lock)  # notified when a store ends
        self._zero = Bitmap(pages)  # guest pages the source reported as all zeros
        self._store = PageStore(cache_dir, self.slots)
        self._warmer = PageFileWarmer(self._store) if warm else None  # brings mapped slots' pages in while staging
        self.demand_store = demand_store  # False: demand-fetched pages stay pending (the prefetcher stores them)

        self.mapped = 0
        self.remaining = 0
        self.overlay_pages = 0
        self.armed = False
        self.armed_event = threading.Event()
        self.anomalies = 0
        self.source_errors = 0
        self.source_refusals = 0  # connections refused: a server that is not the same source
        self.fetched = {"demand": 0, "prefetch": 0}  # pages whose data came from the source
        self.fetched_again = 0  # of them, pages the prefetcher stored after a demand fetch that kept no copy
        self.fetched_zero = 0  # pages fetched that were all zeros (a hole on the wire and in the page file)
        self.settled_zero = 0  # pages made local with no fetch: the source reported them all zeros
        self.demand_source: PageSource | None = None
        self.source_connected = False
        self.reconnects = 0  # times the demand connection came back after it was lost
        self.outage_seconds = 0.0  # time the demand connection was down, in all (ended outages)
        self._down_since: float | None = None
        self._fault_listeners: list[Callable[[int, float], None]] = []
        self._complete_logged = False
        self._completed = threading.Condition()  # notified whenever a change leaves every page local
        self.fetched_bytes = 0  # bytes received from the source, zero pages and pages fetched again included
        self.watch_metrics()

    # --- state --------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """Every mapped page is local: the source is no longer needed."""
        return self.armed and self.remaining == 0

    def status(self) -> dict:
        with self._lock:
            return {
                "armed": self.armed,
                "pages": self.pages,
                "slots": self.slots,
                "mapped": self.mapped,
                "local": self.mapped - self.remaining,
                "overlay_pages": self.overlay_pages,
                "remaining": self.remaining,
                "complete": self.complete,
                "anomalies": self.anomalies,
                "source_connected": self.source_connected,
                "reconnects": self.reconnects,
                "outage_seconds": round(self.outage_seconds + self._current_outage(), 3),
                "source_errors": self.source_errors,
                "source_refusals": self.source_refusals,
                "fetched_demand": self.fetched["demand"],
                "fetched_prefetch": self.fetched["prefetch"],
                "fetched_zero": self.fetched_zero,
                "fetched_again": self.fetched_again,
                "settled_zero": self.settled_zero,
                "fetched_bytes": self.fetched_bytes,
                "page_file_warmed": self._warmer.warmed if self._warmer is not None else 0,
            }

    def watch_metrics(self) -> None:
        m = self.metrics
        m.pages_mapped.set_function(lambda: self.mapped)
        m.pages_remaining.set_function(lambda: self.remaining)
        m.overlay_pages.set_function(lambda: self.overlay_pages)
        m.overlay_bytes.set_function(lambda: self.overlay_pages * PAGE_SIZE)
        m.source_connected.set_function(lambda: int(self.source_connected))
        m.prefetch_progress.set_function(lambda: 1.0 - self.remaining / self.mapped if self.mapped else 1.0)
        m.complete.set_function(lambda: int(self.complete))
        m.armed.set_function(lambda: int(self.armed))
        m.fetches.read = self._fetch_counts

    def _fetch_counts(self) -> tuple[dict[str, int], int]:
        with self._lock:
            return dict(self.fetched), self.fetched_bytes

    def guest_of(self, slot: int) -> int | None:
        value = self._guest[slot]
        return value - 1 if value else None

    def slots_of(self, guests: Sequence[int]) -> dict[int, int]:
        """guest page -> the slot that maps it, for the pages of `guests` that are mapped (one scan)."""
        wanted = {guest + 1 for guest in guests}
        found: dict[int, int] = {}
        for start in range(0, self.slots, LOCK_BATCH):
            with self._lock:
                chunk = self._guest[start : start + LOCK_BATCH]
            for i, value in enumerate(chunk):
                if value in wanted:
                    found[value - 1] = start + i
        return found

    def is_local(self, slot: int) -> bool:
        return bool(self._guest[slot]) and not self._pending.get(slot)

    def add_fault_listener(self, listener: Callable[[int, float], None]) -> None:
        """`listener(first_slot, seconds)` runs after each demand fetch (the prefetcher's hints)."""
        self._fault_listeners.append(listener)

    def on_source_state(self, connected: bool, reason: str) -> None:
        """SourceClient's on_state callback for the demand connection."""
        outage = None
        with self._lock:
            if connected and self._down_since is not None:
                outage = time.monotonic() - self._down_since
                self.outage_seconds += outage
                self.reconnects += 1
                self._down_since = None
                self.metrics.reconnects.inc()
                self.metrics.outage_seconds.inc(outage)
            elif not connected and self._down_since is None:
                self._down_since = time.monotonic()
        self.source_connected = connected
        if connected:
            log.info("source connection is up (%s)%s", reason,
                     "" if outage is None else f" after an outage of {outage:.1f}s")
        else:
            log.warning("source connection is down (%s); reads wait up to %gs for it", reason, self.timeout)

    def _current_outage(self) -> float:
        down_since = self._down_since
        return 0.0 if down_since is None else time.monotonic() - down_since

    def on_source_refused(self, reason: str) -> None:
        """SourceIdentity's callback: a connection reached a server that is not the same source."""
        with self._lock:
            self.source_refusals += 1
        self.metrics.source_refusals.inc()

    def close(self) -> None:
        if self._warmer is not None:
            self._warmer.stop(timeout=5.0)
        self._store.close()

    # --- arming ---------------------------------------------------------------------------------
    def arm(self) -> None:
        """From now on reads of mapped slots fetch from the (frozen) source."""
        with self._lock:
            if self.armed:
                return
            self.armed = True
        if self._warmer is not None:
            self._warmer.stop()
        self.armed_event.set()
        log.info("armed: %d mapped pages will be fetched from the source", self.mapped)
        self._check_complete()

    def learn_zero_pages(self, source: PageSource, timeout: float | None = None) -> int:
        """Ask the source which guest pages are all zeros; mapped slots holding them become local
        (their region of the page file is a hole). Returns the number of zero guest pages."""
        steps = self.zero_page_steps(source, timeout)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def zero_page_steps(self, source: PageSource, timeout: float | None = None) -> Generator[None, None, int]:
        """learn_zero_pages() one block status request per step, so the prefetcher can interleave the
        requests with its fetches (docs/DESIGN.md, "Zero pages"); returns the number of zero guest pages."""
        timeout = self.timeout if timeout is None else timeout
        end = self.pages * PAGE_SIZE
        offset = 0
        zero_pages = 0
        while offset < end:
            extents = source.block_status(offset, min(BLOCK_STATUS_CHUNK, end - offset), timeout)
            if not extents:
                raise DeviceIOError(f"the source answered block status at {offset} with no extents")
            for length, flags in extents:
                length = min(length, end - offset)
                if flags & STATE_ZERO:
                    first = -(-offset // PAGE_SIZE)
                    last = (offset + length) // PAGE_SIZE
                    if first < last:
                        with self._lock:
                            self._zero.set_range(first, last)
                        zero_pages += last - first
                offset += length
            if offset < end:
                yield
        if zero_pages:
            self._settle_zero_slots()
        return zero_pages

    def _settle_zero_slots(self, chunk: int = SETTLE_CHUNK) -> None:
        """Mapped slots holding zero pages become local.

        Staging maps runs of consecutive guest pages to consecutive slots, so a chunk of slots is
        usually settled with a few word operations (pending slots AND zero guest pages); other chunks
        go slot by slot. A per-slot loop over every slot took 58 ms per 256 MiB under the device lock,
        while the guest's swap-ins waited (docs/DESIGN.md, "Zero pages are never written to swap")."""
        for n, start in enumerate(range(0, self.slots, chunk)):
            if n % SETTLE_YIELD == SETTLE_YIELD - 1:
                time.sleep(0)  # a thread that releases a lock and takes it again at once starves its waiters
            count = min(chunk, self.slots - start)
            with self._lock:
                pending = self._pending.word(start, count)
                if not pending:
                    continue
                head = self._guest[start]
                if head and self._guest[start : start + count] == array("I", range(head, head + count)):
                    settled = pending & self._zero.word(head - 1, count)
                else:
                    settled = 0
                    while pending:
                        low = pending & -pending
                        if self._zero.get(self._guest[start + low.bit_length() - 1] - 1):
                            settled |= low
                        pending ^= low
                if not settled:
                    continue
                self._pending.clear_word(start, settled)
                self.remaining -= settled.bit_count()
                unstored = self._demand_unstored.word(start, count) & settled  # those crossed the wire already
                self._demand_unstored.clear_word(start, unstored)
                self.settled_zero += settled.bit_count() - unstored.bit_count()
        self._check_complete()

    def _check_complete(self) -> None:
        if self.complete:
            if not self._complete_logged:
                self._complete_logged = True
                log.info("all pages are local: the source can be released (%d mapped pages)", self.mapped)
            with self._completed:
                self._completed.notify_all()

    def wait_complete(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every mapped page to be local; returns `complete`."""
        with self._completed:
            return self._completed.wait_for(lambda: self.complete, timeout)

    # --- slot transitions (caller holds the lock) -----------------------------------------------
    def _forget(self, slot: int) -> None:
        """Clear what the slot holds (its bytes stay in the page file: see _has_data)."""
        if self._overlay.get(slot):
            self._overlay.clear(slot)
            self.overlay_pages -= 1
        if self._guest[slot]:
            self._guest[slot] = 0
            self.mapped -= 1
            if self._pending.get(slot):
                self._pending.clear(slot)
                self.remaining -= 1
        self._demand_unstored.clear(slot)

    def _forget_range(self, start: int, end: int) -> None:
        """_forget() of every slot in [start, end), in bulk."""
        self.overlay_pages -= self._overlay.count(start, end)
        self._overlay.clear_range(start, end)
        self.remaining -= self._pending.count(start, end)
        self._pending.clear_range(start, end)
        self._demand_unstored.clear_range(start, end)
        self.mapped -= end - start - self._guest[start:end].count(0)
        self._guest[start:end] = _NO_SLOTS[: end - start]

    def _map(self, slot: int, guest: int) -> None:
        self._touched.set(slot)
        if self._guest[slot] == guest + 1:
            return  # the same mapping again: any fetched data stays valid
        self._forget(slot)
        if self._has_data.get(slot):  # a slot waiting for its page is a hole: known zero pages are read from it
            self._store.punch(slot)
            self._has_data.clear(slot)
        self._guest[slot] = guest + 1
        self.mapped += 1
        if self.armed and self._zero.get(guest):
            self.settled_zero += 1
        else:
            self._pending.set(slot)
            self.remaining += 1

    def _make_overlay(self, slot: int) -> None:
        """The caller writes the slot's data next, under the same lock."""
        self._touched.set(slot)
        if self._overlay.get(slot):
            return
        self._forget(slot)
        self._overlay.set(slot)
        self.overlay_pages += 1

    def _store_pages(self, slot: int, data) -> None:
        self._store.write(slot, data)
        self._has_data.set_range(slot, slot + len(data) // PAGE_SIZE)

    def _store_fetched(self, slot: int, data) -> list[tuple[int, int]]:
        """Write fetched pages of claimed slots (_claim_locked) to the page file, where their region is a
        hole: all-zero pages stay holes. Needs no lock. Returns the [start, end) slot ranges written."""
        written = []
        for start, end, is_zero in zero_runs(data):
            if not is_zero:
                self._store.write(slot + start // PAGE_SIZE, data[start:end])
                written.append((slot + start // PAGE_SIZE, slot + -(-end // PAGE_SIZE)))
        return written

    # --- I/O --------------------------------------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DeviceIOError(f"request [{offset}, {offset + length}) beyond the device size {self.size}")

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` with the device contents at `offset`."""
        length = len(buf)
        self._check_range(offset, length)
        if length == 0:
            return
        first, count, start = page_span(offset, length)
        if start == 0 and length == count * PAGE_SIZE:
            self._read_slots(first, count, buf)
        else:
            pages = memoryview(bytearray(count * PAGE_SIZE))
            self._read_slots(first, count, pages)
            buf[:] = pages[start : start + length]

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.read_into(memoryview(out), offset)
        return bytes(out)

    def _read_slots(self, first: int, count: int, out: memoryview) -> None:
        started = time.monotonic()
        untouched: list[int] = []
        end = first + count
        with self._lock:
            # Swap-ins of whole clusters, in bulk: every slot mapped and local, or every slot waiting
            # for one run of consecutive guest pages. Anything else goes slot by slot. A slot being
            # stored is still pending: it is fetched again rather than waited for (docs/DESIGN.md,
            # "Fetched pages are written outside the device lock").
            plain = self.armed and first > 0 and self._overlay.find(first, end) < 0
            waiting = self._pending.count(first, end) if plain else -1
            local = waiting == 0 and 0 not in self._guest[first:end]
            if not local:
                run = self._consecutive_run_locked(first, count) if waiting == count else None
                runs = [run] if run else self._read_each_locked(first, count, out, untouched)
        if local:
            # Outside the lock, so clusters are read in parallel: the kernel never writes or trims a
            # slot while it reads it, and local slots only change by such writes and trims.
            self._store.read_into(out, first)
            return
        if untouched:
            self._anomaly("unmapped_read", f"read of never-written slots {untouched[0]}..{untouched[-1]}", len(untouched))
        if runs:
            into = [out[(run.slot - first) * PAGE_SIZE : (run.slot - first + run.count) * PAGE_SIZE] for run in runs]
            self.fetch(runs, self.demand_source, "demand", self.timeout, into)
            seconds = time.monotonic() - started
            self.metrics.fault_seconds.observe(seconds)
            for listener in self._fault_listeners:
                listener(runs[0].slot, seconds)

    def _consecutive_run_locked(self, first: int, count: int) -> Run | None:
        """The run if the slots map to consecutive guest pages, else None."""
        head = self._guest[first]
        if not head or count > 1 and self._guest[first : first + count] != array("I", range(head, head + count)):
            return None
        return Run(first, head - 1, count)

    def _read_each_locked(self, first: int, count: int, out: memoryview, untouched: list[int]) -> list[Run]:
        """Fill `out` slot by slot; returns the runs still to fetch. Never-written slots go to `untouched`."""
        to_fetch: list[tuple[int, int]] = []
        for i in range(count):
            slot = first + i
            page = out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            guest = self._guest[slot] - 1
            if self._overlay.get(slot):
                self._store.read_into(page, slot)
            elif guest >= 0:
                if not self.armed:
                    page[:] = self.codec.page(guest)
                elif not self._pending.get(slot):
                    self._store.read_into(page, slot)
                else:
                    to_fetch.append((slot, guest))
            elif slot == 0:
                page[:] = self.header
            else:
                page[:] = ZERO_PAGE
                if not self._touched.get(slot):
                    untouched.append(slot)
        return coalesce(to_fetch)

    def fetch(
        self,
        runs: Sequence[Run],
        source: PageSource | None,
        reason: str,
        timeout: float,
        into: Sequence[memoryview] | None = None,
    ) -> None:
        """Fetch `runs` from `source` in one round trip and store the pages of slots that still map
        to them. Run i is received into into[i] (the caller's memory: no allocation per fetch, which
        costs fresh zeroed pages at this size), or into new buffers if `into` is not given."""
        if source is None:
            raise DeviceIOError("no source connection")
        ranges = [(run.guest * PAGE_SIZE, run.count * PAGE_SIZE) for run in runs]
        datas = into if into is not None else [memoryview(bytearray(length)) for _, length in ranges]
        try:
            source.read_many_into(ranges, datas, timeout)
        except Exception as exc:
            with self._lock:
                self.source_errors += 1
            self.metrics.source_errors.inc()
            log.error(
                "%s fetch of %d pages (guest pages %d..) failed: %s: %s",
                reason, sum(r.count for r in runs), runs[0].guest, type(exc).__name__, exc,
            )
            raise DeviceIOError(f"fetch from the source failed: {exc}") from exc
        if reason == "demand" and not self.demand_store:
            self._count_unstored(runs, datas)
            return
        with self._lock:
            claims = [claim for run, data in zip(runs, datas) for claim in self._claim_locked(run, data)]
        written: list[tuple[int, int, list[tuple[int, int]]]] = []  # (slot, pages, data slot ranges)
        try:
            for slot, data in claims:  # outside the lock: a pwrite into fresh page cache can take milliseconds
                written.append((slot, len(data) // PAGE_SIZE, self._store_fetched(slot, data)))
        finally:
            stored = zero = 0  # data pages made local; zero pages made local (holes)
            with self._lock:
                for slot, data in claims:
                    self._storing.clear_range(slot, slot + len(data) // PAGE_SIZE)
                for slot, count, data_ranges in written:
                    for start, end in data_ranges:
                        self._has_data.set_range(start, end)
                    newly_local = self._pending.count(slot, slot + count)  # (the zero-page settle may have been first)
                    self._pending.clear_range(slot, slot + count)
                    self.remaining -= newly_local
                    data_pages = sum(end - start for start, end in data_ranges)
                    zero_pages = newly_local - data_pages
                    if self._demand_unstored.find(slot, slot + count) >= 0:  # fetched on demand before
                        again = sum(self._demand_unstored.count(start, end) for start, end in data_ranges)
                        self.fetched_again += again
                        zero_pages -= self._demand_unstored.count(slot, slot + count) - again  # counted then
                        self._demand_unstored.clear_range(slot, slot + count)
                    stored += data_pages
                    zero += zero_pages
                self.fetched[reason] += stored
                self.fetched_zero += zero
                self.fetched_bytes += sum(len(d) for d in datas)
                self._stored.notify_all()
        self._check_complete()

    def _count_unstored(self, runs: Sequence[Run], datas: Sequence[memoryview]) -> None:
        """Count a demand fetch whose pages went to the kernel only: the slots stay pending, and the
        prefetcher, which pulls the fault's neighbourhood next, fetches and stores them (docs/DESIGN.md, "A
        demand fetch keeps no copy"). Storing a page cost the swap-in about a fifth of its time."""
        pieces = [(run.slot + start // PAGE_SIZE, run.slot + -(-end // PAGE_SIZE), zero)
                  for run, data in zip(runs, datas) for start, end, zero in zero_runs(data)]
        with self._lock:
            for start, end, zero in pieces:  # a page fetched again before it was stored counts once
                first_time = end - start - self._demand_unstored.count(start, end)
                if zero:
                    self.fetched_zero += first_time
                else:
                    self.fetched["demand"] += first_time
                self._demand_unstored.set_range(start, end)
            self.fetched_bytes += sum(len(data) for data in datas)

    def _claim_locked(self, run: Run, data) -> list[tuple[int, memoryview]]:
        """The pieces of a fetched `run` to store: slots that still map to the same guest page, are not
        local yet and are not being stored by another fetch (a slot remapped, trimmed or overwritten while
        the fetch was in flight keeps its new state). They are marked as being stored: until the store
        ends, writes and trims of those slots wait (_wait_for_stores_locked); reads fetch them again."""
        end = run.slot + run.count
        view = memoryview(data)
        if (self._pending.count(run.slot, end) == run.count and self._storing.find(run.slot, end) < 0
                and self._consecutive_run_locked(run.slot, run.count) == run):
            pieces = [(run.slot, view)]  # the usual case: nothing changed while the fetch was in flight
        else:
            pieces = []
            i = 0
            while i < run.count:
                j = i
                while (j < run.count and self._guest[run.slot + j] == run.guest + j + 1
                       and self._pending.get(run.slot + j) and not self._storing.get(run.slot + j)):
                    j += 1
                if j > i:
                    pieces.append((run.slot + i, view[i * PAGE_SIZE : j * PAGE_SIZE]))
                    i = j
                else:
                    i += 1
        for slot, piece in pieces:
            self._storing.set_range(slot, slot + len(piece) // PAGE_SIZE)
        return pieces

    def _wait_for_stores_locked(self, start: int, end: int) -> None:
        """Wait until no fetched page in slots [start, end) is being written to the page file."""
        while self._storing.find(start, end) >= 0:
            self._stored.wait()

    def pending_runs(self, start: int, end: int, max_runs: int, max_pages: int) -> list[Run]:
        """Up to `max_runs` runs (each at most `max_pages`) of mapped, not-yet-local slots in [start, end)."""
        start = max(start, 1)
        end = min(end, self.slots)
        runs: list[Run] = []
        with self._lock:
            slot = self._pending.find(start, end)
            while slot >= 0 and len(runs) < max_runs:
                limit = min(end, slot + max_pages)
                stop = self._pending.find_clear(slot, limit)
                count = (limit if stop < 0 else stop) - slot
                run = self._consecutive_run_locked(slot, count)
                if run is None:  # the run ends where the guest pages stop being consecutive
                    guest = self._guest[slot] - 1
                    run = Run(slot, guest, next(i for i in range(1, count) if self._guest[slot + i] != guest + i + 1))
                runs.append(run)
                count = run.count
                slot = self._pending.find(slot + count, end)
        return runs

    def write(self, data, offset: int) -> None:
        """Write `data` (bytes-like) at `offset`: marker pages map slots, anything else is overlay."""
        data = memoryview(data)
        length = len(data)
        self._check_range(offset, length)
        if length == 0:
            return
        first, count, start = page_span(offset, length)
        if start or length != count * PAGE_SIZE:
            pages = memoryview(bytearray(count * PAGE_SIZE))
            if start:
                self._read_slots(first, 1, pages[:PAGE_SIZE])
            if (start + length) % PAGE_SIZE and (count > 1 or not start):
                self._read_slots(first + count - 1, 1, pages[(count - 1) * PAGE_SIZE :])
            pages[start : start + length] = data
            data = pages
        guests = [self._parse_marker(first + i, data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) for i in range(count)]
        for chunk_start in range(0, count, LOCK_BATCH):
            chunk_end = min(chunk_start + LOCK_BATCH, count)
            with self._lock:
                self._wait_for_stores_locked(first + chunk_start, first + chunk_end)
                data_start = None  # first page of the current run of data (overlay) pages
                for i in range(chunk_start, chunk_end):
                    if guests[i] is None:
                        self._make_overlay(first + i)
                        if data_start is None:
                            data_start = i
                        continue
                    self._map(first + i, guests[i])
                    if data_start is not None:
                        self._store_pages(first + data_start, data[data_start * PAGE_SIZE : i * PAGE_SIZE])
                        data_start = None
                if data_start is not None:
                    self._store_pages(first + data_start, data[data_start * PAGE_SIZE : chunk_end * PAGE_SIZE])
            if self._warmer is not None and not self.armed:
                chunk = range(chunk_start, chunk_end)
                low = next((i for i in chunk if guests[i] is not None), None)
                if low is not None:
                    high = next(i for i in reversed(chunk) if guests[i] is not None)
                    self._warmer.want(first + low, first + high + 1)

    def _parse_marker(self, slot: int, page: memoryview) -> int | None:
        """The guest page a written page maps its slot to, or None if the page is data."""
        if slot == 0 or not looks_like_marker(page):
            return None
        guest = self.codec.parse(page)
        if guest is None:
            self._anomaly("invalid_marker", f"a marker that does not verify at slot {slot}: kept as data")
        elif page[HEADER_SIZE:].tobytes() != MARKER_TAIL:  # (memoryview == bytes compares per item: slow)
            self._anomaly("invalid_marker", f"a marker with data after its header at slot {slot}: kept as data")
            guest = None
        elif guest >= self.pages:
            self._anomaly("invalid_marker", f"a marker for guest page {guest} >= pages={self.pages} at slot {slot}")
            guest = None
        return guest

    def trim(self, offset: int, length: int) -> None:
        """Free the whole slots inside [offset, offset + length): they read as zeros afterwards."""
        self._check_range(offset, length)
        first = -(-offset // PAGE_SIZE)
        end = (offset + length) // PAGE_SIZE
        for start in range(first, end, LOCK_BATCH):  # `swapon --discard` trims the whole device
            stop = min(start + LOCK_BATCH, end)
            with self._lock:
                self._wait_for_stores_locked(start, stop)
                self._touched.set_range(start, stop)
                if self._overlay.find(start, stop) < 0 and self._guest[start:stop] == _NO_SLOTS[: stop - start]:
                    continue  # nothing held here
                # In bulk, and without punching: the kernel discards freed swap slots as it goes, so
                # during completion trims come about as often as swap-ins. A trimmed slot reads as
                # zeros from its state alone; _map() punches old bytes before a slot can read from
                # the page file again without being written first.
                self._forget_range(start, stop)
        self._check_complete()  # the last pages waiting may have been freed

    def _anomaly(self, kind: str, message: str, count: int = 1) -> None:
        with self._lock:
            self.anomalies += count
            seen = self.anomalies - count
        self.metrics.anomalies.labels(kind=kind).inc(count)
        if seen < ANOMALY_LOG_LIMIT:
            log.warning("anomaly (%s): %s", kind, message)
            if seen + count >= ANOMALY_LOG_LIMIT:
                log.warning("further anomalies are counted, not logged")
