"""nbd-postcopy snapshot and restore end to end: real QEMU (TCG), page server, swap device, staging."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nbd_postcopy.common.units import PAGE_SIZE
from nbd_postcopy.device.workingset import write_workingset
from nbd_postcopy.migration import snapshotdir
from nbd_postcopy.migration.restore import RestoreError, RestoreOptions, restore
from nbd_postcopy.migration.snapshot import SnapshotOptions, machine_of, snapshot
from nbd_postcopy.migration.snapshotdir import Manifest
from nbd_postcopy.testbench.guest import Failure, PassOk, prepare_guest
from nbd_postcopy.testbench.vm import Vm
from nbd_postcopy.host.attachment import State
from tests.migration.test_migrate import _nothing_left
from tests.swapdev import AffinityWatch, processes_mentioning, run_setup_swap

MIB = 1 << 20


@pytest.fixture(scope="module")
def guest_image():
    return prepare_guest()


def _remove_what_a_failed_restore_left(run_dir: Path) -> None:
    """A restore that fails after the resume leaves its swap device (and maybe its page server) up."""
    for state in run_dir.glob("rst*/swap"):
        run_setup_swap("detach", State.load(state).name, "--no-complete")
    for pid in processes_mentioning(str(run_dir)):
        if b" serve " in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "):
            os.kill(pid, signal.SIGTERM)


def _restored_guest_verifies(vm: Vm) -> None:
    """Full verification passes of all the guest's memory after the restore, and no FAIL line."""
    after = vm.console.mark()
    vm.console.wait_for(PassOk, count=2, after=after, timeout=90)
    assert vm.console.events(Failure) == [], vm.console.tail()
    assert vm.qmp.status() == "running"


def _snapshot_of_a_fresh_guest(guest_image, run_dir, snap, append: str, mib: int = 128, ram: str = "file",
                               stream=None):
    """Boot a guest, let it verify its memory once, snapshot it into `snap` (the VM quits); the report."""
    with Vm(guest_image, run_dir, name="src", memory_mib=mib, ram=ram, append=append, extra_qmp=1) as source:
        source.console.wait_for(PassOk, timeout=60)
        saved = snapshot(SnapshotOptions(source.extra_qmp_paths[0], snap, quiet=stream is None, stream=stream))
        source.wait_exit(10)
    return saved


def _restore_into_a_fresh_qemu(guest_image, run_dir, snap, append: str, name: str = "dst", stream=None,
                               mib: int = 128):
    """Restore `snap` into a new QEMU waiting with -incoming defer; the guest must verify its memory.
    Returns the restore's report."""
    try:
        with Vm(guest_image, run_dir, name=name, memory_mib=mib, ram="ram", incoming=True, append=append,
                extra_qmp=1) as destination:
            report = restore(RestoreOptions(snap, destination.extra_qmp_paths[0], run_dir / f"rst-{name}",
                                            quiet=stream is None, stream=stream))
            _restored_guest_verifies(destination)
    finally:
        _remove_what_a_failed_restore_left(run_dir)
    return report


@pytest.mark.slow
@pytest.mark.root
def test_snapshot_then_restore_twice_with_working_set_replay(guest_image, run_dir, swap_lock):
    append = "memcheck.seed=23 memcheck.mode=write"
    snap = run_dir / "snap"
    saved = _snapshot_of_a_fresh_guest(guest_image, run_dir, snap, append, mib=256)
    assert saved.guest_bytes == 256 * MIB and saved.data_bytes < saved.guest_bytes
    assert saved.state_bytes < 16 * MIB, "guest RAM must not be in the device state"
    assert sorted(p.name for p in snap.iterdir()) == ["manifest.json", "ram", "state"]
    assert [p.name for p in run_dir.glob("snap.partial-*")] == []

    with AffinityWatch(str(run_dir)) as watch:
        reports = [_restore_into_a_fresh_qemu(guest_image, run_dir, snap, append, name=f"dst{number}", mib=256)
                   for number in (1, 2)]
    watch.check_auto(page_server_too=True)  # restore runs on one host, like migrate
    first, second = reports
    assert first.replayed_pages == 0 and first.recorded_pages > 0
    assert (snap / "workingset").read_text().startswith("# working set of the snapshot with RAM sha256 ")
    assert second.replayed_pages == first.recorded_pages
    for report in reports:
        assert report.guest_bytes == 256 * MIB
        assert report.pages_demand + report.pages_prefetch > 0
    print(f"\nwithout a record:\n{first.summary()}\nwith one:\n{second.summary()}")
    snapshotdir.verify(snap, snapshotdir.load(snap))  # restores never change the snapshot
    _nothing_left(run_dir)


