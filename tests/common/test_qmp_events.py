"""The time between two QMP events: by QEMU's stamps when there are any."""

from nbd_postcopy.common.qmp import QmpEvent, seconds_between


def test_qemu_stamps_win_over_arrival_times():
    # the source's STOP arrived 2 ms after the destination's RESUME, though QEMU stamped it 6 ms before
    stop = QmpEvent("STOP", {}, host_time=100.012, qemu_time=1_700_000_000.000)
    resume = QmpEvent("RESUME", {}, host_time=100.010, qemu_time=1_700_000_000.006)
    assert abs(seconds_between(stop, resume) - 0.006) < 1e-6


def test_arrival_times_without_stamps():
    stop = QmpEvent("STOP", {}, host_time=100.000)
    resume = QmpEvent("RESUME", {}, host_time=100.004)
    assert abs(seconds_between(stop, resume) - 0.004) < 1e-9
