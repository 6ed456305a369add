"""nbd-postcopy migrate end to end: real QEMU (TCG), real page server, real swap device, real staging."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbd_postcopy.migration import migrate as migrate_module
from nbd_postcopy.testbench.guest import Failure, Heartbeat, PassOk, prepare_guest
from nbd_postcopy.migration.destination import histogram_quantiles
from nbd_postcopy.migration.migrate import MigrateError, MigrateOptions, migrate
from nbd_postcopy.testbench.vm import Vm, merged_heartbeats
from nbd_postcopy.host.attachment import State
from nbd_postcopy.host.memcg import AUTO_PREFIX, task_memcg
from tests.swapdev import AffinityWatch, processes_mentioning, run_setup_swap

MIB = 1 << 20
PAGE = 4096


@pytest.fixture(scope="module")
def guest_image():
    return prepare_guest()


def _vm_pair(image, run_dir, mib: int, append: str, hold_destination: bool = False) -> tuple[Vm, Vm]:
    """hold_destination: start it with -S, so that it stays paused once the device state is in."""
    source = Vm(image, run_dir, name="src", memory_mib=mib, ram="file", append=append, extra_qmp=1)
    destination = Vm(image, run_dir, name="dst", memory_mib=mib, ram="ram", incoming=True, append=append, extra_qmp=1,
                     extra_args=["-S"] if hold_destination else [])
    return source, destination


def _nothing_left(run_dir) -> None:
    with open("/proc/swaps") as swaps:
        assert str(run_dir) not in swaps.read()
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(run_dir) not in losetup
    with open("/proc/mounts") as mounts:
        assert str(run_dir) not in mounts.read()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(run_dir) not in ps, [line for line in ps.splitlines() if str(run_dir) in line]


def test_histogram_quantiles():
    text = "\n".join([
        "# TYPE x_seconds histogram",
        'x_seconds_bucket{le="0.001"} 50.0',
        'x_seconds_bucket{le="0.01"} 99.0',
        'x_seconds_bucket{le="0.1"} 100.0',
        'x_seconds_bucket{le="+Inf"} 100.0',
        "x_seconds_count 100.0",
        "x_seconds_sum 1.0",
    ])
    assert histogram_quantiles(text + "\n", "x_seconds", (0.5, 0.99, 1.0)) == (1.0, 10.0, 100.0)
    assert histogram_quantiles("", "x_seconds", (0.5,)) == (None,)


@pytest.mark.slow
@pytest.mark.root
def test_migrate_the_checker_guest(guest_image, run_dir, swap_lock):
    append = "memcheck.seed=17 memcheck.mode=write"
    source, destination = _vm_pair(guest_image, run_dir, 256, append)
    with source, destination:
        source.console.wait_for(PassOk, timeout=60)
        pages = run_dir / "pages"
        pages.mkdir()
        device_keys = (f"cache-dir={pages}", "warm=off")
        with AffinityWatch(str(run_dir / "mig")) as watch:
            report = migrate(MigrateOptions(source.extra_qmp_paths[0], destination.extra_qmp_paths[0],
                                            run_dir / "mig", device_keys=device_keys, quiet=True))
        assert report.guest_bytes == 256 * MIB
        watch.check_auto(page_server_too=True)  # one host: the page server is prefetch work too
        [nbdkit] = watch.argvs["nbdkit"]
        assert set(device_keys) <= set(nbdkit), nbdkit  # --device-key reached the plugin
        assert report.device_state_bytes < 16 * MIB, "guest RAM must not travel in QEMU's stream"
        assert report.source_released
        assert report.pages_demand + report.pages_prefetch > 0
        # the guest's never-touched memory is holes at the source: zero pages, no data on the wire; with the
        # demand and prefetched pages they cover the guest (a page fetched on demand, then prefetched, twice)
        pages = report.guest_bytes // 4096
        assert report.pages_without_fetch > 0
        assert report.pages_prefetch + report.pages_without_fetch <= pages
        assert pages <= report.pages_demand + report.pages_prefetch + report.pages_without_fetch
        # by QEMU's own event stamps: the destination cannot resume before the source stopped (by arrival,
        # a late STOP event has made this negative)
        assert 0 < report.switchover_to_resume_ms < 10_000
        source.wait_exit(10)

        after = destination.console.mark()
        time.sleep(3)  # the guest keeps running on its own for a while after the source is gone
        passes = destination.console.wait_for(PassOk, count=3, after=after, timeout=60)
        assert [p.number for p in passes] == list(range(passes[0].number, passes[0].number + 3))
        assert len(destination.console.events(Heartbeat, after=after)) >= 20
        beats = merged_heartbeats(source.console, destination.console)
        assert [b.counter for b in beats] == list(range(beats[0].counter, beats[-1].counter + 1))
        assert source.console.events(Failure) == [] and destination.console.events(Failure) == []
        assert destination.qmp.status() == "running"
    _nothing_left(run_dir)


@pytest.mark.slow
@pytest.mark.root
def test_device_killed_before_the_switchover_leaves_the_source_running(guest_image, run_dir, swap_lock,
                                                                        monkeypatch):
    real_stage = migrate_module.stage_range

    def stage_then_kill_the_device(*args, **kwargs):
        report = real_stage(*args, **kwargs)
        state = (run_dir / "mig" / "swap" / "state").read_text()
        nbdkit_pid = int(next(line.split("=", 1)[1] for line in state.splitlines()
                              if line.startswith("nbdkit_pid=")).strip("'\""))
        os.kill(nbdkit_pid, signal.SIGKILL)
        return report

    monkeypatch.setattr(migrate_module, "stage_range", stage_then_kill_the_device)
    append = "memcheck.seed=3"
    source, destination = _vm_pair(guest_image, run_dir, 128, append)
    with source, destination:
        source.console.wait_for(PassOk, timeout=60)
        with pytest.raises(MigrateError, match="destination device"):
            migrate(MigrateOptions(source.extra_qmp_paths[0], destination.extra_qmp_paths[0], run_dir / "mig",
                                   quiet=True))
        assert source.qmp.status() == "running"
        source.console.wait_for(PassOk, after=source.console.mark(), timeout=30)
        assert source.console.events(Failure) == []
    _nothing_left(run_dir)


@pytest.mark.slow
@pytest.mark.root
def test_sigterm_while_staging_rolls_the_migration_back(guest_image, run_dir, swap_lock, processes):
    """`kill PID`, or a service manager's stop, is Ctrl-C for the command line: a migration SIGTERMed while
    it stages undoes what it started (page server, swap device, the staging memcg) and the source guest
    keeps running."""
    source, destination = _vm_pair(guest_image, run_dir, 128, "memcheck.seed=5 memcheck.mode=idle")
    with source, destination:
        source.console.wait_for(PassOk, timeout=60)
        log = run_dir / "migrate.log"
        with open(log, "wb") as out:
            command = processes.start([sys.executable, "-m", "nbd_postcopy.cli", "migrate",
                                       "--source-qmp", source.extra_qmp_paths[0],
                                       "--destination-qmp", destination.extra_qmp_paths[0],
                                       "--work-dir", run_dir / "mig"], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "migrate: staging" not in log.read_text(errors="replace"):
            assert command.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.01)
        command.send_signal(signal.SIGTERM)
        assert command.wait(60) == 128 + signal.SIGTERM, log.read_text(errors="replace")
        said = log.read_text(errors="replace")
        assert "rolling back: the source keeps running" in said and "nbd-postcopy migrate: terminated" in said, said
        assert source.qmp.status() == "running"
        home = task_memcg(destination.pid)[1]
        assert not list(home.glob(AUTO_PREFIX + "*")), "the staging memcg was left behind"
        source.console.wait_for(PassOk, after=source.console.mark(), timeout=60)
        assert source.console.events(Failure) == []
    _nothing_left(run_dir)


@pytest.mark.slow
@pytest.mark.root
def test_a_destination_that_dies_after_the_switchover_never_releases_the_source(guest_image, run_dir, swap_lock,
                                                                                 monkeypatch):
    """A QEMU that exits frees its memory and the kernel trims every slot it held, so the device then reports
    every page local. The driver must see a dead guest there, not a finished migration: the source stays,
    paused with the guest's memory intact, and resumes it."""
    real_wait_for_prefetch = migrate_module.wait_for_prefetch
    device_said_complete = []

    def kill_the_destination_first(device, *args, **kwargs):
        destination.process.kill()
        destination.process.wait(10)
        deadline = time.monotonic() + 30
        while not device("status")["complete"] and time.monotonic() < deadline:
            time.sleep(0.05)
        device_said_complete.append(device("status")["complete"])
        return real_wait_for_prefetch(device, *args, **kwargs)

    monkeypatch.setattr(migrate_module, "wait_for_prefetch", kill_the_destination_first)
    source, destination = _vm_pair(guest_image, run_dir, 128, "memcheck.seed=9 memcheck.mode=write")
    with source, destination:
        source.console.wait_for(PassOk, timeout=60)
        with pytest.raises(MigrateError, match="exited after the switchover"):
            migrate(MigrateOptions(source.extra_qmp_paths[0], destination.extra_qmp_paths[0], run_dir / "mig",
                                   quiet=True))
        assert device_said_complete == [True]  # the hazard: the dead QEMU's trimmed slots looked local
        assert source.qmp.status() == "postmigrate"  # not released: paused, its memory intact
        source.qmp.execute("cont")
        source.console.wait_for(PassOk, count=2, after=source.console.mark(), timeout=60)
        assert source.console.events(Failure) == []
    _nothing_left(run_dir)


