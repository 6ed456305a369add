"""Unit tests of the device semantics (slot map, overlay, trim, arming, demand fetch) with a fake source."""

from __future__ import annotations

import os
import random
import sys
import threading
import time

import pytest

from nbd_postcopy.common.units import PAGE_SIZE
from nbd_postcopy.device import swapheader
from nbd_postcopy.device.device import Bitmap, Device, DeviceIOError, Run, coalesce, default_headroom
from nbd_postcopy.device.markers import HEADER_SIZE, MarkerCodec
from nbd_postcopy.device.metrics import DeviceMetrics

P = PAGE_SIZE
KEY = b"k" * 32


class SourceDown(Exception):
    pass


class FakeSource:
    """The SourceClient interface over an in-memory image; records every read_many call."""

    def __init__(self, image: bytes):
        self.image = image
        self.size = len(image)
        self.connected = True
        self.calls: list[list[tuple[int, int]]] = []
        self.down = False
        self.before_reply = None  # called inside read_many, before answering (race tests)

    def read_many(self, ranges, timeout):
        self.calls.append(list(ranges))
        if self.down:
            raise SourceDown(f"source unavailable for {timeout}s")
        if self.before_reply:
            self.before_reply()
        return [self.image[offset : offset + length] for offset, length in ranges]

    def read_many_into(self, ranges, views, timeout):
        for view, data in zip(views, self.read_many(ranges, timeout), strict=True):
            view[:] = data

    def close(self):
        self.down = True

    def block_status(self, offset, length, timeout):
        """base:allocation extents: all-zero pages as HOLE|ZERO (3), others as data (0)."""
        extents = []
        for page_offset in range(offset, offset + length, P):
            flags = 3 if not any(self.image[page_offset : page_offset + P]) else 0
            if extents and extents[-1][1] == flags:
                extents[-1] = (extents[-1][0] + P, flags)
            else:
                extents.append((P, flags))
        return extents


def random_image(pages: int, zero_pages: tuple[int, ...] = ()) -> bytes:
    image = bytearray(os.urandom(pages * P))
    for page in zero_pages:
        image[page * P : (page + 1) * P] = bytes(P)
    return bytes(image)


@pytest.fixture
def codec():
    return MarkerCodec(KEY)


def make_device(tmp_path, pages=64, headroom=16, image=None, **kwargs) -> tuple[Device, FakeSource]:
    device = Device(pages, MarkerCodec(KEY), headroom=headroom, cache_dir=str(tmp_path), **kwargs)
    source = FakeSource(image if image is not None else random_image(pages))
    device.demand_source = source
    return device, source


def stage(device: Device, mapping: dict[int, int]) -> None:
    """Write marker pages: {slot: guest page}."""
    for slot, guest in mapping.items():
        device.write(device.codec.page(guest), slot * P)


def test_geometry_and_header(tmp_path):
    device, _ = make_device(tmp_path, pages=100, headroom=10, label="lbl")
    assert device.slots == 111 and device.size == 111 * P
    fields = swapheader.parse(device.read(0, P))
    assert fields["last_page"] == 110 and fields["version"] == 1 and fields["label"] == "lbl"
    assert default_headroom(1000) == 4096 and default_headroom(1 << 20) == (1 << 20) // 32


def test_page_file_is_unlinked_and_sparse(tmp_path, codec):
    device, _ = make_device(tmp_path)
    assert os.listdir(tmp_path) == []
    device.write(b"x" * P, 5 * P)
    assert device._store.allocated_bytes() == P
    device.trim(5 * P, P)  # trims only forget: the bytes go when the slot is mapped again
    assert device.read(5 * P, P) == bytes(P) and device._store.allocated_bytes() == P
    device.write(codec.page(7), 5 * P)
    assert device._store.allocated_bytes() == 0
    device.close()


def test_unarmed_reads_of_mapped_slots_return_markers(tmp_path, codec):
    device, source = make_device(tmp_path)
    stage(device, {1: 10, 2: 11, 3: 40})
    assert device.read(2 * P, P) == codec.page(11)
    assert device.read(1 * P, 3 * P) == codec.page(10) + codec.page(11) + codec.page(40)
    assert source.calls == []
    assert device.status()["mapped"] == 3 and device.status()["remaining"] == 3


