"""The background prefetcher: pulls every mapped page that is not local yet, without slowing demand.

Scheduling (PrefetchScheduler, no threads or sockets, unit-tested on its own):
  0. right after arming, a replayed working set if one was given (device/workingset.py), in its
     recorded order, before anything else (`replay_done` is set once it is fetched);
  1. the neighbourhood of recent demand faults first, newest fault first (pre-paging: a guest that
     faults on a page soon wants its neighbours; staging pages a range out in address order, so
     neighbouring slots hold neighbouring guest pages);
  2. then a sweep over all slots, resuming where it stopped.
Zero pages: until the source has reported the whole image, one block status request goes out before
each batch, so fetching starts at once; the zero pages learned are settled (never fetched) once the whole
image is reported, and zero pages the sweep fetched before that arrive as holes on the wire and stay holes
in the page file.
Pacing: one batch of WINDOW runs (512 KiB) is in flight at a time, back to back, with no waiting for
gaps in demand. Demand fetches have their own source connection (and, between hosts, their own
priority on the wire: docs/DESIGN.md, "Demand before prefetch on the wire"), so a demand request waits
at most behind one small batch at the page server; a prefetcher that waited for quiet moments starved
under the steady faults of a guest that scans its memory, and the guest then faulted on almost every
page (docs/DESIGN.md, "Decisions": prefetch pacing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator

from ..common.linux import format_cpu_list, pin_this_thread
from ..common.units import PAGE_SIZE
from .device import Device, DeviceIOError, PageSource, Run
from .workingset import REPLAY_SPAN

log = logging.getLogger("nbd_postcopy.device.prefetch")

WINDOW = 2  # runs per round trip
RUN_PAGES = 128  # pages per run (512 KiB; docs/DESIGN.md, "Decisions": larger prefetch runs)
RETRY_PAUSE = 1.0  # after a failed prefetch fetch
IDLE_POLL = 0.2  # seconds between looks for work once everything is local


def _clipped(found: list[Run], chosen: list[Run]) -> list[Run]:
    """`found` without the slots that `chosen` (or an earlier run of `found`) already covers: lookups that
    start inside one pending run (two recorded pages a few slots apart, neighbouring fault hints) find
    overlapping runs, and each page must go over the wire once. A clipped run is still consecutive."""
    out: list[Run] = []
    for run in found:
        pieces = [(run.slot, run.slot + run.count)]
        for other in (*chosen, *out):
            a, b = other.slot, other.slot + other.count
            pieces = [(s, e) for s0, e0 in pieces for s, e in ((s0, min(e0, a)), (max(s0, b), e0)) if s < e]
        out += [Run(s, run.guest + s - run.slot, e - s) for s, e in pieces]
    return out


class PrefetchScheduler:
    """Chooses the next runs to prefetch: fault neighbourhoods first, then a sweep."""

    def __init__(
        self, device: Device, *, run_pages: int = RUN_PAGES, behind: int = 16, ahead: int = 256, max_hints: int = 64
    ):
        self.device = device
        self.run_pages = run_pages
        self.behind = behind
        self.ahead = ahead
        self._hints: deque[int] = deque(maxlen=max_hints)
        self._replay: deque[int] = deque()
        self._cursor = 1

    def replay(self, slots: list[int]) -> None:
        """Queue these slots (and the few after each) for replay_runs(), in this order."""
        self._replay.extend(slots)

    def replay_runs(self, max_runs: int) -> list[Run]:
        """The next runs of the replayed working set that are not local yet ([] once it is done)."""
        runs: list[Run] = []
        while self._replay and len(runs) < max_runs:
            slot = self._replay.popleft()
            found = self.device.pending_runs(slot, slot + REPLAY_SPAN, max_runs - len(runs), self.run_pages)
            runs += _clipped(found, runs)
        return runs

    def hint(self, slot: int) -> None:
        """A demand fault at `slot` (thread-safe: deque appends are atomic)."""
        self._hints.append(slot)

    def next_runs(self, max_runs: int) -> list[Run]:
        runs: list[Run] = []
        while self._hints and len(runs) < max_runs:
            slot = self._hints.pop()  # newest first
            found = self.device.pending_runs(slot - self.behind, slot + self.ahead, max_runs - len(runs), self.run_pages)
            runs += _clipped(found, runs)
            if len(runs) >= max_runs:
                self._hints.append(slot)  # its neighbourhood may hold more
        wrapped = False
        while len(runs) < max_runs:
            found = self.device.pending_runs(self._cursor, self.device.slots, max_runs - len(runs), self.run_pages)
            found = _clipped(found, runs)
            if found:
                runs += found
                self._cursor = found[-1].slot + found[-1].count
            elif wrapped or self._cursor <= 1:
                break
            else:
                self._cursor, wrapped = 1, True
        return runs


class Prefetcher:
    """Runs the scheduler on a daemon thread over its own source connection (which it owns and closes),
    after arming."""

    def __init__(self, device: Device, source: PageSource, *, timeout: float, learn_zeros: bool = True,
                 replay: list[int] = (), cpus: frozenset[int] | None = None):
        self.device = device
        self.cpus = cpus  # the CPUs the thread runs on (prefetch-cpus=), or None for any
        self.replay = list(replay)  # guest pages to pull first (a recorded working set)
        self.replayed = 0  # of them, mapped when the device was armed
        self.replay_done = threading.Event()  # the working set is fetched (or there was none)
        self.source = source
        self.timeout = timeout
        self.learn_zeros = learn_zeros
        self.scheduler = PrefetchScheduler(device)
        self._buffer = memoryview(bytearray(WINDOW * self.scheduler.run_pages * PAGE_SIZE))  # every batch lands here
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        device.add_fault_listener(self._on_fault)

    def _on_fault(self, slot: int, seconds: float) -> None:
        self.scheduler.hint(slot)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and close the source connection (which also ends a fetch in flight)."""
        self._stop.set()
        self.device.armed_event.set()  # wake a thread still waiting for arming
        self.source.close()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        if self.cpus:
            try:
                pin_this_thread(self.cpus)
                log.info("the prefetcher runs on CPU %s", format_cpu_list(self.cpus))
            except OSError as exc:  # e.g. a cpuset changed since the key was checked: run anywhere
                log.warning("prefetcher not pinned: %s", exc)
        self.device.armed_event.wait()
        if self._stop.is_set():
            return
        if self.replay:
            self._replay_working_set()
        self.replay_done.set()
        log.info("prefetching %d pages", self.device.remaining)
        learning = self._learn_zero_pages() if self.learn_zeros else None
        while not self._stop.is_set():
            if learning is not None:
                try:
                    next(learning)
                except StopIteration:
                    learning = None
            runs = self.scheduler.next_runs(WINDOW)
            if not runs:  # everything is local (or being fetched on demand): wait for new mappings
                if learning is None:
                    self._stop.wait(IDLE_POLL)
                continue
            self._fetch(runs)

    def _replay_working_set(self) -> None:
        """Fetch the recorded working set first (staging is over: its slots are known)."""
        started = time.monotonic()
        slots = self.device.slots_of(self.replay)
        self.scheduler.replay([slots[page] for page in self.replay if page in slots])
        self.replayed = len(slots)
        fetched = self.device.fetched["prefetch"]
        while not self._stop.is_set():
            runs = self.scheduler.replay_runs(WINDOW * self.scheduler.run_pages // REPLAY_SPAN)  # a full batch
            if not runs:
                break
            self._fetch(runs)  # runs that fail are left to the sweep
        log.info("replayed a working set of %d guest pages (%d mapped): %d pages fetched in %.2fs", len(self.replay),
                 len(slots), self.device.fetched["prefetch"] - fetched, time.monotonic() - started)

    def _fetch(self, runs: list[Run]) -> None:
        """Fetch one batch into the reusable buffer; after a failure, pause before the next."""
        try:
            self.device.fetch(runs, self.source, "prefetch", self.timeout, self._receive_views(runs))
        except DeviceIOError:
            self._stop.wait(RETRY_PAUSE)

    def _receive_views(self, runs: list[Run]) -> list[memoryview]:
        views, start = [], 0
        for run in runs:
            end = start + run.count * PAGE_SIZE
            views.append(self._buffer[start:end])
            start = end
        return views

    def _learn_zero_pages(self) -> Iterator[None]:
        """The device's zero page learning, one block status request per step: the prefetcher takes a
        step before each batch, so fetching starts at once (docs/DESIGN.md, "Zero pages")."""
        started = time.monotonic()
        try:
            zero = yield from self.device.zero_page_steps(self.source, self.timeout)
        except Exception as exc:  # block status is an optimisation: fetching zero pages is still correct
            log.warning("could not learn zero pages from the source (%s: %s); fetching them", type(exc).__name__, exc)
            return
        log.info("the source reports %d zero pages (%.2fs): served without fetching", zero, time.monotonic() - started)
