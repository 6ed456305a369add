"""Working-set record and replay: the recorder, the file format, the scheduler's replay queue."""

from __future__ import annotations

import pytest

from nbd_postcopy.common.units import PAGE_SIZE
from nbd_postcopy.device.device import Run
from nbd_postcopy.device.prefetch import PrefetchScheduler
from nbd_postcopy.device.workingset import (
    WorkingSetError,
    WorkingSetRecorder,
    read_workingset,
    write_workingset,
)
from tests.device.test_device import make_device, stage

P = PAGE_SIZE


def test_the_recorder_keeps_first_faults_as_guest_pages_in_order(tmp_path):
    device, _ = make_device(tmp_path, pages=64, headroom=0)
    stage(device, {1: 30, 2: 31, 5: 7, 9: 12})
    device.arm()
    recorder = WorkingSetRecorder(device.guest_of, limit=3)
    device.add_fault_listener(recorder)
    for slot in (5, 1, 5, 9, 2):  # a repeat is kept once; the limit stops the list
        device.read(slot * P, P)
    assert recorder.pages() == [7, 30, 12]


def test_the_file_round_trips_and_bad_lines_are_refused(tmp_path):
    path = tmp_path / "workingset"
    write_workingset(path, [5, 3, 9], comment="snapshot abc\nrecorded at restore 1")
    assert path.read_text().startswith("# snapshot abc\n# recorded at restore 1\n5\n")
    assert read_workingset(path, 10) == [5, 3, 9]
    assert not list(tmp_path.glob(".*tmp*"))
    path.write_text("1\n1\n2  # comment\n\n")
    assert read_workingset(path, 10) == [1, 2]
    path.write_text("1\n10\n")
    with pytest.raises(WorkingSetError, match="line 2: '10' is not a guest page number below 10"):
        read_workingset(path, 10)
    path.write_text("x\n")
    with pytest.raises(WorkingSetError, match="line 1"):
        read_workingset(path, 10)
    with pytest.raises(WorkingSetError, match="cannot read"):
        read_workingset(tmp_path / "missing", 10)


def test_slots_of_maps_guest_pages_back_to_slots(tmp_path):
    device, _ = make_device(tmp_path, pages=64, headroom=0)
    stage(device, {1: 30, 2: 31, 5: 7})
    assert device.slots_of([7, 31, 50]) == {7: 5, 31: 2}


def test_the_replay_queue_yields_the_recorded_pages_in_order_and_skips_local_ones(tmp_path):
    device, source = make_device(tmp_path, pages=1024, headroom=0)
    for slot in range(1, 1025):
        device.write(device.codec.page(slot - 1), slot * P)
    device.arm()
    device.read(300 * P, 4 * P)  # local already
    scheduler = PrefetchScheduler(device, run_pages=64)
    scheduler.replay([700, 300, 1020])
    assert scheduler.replay_runs(2) == [Run(700, 699, 8), Run(304, 303, 4)]
    assert scheduler.replay_runs(2) == [Run(1020, 1019, 5)]
    assert scheduler.replay_runs(2) == []


def test_the_prefetcher_fetches_the_working_set_first(tmp_path):
    from nbd_postcopy.device.prefetch import Prefetcher
    from tests.device.test_device import random_image

    pages = 2000
    device, source = make_device(tmp_path, pages=pages, headroom=1, image=random_image(pages))
    for slot in range(1, pages + 1):
        device.write(device.codec.page(slot - 1), slot * P)
    prefetch_source = type(source)(source.image)
    prefetcher = Prefetcher(device, prefetch_source, timeout=5, learn_zeros=False, replay=[1500, 10, 4000])
    prefetcher.start()
    try:
        device.arm()
        assert prefetcher.replay_done.wait(10)
        assert prefetcher.replayed == 2  # guest page 4000 is not mapped
        first = [offset // P for call in prefetch_source.calls[:2] for offset, _ in call]
        assert first[:2] == [1500, 10]
    finally:
        prefetcher.close()