def test_armed_multi_slot_read_is_one_round_trip_with_merged_runs(tmp_path):
    device, source = make_device(tmp_path)
    # slots 1..8 as the kernel's readahead would read them: guest 20..23, then 30, 31, then 5, then 6
    stage(device, {1: 20, 2: 21, 3: 22, 4: 23, 5: 30, 6: 31, 7: 5, 8: 6})
    device.arm()
    data = device.read(1 * P, 8 * P)
    image = source.image
    expected = image[20 * P : 24 * P] + image[30 * P : 32 * P] + image[5 * P : 7 * P]
    assert data == expected
    assert source.calls == [[(20 * P, 4 * P), (30 * P, 2 * P), (5 * P, 2 * P)]]
    # stored locally: a re-read does not go to the source, even when it is down
    source.down = True
    assert device.read(1 * P, 8 * P) == expected
    assert len(source.calls) == 1
    status = device.status()
    assert status["remaining"] == 0 and status["local"] == 8 and status["complete"]
    assert status["fetched_demand"] == 8
    assert device.metrics.registry.get_sample_value("nbd_postcopy_pages_fetched_total", {"reason": "demand"}) == 8
    assert device.metrics.registry.get_sample_value("nbd_postcopy_fault_seconds_count") == 1


def test_unaligned_reads_of_mapped_slots(tmp_path):
    device, source = make_device(tmp_path)
    stage(device, {3: 7, 4: 8})
    device.arm()
    assert device.read(3 * P + 100, P) == source.image[7 * P + 100 : 8 * P + 100]


def test_valid_forged_and_foreign_markers(tmp_path, codec):
    device, _ = make_device(tmp_path)
    forged = bytearray(codec.page(3))
    forged[HEADER_SIZE - 1] ^= 1
    foreign = MarkerCodec(KEY, migration_id=b"m" * 16).page(3)
    other_key = MarkerCodec(b"o" * 32).page(3)
    with_data = bytearray(codec.page(3))
    with_data[-1] = 1
    out_of_range = codec.page(64)
    for slot, page in enumerate([forged, foreign, other_key, with_data, out_of_range], start=1):
        device.write(page, slot * P)
    for slot, page in enumerate([forged, foreign, other_key, with_data, out_of_range], start=1):
        assert device.guest_of(slot) is None
        assert device.read(slot * P, P) == bytes(page)  # kept exactly, as data
    assert device.status()["overlay_pages"] == 5 and device.status()["mapped"] == 0
    assert device.anomalies == 5
    assert device.metrics.registry.get_sample_value("nbd_postcopy_anomalies_total", {"kind": "invalid_marker"}) == 5
    device.write(codec.page(3), 1 * P)
    assert device.guest_of(1) == 3


def test_overlay_round_trip_and_marker_replaces_overlay(tmp_path, codec):
    device, source = make_device(tmp_path)
    data = os.urandom(3 * P)
    device.write(data, 10 * P)
    assert device.read(10 * P, 3 * P) == data
    device.arm()
    assert device.read(10 * P, 3 * P) == data
    assert source.calls == []
    device.write(codec.page(9), 11 * P)
    assert device.status()["overlay_pages"] == 2
    assert device.read(11 * P, P) == source.image[9 * P : 10 * P]
    assert device.metrics.registry.get_sample_value("nbd_postcopy_overlay_bytes") == 2 * P


def test_overlay_write_replaces_mapping(tmp_path):
    device, source = make_device(tmp_path)
    stage(device, {4: 1})
    device.arm()
    device.read(4 * P, P)
    data = os.urandom(P)
    device.write(data, 4 * P)
    assert device.guest_of(4) is None and device.read(4 * P, P) == data
    assert device.status()["mapped"] == 0


def test_unaligned_writes_read_modify_write(tmp_path):
    device, _ = make_device(tmp_path)
    reference = bytearray(device.read(0, device.size))
    for offset, length in [(5 * P + 100, 50), (6 * P - 10, 20), (7 * P + 1, 3 * P), (0, 512), (20 * P + 7, P - 7)]:
        chunk = os.urandom(length)
        device.write(chunk, offset)
        reference[offset : offset + length] = chunk
    assert device.read(0, device.size) == bytes(reference)