def _pages_that_differ(one: Path, other: Path) -> int:
    differ = 0
    with open(one, "rb") as a, open(other, "rb") as b:
        while chunk := a.read(MIB):
            theirs = b.read(MIB)
            if chunk != theirs:
                differ += sum(chunk[i:i + PAGE] != theirs[i:i + PAGE] for i in range(0, len(chunk), PAGE))
    return differ


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.parametrize("gate", ["closed", "open"])
def test_the_destination_resumes_with_the_frozen_source_memory_only_behind_the_gate(guest_image, run_dir, swap_lock,
                                                                                     monkeypatch, gate):
    """The destination is held paused when the device state has arrived (-S), and its memory is compared
    page by page with the frozen source's. Behind the freeze gate (the default) they are identical. The
    negative control serves with the gate open and lets the prefetcher pull all of the running source's
    RAM; the source guest then rewrites a slice before the switchover, so the destination holds stale
    pages."""
    mib = 128
    source, destination = _vm_pair(guest_image, run_dir, mib, "memcheck.seed=8 memcheck.mode=write",
                                   hold_destination=True)
    real_popen = migrate_module.subprocess.Popen
    real_switch_over = migrate_module._Migration._switch_over
    real_wait_completed = migrate_module.wait_migration_completed
    differing = []

    def popen_with_the_gate_open(argv, *args, **kwargs):
        if "serve" in argv:
            argv = [("open" if a == "closed" else a) for a in argv]
        return real_popen(argv, *args, **kwargs)

    def switch_over_after_a_rewrite(self, source_qmp, destination_qmp):
        deadline = time.monotonic() + 60
        while not self._device("status").get("complete"):
            assert time.monotonic() < deadline, "the prefetcher never pulled the running source's RAM"
            time.sleep(0.2)
        # memcheck rewrites a slice right after printing OK: the second OK from now follows such a rewrite.
        source.console.wait_for(PassOk, count=2, after=source.console.mark(), timeout=60)
        return real_switch_over(self, source_qmp, destination_qmp)

    def compare_before_the_resume(qmp, mark, timeout):
        real_wait_completed(qmp, mark, timeout)
        deadline = time.monotonic() + 60
        while destination.qmp.status() != "paused":  # -S: the device state is in, the guest not yet running
            assert time.monotonic() < deadline, destination.qmp.status()
            time.sleep(0.05)
        assert source.qmp.status() == "postmigrate"
        for vm in (source, destination):
            vm.qmp.execute("pmemsave", val=0, size=mib * MIB, filename=str(run_dir / f"{vm.name}.mem"), timeout=120)
        differing.append(_pages_that_differ(run_dir / "src.mem", run_dir / "dst.mem"))
        destination.qmp.execute("cont")

    monkeypatch.setattr(migrate_module, "wait_migration_completed", compare_before_the_resume)
    if gate == "open":
        monkeypatch.setattr(migrate_module.subprocess, "Popen", popen_with_the_gate_open)
        monkeypatch.setattr(migrate_module._Migration, "_switch_over", switch_over_after_a_rewrite)
    with source, destination:
        source.console.wait_for(PassOk, timeout=60)
        try:
            migrate(MigrateOptions(source.extra_qmp_paths[0], destination.extra_qmp_paths[0], run_dir / "mig",
                                   quiet=True))
        except MigrateError as exc:
            # Without the gate the resumed guest may die of its stale memory, which leaves the device attached.
            assert gate == "open", exc
        finally:  # no device outlives the test, whatever happened
            if (run_dir / "mig" / "swap").exists():
                run_setup_swap("detach", State.load(run_dir / "mig" / "swap").name, "--no-complete")
        assert len(differing) == 1
        if gate == "closed":
            assert differing == [0], f"{differing[0]} pages differ from the frozen source's"
            destination.console.wait_for(PassOk, count=2, after=destination.console.mark(), timeout=60)
            assert destination.console.events(Failure) == []
        else:
            assert differing[0] > 0, "without the gate the destination still resumed with the source's memory"
    _nothing_left(run_dir)


