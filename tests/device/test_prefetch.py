"""The prefetch scheduler (no threads), and the prefetcher thread on a fake source."""

from __future__ import annotations

import threading
import time

import pytest

from nbd_postcopy.common.units import PAGE_SIZE
from nbd_postcopy.device.device import Run
from nbd_postcopy.device.prefetch import RUN_PAGES, WINDOW, PrefetchScheduler, Prefetcher
from tests.device.test_device import make_device, random_image, stage

P = PAGE_SIZE


def identity_staged(tmp_path, pages=1024, **kwargs):
    device, source = make_device(tmp_path, pages=pages, headroom=0, **kwargs)
    for slot in range(1, pages + 1):
        device.write(device.codec.page(slot - 1), slot * P)
    device.arm()
    return device, source


def take(scheduler, device, source, max_runs):
    """next_runs, then fetch them as the prefetcher would."""
    runs = scheduler.next_runs(max_runs)
    if runs:
        device.fetch(runs, source, "prefetch", 1.0)
    return runs


def test_sweep_covers_everything_in_runs(tmp_path):
    device, source = identity_staged(tmp_path, pages=300)
    scheduler = PrefetchScheduler(device, run_pages=64)
    assert take(scheduler, device, source, 3) == [Run(1, 0, 64), Run(65, 64, 64), Run(129, 128, 64)]
    assert take(scheduler, device, source, 8) == [Run(193, 192, 64), Run(257, 256, 44)]
    assert take(scheduler, device, source, 8) == [] and device.complete


def test_hints_come_before_the_sweep(tmp_path):
    device, source = identity_staged(tmp_path)
    scheduler = PrefetchScheduler(device, run_pages=64, behind=16, ahead=256)
    scheduler.hint(500)
    scheduler.hint(800)  # newest first
    assert take(scheduler, device, source, 4) == [Run(784, 783, 64), Run(848, 847, 64), Run(912, 911, 64), Run(976, 975, 49)]
    # the 800 neighbourhood is exhausted: then 500's, then the sweep from the start
    assert take(scheduler, device, source, 5) == [Run(484, 483, 64), Run(548, 547, 64), Run(612, 611, 64), Run(676, 675, 64), Run(740, 739, 16)]
    assert take(scheduler, device, source, 1) == [Run(1, 0, 64)]


def test_runs_skip_local_and_break_at_guest_discontinuities(tmp_path):
    device, source = make_device(tmp_path, pages=64, headroom=0)
    stage(device, {1: 10, 2: 11, 3: 12, 4: 40, 5: 41, 7: 3})
    device.arm()
    device.read(2 * P, P)  # slot 2 becomes local
    scheduler = PrefetchScheduler(device)
    assert scheduler.next_runs(8) == [Run(1, 10, 1), Run(3, 12, 1), Run(4, 40, 2), Run(7, 3, 1)]


def test_sweep_wraps_to_pick_up_slots_behind_the_cursor(tmp_path):
    device, _ = identity_staged(tmp_path, pages=10)
    scheduler = PrefetchScheduler(device, run_pages=4)
    assert scheduler.next_runs(1) == [Run(1, 0, 4)]
    assert scheduler.next_runs(5) == [Run(5, 4, 4), Run(9, 8, 2), Run(1, 0, 4)]


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_prefetcher_fetches_everything_then_completes(tmp_path, caplog):
    pages = 2000
    device, source = make_device(tmp_path, pages=pages, headroom=1, image=random_image(pages, zero_pages=(7, 8, 9)))
    for slot in range(1, pages + 1):
        device.write(device.codec.page(slot - 1), slot * P)
    prefetch_source = type(source)(source.image)
    prefetcher = Prefetcher(device, prefetch_source, timeout=5)
    prefetcher.start()
    try:
        time.sleep(0.05)
        assert prefetch_source.calls == []  # never before arming
        caplog.set_level("INFO")
        device.arm()
        wait_until(lambda: device.complete)
        calls = len(prefetch_source.calls)
        stage(device, {pages + 1: 5})  # a page mapped later (after completion) is fetched too
        wait_until(lambda: device.complete)
        assert len(prefetch_source.calls) == calls + 1
    finally:
        prefetcher.close()
    assert "all pages are local: the source can be released" in caplog.text
    assert device.fetched["prefetch"] == pages - 3 + 1 and device.fetched_zero == 0  # zero pages were never fetched
    assert all(len(call) <= WINDOW and all(length <= RUN_PAGES * P for _, length in call) for call in prefetch_source.calls)
    source.down = True
    assert device.read(P, pages * P) == source.image
    assert device.read((pages + 1) * P, P) == source.image[5 * P : 6 * P]


def test_steady_demand_does_not_starve_the_prefetcher(tmp_path):
    """A guest that faults all the time (here: every slot from the end, a millisecond per fetch) still
    gets full prefetch batches, and the two meet in the middle."""
    pages = 3000
    device, demand = identity_staged(tmp_path, pages=pages)
    demand.before_reply = lambda: time.sleep(0.001)
    prefetch_source = type(demand)(demand.image)
    prefetcher = Prefetcher(device, prefetch_source, timeout=5, learn_zeros=False)

    def guest() -> None:
        slot = pages
        while slot > 0 and not device.complete:
            device.read(slot * P, P)
            slot -= 1

    thread = threading.Thread(target=guest)
    thread.start()
    prefetcher.start()
    try:
        thread.join(30)
    finally:
        prefetcher.close()
    assert device.complete and device.fetched["demand"] > 0
    assert device.fetched["demand"] + device.fetched["prefetch"] == pages
    assert device.fetched["prefetch"] > device.fetched["demand"]  # the prefetcher was not starved
    full = [call for call in prefetch_source.calls if len(call) == WINDOW]
    assert full and len(full) >= len(prefetch_source.calls) - 1  # only the last batch may hold less


def test_overlapping_lookups_never_fetch_a_page_twice(tmp_path):
    """Recorded pages a few slots apart (and neighbouring fault hints) start lookups inside one pending run."""
    device, source = identity_staged(tmp_path)
    scheduler = PrefetchScheduler(device, run_pages=64, behind=16, ahead=256)
    scheduler.replay([700, 702, 704])
    assert scheduler.replay_runs(8) == [Run(700, 699, 8), Run(708, 707, 2), Run(710, 709, 2)]
    scheduler.hint(300)
    scheduler.hint(310)
    runs = scheduler.next_runs(8)
    slots = [slot for run in runs for slot in range(run.slot, run.slot + run.count)]
    assert len(slots) == len(set(slots))