def test_unaligned_write_into_a_mapped_slot_fetches_then_keeps_data(tmp_path):
    device, source = make_device(tmp_path)
    stage(device, {2: 9})
    device.arm()
    device.write(b"abc", 2 * P + 10)
    expected = bytearray(source.image[9 * P : 10 * P])
    expected[10:13] = b"abc"
    assert device.read(2 * P, P) == bytes(expected)
    assert device.guest_of(2) is None


def test_write_over_header_is_overlay(tmp_path, codec):
    device, _ = make_device(tmp_path)
    page = codec.page(1)  # even a valid marker is data in slot 0
    device.write(page, 0)
    assert device.read(0, P) == page and device.guest_of(0) is None
    device.trim(0, P)
    assert device.read(0, P) == device.header


def test_trim_frees_slots(tmp_path, codec):
    device, source = make_device(tmp_path)
    stage(device, {1: 1, 2: 2})
    device.write(os.urandom(P), 3 * P)
    device.arm()
    device.read(1 * P, P)
    device.trim(1 * P, 3 * P + 100)  # the partial 4th slot is left alone
    assert device.read(1 * P, 3 * P) == bytes(3 * P)
    status = device.status()
    assert status["mapped"] == 0 and status["overlay_pages"] == 0 and status["remaining"] == 0
    assert device.anomalies == 0  # trimmed slots read as zeros without complaint


def test_big_trim_over_every_kind_of_slot(tmp_path, codec):
    device, source = make_device(tmp_path, pages=3000, headroom=0)
    stage(device, {slot: slot - 1 for slot in range(1, 2001)})  # mapped
    device.write(os.urandom(500 * P), 2001 * P)  # overlay; slots 2501.. never written
    device.arm()
    device.read(1 * P, 700 * P)  # local now; 701..2000 still pending
    device.trim(300 * P, 2500 * P)  # slots 300 .. 2799, across lock batches
    status = device.status()
    assert status["mapped"] == 299 and status["local"] == 299 and status["overlay_pages"] == 0
    assert status["remaining"] == 0 and device.read(300 * P, 2500 * P) == bytes(2500 * P)
    assert device.read(1 * P, 299 * P) == source.image[: 299 * P]


@pytest.mark.parametrize("map_before_learning", [True, False], ids=["settled-by-learning", "mapped-when-known"])
def test_old_bytes_of_a_trimmed_slot_never_show_through_a_zero_page(tmp_path, codec, map_before_learning):
    device, source = make_device(tmp_path, image=random_image(64, zero_pages=(9,)))
    stage(device, {1: 1})
    device.write(os.urandom(P), 2 * P)  # overlay bytes in slot 2
    device.arm()
    assert device.read(1 * P, P) == source.image[P : 2 * P]  # slot 1 now holds guest page 1's bytes
    device.trim(1 * P, 2 * P)
    fetches = len(source.calls)
    if map_before_learning:
        stage(device, {1: 9, 2: 9})  # waiting for guest page 9, which is all zeros...
        device.learn_zero_pages(source)  # ...and becomes local as a hole
    else:
        device.learn_zero_pages(source)
        stage(device, {1: 9, 2: 9})  # local at once
    assert device.is_local(1) and device.is_local(2)
    assert device.read(1 * P, 2 * P) == bytes(2 * P) and len(source.calls) == fetches


def test_without_demand_store_a_fetched_page_stays_pending_until_prefetched(tmp_path):
    device, source = make_device(tmp_path, image=random_image(64, zero_pages=(5,)), demand_store=False)
    stage(device, {1: 3, 2: 4, 3: 5})
    device.arm()
    for _ in range(2):  # fetched again: the first fetch kept nothing
        assert device.read(1 * P, 3 * P) == source.image[3 * P : 6 * P]
    assert len(source.calls) == 2 and device.status()["remaining"] == 3 and not device.is_local(1)
    # counted once as pages (guest page 5 is all zeros), although their bytes crossed the wire twice
    assert device.fetched["demand"] == 2 and device.fetched_zero == 1 and device.fetched["prefetch"] == 0
    assert device.fetched_bytes == 6 * P
    assert device.metrics.registry.get_sample_value("nbd_postcopy_pages_fetched_total", {"reason": "demand"}) == 2
    assert device._store.allocated_bytes() == 0
    device.fetch([Run(1, 3, 3)], source, "prefetch", 1.0)  # the prefetcher stores them
    assert device.complete and device.fetched["prefetch"] == 2 and device.fetched_again == 2
    assert device.fetched_zero == 1 and device.settled_zero == 0  # the zero page was fetched, once
    source.down = True
    assert device.read(1 * P, 3 * P) == source.image[3 * P : 6 * P]