def _fake_snapshot(run_dir, machine: dict, name: str = "fake") -> tuple:
    """A well-formed snapshot of `machine` (its RAM a little pattern, its state junk: never loaded here)."""
    directory = run_dir / name
    partial = snapshotdir.begin(directory)
    (partial / "state").write_bytes(b"QEVM" + bytes(1000))
    with open(partial / "ram", "wb") as ram:
        ram.truncate(machine["ram_bytes"])
        ram.write(b"\x5a" * PAGE_SIZE)
    snapshotdir.finish(partial, directory, Manifest(
        memdev="ram0", machine=machine,
        ram={"file": "ram", "bytes": machine["ram_bytes"], "data_bytes": PAGE_SIZE,
             "sha256": snapshotdir.file_sha256(partial / "ram")},
        state={"file": "state", "bytes": 1004, "sha256": snapshotdir.file_sha256(partial / "state")},
    ))
    return directory


def _swaps() -> str:
    with open("/proc/swaps") as swaps:
        return swaps.read()


@pytest.mark.slow
@pytest.mark.root
def test_a_damaged_or_unfitting_snapshot_is_refused_and_nothing_is_started(guest_image, run_dir, swap_lock):
    try:
        _refusals(guest_image, run_dir)
    finally:
        _remove_what_a_failed_restore_left(run_dir)
    _nothing_left(run_dir)


def _refusals(guest_image, run_dir) -> None:
    with Vm(guest_image, run_dir, name="dst", memory_mib=128, ram="ram", incoming=True, extra_qmp=1) as destination:
        machine = machine_of(destination.qmp, 128 * MIB)
        good = _fake_snapshot(run_dir, machine)
        swaps, loops = _swaps(), subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout

        def refused(directory, match):
            with pytest.raises(RestoreError, match=match) as refusal:
                restore(RestoreOptions(directory, destination.extra_qmp_paths[0], run_dir / "rst", quiet=True))
            assert "\n" not in str(refusal.value), "a refusal is one line"
            assert destination.qmp.status() == "inmigrate"  # untouched: it can still take a good snapshot
            assert _swaps() == swaps
            assert subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout == loops
            assert not (run_dir / "rst" / "swap").exists()

        tampered = run_dir / "tampered"
        shutil.copytree(good, tampered)
        (tampered / "ram").chmod(0o644)
        with open(tampered / "ram", "r+b") as ram:
            ram.seek(64 * MIB)
            ram.write(b"\1")
        refused(tampered, "RAM file .* does not match its checksum in the manifest: .* refused")

        truncated = run_dir / "truncated"
        shutil.copytree(good, truncated)
        (truncated / "state").chmod(0o644)
        with open(truncated / "state", "r+b") as state:
            state.truncate(500)
        refused(truncated, "has 500 bytes, the manifest says 1004: truncated; refused")

        half_written = run_dir / "half"
        shutil.copytree(good, half_written)
        (half_written / "manifest.json").unlink()
        refused(half_written, "is not a snapshot: it has no manifest.json")

        bigger = _fake_snapshot(run_dir, dict(machine, ram_bytes=256 * MIB), "bigger")
        refused(bigger, "does not fit the snapshot")
        other_machine = _fake_snapshot(run_dir, dict(machine, type="q35-machine"), "q35")
        refused(other_machine, "does not fit the snapshot: type is .*, the snapshot's is 'q35-machine'")
        other_memdev = run_dir / "memdev"
        shutil.copytree(good, other_memdev)
        manifest = snapshotdir.load(other_memdev)
        manifest.memdev = "mem1"
        (other_memdev / "manifest.json").write_text(manifest.to_json())
        refused(other_memdev, "has no memory backend 'mem1'")


