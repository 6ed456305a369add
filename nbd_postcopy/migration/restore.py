"""Resume a snapshot (snapshot.py) in a waiting QEMU, its RAM faulted in lazily through the postcopy swap device.

A restore is a migration whose source is a file: the page server serves the snapshot's RAM file, and
QEMU's stream of device state comes from the snapshot's state file instead of a running QEMU.

  1. check the snapshot (manifest, sizes, SHA-256 checksums) and the QEMU: it waits with -incoming
     defer, its RAM is anonymous and fits the snapshot (memdev id, RAM size, machine type, vCPUs);
  2. serve DIR/ram (`nbd-postcopy serve --file`, gate open: the file never changes);
  3. attach the swap device (with replay=DIR/workingset if the snapshot has a record), stage the RAM
     onto it and arm it; with a record, wait (at most REPLAY_WAIT) while the prefetcher pulls that
     working set first;
  4. load the device state: QEMU listens (x-ignore-shared), and the verified bytes are sent to it; then
     `cont` (a snapshot is saved paused);
  5. the guest runs: wait for the prefetcher, save the first demand faults as DIR/workingset for the
     next restore, stop the page server, complete (pre-page every page) and detach.

A restore goes through a migration's phases (migrate.py: Phase, TRANSITIONS), its page server in the
source's part (SWITCHING is the load of the device state, RELEASED the page server stopped once every
page is local), and a failure does what migrate's FAILURE_POLICY says for its phase: a refused snapshot
or QEMU (CHECKING) leaves everything as it was; until the guest resumes, everything started is removed
and the QEMU is told to quit (it cannot take a second incoming stream); after that the guest needs the
page server until every page is local, so a failure leaves the page server and the swap device up and
says how to finish, unless the QEMU is gone; once the page server is stopped, the device holds every
page and is left attached.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..common.linux import free_port
from ..common.qmp import Qmp, VmError
from ..device.markers import MarkerCodec
from ..device.workingset import RECORD_LIMIT, WorkingSetError, read_workingset, write_workingset
from ..host import attachment
from ..host.completion import complete_range
from ..host.staging import stage_range
from . import snapshotdir
from .destination import (
    MigrateError,
    check_destination_alive,
    check_incoming_ram,
    drive,
    exited,
    pages_without_fetch,
    prefetch_cpus,
    prefetch_cpus_key,
    serve_cpus_args,
    wait_for_prefetch,
    wait_gone,
    with_device_keys,
)
from .migrate import Phase, PhasedDriver, Policy
from .pageserver import PageServerError, PageServerProcess
from .ram import RamRegion
from .snapshot import machine_of
from .snapshotdir import Manifest, SnapshotError

log = logging.getLogger(__name__)

LOAD_TIMEOUT = 120.0  # seconds for QEMU to load the device state and resume
FIRST_SECONDS = 2.0  # demand faults are also counted for this long after the resume
REPLAY_WAIT = 10.0  # seconds the guest may wait for its recorded working set before it resumes


class RestoreError(MigrateError):
    """The restore failed or was refused; the message says at which step and what state remains."""


@dataclass
class RestoreOptions:
    directory: Path  # the snapshot
    qmp: Path  # QMP socket of the QEMU started with -incoming defer (one nobody else is connected to)
    work_dir: Path  # short private directory: sockets, the key, the device's state directory
    replay: bool = True  # prefetch the snapshot's recorded working set first, if it has one
    record: bool = True  # save the first demand faults as the snapshot's working set
    prefetch_cpus: str = "auto"  # where the prefetcher and the page server run (destination.prefetch_cpus)
    device_keys: tuple[str, ...] = ()  # more plugin keys for the device (destination.DEVICE_KEYS)
    quiet: bool = False
    stream: TextIO | None = None


@dataclass
class RestoreReport:
    guest_bytes: int
    verify_seconds: float
    stage_seconds: float
    load_to_resume_ms: float  # device state sent to RESUME
    to_resume_seconds: float  # restore started to RESUME
    resume_to_local_seconds: float | None  # RESUME to every page local (None: the prefetcher stalled)
    complete_seconds: float
    total_seconds: float
    pages_demand: int
    pages_demand_first: int  # in the first FIRST_SECONDS after the resume
    pages_prefetch: int
    pages_without_fetch: int
    replayed_pages: int  # working-set pages given to the device (0: no record used)
    replay_seconds: float  # arming to the working set fetched, before the device state was loaded
    recorded_pages: int  # pages in DIR/workingset afterwards (0: none written)
    fault_p50_ms: float | None
    fault_p99_ms: float | None

    def summary(self) -> str:
        def ms(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.2f} ms"

        local = "n/a (the prefetcher stalled)" if self.resume_to_local_seconds is None else \
            f"{self.resume_to_local_seconds:.2f} s after the resume"
        replay = f"{self.replayed_pages} recorded pages prefetched first, in {self.replay_seconds:.2f} s before " \
                 "the resume" if self.replayed_pages else "none (no record used)"
        return "\n".join([
            f"guest RAM:                 {self.guest_bytes >> 20} MiB",
            f"snapshot verified:         {self.verify_seconds:.2f} s (checksums)",
            f"staging:                   {self.stage_seconds:.2f} s",
            f"device state to resume:    {ms(self.load_to_resume_ms)}",
            f"time to resume:            {self.to_resume_seconds:.2f} s (from the start of the restore)",
            f"every page local:          {local}",
            f"completion:                {self.complete_seconds:.2f} s",
            f"total:                     {self.total_seconds:.2f} s",
            f"working set:               {replay}",
            f"pages demand-fetched:      {self.pages_demand} ({self.pages_demand_first} in the first "
            f"{FIRST_SECONDS:g} s)",
            f"pages prefetched:          {self.pages_prefetch}",
            f"pages zero (no fetch):     {self.pages_without_fetch}",
            "fault latency p50 / p99:   " + ("n/a (no demand faults)" if self.fault_p50_ms is None else
                                              f"<= {ms(self.fault_p50_ms)} / <= {ms(self.fault_p99_ms)}"),
            "working set recorded:      " + (f"{self.recorded_pages} pages (DIR/{snapshotdir.WORKINGSET})"
                                              if self.recorded_pages else "no"),
        ])


def restore(options: RestoreOptions) -> RestoreReport:
    return _Restore(options).run()


class _Restore(PhasedDriver):
    name = what = "restore"
    device_name = "the swap device"

    def __init__(self, options: RestoreOptions):
        self.o = options
        self.snapshot = Path(options.directory).absolute()
        self.work = Path(options.work_dir)
        self.stream = options.stream if options.stream is not None else sys.stderr
        self.phase = Phase.CHECKING
        self.pid = 0
        self.ram: RamRegion | None = None
        self.server: PageServerProcess | None = None
        self.swap_name = f"rst{uuid.uuid4().hex[:8]}"
        self.swap_state = self.work / "swap"
        self.metrics_port = free_port()
        self.prefetch_cpus: frozenset[int] | None = None

    def run(self) -> RestoreReport:
        self.started = time.monotonic()
        self.manifest, self.state = self._check_snapshot()  # before anything else, the QEMU too
        self.verify_seconds = time.monotonic() - self.started
        self.work.mkdir(parents=True, exist_ok=True)
        return drive(self.o.qmp, "restoring", self._run, self._fail)

    def _run(self, qmp: Qmp) -> RestoreReport:
        started, manifest, state, verify_seconds = self.started, self.manifest, self.state, self.verify_seconds
        self.pid = qmp.peer_pid()
        ram = self.ram = self._check_qemu(qmp, manifest)
        replay = self._working_set(manifest) if self.o.replay else []

        self._enter(Phase.SERVING)
        self._serve()
        self._enter(Phase.ATTACHING)
        key = self.work / "key"
        key.write_bytes(os.urandom(32))
        os.chmod(key, 0o600)
        self._attach(ram.length, key, replay)
        self._enter(Phase.STAGING)
        self.say(f"staging {ram.length >> 20} MiB of guest RAM (QEMU pid {self.pid}) onto {self.device}")
        stage = stage_range(self.pid, ram.address, ram.length, MarkerCodec.from_file(key), self.device,
                            control=str(self.control), quiet=self.o.quiet, stream=self.stream)
        self._enter(Phase.ARMING)
        if not self._device("arm").get("armed"):
            raise RestoreError("the device did not arm")
        if not self._device("status").get("source_connected"):
            raise RestoreError("the device is not connected to the snapshot's page server")
        replay_seconds = self._wait_for_replay() if replay else 0.0

        self._enter(Phase.SWITCHING)
        self.say(f"loading the device state ({len(state)} bytes, x-ignore-shared)")
        loaded, resumed = self._load(qmp, state)
        self._enter(Phase.RESUMED)
        self.server.watch()
        self.say(f"the guest runs ({(resumed - loaded) * 1000:.1f} ms after its device state was sent); "
                 "fetching the rest of its memory")
        first = {}

        def count_first_faults(status: dict) -> None:
            if time.monotonic() - resumed <= FIRST_SECONDS or not first:
                first["demand"] = status["fetched_demand"]

        status = wait_for_prefetch(self._device, self.o.quiet, self.stream,
                                   check_alive=lambda: check_destination_alive(qmp, self.pid),
                                   on_status=count_first_faults)
        released = bool(status.get("complete"))
        local_after = time.monotonic() - resumed if released else None
        recorded = self._record(manifest, replay) if self.o.record else 0
        if released:  # every page is local: the page server is not needed
            self.server.stop()
            self._enter(Phase.RELEASED)
        completion = complete_range(self.pid, ram.address, ram.length, control=str(self.control),
                                    quiet=self.o.quiet, stream=self.stream)
        status = self._device("status")
        if not status.get("complete"):
            raise RestoreError(f"completion ended but the device still has {status.get('remaining')} pages to fetch")
        self._enter(Phase.COMPLETED)
        if not released:  # completion fetched what the prefetcher had left
            self.server.stop()
        faults = self._fault_latency()
        self._detach()
        self._enter(Phase.DETACHED)
        self.say("done: every page is in the guest and the swap device is detached")
        return RestoreReport(
            guest_bytes=ram.length,
            verify_seconds=verify_seconds,
            stage_seconds=stage.seconds,
            load_to_resume_ms=(resumed - loaded) * 1000,
            to_resume_seconds=resumed - started,
            resume_to_local_seconds=local_after,
            complete_seconds=completion.seconds,
            total_seconds=time.monotonic() - started,
            pages_demand=status["fetched_demand"],
            pages_demand_first=first.get("demand", status["fetched_demand"]),
            pages_prefetch=status["fetched_prefetch"],
            pages_without_fetch=pages_without_fetch(status),
            replayed_pages=len(replay),
            replay_seconds=replay_seconds,
            recorded_pages=recorded,
            fault_p50_ms=faults[0],
            fault_p99_ms=faults[1],
        )

    def _fail(self, qmp: Qmp, exc: BaseException) -> None:
        """Act on a failure as FAILURE_POLICY says for its phase; returns to let the caller re-raise."""
        policy = self._failure_policy()
        if policy is Policy.RAISE:
            return
        if policy is Policy.ROLL_BACK:
            self.say(f"failed ({exc}); rolling back")
            with contextlib.suppress(Exception):
                qmp.execute("quit", timeout=5)
            wait_gone(self.pid, 15.0)  # its staged RAM must go before swapoff
            self._stop_server()
            self._detach()
            self._enter(Phase.ROLLED_BACK)
            if isinstance(exc, Exception):
                raise RestoreError(f"{exc}\nrolled back: the QEMU was told to quit, the page server and the swap "
                                   "device are gone; the snapshot is unchanged") from exc
            return
        ram = self.ram
        finish = attachment.detach_command(self.swap_name, self.pid, ram.address, ram.length)
        self._enter(Phase.FAILED)
        if policy is Policy.KEEP_DEVICE:
            raise RestoreError(
                f"completion failed after every page was local: {exc}. Every page is on the swap device "
                f"{self.swap_name}, which was left attached; finish with '{finish}'") from exc
        if exited(self.pid):
            self._stop_server()
            self._detach()
            raise RestoreError(f"the QEMU (pid {self.pid}) exited after the resume ({exc}); page server and swap "
                               "device removed; the snapshot is unchanged") from exc
        raise RestoreError(
            f"the restore failed after the resume: {exc}. The guest runs and still needs its pages: the page "
            f"server (pid {self.server.pid}) and the swap device {self.swap_name} were left running; finish "
            f"with '{finish}', then stop the page server") from exc

    # --- the steps ---------------------------------------------------------------------------------

    def _check_snapshot(self) -> tuple[Manifest, bytes]:
        """The manifest and the device state, both verified; the RAM file's checksum too."""
        try:
            manifest = snapshotdir.load(self.snapshot)
            self.say(f"verifying {self.snapshot} ({manifest.ram['bytes'] >> 20} MiB of RAM)")
            snapshotdir.verify(self.snapshot, manifest)
        except SnapshotError as exc:
            raise RestoreError(str(exc)) from None
        state = (self.snapshot / manifest.state["file"]).read_bytes()
        if hashlib.sha256(state).hexdigest() != manifest.state["sha256"]:  # changed since verify
            raise RestoreError(f"the device state file in {self.snapshot} changed while it was read; refused")
        return manifest, state

    def _check_qemu(self, qmp: Qmp, manifest: Manifest) -> RamRegion:
        memdev = manifest.memdev
        try:
            ram = check_incoming_ram(qmp, self.pid, memdev, qemu="the QEMU")
        except MigrateError as exc:
            raise RestoreError(f"the QEMU does not fit the snapshot: {exc}") from None
        machine = machine_of(qmp, ram.length)
        for key, value in manifest.machine.items():
            if machine.get(key) != value:
                raise RestoreError(f"the QEMU does not fit the snapshot: {key} is {machine.get(key)!r}, the "
                                   f"snapshot's is {value!r}")
        return ram

    def _working_set(self, manifest: Manifest) -> list[int]:
        """The snapshot's recorded working set, if it has a usable one."""
        path = self.snapshot / snapshotdir.WORKINGSET
        if not path.exists():
            return []
        try:
            if not path.read_text().startswith(f"# {snapshotdir.workingset_comment(manifest)}\n"):
                raise WorkingSetError(f"{path} was recorded for another snapshot")
            return read_workingset(path, manifest.ram["bytes"] // 4096)
        except (WorkingSetError, OSError, UnicodeDecodeError) as exc:
            self.say(f"warning: not replaying the working set: {exc}")
            return []

    def _serve(self) -> None:
        socket_path = self.work / "snapshot.sock"
        self.prefetch_cpus = prefetch_cpus(self.o.prefetch_cpus)
        self.server = PageServerProcess(["--file", str(self.snapshot / snapshotdir.RAM)], [f"unix:{socket_path}"],
                                        self.work / "page-server.log", extra_args=serve_cpus_args(self.prefetch_cpus))
        self.say(f"serving the snapshot's RAM on {socket_path}")
        try:
            self.server.start()
        except PageServerError as exc:
            raise RestoreError(str(exc)) from None
        self.server.open_gate()  # the file is the frozen source

    def _attach(self, size: int, key: Path, replay: list[int]) -> None:
        keys = [f"source=nbd+unix:///?socket={self.server.listen[0][5:]}", f"size={size}", f"key={key}",
                f"source-id={self.server.instance}", f"metrics=127.0.0.1:{self.metrics_port}",
                *prefetch_cpus_key(self.prefetch_cpus)]
        if replay:
            keys.append(f"replay={self.snapshot / snapshotdir.WORKINGSET}")
        self.say(f"attaching the swap device ({self.swap_name})"
                 + (f", replaying a working set of {len(replay)} pages" if replay else ""))
        self._attach_device(with_device_keys(keys, self.o.device_keys))

    def _wait_for_replay(self) -> float:
        """Let the prefetcher pull the recorded working set before the guest runs (REAP's eager part)."""
        started = time.monotonic()
        while not self._device("workingset").get("replay_done"):
            if time.monotonic() - started > REPLAY_WAIT:
                self.say(f"the working set is not all here after {REPLAY_WAIT:g}s: resuming anyway")
                break
            time.sleep(0.01)
        return time.monotonic() - started

    def _load(self, qmp: Qmp, state: bytes) -> tuple[float, float]:
        """Send the verified device state to the QEMU and let the guest run; returns (sent, resumed) times."""
        qmp.set_capabilities(x_ignore_shared=True, events=True)
        address = self.work / "state.sock"
        address.unlink(missing_ok=True)
        mark = qmp.mark()
        qmp.migrate_incoming(f"unix:{address}")
        loaded = time.monotonic()
        with socket.socket(socket.AF_UNIX) as stream:
            stream.settimeout(LOAD_TIMEOUT)
            stream.connect(str(address))
            stream.sendall(state)
        status = qmp.wait_migration(after=mark, timeout=LOAD_TIMEOUT)
        if status != "completed":
            raise RestoreError(f"QEMU refused the device state: its incoming migration {status}")
        if qmp.status() != "running":
            qmp.execute("cont")  # a snapshot is saved with the guest paused
        try:
            resume = qmp.wait_event("RESUME", after=mark, timeout=LOAD_TIMEOUT)
        except VmError:
            raise RestoreError("the guest did not resume after its device state was loaded") from None
        return loaded, resume.host_time

    def _record(self, manifest: Manifest, replayed: list[int]) -> int:
        """Save the working set for the next restore: the replayed record, then the pages it missed."""
        try:
            recorded = self._device("workingset")["recorded"]
        except (MigrateError, KeyError) as exc:
            self.say(f"warning: no working set recorded ({exc})")
            return 0
        pages = list(replayed)
        seen = set(pages)
        pages += [page for page in recorded if page not in seen][: max(0, RECORD_LIMIT - len(pages))]
        if not pages:
            return 0
        if pages == replayed:
            return len(pages)
        try:
            write_workingset(self.snapshot / snapshotdir.WORKINGSET, pages, snapshotdir.workingset_comment(manifest))
        except OSError as exc:
            self.say(f"warning: cannot save the working set in {self.snapshot}: {exc.strerror or exc}")
            return 0
        return len(pages)

    def _stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()