def test_never_written_slot_reads_zeros_as_anomaly(tmp_path):
    device, source = make_device(tmp_path)
    device.arm()
    assert device.read(30 * P, 2 * P) == bytes(2 * P)
    assert device.anomalies == 2 and source.calls == []
    assert device.metrics.registry.get_sample_value("nbd_postcopy_anomalies_total", {"kind": "unmapped_read"}) == 2


def test_zero_pages_are_served_without_fetching(tmp_path):
    device, source = make_device(tmp_path, image=random_image(64, zero_pages=(3, 4, 50)))
    stage(device, {1: 3, 2: 4, 3: 5, 4: 50})
    device.arm()
    assert device.learn_zero_pages(source) == 3
    assert device.status()["remaining"] == 1
    assert device.read(1 * P, 2 * P) == bytes(2 * P)
    assert source.calls == []
    stage(device, {10: 50})  # mapped after arming: known zero at once
    assert device.is_local(10) and device.read(10 * P, P) == bytes(P)
    assert device.read(3 * P, P) == source.image[5 * P : 6 * P]
    assert device.complete
    assert device.status()["settled_zero"] == 4 and device.fetched_zero == 0 and device.fetched["demand"] == 1


def test_a_zero_page_fetched_on_demand_then_learned_is_not_counted_as_never_fetched(tmp_path):
    device, source = make_device(tmp_path, image=random_image(64, zero_pages=(3, 4)), demand_store=False)
    stage(device, {1: 3, 2: 4, 3: 5})
    device.arm()
    assert device.read(1 * P, P) == bytes(P)  # fetched on demand, kept no copy: still pending
    device.learn_zero_pages(source)  # settles slots 1 and 2
    assert device.status()["remaining"] == 1 and device.fetched_zero == 1 and device.settled_zero == 1


def test_zero_pages_settle_in_runs_and_slot_by_slot(tmp_path):
    """Settling takes word operations over runs of consecutive guest pages and goes slot by slot
    elsewhere; both must agree with the per-page rule (pending, and its guest page is all zeros)."""
    rng = random.Random(5)
    pages = 1500
    zero = tuple(sorted(rng.sample(range(pages), 400)))
    device, source = make_device(tmp_path, pages=pages, headroom=1000, image=random_image(pages, zero))
    mapping = {1 + i: i for i in range(700)}  # one long run across chunks, starting mid-byte (slot 1)
    shuffled = rng.sample(range(700, pages), pages - 700)  # then guest pages in no order, with gaps
    mapping.update({slot: guest for slot, guest in zip(range(750, 750 + len(shuffled) * 2, 2), shuffled)})
    stage(device, mapping)
    device.arm()
    device.read(1 * P, 3 * P)  # a few slots already local
    assert device.learn_zero_pages(source) == len(zero)
    expected_local = {slot for slot, guest in mapping.items() if guest in zero or slot <= 3}
    assert {slot for slot in mapping if device.is_local(slot)} == expected_local
    assert device.status()["remaining"] == len(mapping) - len(expected_local)