CLI = [sys.executable, "-m", "nbd_postcopy.cli"]


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`nbd-postcopy ARGS` in a subprocess (PYTHONPATH passes on, so this tree's code runs)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.root
def test_a_keep_running_snapshot_resumes_the_guest_and_restores(guest_image, run_dir, swap_lock):
    append = "memcheck.seed=31 memcheck.mode=write"
    snap = run_dir / "snap"
    with Vm(guest_image, run_dir, name="src", memory_mib=128, ram="file", append=append, extra_qmp=1) as source:
        source.console.wait_for(PassOk, timeout=60)
        done = _cli("snapshot", "--qmp", str(source.extra_qmp_paths[0]), "--to", str(snap), "--keep-running", "-q")
        assert done.returncode == 0, done.stderr
        assert "the VM:                    runs on" in done.stdout
        assert source.process.poll() is None and source.qmp.status() == "running"
        after = source.console.mark()
        source.console.wait_for(PassOk, count=2, after=after, timeout=90)  # it goes on checking its memory
        assert source.console.events(Failure) == [], source.console.tail()
    assert sorted(p.name for p in snap.iterdir()) == ["manifest.json", "ram", "state"]
    _restore_into_a_fresh_qemu(guest_image, run_dir, snap, append)
    _nothing_left(run_dir)


@pytest.mark.slow
@pytest.mark.root
def test_no_replay_ignores_the_working_set_and_no_record_leaves_it_untouched(guest_image, run_dir, swap_lock):
    append = "memcheck.seed=37 memcheck.mode=write"
    snap = run_dir / "snap"
    _snapshot_of_a_fresh_guest(guest_image, run_dir, snap, append)
    _restore_into_a_fresh_qemu(guest_image, run_dir, snap, append, name="first")  # records the working set
    record = snap / "workingset"
    before = (record.read_bytes(), record.stat())
    assert record.read_text().startswith("# working set of the snapshot with RAM sha256 ")

    try:
        with Vm(guest_image, run_dir, name="dst", memory_mib=128, ram="ram", incoming=True, append=append,
                extra_qmp=1) as destination:
            done = _cli("restore", str(snap), "--qmp", str(destination.extra_qmp_paths[0]),
                        "--work-dir", str(run_dir / "rst-cli"), "--no-replay", "--no-record", "-q")
            assert done.returncode == 0, done.stderr
            _restored_guest_verifies(destination)
    finally:
        _remove_what_a_failed_restore_left(run_dir)
    report = dict(line.split(":", 1) for line in done.stdout.splitlines())
    assert report["working set"].strip() == "none (no record used)", done.stdout
    assert report["working set recorded"].strip() == "no", done.stdout
    assert int(report["pages demand-fetched"].split()[0]) > 0, "without a replay the guest demands pages"
    after = (record.read_bytes(), record.stat())
    assert after[0] == before[0]
    assert (after[1].st_ino, after[1].st_mtime_ns) == (before[1].st_ino, before[1].st_mtime_ns)
    assert sorted(p.name for p in snap.iterdir()) == ["manifest.json", "ram", "state", "workingset"]
    _nothing_left(run_dir)


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.parametrize("room, error", [
    ("16m", "copying guest RAM into .* failed: No space left on device"),  # the device state fits
    ("64k", "saving the device state failed: writing .* failed: No space left on device"),
], ids=["ram-copy", "device-state"])
def test_a_failed_snapshot_leaves_no_partial_directory_and_the_guest_runs_on(guest_image, run_dir, room, error):
    append = "memcheck.seed=41 memcheck.mode=write"
    full = run_dir / "full"  # a file system too small for the snapshot: it fills up partway
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(full)], check=True)
    try:
        with Vm(guest_image, run_dir, name="src", memory_mib=128, ram="file", append=append, extra_qmp=1) as source:
            source.console.wait_for(PassOk, timeout=60)
            done = _cli("snapshot", "--qmp", str(source.extra_qmp_paths[0]), "--to", str(full / "snap"))
            assert done.returncode == 1
            last = done.stderr.strip().splitlines()[-1]  # after the progress lines, one line says why
            assert re.fullmatch(f"nbd-postcopy snapshot: error: {error}", last), done.stderr
            assert "Traceback" not in done.stderr
            assert list(full.iterdir()) == [], "no snapshot and no partial directory"
            assert source.process.poll() is None and source.qmp.status() == "running"
            after = source.console.mark()
            source.console.wait_for(PassOk, count=2, after=after, timeout=90)
            assert source.console.events(Failure) == [], source.console.tail()
    finally:
        subprocess.run(["umount", str(full)], check=True)
    _nothing_left(run_dir)


