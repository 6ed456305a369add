"""QEMU plumbing against real QEMU (TCG): VM lifecycle, QMP, RAM location, and QEMU's own migrations."""

from __future__ import annotations

import os
import time

import pytest

from nbd_postcopy.testbench.guest import Failure, PassOk, prepare_guest
from nbd_postcopy.common.qmp import QmpError, VmError
from nbd_postcopy.testbench.vm import Console, Vm, find_ram_region, ignore_shared_migrate, largest_gap, merged_heartbeats, postcopy_migrate

MIB = 1 << 20


@pytest.fixture(scope="module")
def guest_image():
    return prepare_guest()


def _maps_line(pid: int, address: int) -> str:
    with open(f"/proc/{pid}/maps") as maps:
        return next(line for line in maps if int(line.split("-")[0], 16) == address)


def _assert_gone(*vms: Vm) -> None:
    for vm in vms:
        assert vm.process.poll() is not None, f"QEMU {vm.name} still runs"
        assert not vm.qmp_path.exists()
        if vm.ram_file is not None:
            assert not vm.ram_file.exists(), f"{vm.ram_file} left behind"


def _console(run_dir, name: str, output: bytes) -> Console:
    """A Console reading `output` from a real pipe that is then closed (the QEMU exited)."""
    read_end, write_end = os.pipe()
    console = Console(os.fdopen(read_end, "rb"), run_dir / f"{name}.console", name)
    os.write(write_end, output)
    os.close(write_end)
    console.join()
    return console


def test_a_heartbeat_cut_by_the_switchover_counts_once_when_its_rest_arrives(run_dir):
    source = _console(run_dir, "src", b"HEARTBEAT 7 t=0.350\nHEARTBEAT 8 t=0.4")
    time.sleep(0.05)
    destination = _console(run_dir, "dst", b"00\nHEARTBEAT 9 t=0.450\n")
    beats = merged_heartbeats(source, destination)
    assert [(b.counter, b.guest_time) for b in beats] == [(7, 0.35), (8, 0.4), (9, 0.45)]
    # beat 8 arrived with its rest, at the destination, not when the source's console closed
    assert beats[1].host_time == destination.first_line[1] > source.unterminated[1]
    assert source.events(Failure) == [] and destination.events(Failure) == []


def test_a_failure_cut_by_the_switchover_still_counts(run_dir):
    source = _console(run_dir, "src", b"HEARTBEAT 7 t=0.350\nFAIL page 12 at ")
    assert [f.line for f in source.events(Failure)] == ["FAIL page 12 at "]


def test_find_ram_region_on_incoming_destination(guest_image, run_dir):
    with Vm(guest_image, run_dir, name="dst", memory_mib=192, ram="ram", incoming=True) as vm:
        assert vm.qmp.status() == "inmigrate"
        assert vm.qmp.peer_pid() == vm.pid
        region = find_ram_region(vm)
        assert region.length == 192 * MIB and region.path == ""
        fields = _maps_line(vm.pid, region.address).split()
        assert fields[1] == "rw-p" and fields[4] == "0", "guest RAM should be a private anonymous mapping"
    _assert_gone(vm)


def test_find_ram_region_on_shared_sources(guest_image, run_dir):
    with Vm(guest_image, run_dir, name="file", memory_mib=128, ram="file") as by_file, \
         Vm(guest_image, run_dir, name="memfd", memory_mib=128, ram="memfd") as by_memfd:
        file_region = find_ram_region(by_file)
        assert file_region.length == 128 * MIB and file_region.path == str(by_file.ram_file)
        assert _maps_line(by_file.pid, file_region.address).split()[1] == "rw-s"
        memfd_region = find_ram_region(by_memfd)
        assert memfd_region.length == 128 * MIB and memfd_region.path.startswith("/memfd:")
        assert by_file.process.poll() is None and by_memfd.process.poll() is None
    _assert_gone(by_file, by_memfd)