def test_wait_complete_wakes_when_the_last_page_arrives(tmp_path):
    device, source = make_device(tmp_path)
    stage(device, {1: 1, 2: 2})
    assert not device.wait_complete(0.01)  # not armed: never complete
    device.arm()
    assert not device.wait_complete(0.01)
    waited = {}

    def waiter():
        started = time.monotonic()
        waited["complete"] = device.wait_complete(30)
        waited["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=waiter)
    thread.start()
    device.read(1 * P, P)
    device.trim(2 * P, P)  # the last page waiting is freed: complete without a fetch
    thread.join(10)
    assert waited["complete"] and waited["seconds"] < 10  # woken, not timed out


def test_source_failure_is_eio_and_counted(tmp_path):
    device, source = make_device(tmp_path)
    stage(device, {1: 1})
    device.arm()
    source.down = True
    with pytest.raises(DeviceIOError, match="source unavailable"):
        device.read(1 * P, P)
    assert device.source_errors == 1
    assert device.metrics.registry.get_sample_value("nbd_postcopy_source_errors_total") == 1
    source.down = False
    assert device.read(1 * P, P) == source.image[P : 2 * P]


def test_remap_during_fetch_does_not_store_stale_data(tmp_path, codec):
    device, source = make_device(tmp_path)
    stage(device, {1: 10, 2: 11})
    device.arm()
    # while the fetch is in flight: slot 1 gets another guest page, slot 2 is overwritten with data
    data = os.urandom(P)

    def race():
        source.before_reply = None
        device.write(codec.page(20), 1 * P)
        device.write(data, 2 * P)

    source.before_reply = race
    device.read(1 * P, 2 * P)
    assert device.guest_of(1) == 20 and not device.is_local(1)
    assert device.read(2 * P, P) == data
    assert device.read(1 * P, P) == source.image[20 * P : 21 * P]


def test_concurrent_reads_and_writes(tmp_path, codec):
    device, source = make_device(tmp_path, pages=256, headroom=0)
    stage(device, {slot: slot - 1 for slot in range(1, 257)})
    device.arm()
    errors = []

    def reader(start):
        try:
            for slot in range(start, 257, 4):
                assert device.read(slot * P, P) == source.image[(slot - 1) * P : slot * P]
        except AssertionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(s,)) for s in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and device.complete


def test_out_of_range_requests(tmp_path):
    device, _ = make_device(tmp_path)
    with pytest.raises(DeviceIOError, match="beyond"):
        device.read(device.size - 10, 20)
    with pytest.raises(DeviceIOError, match="beyond"):
        device.write(b"x" * 20, device.size - 10)


def test_coalesce():
    assert coalesce([(1, 5), (2, 6), (3, 9), (5, 10), (6, 11)]) == [Run(1, 5, 2), Run(3, 9, 1), Run(5, 10, 2)]


def test_bitmap_find_and_set_range():
    bitmap = Bitmap(1000)
    bitmap.set_range(5, 900)
    assert bitmap.find(0, 1000) == 5 and bitmap.find(900, 1000) == -1
    assert all(bitmap.get(i) for i in range(5, 900)) and not bitmap.get(4) and not bitmap.get(900)
    empty = Bitmap(1 << 16)
    empty.set(60000)
    assert empty.find(1, 1 << 16) == 60000 and empty.find(1, 60000) == -1


def test_bitmap_find_clear_agrees_with_get():
    rng = random.Random(7)
    for _ in range(200):
        bitmap = Bitmap(300)
        for _ in range(rng.randrange(4)):
            start = rng.randrange(300)
            bitmap.set_range(start, rng.randrange(start, 301))
        start = rng.randrange(300)
        end = rng.randrange(start, 301)
        expected = next((i for i in range(start, end) if not bitmap.get(i)), -1)
        assert bitmap.find_clear(start, end) == expected


def test_memory_per_page_is_small(tmp_path):
    pages = 1 << 20  # 4 GiB guest
    device = Device(pages, MarkerCodec(KEY), cache_dir=str(tmp_path), metrics=DeviceMetrics())
    state = sum(
        sys.getsizeof(x)
        for x in (device._guest, device._overlay.bits, device._pending.bits, device._touched.bits, device._has_data.bits,
                  device._zero.bits)
    )
    assert state <= 8 * pages  # about 4.6 bytes per guest page
    device.close()


def test_bitmap_words_agree_with_bits():
    rng = random.Random(3)
    for _ in range(300):
        bitmap = Bitmap(300)
        for i in rng.sample(range(300), rng.randrange(300)):
            bitmap.set(i)
        start = rng.randrange(300)
        count = rng.randrange(1, 120)
        word = bitmap.word(start, count)
        assert [k for k in range(count) if word >> k & 1] == [k for k in range(count) if start + k < 300 and bitmap.get(start + k)]
        before = [bitmap.get(i) for i in range(300)]
        mask = rng.getrandbits(count) & word
        bitmap.clear_word(start, mask)
        assert [bitmap.get(i) for i in range(300)] == [b and not (start <= i < start + count and mask >> (i - start) & 1)
                                                          for i, b in enumerate(before)]


