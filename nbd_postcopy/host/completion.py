"""Completion: bring every still-swapped page of a staged range back into the target process.

`complete_range()` walks the range in chunks. For each chunk that still has swap entries (pagemap
bit 62) it issues process_madvise(MADV_WILLNEED), which starts the swap-ins asynchronously, and a few
chunks later it read-touches those pages from outside (process_vm_readv). The touch maps the page into
the target again, so pagemap shows it present: that is the per-page proof that it is in (a page that is
only in the swap cache still shows a swap entry). An optional rate cap paces the chunks so the target's
own demand faults keep most of the device.

With the device's control socket, completion then waits, as long as the device makes progress, until the
device holds every page: while its prefetcher runs, the pages that completion's swap-ins fetched on demand
are stored by the prefetcher afterwards.

Pages on any swap device count: after completion the range has no swap entries at all, so swapoff of the
postcopy device is quick. Completion does not swapoff; `scripts/setup-swap.sh detach` does that after.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import TextIO

from ..common import linux
from ..common.units import PAGE_SIZE
from ..device.control import ControlError, request, statuses_until_local
from ..common.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
READAHEAD_CHUNKS = 8  # chunks whose swap-ins are in flight before the oldest is touched (8 MiB by default)
PASSES = 3
DEVICE_STALL_SECONDS = 2.0  # how long the device may make no progress before completion stops waiting for it


class CompletionError(Exception):
    """Completion could not bring the whole range in; the message says which pages."""


@dataclass
class CompleteReport:
    pid: int
    address: int
    pages: int
    swapped_at_start: int = 0
    brought_in: int = 0
    seconds: float = 0.0
    pswpin: int = 0
    device_complete: bool | None = None

    @property
    def pages_per_second(self) -> float:
        return self.brought_in / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        text = (f"completed process {self.pid} range {self.address:#x}+{self.pages * PAGE_SIZE:#x}: brought in "
                f"{self.brought_in} of {self.swapped_at_start} swapped pages in {self.seconds:.2f}s "
                f"({self.pages_per_second:,.0f} pages/s, {self.pages_per_second * PAGE_SIZE / 2**20:.1f} MiB/s, "
                f"pswpin +{self.pswpin})")
        if self.device_complete is not None:
            text += f"; device complete: {'yes' if self.device_complete else 'no'}"
        return text


def swapped_runs(pagemap: linux.Pagemap, address: int, first: int, count: int) -> list[tuple[int, int]]:
    """Runs (start page, count) of swapped pages among pages [first, first+count) of the range."""
    entries = pagemap.entries(address + first * PAGE_SIZE, count)
    return [(first + s, n) for s, n in linux.page_runs(i for i in range(count) if linux.is_swapped(entries[i]))]


def swapped_pages(pagemap: linux.Pagemap, address: int, pages: int) -> list[int]:
    """Indices of the swapped-out pages among the `pages` pages from `address`."""
    entries = pagemap.entries(address, pages)
    return [i for i in range(pages) if linux.is_swapped(entries[i])]


def _touch(pid: int, address: int, runs: list[tuple[int, int]], buffer: bytearray) -> None:
    view = memoryview(buffer)
    for start, n in runs:
        linux.process_vm_readv(pid, view[:n * PAGE_SIZE], address + start * PAGE_SIZE)


def _require_armed(control: str) -> None:
    """Refuse to complete from an unarmed device: its reads answer with the staging markers."""
    try:
        status = request(control, "status")
    except ControlError as exc:
        raise CompletionError(str(exc)) from None
    if not status.get("armed"):
        raise CompletionError(f"the device behind {control} is not armed: completing now would read staging markers "
                              "into the process instead of guest pages; arm it first")


def complete_range(pid: int, address: int, length: int, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   rate_bytes: float | None = None, control: str | None = None, quiet: bool = False,
                   stream: TextIO | None = None) -> CompleteReport:
    """Bring every swapped-out page of [address, address+length) of `pid` back in. See the module doc."""
    if address % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
        raise CompletionError(f"address {address:#x} and length {length} must be positive multiples of {PAGE_SIZE}")
    if chunk_bytes < PAGE_SIZE or chunk_bytes % PAGE_SIZE:
        raise CompletionError(f"chunk size {chunk_bytes} must be a positive multiple of {PAGE_SIZE}")
    if control:
        _require_armed(control)
    pages = length // PAGE_SIZE
    chunk = chunk_bytes // PAGE_SIZE
    started = time.monotonic()
    pswpin_before = linux.vmstat("pswpin")["pswpin"]
    try:
        holes = linux.uncovered_ranges(pid, address, length)
        if holes:
            start, end = holes[0]
            raise CompletionError(f"range {address:#x}-{address + length:#x} is not inside anonymous private writable "
                                  f"mappings of process {pid}: {start:#x}-{end:#x} is not (see /proc/{pid}/maps)")
        pidfd = linux.pidfd_open(pid)
    except OSError as exc:
        raise CompletionError(exc.strerror) from None
    try:
        pagemap = linux.Pagemap(pid)
    except OSError as exc:
        os.close(pidfd)
        raise CompletionError(exc.strerror) from None
    report = CompleteReport(pid, address, pages)
    buffer = bytearray(chunk_bytes)
    try:
        remaining = swapped_pages(pagemap, address, pages)
        report.swapped_at_start = len(remaining)
        bar = Progress("completing", len(remaining), quiet=quiet, stream=stream)
        for _ in range(PASSES):
            if not remaining:
                break
            in_flight: deque[list[tuple[int, int]]] = deque()

            def bring_in_oldest() -> None:
                runs = in_flight.popleft()
                _touch(pid, address, runs, buffer)
                report.brought_in += sum(n for _, n in runs)
                bar.update(min(report.brought_in, bar.total))

            for first in range(0, pages, chunk):
                runs = swapped_runs(pagemap, address, first, min(chunk, pages - first))
                for start, n in runs:
                    linux.process_madvise(pidfd, address + start * PAGE_SIZE, n * PAGE_SIZE, linux.MADV_WILLNEED)
                if runs:
                    in_flight.append(runs)
                while len(in_flight) > READAHEAD_CHUNKS:
                    bring_in_oldest()
                if rate_bytes:
                    ahead = report.brought_in * PAGE_SIZE / rate_bytes - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
            while in_flight:
                bring_in_oldest()
            remaining = swapped_pages(pagemap, address, pages)
        bar.finish()
    except OSError as exc:
        raise CompletionError(f"{exc.strerror or exc} (process {pid})") from exc
    finally:
        pagemap.close()
        os.close(pidfd)
    report.seconds = time.monotonic() - started
    report.pswpin = linux.vmstat("pswpin")["pswpin"] - pswpin_before
    if remaining:
        shown = ", ".join(f"{i} ({address + i * PAGE_SIZE:#x})" for i in remaining[:8])
        raise CompletionError(f"{len(remaining)} pages are still swapped out after {PASSES} passes: {shown}")
    if control:
        try:
            report.device_complete = _wait_device_complete(control)
        except ControlError as exc:
            log.warning("%s", exc)
    return report


def _wait_device_complete(control: str) -> bool:
    """Whether the device holds every page locally, waiting while it makes progress: the pages that
    completion's swap-ins fetched on demand are stored by the prefetcher afterwards (docs/DESIGN.md, "A
    demand fetch keeps no copy")."""
    for status in statuses_until_local(lambda command: request(control, command), DEVICE_STALL_SECONDS):
        pass
    return bool(status.get("complete"))
