"""Watch one nbd-postcopy migration from outside: CPU of its processes and the device's first seconds.

`MigrationProbe` runs a thread beside `nbd_postcopy.migration.migrate.migrate()` and finds what the driver
starts under its work directory without any hook: the page server (`nbd-postcopy serve`, by its socket
in the command line) and the swap device's nbdkit and nbdfuse (from the attachment's state record).
It samples their CPU time (utime + stime, /proc/PID/stat) every SAMPLE_SECONDS and at the source's QMP
STOP event, and after the destination's RESUME event the device's control "status" counters, the
system's pswpin and the destination QEMU's major faults every WINDOW_STEP seconds for WINDOW seconds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import cpu_seconds

from nbd_postcopy.common import linux
from nbd_postcopy.common.qmp import Qmp, QmpEvent
from nbd_postcopy.device.control import ControlError, request
from nbd_postcopy.host.attachment import State

SAMPLE_SECONDS = 0.05
WINDOW = 2.0  # seconds after RESUME whose faults are reported
WINDOW_STEP = 0.1
ROLES = ("nbdkit", "serve", "nbdfuse")


@dataclass
class CpuSample:
    time: float  # time.monotonic()
    seconds: dict[str, float]  # role -> CPU seconds, for the roles alive then


@dataclass
class WindowSample:
    time: float
    demand: int  # the device's fetched_demand counter
    prefetch: int
    remaining: int
    pswpin: int  # /proc/vmstat, pages read from any swap device (readahead included)
    majflt: int  # the destination QEMU's major faults


@dataclass
class ProbeResult:
    stop_time: float | None = None
    resume_time: float | None = None
    at_stop: CpuSample | None = None  # CPU just before the switchover
    at_release: CpuSample | None = None  # the last sample in which the page server was alive
    window: list[WindowSample] = field(default_factory=list)

    def fetch_cpu(self) -> dict[str, float] | None:
        """CPU seconds of each role from the switchover until the source was released."""
        if self.at_stop is None or self.at_release is None:
            return None
        return {role: self.at_release.seconds.get(role, 0.0) - self.at_stop.seconds.get(role, 0.0) for role in ROLES}

    def early_faults(self) -> dict | None:
        """Counter deltas from the first sample after RESUME over WINDOW seconds, or until the prefetcher
        had every page (then completion pre-pages and pswpin no longer means the guest's touches)."""
        if len(self.window) < 2:
            return None
        first = self.window[0]
        last = first
        for sample in self.window[1:]:
            if sample.time - first.time > WINDOW + WINDOW_STEP / 2:
                break
            last = sample
            if sample.remaining == 0:
                break
        steps = []  # demand pages since the first sample, at each half second
        for mark in (0.5, 1.0, 1.5, 2.0):
            if mark > last.time - first.time + WINDOW_STEP / 2:
                break
            steps.append(max(s.demand for s in self.window if s.time - first.time <= mark + WINDOW_STEP / 2)
                         - first.demand)
        return {
            "seconds": last.time - first.time,
            "demand": last.demand - first.demand,
            "prefetch": last.prefetch - first.prefetch,
            "pswpin": last.pswpin - first.pswpin,
            "majflt": last.majflt - first.majflt,
            "late_ms": (first.time - self.resume_time) * 1000 if self.resume_time else None,
            "demand_by_half_second": steps,
        }


class MigrationProbe:
    def __init__(self, work_dir: Path, source: Qmp, destination: Qmp, destination_pid: int):
        self.work = Path(work_dir)
        self.destination_pid = destination_pid
        self.result = ProbeResult()
        self.pids: dict[str, int] = {}
        self.control: str | None = None
        self._resumed = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._last: CpuSample | None = None
        self._thread = threading.Thread(target=self._run, name="migration-probe", daemon=True)
        source.on_event(self._on_source_event)
        destination.on_event(self._on_destination_event)

    def __enter__(self) -> MigrationProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._resumed.set()
        self._thread.join(10)

    def _on_source_event(self, event: QmpEvent) -> None:
        if event.name == "STOP" and self.result.stop_time is None:
            self.result.stop_time = event.host_time
            self.result.at_stop = self._sample_cpu()

    def _on_destination_event(self, event: QmpEvent) -> None:
        if event.name == "RESUME" and self.result.resume_time is None:
            self.result.resume_time = event.host_time
            self._resumed.set()

    def _sample_cpu(self) -> CpuSample:
        with self._lock:
            seconds = {}
            for role, pid in self.pids.items():
                value = cpu_seconds(pid)
                if value is not None:
                    seconds[role] = value
            return CpuSample(time.monotonic(), seconds)

    def _find_processes(self) -> None:
        if "serve" not in self.pids:
            socket = str(self.work / "source.sock")
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and linux.process_matches(int(entry.name), socket) \
                        and linux.process_matches(int(entry.name), " serve "):
                    with self._lock:
                        self.pids["serve"] = int(entry.name)
                    break
        if "nbdkit" not in self.pids:
            for record in self.work.glob("*/state.json"):
                try:
                    state = State.load(record.parent)
                except (OSError, ValueError):
                    continue
                state.adopt_pids()
                if state.nbdkit_pid:
                    with self._lock:
                        self.pids["nbdkit"] = state.nbdkit_pid
                        if state.nbdfuse_pid:
                            self.pids["nbdfuse"] = state.nbdfuse_pid
                    self.control = state.control

    def _window_sample(self) -> WindowSample | None:
        try:
            status = request(self.control, "status", timeout=2.0)
            stat = Path(f"/proc/{self.destination_pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (ControlError, OSError):
            return None
        return WindowSample(time.monotonic(), status["fetched_demand"], status["fetched_prefetch"],
                            status["remaining"], linux.vmstat("pswpin")["pswpin"], int(stat[9]))  # field 12: majflt

    def _run(self) -> None:
        window_end = None
        while not self._done.is_set():
            if "serve" not in self.pids or "nbdkit" not in self.pids:
                self._find_processes()
            sample = self._sample_cpu()
            if "serve" in sample.seconds:
                self.result.at_release = sample
            if self._resumed.is_set() and self.control and not self._done.is_set():
                if window_end is None:
                    window_end = time.monotonic() + WINDOW + 2 * WINDOW_STEP
                if time.monotonic() < window_end and (taken := self._window_sample()):
                    self.result.window.append(taken)
                    self._done.wait(max(0.0, taken.time + WINDOW_STEP - time.monotonic()))
                    continue
            (self._resumed if not self._resumed.is_set() else self._done).wait(SAMPLE_SECONDS)