def test_bitmap_ranges():
    for start, end in [(0, 0), (3, 5), (0, 64), (5, 61), (8, 16), (13, 200)]:
        bitmap = Bitmap(256)
        bitmap.set_range(start, end)
        assert [i for i in range(256) if bitmap.get(i)] == list(range(start, end))
        assert bitmap.count(start, end) == end - start
        assert bitmap.count(0, 256) == end - start and bitmap.count(start + 1, end + 3) == max(0, end - start - 1)
        assert bitmap.count(start, end + 1) == end - start and (start == 0 or bitmap.count(start - 1, end) == end - start)
        bitmap.set_range(0, 256)
        bitmap.clear_range(start, end)
        assert [i for i in range(256) if not bitmap.get(i)] == list(range(start, end))


def test_bitmap_range_edits_and_counts_agree_with_bits():
    rng = random.Random(11)
    for _ in range(500):
        bitmap = Bitmap(200)
        expected = [False] * 200
        for _ in range(rng.randrange(1, 6)):
            start = rng.randrange(200)
            end = rng.randrange(start, 201)
            value = rng.random() < 0.6
            (bitmap.set_range if value else bitmap.clear_range)(start, end)
            expected[start:end] = [value] * (end - start)
        assert [bitmap.get(i) for i in range(200)] == expected
        start = rng.randrange(201)
        end = rng.randrange(start, 201)
        assert bitmap.count(start, end) == sum(expected[start:end])


def test_big_write_mixing_markers_and_data(tmp_path, codec):
    device, source = make_device(tmp_path, pages=3000, headroom=0)
    pages = [codec.page(i) if i % 3 == 0 else os.urandom(P) for i in range(3000)]
    device.write(b"".join(pages), P)  # crosses several lock batches
    assert device.status()["mapped"] == 1000 and device.status()["overlay_pages"] == 2000
    assert all(device.guest_of(1 + i) == i for i in range(0, 3000, 3))
    device.arm()
    expected = b"".join(source.image[i * P : (i + 1) * P] if i % 3 == 0 else page for i, page in enumerate(pages))
    assert device.read(P, 3000 * P) == expected


@pytest.mark.parametrize("change", ["none", "remapped", "trimmed", "overwritten"])
def test_a_fetched_run_stores_only_what_did_not_change_in_flight(tmp_path, codec, change):
    """A one-page run and a two-page run whose second page is unchanged store the first page alike: the
    whole-run shortcut of _claim_locked agrees with its piece-by-piece path."""
    image = random_image(64)
    results = []
    for pages in (1, 2):
        device, source = make_device(tmp_path, image=image)
        stage(device, {3: 10, 4: 11})
        device.arm()

        def race():
            source.before_reply = None
            if change == "remapped":
                stage(device, {3: 20})
            elif change == "trimmed":
                device.trim(3 * P, P)
            elif change == "overwritten":
                device.write(b"\x55" * P, 3 * P)

        source.before_reply = race
        device.fetch([Run(3, 10, pages)], source, "prefetch", 1.0)
        results.append((device.fetched["prefetch"] - (pages - 1), device.remaining + (pages - 1),
                        device.is_local(3), device.read(3 * P, P)))
    assert results[0] == results[1]
    assert results[0][0] == (1 if change == "none" else 0)
    assert results[0][3] == {"none": image[10 * P : 11 * P], "remapped": image[20 * P : 21 * P],
                             "trimmed": bytes(P), "overwritten": b"\x55" * P}[change]


class HeldStore:
    """Holds the device's next page-file write of fetched pages until released (the store runs outside the
    device lock, so other threads can act on the same slots meanwhile)."""

    def __init__(self, device: Device):
        self.device = device
        self.entered, self.release = threading.Event(), threading.Event()
        self.original = device._store.write
        device._store.write = self.write

    def write(self, slot, data):
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)
        self.original(slot, data)


