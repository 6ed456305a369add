"""Live-migrate a running QEMU VM with nbd-postcopy (docs/DESIGN.md, "Architecture").

QEMU's own migration stream carries device state only (capability x-ignore-shared: the source's RAM is
on a shared backend), and the destination's RAM arrives through kernel swap:

  1. check both QEMUs: the source runs with shared RAM, the destination waits (-incoming defer) with
     anonymous RAM of the same size;
  2. serve the source RAM (`nbd-postcopy serve`) with the freeze gate closed;
  3. attach the destination swap device (host/attachment.py, the plugin fetching from 2.);
  4. stage the destination RAM onto it and arm the device;
  5. migrate; the gate opens the moment the source stops (QMP STOP event), and the guest resumes at
     the destination, faulting its pages in on demand while the prefetcher pulls the rest;
  6. release and complete: once the device's prefetcher has pulled every page, the source is no longer
     needed: quit it and stop the page server; then pre-page every page into the guest (now a local
     copy) and detach the device. (If the prefetcher stalls, completion fetches the rest first.)

Until the destination resumes, any failure rolls back: the source keeps (or resumes) running, the
destination QEMU is told to quit (an -incoming QEMU cannot take a second migration), and everything
started here is stopped. After that point the guest lives at the destination and needs the source
until every page is local, so a failure leaves the source and the page server up and says so; only
if the destination QEMU itself is gone are they removed, leaving the paused source to be resumed.
Once every page is local the source is released, as QEMU's own postcopy releases it once every page
is sent; a failure after that leaves the swap device attached, holding every page.

The driver keeps how far it got in one `Phase`, and checks every change against TRANSITIONS; a failure
does what FAILURE_POLICY says for the phase it happened in.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..host import attachment
from ..host.completion import complete_range
from ..device.control import ControlError, request
from ..device.markers import MarkerCodec
from ..common.linux import format_cpu_list, free_port, reap, terminate
from .destination import (  # (the tests import some of them from here)
    MigrateError,
    Narrator,
    attach_device,
    check_destination_alive,
    check_incoming_ram,
    check_shared_ram,
    connect as _connect,
    detach_device,
    exited as _exited,
    fault_latency,
    pages_without_fetch,
    prefetch_cpus,
    prefetch_cpus_key,
    serve_cpus_args,
    wait_for_prefetch,
    wait_gone as _wait_gone,
    wait_migration_completed,
    with_device_keys,
)
from .ram import RAM_ID, RamRegion
from ..common.qmp import Qmp, QmpEvent, VmError, seconds_between
from ..host.staging import stage_range

log = logging.getLogger(__name__)

SERVER_START_TIMEOUT = 10.0


@dataclass
class MigrateOptions:
    source_qmp: Path  # a QMP socket of the running source QEMU (one nobody else is connected to)
    destination_qmp: Path  # a QMP socket of the destination QEMU, started with -incoming defer
    work_dir: Path  # short private directory: sockets, the key, the device's state directory
    memdev: str = RAM_ID  # the memory backend holding guest RAM, on both sides
    release_source: bool = True  # quit the source QEMU once every page is local
    prefetch_cpus: str = "auto"  # where the prefetcher and the page server run (destination.prefetch_cpus)
    device_keys: tuple[str, ...] = ()  # more plugin keys for the device (destination.DEVICE_KEYS)
    quiet: bool = False
    stream: TextIO | None = None  # progress and step lines (default stderr)


@dataclass
class MigrationReport:
    guest_bytes: int
    stage_seconds: float
    downtime_ms: float | None  # QEMU's own figure (source query-migrate)
    switchover_to_resume_ms: float  # source STOP event to destination RESUME event
    complete_seconds: float
    total_seconds: float  # migrate command to source released
    device_state_bytes: int  # what QEMU's stream carried
    pages_demand: int
    pages_prefetch: int
    pages_without_fetch: int  # zero pages known from block status (served with no fetch)
    fault_p50_ms: float | None  # upper bucket bounds of the plugin's fault latency histogram
    fault_p99_ms: float | None
    source_released: bool

    def summary(self) -> str:
        def ms(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.2f} ms"

        return "\n".join([
            f"guest RAM:                 {self.guest_bytes >> 20} MiB",
            f"staging:                   {self.stage_seconds:.2f} s (before the migration)",
            f"downtime (QEMU):           {ms(self.downtime_ms)}",
            f"switchover to resume:      {ms(self.switchover_to_resume_ms)}",
            f"device state sent:         {self.device_state_bytes / 2**20:.2f} MiB",
            f"completion:                {self.complete_seconds:.2f} s",
            f"total to source release:   {self.total_seconds:.2f} s"
            + ("" if self.source_released else " (source not released)"),
            f"pages demand-fetched:      {self.pages_demand}",
            f"pages prefetched:          {self.pages_prefetch}",
            f"pages zero (no fetch):     {self.pages_without_fetch}",
            f"fault latency p50 / p99:   <= {ms(self.fault_p50_ms)} / <= {ms(self.fault_p99_ms)}",
        ])


def migrate(options: MigrateOptions) -> MigrationReport:
    return _Migration(options).run()


# --- the phases ------------------------------------------------------------------------------------


class Phase(enum.Enum):
    """How far a migration got. The phases up to SWITCHING are entered as their step starts, so a step
    that fails half done is undone like a finished one; the later ones once reached."""

    CHECKING = "checking both QEMUs"
    SERVING = "serving the source RAM (gate closed)"
    ATTACHING = "attaching the destination swap device"
    STAGING = "staging the destination RAM"
    ARMING = "arming the destination device"
    SWITCHING = "migrating device state"
    RESUMED = "the guest runs at the destination and needs the source"
    RELEASED = "every page is local and the source was released"
    COMPLETED = "every page is in the guest"
    DETACHED = "the swap device is detached: done"
    ROLLED_BACK = "rolled back"
    FAILED = "failed after the switchover (or before anything started)"


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    phase: frozenset(following)
    for phase, following in {
        Phase.CHECKING: {Phase.SERVING, Phase.FAILED},
        Phase.SERVING: {Phase.ATTACHING, Phase.ROLLED_BACK},
        Phase.ATTACHING: {Phase.STAGING, Phase.ROLLED_BACK},
        Phase.STAGING: {Phase.ARMING, Phase.ROLLED_BACK},
        Phase.ARMING: {Phase.SWITCHING, Phase.ROLLED_BACK},
        Phase.SWITCHING: {Phase.RESUMED, Phase.ROLLED_BACK},
        # The source is released as soon as the prefetcher has every page, else after completion.
        Phase.RESUMED: {Phase.RELEASED, Phase.COMPLETED, Phase.FAILED},
        Phase.RELEASED: {Phase.COMPLETED, Phase.FAILED},
        Phase.COMPLETED: {Phase.DETACHED, Phase.FAILED},
        Phase.DETACHED: set(),
        Phase.ROLLED_BACK: set(),
        Phase.FAILED: set(),
    }.items()
}
FINAL = frozenset(phase for phase, following in TRANSITIONS.items() if not following)


class Policy(enum.Enum):
    """What a failure in a phase does to what the migration started."""

    RAISE = "nothing to undo, or the failure already said what remains: raise it as it is"
    ROLL_BACK = "the source keeps (or resumes) running; the destination QEMU quits; everything started is removed"
    KEEP_SOURCE = "the guest needs the source: leave the source, the page server and the swap device up " \
                  "(unless the destination QEMU is gone: then remove the page server and the swap device)"
    KEEP_DEVICE = "the source is gone: leave the swap device attached, holding every page"


FAILURE_POLICY: dict[Phase, Policy] = {
    Phase.CHECKING: Policy.RAISE,
    Phase.SERVING: Policy.ROLL_BACK,
    Phase.ATTACHING: Policy.ROLL_BACK,
    Phase.STAGING: Policy.ROLL_BACK,
    Phase.ARMING: Policy.ROLL_BACK,
    Phase.SWITCHING: Policy.ROLL_BACK,
    Phase.RESUMED: Policy.KEEP_SOURCE,
    Phase.RELEASED: Policy.KEEP_DEVICE,
    Phase.COMPLETED: Policy.RAISE,
    Phase.DETACHED: Policy.RAISE,
    Phase.ROLLED_BACK: Policy.RAISE,
    Phase.FAILED: Policy.RAISE,
}


class PhaseError(RuntimeError):
    """A bug in the driver: it tried a phase transition the table does not allow ("wrong postcopy state")."""


class PhasedDriver(Narrator):
    """A driver that goes through Phase (a migration, a restore): it keeps its phase, checked against
    TRANSITIONS, prints its steps (Narrator), and keeps the destination swap device it attaches
    (self.swap_name, .swap_state, .metrics_port; .attached, .device, .control)."""

    what = "migration"
    device_name = "the destination device"
    phase: Phase
    o: MigrateOptions
    swap_name: str
    swap_state: Path
    metrics_port: int
    attached = False  # kept by _attach_device and _detach (a failed detach leaves it True)
    device: str | None = None  # the swap device and its control socket, once attached
    control: Path | None = None

    def _enter(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise PhaseError(f"wrong {self.what} phase: {self.phase.name} -> {phase.name}")
        log.debug("phase %s -> %s", self.phase.name, phase.name)
        self.phase = phase

    def _failure_policy(self) -> Policy:
        """What a failure now does (FAILURE_POLICY); a failure that is raised as it is ends the phases."""
        policy = FAILURE_POLICY[self.phase]
        if policy is Policy.RAISE and self.phase not in FINAL:
            self._enter(Phase.FAILED)
        return policy

    def _attach_device(self, keys: list[str]) -> None:
        swap = attach_device(keys, self.swap_name, self.swap_state)
        self.attached = True
        self.device, self.control = swap.state.device, Path(swap.state.control)

    def _detach(self) -> None:
        if self.attached and detach_device(self.swap_name):
            self.attached = False

    def _fault_latency(self) -> tuple[float | None, float | None]:
        return fault_latency(self.metrics_port)

    def _device(self, command: str) -> dict:
        try:
            return request(str(self.control), command)
        except ControlError as exc:
            raise MigrateError(f"{self.device_name} does not answer ({exc}); is its nbdkit still running? "
                               f"see {self.swap_state / 'log'}") from None


class _Migration(PhasedDriver):
    def __init__(self, options: MigrateOptions):
        self.o = options
        self.work = Path(options.work_dir)
        self.stream = options.stream if options.stream is not None else sys.stderr
        self.phase = Phase.CHECKING
        self.src_pid = self.dst_pid = 0  # the QEMUs, from their QMP sockets
        self.dst_ram: RamRegion | None = None
        self.socket = self.work / "source.sock"  # the page server's
        self.server_log = self.work / "source-server.log"
        self.server: subprocess.Popen | None = None
        self.swap_name = f"mig{uuid.uuid4().hex[:8]}"
        self.swap_state = self.work / "swap"
        self.metrics_port = free_port()
        self.prefetch_cpus: frozenset[int] | None = None

    def run(self) -> MigrationReport:
        self.work.mkdir(parents=True, exist_ok=True)
        source = _connect(self.o.source_qmp, "source")
        try:
            destination = _connect(self.o.destination_qmp, "destination")
        except BaseException:
            source.close()
            raise
        try:
            return self._run(source, destination)
        except BaseException as exc:
            self._fail(source, destination, exc)
            raise
        finally:
            destination.close()
            source.close()

    def _run(self, source: Qmp, destination: Qmp) -> MigrationReport:
        src_pid, dst_pid = self.src_pid, self.dst_pid = source.peer_pid(), destination.peer_pid()
        src_ram, dst_ram = self._check(source, destination, src_pid, dst_pid)
        self.dst_ram = dst_ram
        self.prefetch_cpus = prefetch_cpus(self.o.prefetch_cpus)
        self._enter(Phase.SERVING)
        self._start_server(src_pid, src_ram)
        key = self.work / "key"
        key.write_bytes(os.urandom(32))
        self._enter(Phase.ATTACHING)
        self._attach(src_ram.length, key)
        self._enter(Phase.STAGING)
        self.say(f"staging {dst_ram.length >> 20} MiB of destination RAM (QEMU pid {dst_pid}) onto {self.device}")
        stage = stage_range(dst_pid, dst_ram.address, dst_ram.length, MarkerCodec.from_file(key), self.device,
                            control=str(self.control), quiet=self.o.quiet, stream=self.stream)
        self._enter(Phase.ARMING)
        armed = self._device("arm")
        if not armed.get("armed"):
            raise MigrateError(f"the destination device did not arm: {armed}")
        if not self._device("status").get("source_connected"):
            raise MigrateError("the destination device is not connected to the source page server")
        self._enter(Phase.SWITCHING)
        self.say("migrating device state (x-ignore-shared)")
        started, stop, resume, info = self._switch_over(source, destination)
        self._enter(Phase.RESUMED)
        switchover_ms = seconds_between(stop, resume) * 1000
        self.say(f"the guest runs at the destination ({switchover_ms:.1f} ms "
                 f"after the source stopped); completing")
        released_at = None
        prefetched = wait_for_prefetch(self._device, self.o.quiet, self.stream,
                                       check_alive=lambda: check_destination_alive(destination, dst_pid))
        if prefetched.get("complete"):  # the source is not needed
            released_at = self._release_source(source)
            self._enter(Phase.RELEASED)
        completion = complete_range(dst_pid, dst_ram.address, dst_ram.length, control=str(self.control),
                                    quiet=self.o.quiet, stream=self.stream)
        status = self._device("status")
        if not status.get("complete"):
            self._enter(Phase.FAILED)
            raise MigrateError(
                f"completion ended but the device still has {status.get('remaining')} pages to fetch: the source "
                f"QEMU (pid {src_pid}), the page server and the swap device {self.swap_name} were left running")
        self._enter(Phase.COMPLETED)
        if released_at is None:  # completion fetched what the prefetcher had left
            released_at = self._release_source(source)
        faults = self._fault_latency()
        total = released_at - started
        self._detach()
        self._enter(Phase.DETACHED)
        return MigrationReport(
            guest_bytes=dst_ram.length,
            stage_seconds=stage.seconds,
            downtime_ms=info.get("downtime"),
            switchover_to_resume_ms=switchover_ms,
            complete_seconds=completion.seconds,
            total_seconds=total,
            device_state_bytes=info.get("ram", {}).get("transferred", 0),
            pages_demand=status["fetched_demand"],
            pages_prefetch=status["fetched_prefetch"],
            pages_without_fetch=pages_without_fetch(status),
            fault_p50_ms=faults[0],
            fault_p99_ms=faults[1],
            source_released=self.o.release_source,
        )

    def _fail(self, source: Qmp, destination: Qmp, exc: BaseException) -> None:
        """Act on a failure as the phase it happened in says (FAILURE_POLICY), and raise the error that
        tells the user what remains. Returns only to let the caller re-raise `exc` as it is."""
        policy = self._failure_policy()
        if policy is Policy.RAISE:
            return
        if policy is Policy.ROLL_BACK:
            self._roll_back(source, destination, exc)
            self._enter(Phase.ROLLED_BACK)
            if isinstance(exc, Exception):
                raise MigrateError(f"{exc}\nrolled back: the source VM keeps running, the destination QEMU was "
                                   "told to quit, the page server and the swap device are gone") from exc
            return
        dst_ram, dst_pid, src_pid = self.dst_ram, self.dst_pid, self.src_pid
        retry = f"'{attachment.detach_command(self.swap_name, dst_pid, dst_ram.address, dst_ram.length)}'"
        self._enter(Phase.FAILED)
        if policy is Policy.KEEP_DEVICE:
            raise MigrateError(
                f"completion failed after the source was released: {exc}. Every page is on the swap device "
                f"{self.swap_name}, which was left attached; retry with {retry}") from exc
        if _exited(dst_pid):
            self._stop_server()
            self._detach()
            raise MigrateError(
                f"the destination QEMU (pid {dst_pid}) exited after the switchover ({exc}); the source QEMU "
                f"(pid {src_pid}) is paused with the guest's memory intact: the QMP command 'cont' resumes "
                "it there, if nothing else (e.g. shared disks) moved on. Page server and swap device removed."
            ) from exc
        raise MigrateError(
            f"completion failed after the switchover: {exc}. The guest runs at the destination and still "
            f"needs the source: the source QEMU (pid {src_pid}), the page server (pid {self.server.pid}) "
            f"and the swap device {self.swap_name} were left running; retry with {retry}") from exc

    # --- the steps ---------------------------------------------------------------------------------

    def _check(self, source: Qmp, destination: Qmp, src_pid: int, dst_pid: int) -> tuple[RamRegion, RamRegion]:
        src_ram = check_shared_ram(source, src_pid, self.o.memdev)
        dst_ram = check_incoming_ram(destination, dst_pid, self.o.memdev)
        if src_ram.length != dst_ram.length:
            raise MigrateError(f"guest RAM sizes differ: source {src_ram.length} bytes, destination {dst_ram.length}")
        return src_ram, dst_ram

    def _start_server(self, src_pid: int, ram: RamRegion) -> None:
        argv = [sys.executable, "-m", "nbd_postcopy.cli", "serve", *ram.serve_args(src_pid),
                "--listen", f"unix:{self.socket}", "--gate", "closed",
                *serve_cpus_args(self.prefetch_cpus)]  # on one host the page server is prefetch work too
        self.say(f"serving the source RAM ({ram.length >> 20} MiB, {ram.file or 'through /proc/PID/mem'}) on {self.socket}, "
                 "gate closed" + (f"; the prefetch work runs on CPU {format_cpu_list(self.prefetch_cpus)}"
                                  if self.prefetch_cpus else ""))
        with open(self.server_log, "ab") as log_file:
            self.server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                           start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not self.socket.exists():
            if self.server.poll() is not None:
                tail = self.server_log.read_text(errors="replace").strip().splitlines()[-5:]
                raise MigrateError(f"the source page server exited with status {self.server.returncode}:\n"
                                   + "\n".join(tail))
            if time.monotonic() > deadline:
                raise MigrateError(f"the source page server did not listen on {self.socket} within "
                                   f"{SERVER_START_TIMEOUT:g}s")
            time.sleep(0.02)

    def _attach(self, size: int, key: Path) -> None:
        keys = [f"source=nbd+unix:///?socket={self.socket}", f"size={size}", f"key={key}",
                f"metrics=127.0.0.1:{self.metrics_port}", *prefetch_cpus_key(self.prefetch_cpus)]
        self.say(f"attaching the destination swap device ({self.swap_name})")
        self._attach_device(with_device_keys(keys, self.o.device_keys))

    def _switch_over(self, source: Qmp, destination: Qmp) -> tuple[float, QmpEvent, QmpEvent, dict]:
        for qmp in (source, destination):
            qmp.set_capabilities(x_ignore_shared=True, events=True)
        uri = f"unix:{self.work / 'migrate.sock'}"
        src_mark, dst_mark = source.mark(), destination.mark()
        server = self.server

        def open_gate(event: QmpEvent) -> None:
            if event.name == "STOP" and server.poll() is None:
                server.send_signal(signal.SIGUSR1)

        source.on_event(open_gate)
        destination.migrate_incoming(uri)
        started = time.monotonic()
        source.migrate(uri)
        wait_migration_completed(source, src_mark, 300)
        stop = source.wait_event("STOP", after=src_mark, timeout=10)
        try:
            resume = destination.wait_event("RESUME", after=dst_mark, timeout=60)
        except VmError:
            raise MigrateError("the destination did not resume after the device state arrived") from None
        info = source.query_migrate()
        return started, stop, resume, info

    def _roll_back(self, source: Qmp, destination: Qmp, cause: BaseException) -> None:
        self.say(f"failed ({cause}); rolling back: the source keeps running")
        with contextlib.suppress(Exception):
            destination.execute("quit", timeout=5)
        _wait_gone(self.dst_pid, 15.0)  # never two running guests; and its staged RAM must go before swapoff
        with contextlib.suppress(Exception):
            if source.status() in ("postmigrate", "paused", "finish-migrate"):
                source.execute("cont")
        self._stop_server()
        self._detach()

    def _release_source(self, source: Qmp) -> float:
        """Every page is local: quit the source (unless told not to) and stop the page server. Returns
        when that happened (time.monotonic())."""
        server = self.server if self.server is not None and self.server.poll() is None else None
        if server is not None:
            server.send_signal(signal.SIGTERM)  # it shuts down while the source QEMU quits
        if self.o.release_source:
            source.execute("quit", timeout=10)
        if server is not None:
            reap(server)
        self.say("every page is local: the source " + ("was released" if self.o.release_source else
                                                         "is no longer needed (left running as asked)"))
        return time.monotonic()

    def _stop_server(self) -> None:
        if self.server is not None:
            terminate(self.server)