@pytest.mark.slow
@pytest.mark.root
def test_a_memfd_backed_vm_is_snapshotted_through_its_process_memory_and_restores(guest_image, run_dir, swap_lock):
    append = "memcheck.seed=43 memcheck.mode=write"
    snap = run_dir / "snap"
    narration = io.StringIO()
    saved = _snapshot_of_a_fresh_guest(guest_image, run_dir, snap, append, ram="memfd", stream=narration)
    assert "copying 128 MiB of guest RAM (through /proc/PID/mem)" in narration.getvalue()
    assert saved.guest_bytes == 128 * MIB and 0 < saved.data_bytes < saved.guest_bytes
    ram = (snap / "ram").stat()
    assert ram.st_size == 128 * MIB and ram.st_blocks * 512 < ram.st_size, "zero pages are holes"
    _restore_into_a_fresh_qemu(guest_image, run_dir, snap, append)
    _nothing_left(run_dir)


@pytest.mark.slow
@pytest.mark.root
def test_a_working_set_recorded_for_another_snapshot_is_ignored_with_a_warning(guest_image, run_dir, swap_lock):
    append = "memcheck.seed=47 memcheck.mode=write"
    snap = run_dir / "snap"
    _snapshot_of_a_fresh_guest(guest_image, run_dir, snap, append)
    other = f"working set of the snapshot with RAM sha256 {'0' * 64}"
    write_workingset(snap / "workingset", list(range(0, 4096, 8)), other)
    narration = io.StringIO()
    report = _restore_into_a_fresh_qemu(guest_image, run_dir, snap, append, stream=narration)
    assert "warning: not replaying the working set: " in narration.getvalue()
    assert "was recorded for another snapshot" in narration.getvalue()
    assert report.replayed_pages == 0 and "none (no record used)" in report.summary()
    assert report.recorded_pages > 0  # this restore's own record replaces it
    assert (snap / "workingset").read_text().startswith(f"# {snapshotdir.workingset_comment(snapshotdir.load(snap))}\n")
    _nothing_left(run_dir)


@pytest.mark.slow
@pytest.mark.root
def test_a_snapshot_goes_only_into_an_absent_or_empty_directory(guest_image, run_dir):
    occupied, empty = run_dir / "occupied", run_dir / "empty"
    occupied.mkdir()
    (occupied / "keep").write_text("mine")
    empty.mkdir()
    with Vm(guest_image, run_dir, name="src", memory_mib=128, ram="file", extra_qmp=1) as source:
        source.console.wait_for(PassOk, timeout=60)
        mark = source.qmp.mark()
        done = _cli("snapshot", "--qmp", str(source.extra_qmp_paths[0]), "--to", str(occupied), "--keep-running")
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1] == (
            f"nbd-postcopy snapshot: error: {occupied} already exists and is not empty: remove it or choose "
            "another --to"), done.stderr
        assert [p.name for p in occupied.iterdir()] == ["keep"] and (occupied / "keep").read_text() == "mine"
        assert [p.name for p in run_dir.glob("*.partial-*")] == []
        assert "STOP" not in [event.name for event in source.qmp.events(after=mark)], "refused before the pause"
        assert source.qmp.status() == "running"

        done = _cli("snapshot", "--qmp", str(source.extra_qmp_paths[0]), "--to", str(empty), "-q")
        assert done.returncode == 0, done.stderr
        source.wait_exit(10)
    assert sorted(p.name for p in empty.iterdir()) == ["manifest.json", "ram", "state"]
    snapshotdir.verify(empty, snapshotdir.load(empty))
    _nothing_left(run_dir)


@pytest.mark.slow
@pytest.mark.root
def test_a_device_state_qemu_refuses_rolls_the_restore_back(guest_image, run_dir, swap_lock):
    try:
        with Vm(guest_image, run_dir, name="dst", memory_mib=128, ram="ram", incoming=True, extra_qmp=1) as destination:
            # A snapshot whose checksums hold but whose device state is junk: it passes every check.
            fake = _fake_snapshot(run_dir, machine_of(destination.qmp, 128 * MIB))
            swaps = _swaps()
            with pytest.raises(RestoreError, match="QEMU refused the device state") as failure:
                restore(RestoreOptions(fake, destination.extra_qmp_paths[0], run_dir / "rst", quiet=True))
            assert "rolled back: the QEMU was told to quit, the page server and the swap device are gone" in \
                str(failure.value)
            assert destination.wait_exit(10) is not None
            assert _swaps() == swaps
            assert not (run_dir / "rst" / "swap").exists()
    finally:
        _remove_what_a_failed_restore_left(run_dir)
    snapshotdir.verify(fake, snapshotdir.load(fake))
    assert sorted(p.name for p in fake.iterdir()) == ["manifest.json", "ram", "state"]
    _nothing_left(run_dir)