@pytest.mark.slow
@pytest.mark.root
def test_the_source_goes_before_completion_and_a_failure_then_keeps_the_device(guest_image, run_dir, swap_lock,
                                                                              monkeypatch):
    """Once every page is local the source is released, then completion runs; if completion then
    fails, the swap device stays attached holding every page, and the detach command the error gives
    finishes the job."""
    source, destination = _vm_pair(guest_image, run_dir, 128, "memcheck.seed=5")
    source_gone_at_completion = []

    def completion_that_fails(*args, **kwargs):
        try:
            source.process.wait(5)
            source_gone_at_completion.append(True)
        except subprocess.TimeoutExpired:
            source_gone_at_completion.append(False)
        raise OSError("completion failed on purpose")

    monkeypatch.setattr(migrate_module, "complete_range", completion_that_fails)
    with source, destination:
        source.console.wait_for(PassOk, timeout=60)
        try:
            with pytest.raises(MigrateError, match="after the source was released") as failed:
                migrate(MigrateOptions(source.extra_qmp_paths[0], destination.extra_qmp_paths[0], run_dir / "mig",
                                       quiet=True))
            assert source_gone_at_completion == [True]
            # The guest runs on, its memory served by the device alone.
            destination.console.wait_for(PassOk, count=2, after=destination.console.mark(), timeout=60)
            retry = shlex.split(str(failed.value).split("retry with '", 1)[1].split("'", 1)[0])
            result = subprocess.run(retry, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr
            destination.console.wait_for(PassOk, after=destination.console.mark(), timeout=60)
            assert destination.console.events(Failure) == []
        finally:  # whatever happened above: no device and no page server outlive the test
            state_dir = run_dir / "mig" / "swap"
            if state_dir.exists():
                run_setup_swap("detach", State.load(state_dir).name, "--no-complete")
            for pid in processes_mentioning(str(run_dir / "mig" / "source.sock")):
                os.kill(pid, signal.SIGTERM)
    _nothing_left(run_dir)