@pytest.mark.parametrize("action", ["remap", "overwrite", "trim"])
def test_a_slot_being_stored_waits_for_its_store(tmp_path, codec, action):
    """The page-file write of fetched pages runs outside the device lock. A remap, overwrite or trim of
    the same slot meanwhile must not race it (the fetched bytes would land over the new state): each
    waits until the store ends."""
    device, source = make_device(tmp_path)
    stage(device, {3: 10})
    device.arm()
    held = HeldStore(device)
    prefetch = threading.Thread(target=device.fetch, args=([Run(3, 10, 1)], source, "prefetch", 5.0))
    prefetch.start()
    assert held.entered.wait(5)
    new_data = os.urandom(P)
    act = {"remap": lambda: stage(device, {3: 20}), "overwrite": lambda: device.write(new_data, 3 * P),
           "trim": lambda: device.trim(3 * P, P)}[action]
    other = threading.Thread(target=act)
    other.start()
    other.join(0.3)
    assert other.is_alive(), f"{action} did not wait for the store of its slot"
    held.release.set()
    prefetch.join(5)
    other.join(5)
    assert not other.is_alive() and not prefetch.is_alive()
    assert len(source.calls) == 1
    assert device.status()["remaining"] == (1 if action == "remap" else 0)  # a remapped slot waits for its new page
    expected = {"remap": source.image[20 * P : 21 * P], "overwrite": new_data, "trim": bytes(P)}[action]
    assert device.read(3 * P, P) == expected


@pytest.mark.parametrize("demand_store", [True, False])
def test_a_read_of_a_slot_being_stored_fetches_it_again_without_waiting(tmp_path, demand_store):
    """A store can take tens of milliseconds (dirty page throttling at 4 GiB): a swap-in of a slot being
    stored fetches the page again rather than wait, and stores nothing itself; the store then makes it local."""
    device, source = make_device(tmp_path, demand_store=demand_store)
    stage(device, {3: 10})
    device.arm()
    held = HeldStore(device)
    prefetch = threading.Thread(target=device.fetch, args=([Run(3, 10, 1)], source, "prefetch", 5.0))
    prefetch.start()
    try:
        assert held.entered.wait(5)
        assert device.read(3 * P, P) == source.image[10 * P : 11 * P]  # while the store is held
        assert len(source.calls) == 2
        assert device.status()["remaining"] == 1
    finally:
        held.release.set()
        prefetch.join(5)
    assert not prefetch.is_alive()
    status = device.status()
    assert status["remaining"] == 0 and status["fetched_prefetch"] == 1
    assert status["fetched_demand"] == (0 if demand_store else 1)  # a storing fetch counts what it stored
    assert device.read(3 * P, P) == source.image[10 * P : 11 * P]
    assert len(source.calls) == 2  # local now


def test_fetched_zero_pages_stay_holes_in_the_page_file(tmp_path):
    device, source = make_device(tmp_path, pages=64, headroom=0, image=random_image(64, zero_pages=(10, 11, 12)))
    stage(device, {1: 10, 2: 11, 3: 12, 4: 13})
    device.arm()
    assert device.read(P, 4 * P) == source.image[10 * P : 14 * P]  # one run, three zero pages in it
    assert device.fetched_zero == 3 and device.fetched["demand"] == 1
    assert device._store.allocated_bytes() <= P  # only the data page was written
    assert device.read(P, 3 * P) == bytes(3 * P)  # now local: read back from the holes


def test_staging_brings_the_page_file_in_and_arming_stops_it(tmp_path, codec):
    """With warm=True, the page file's pages of the slots that markers map are brought into memory
    (clean zero pages of the hole) while staging, and not after arming; data and holes read as before."""
    device, source = make_device(tmp_path, pages=4096, headroom=0, warm=True)
    try:
        stage(device, {slot: slot - 1 for slot in range(1, 2049)})
        deadline = time.monotonic() + 10
        while device.status()["page_file_warmed"] < 2048 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert device.status()["page_file_warmed"] >= 2048
        assert device._store.view().resident(P, 2048 * P)
        assert device._store.allocated_bytes() == 0  # in memory, not on disk: nothing was written
        device.arm()
        device.write(b"".join(codec.page(g) for g in range(2048, 4096)), 2049 * P)  # mapped after arming
        time.sleep(0.2)
        assert device.status()["page_file_warmed"] < 4096
        assert device.read(P, 2 * P) == source.image[: 2 * P]
        assert device.read(2049 * P, P) == source.image[2048 * P : 2049 * P]
    finally:
        device.close()


def test_without_warm_nothing_is_brought_in(tmp_path, codec):
    device, _ = make_device(tmp_path, pages=256, headroom=0)
    try:
        stage(device, {slot: slot - 1 for slot in range(1, 257)})
        time.sleep(0.1)
        assert device.status()["page_file_warmed"] == 0
        assert not device._store.view().resident(P, 256 * P)
    finally:
        device.close()