def test_qmp_errors_name_the_command(guest_image, run_dir):
    with Vm(guest_image, run_dir, name="err", memory_mib=128, incoming=True) as vm:
        with pytest.raises(QmpError, match="QMP no-such-command failed: The command no-such-command has not been found"):
            vm.qmp.execute("no-such-command")
        with pytest.raises(VmError, match="no memory backend 'nope'"):
            find_ram_region(vm, memdev="nope")


def test_qmp_events_reach_callbacks_and_waiters(guest_image, run_dir):
    with Vm(guest_image, run_dir, name="ev", memory_mib=128) as vm:
        seen = []
        vm.qmp.on_event(lambda event: seen.append(event.name))
        mark = vm.qmp.mark()
        vm.qmp.execute("stop")
        stop = vm.qmp.wait_event("STOP", after=mark, timeout=5)
        assert stop.name == "STOP" and "STOP" in seen
        assert vm.qmp.status() == "paused"
        vm.qmp.execute("cont")
        vm.qmp.wait_event("RESUME", after=mark, timeout=5)
        with pytest.raises(VmError, match="no QMP event SHUTDOWN"):
            vm.qmp.wait_event("SHUTDOWN", after=vm.qmp.mark(), timeout=0.2)


def test_qemu_start_failure_shows_its_error(guest_image, run_dir):
    vm = Vm(guest_image, run_dir, name="bad", memory_mib=128, extra_args=["-no-such-option"])
    with pytest.raises(VmError, match="exited with status 1: .*-no-such-option"):
        vm.start()
    _assert_gone(vm)


@pytest.mark.slow
def test_qemu_postcopy_of_the_checker_guest(guest_image, run_dir):
    append = "memcheck.seed=21 memcheck.mode=write"
    with Vm(guest_image, run_dir, name="src", memory_mib=256, ram="file", append=append) as source, \
         Vm(guest_image, run_dir, name="dst", memory_mib=256, ram="ram", incoming=True, append=append) as dest:
        source.console.wait_for(PassOk, timeout=60)
        result = postcopy_migrate(source.qmp, dest.qmp, f"unix:{run_dir}/migrate.sock")
        assert result.status == "completed"
        assert result.postcopy_requests > 0, "the destination never faulted a page in from the source"
        assert result.transferred_bytes > 200 * MIB
        assert source.qmp.status() == "postmigrate" and dest.qmp.status() == "running"

        after = dest.console.mark()
        passes = dest.console.wait_for(PassOk, count=3, after=after, timeout=60)
        assert [p.number for p in passes] == list(range(passes[0].number, passes[0].number + 3))
        beats = merged_heartbeats(source.console, dest.console)
        assert [b.counter for b in beats] == list(range(beats[0].counter, beats[-1].counter + 1))
        assert largest_gap(beats) < 10.0
        assert source.console.events(Failure) == [] and dest.console.events(Failure) == []

        source.close()
        assert source.process.poll() is not None
        dest.console.wait_for(PassOk, after=dest.console.mark(), timeout=30)
    _assert_gone(source, dest)


@pytest.mark.slow
def test_ignore_shared_precopy_on_the_same_file(guest_image, run_dir):
    append = "memcheck.seed=5 memcheck.mode=write"
    with Vm(guest_image, run_dir, name="src", memory_mib=128, ram="file", append=append) as source:
        source.console.wait_for(PassOk, timeout=60)
        with Vm(guest_image, run_dir, name="dst", memory_mib=128, ram="file", ram_file=source.ram_file,
                incoming=True, append=append) as dest:
            result = ignore_shared_migrate(source.qmp, dest.qmp, f"unix:{run_dir}/migrate.sock")
            assert result.status == "completed"
            assert result.transferred_bytes < 16 * MIB, "shared RAM should not travel"
            dest.console.wait_for(PassOk, count=2, after=dest.console.mark(), timeout=60)
            assert dest.console.events(Failure) == [] and source.console.events(Failure) == []
            source.close()  # removes the file's name; the destination keeps its mapping
            dest.console.wait_for(PassOk, after=dest.console.mark(), timeout=30)
        assert dest.process.poll() is not None
    _assert_gone(source, dest)
