"""The test bench's QEMU: boot the checker guest, read its serial console, run QEMU's own migrations.

    with Vm(image, run_dir, name="src", ram="file") as source, \\
         Vm(image, run_dir, name="dst", ram="ram", incoming=True) as destination:
        source.console.wait_for(PassOk, timeout=30)
        result = postcopy_migrate(source.qmp, destination.qmp, f"unix:{run_dir}/mig.sock")

A `Vm` owns its QEMU process (stopped in close(): `quit` over QMP, then SIGTERM, then SIGKILL) and the
/dev/shm file it created, and talks to it through the product's QMP client (nbd_postcopy.common.qmp).
QEMU's own postcopy (`postcopy_migrate`) is the reference the benchmarks measure against.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..common.qmp import Qmp, QmpError, QmpEvent, VmError, seconds_between
from ..migration.ram import RAM_ID, RamRegion, ram_region_of
from .guest import ConsoleEvent, Failure, GuestImage, Heartbeat, PassOk, parse_console_line

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"

RamBackend = Literal["file", "memfd", "ram"]


# --- serial console ----------------------------------------------------------------------------


class Console:
    """Reads a QEMU serial console from a pipe, logs it to a file, and keeps memcheck's events.

    `on_line`, if given, is called with every line (without its line ending) as it arrives.
    A migration can stop the guest in the middle of a line: the source's console then ends in a line
    without its ending (read only when the source QEMU exits), and the destination's starts with the
    rest. Neither piece is parsed on its own; `unterminated` and `first_line` keep them, with their
    arrival times, and merged_heartbeats() joins them.
    """

    def __init__(self, stream, log_path: Path, name: str, on_line: Callable[[str], None] | None = None):
        self.log_path = log_path
        self._stream = stream
        self._on_line = on_line
        self._events: list[ConsoleEvent] = []
        self._tail: list[str] = []
        self.first_line: tuple[str, float] | None = None  # the first line and when it arrived
        self.unterminated: tuple[str, float] | None = None  # a last line without its ending, at exit
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, name=f"{name}-console", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with open(self.log_path, "ab") as log_file:
            for raw in iter(self._stream.readline, b""):
                now = time.monotonic()
                log_file.write(raw)
                log_file.flush()
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if self._on_line is not None:
                    self._on_line(line)
                if self.first_line is None:
                    self.first_line = (line, now)
                event = parse_console_line(line, now)  # (the rest of a cut line matches no event)
                if not raw.endswith(b"\n"):  # the guest stopped here mid-line (a migration source)
                    self.unterminated = (line, now)
                    if not isinstance(event, Failure):  # a failure still counts; the rest waits for its end
                        event = None
                with self._changed:
                    self._tail = (self._tail + [line])[-40:]
                    if event is not None:
                        self._events.append(event)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return not self._thread.is_alive()

    def mark(self) -> int:
        with self._changed:
            return len(self._events)

    def events(self, kind: type | tuple[type, ...] = object, after: int = 0) -> list[Any]:
        with self._changed:
            return [e for e in self._events[after:] if isinstance(e, kind)]

    def tail(self) -> str:
        """The last lines printed, for error messages."""
        with self._changed:
            return "\n".join(self._tail)

    def wait_for(
        self,
        kind: type | tuple[type, ...],
        count: int = 1,
        after: int = 0,
        timeout: float = 30.0,
    ) -> list[Any]:
        """Wait until `count` events of `kind` arrived after position `after`; return them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [e for e in self._events[after:] if isinstance(e, kind)]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed:
                    why = "the console closed" if self.closed else f"{timeout}s passed"
                    raise VmError(
                        f"waited for {count} {getattr(kind, '__name__', kind)} from {self.log_path.name}, "
                        f"saw {len(found)} before {why}; last console lines:\n{self._tail_unlocked()}"
                    )
                self._changed.wait(min(remaining, 0.5))

    def _tail_unlocked(self) -> str:
        return "\n".join(self._tail)

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


def merged_heartbeats(*consoles: Console) -> list[Heartbeat]:
    """Heartbeats from several consoles of one guest (source then destination), by guest counter. A line
    that a migration cut in two counts once, when its rest arrived at the destination."""
    beats = {b.counter: b for c in consoles for b in c.events(Heartbeat)}
    for before, after in zip(consoles, consoles[1:]):
        if before.unterminated is not None and after.first_line is not None:
            event = parse_console_line(before.unterminated[0] + after.first_line[0], after.first_line[1])
            if isinstance(event, Heartbeat):
                beats.setdefault(event.counter, event)
    return [beats[k] for k in sorted(beats)]


def verified_after(running: "Vm", settle: float, *others: "Vm", timeout: float = 60.0) -> str:
    """Let the guest in `running` go on `settle` seconds: "yes" if it then completes a verification pass and
    no console (its own or the `others'`, such as the migration source's) reported a wrong page, else
    "NO: " and the first FAIL line."""
    mark = running.console.mark()
    time.sleep(settle)
    running.console.wait_for(PassOk, after=mark, timeout=timeout)
    failures = [event for vm in (*others, running) for event in vm.console.events(Failure)]
    return "yes" if not failures else f"NO: {failures[0].line}"


def largest_gap(beats: list[Heartbeat], start: float | None = None, end: float | None = None) -> float:
    """The longest host-time interval between consecutive heartbeats arriving within [start, end].

    The guest prints a heartbeat every ~50 ms while it runs; a longer gap is time the guest (or its
    console) was stalled, as seen from the host. With `start`, the gap from `start` to the first
    heartbeat counts too, and with `end`, the gap from the last heartbeat to `end`.
    """
    times = [b.host_time for b in beats if (start is None or b.host_time >= start) and (end is None or b.host_time <= end)]
    if start is not None:
        times.insert(0, start)
    if end is not None:
        times.append(end)
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


# --- VM ----------------------------------------------------------------------------------------


@dataclass
class Vm:
    """One QEMU TCG VM booting the test guest, with QMP and a parsed serial console.

    ram: "file" (memory-backend-file,share=on on /dev/shm, or on `ram_file`), "memfd"
    (memory-backend-memfd,share=on) or "ram" (anonymous memory-backend-ram, for a destination).
    memory_mib: the guest's RAM; the cloud kernel needs 96 MiB or more to boot (64 MiB does not).
    incoming: start with `-incoming defer` (then call qmp.migrate_incoming).
    extra_qmp: how many more QMP sockets to open (QEMU serves one client per socket); their paths are
    in `extra_qmp_paths`, e.g. for `nbd-postcopy serve --gate qmp:PATH`.
    """

    image: GuestImage
    run_dir: Path
    name: str = "vm"
    memory_mib: int = 256
    ram: RamBackend = "file"
    ram_file: Path | None = None
    incoming: bool = False
    append: str = ""
    extra_qmp: int = 0
    extra_args: list[str] = field(default_factory=list)
    wrapper: list[str] = field(default_factory=list)  # e.g. nsenter --net=...: it must exec QEMU (same PID)

    process: subprocess.Popen | None = field(default=None, init=False)
    qmp: Qmp = field(init=False)
    console: Console = field(init=False)
    _owns_ram_file: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        if self.ram == "file" and self.ram_file is None:
            self.ram_file = Path("/dev/shm") / f"nbd-postcopy-{self.name}-{os.getpid()}-{id(self):x}.ram"
        self.qmp_path = self.run_dir / f"{self.name}.qmp"
        self.extra_qmp_paths = [self.run_dir / f"{self.name}.qmp{i + 1}" for i in range(self.extra_qmp)]
        self.console_log = self.run_dir / f"{self.name}.console"
        self.stderr_log = self.run_dir / f"{self.name}.stderr"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise VmError(f"VM {self.name} is not started")
        return self.process.pid

    def command(self) -> list[str]:
        size = f"{self.memory_mib}M"
        if self.ram == "file":
            backend = f"memory-backend-file,id={RAM_ID},size={size},mem-path={self.ram_file},share=on"
        elif self.ram == "memfd":
            backend = f"memory-backend-memfd,id={RAM_ID},size={size},share=on"
        elif self.ram == "ram":
            backend = f"memory-backend-ram,id={RAM_ID},size={size}"
        else:
            raise ValueError(f"unknown RAM backend {self.ram!r} (want file, memfd or ram)")
        argv = [
            QEMU, "-accel", "tcg", "-nodefaults", "-display", "none", "-no-reboot",
            "-machine", f"pc,memory-backend={RAM_ID}", "-m", size, "-object", backend,
            # kvmvapic reads guest RAM while loading device state, before postcopy can supply it.
            "-global", "apic-common.vapic=off",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initramfs),
            # A guest kernel oops (e.g. on a wrong page) panics, and the panic ends QEMU (-no-reboot).
            "-append", f"console=ttyS0 panic=-1 oops=panic quiet {self.append}".strip(),
            "-chardev", "stdio,id=serial0,signal=off", "-serial", "chardev:serial0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        for path in self.extra_qmp_paths:
            argv += ["-qmp", f"unix:{path},server=on,wait=off"]
        if self.incoming:
            argv += ["-incoming", "defer"]
        return argv + self.extra_args

    def start(self, timeout: float = 10.0) -> Vm:
        if self.ram == "file":
            self._owns_ram_file = not self.ram_file.exists()
        argv = [*self.wrapper, *self.command()]
        log.debug("starting %s: %s", self.name, " ".join(argv))
        with open(self.stderr_log, "wb") as stderr:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True
            )
        try:
            self.console = Console(self.process.stdout, self.console_log, self.name)
            self._wait_for_socket(timeout)
            self.qmp = Qmp(self.qmp_path, timeout=timeout, name=self.name)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_for_socket(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.qmp_path.exists():
            if self.process.poll() is not None:
                raise VmError(f"QEMU {self.name} exited with status {self.process.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise VmError(f"QEMU {self.name} did not open {self.qmp_path} within {timeout}s")
            time.sleep(0.01)

    def stderr(self) -> str:
        try:
            return self.stderr_log.read_text(errors="replace").strip()
        except FileNotFoundError:
            return ""

    def wait_exit(self, timeout: float = 10.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise VmError(f"QEMU {self.name} (pid {self.pid}) still runs after {timeout}s") from None

    def close(self) -> None:
        """Stop QEMU (quit, then SIGTERM, then SIGKILL) and remove what this VM created."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            if hasattr(self, "qmp"):
                try:
                    self.qmp.execute("quit", timeout=2.0)
                except VmError:
                    pass
            for sig, grace in ((None, 3.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
                if sig is not None:
                    proc.send_signal(sig)
                try:
                    proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if hasattr(self, "qmp"):
            self.qmp.close()
        if hasattr(self, "console"):
            self.console.join()
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        for path in [self.qmp_path, *self.extra_qmp_paths]:
            path.unlink(missing_ok=True)
        if self._owns_ram_file:
            self.ram_file.unlink(missing_ok=True)

    def __enter__(self) -> Vm:
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --- guest RAM in the QEMU process -------------------------------------------------------------


def find_ram_region(vm: Vm, memdev: str = RAM_ID) -> RamRegion:
    return ram_region_of(vm.pid, vm.qmp, memdev)



# --- QEMU's own migrations (the reference to measure against) ----------------------------------


@dataclass
class MigrationResult:
    status: str
    downtime_ms: float | None
    total_time_ms: float | None
    transferred_bytes: int | None
    postcopy_requests: int | None
    switchover_time: float  # time.monotonic() when the source stopped
    resume_time: float  # time.monotonic() when the destination resumed
    switchover_to_resume_ms: float  # by QEMU's own event stamps (common.qmp.seconds_between)
    info: dict[str, Any]  # the source's final query-migrate


def _result(source: Qmp, status: str, stop: QmpEvent, resume: QmpEvent) -> MigrationResult:
    # QEMU announces "completed" a moment before it fills in total-time (and a precopy's downtime).
    deadline = time.monotonic() + 2.0
    while not (info := source.query_migrate()).get("total-time") and time.monotonic() < deadline:
        time.sleep(0.01)
    ram = info.get("ram", {})
    return MigrationResult(
        status=status,
        downtime_ms=info.get("downtime"),
        total_time_ms=info.get("total-time"),
        transferred_bytes=ram.get("transferred"),
        postcopy_requests=ram.get("postcopy-requests"),
        switchover_time=stop.host_time,
        resume_time=resume.host_time,
        switchover_to_resume_ms=seconds_between(stop, resume) * 1000,
        info=info,
    )


def postcopy_migrate(
    source: Qmp,
    destination: Qmp,
    uri: str,
    precopy_seconds: float = 0.0,
    preempt: bool = False,
    max_bandwidth: int | None = 10 << 30,
    timeout: float = 300.0,
) -> MigrationResult:
    """QEMU's own postcopy: start precopy, switch to postcopy after `precopy_seconds`, wait until done.

    The destination must have been started with `-incoming defer`.
    preempt: the postcopy-preempt capability (urgent pages on a channel of their own).
    max_bandwidth: bytes/s for the background stream (QEMU's default is 128 MiB/s); None keeps it.
    """
    for qmp in (source, destination):
        qmp.set_capabilities(postcopy_ram=True, postcopy_preempt=preempt, events=True)
    if max_bandwidth is not None:
        source.set_parameters(max_bandwidth=max_bandwidth)
    dst_mark, src_mark = destination.mark(), source.mark()
    destination.migrate_incoming(uri)
    source.migrate(uri)
    time.sleep(precopy_seconds)
    try:
        source.start_postcopy()
    except QmpError as exc:
        if source.query_migrate().get("status") != "completed":
            raise
        log.info("precopy finished before postcopy was started: %s", exc)
    return _finish(source, destination, src_mark, dst_mark, timeout)


def ignore_shared_migrate(source: Qmp, destination: Qmp, uri: str, timeout: float = 120.0) -> MigrationResult:
    """Precopy with x-ignore-shared: shared RAM is not sent (the classic local use: both on one file)."""
    for qmp in (source, destination):
        qmp.set_capabilities(x_ignore_shared=True, events=True)
    dst_mark, src_mark = destination.mark(), source.mark()
    destination.migrate_incoming(uri)
    source.migrate(uri)
    return _finish(source, destination, src_mark, dst_mark, timeout)


def _finish(source: Qmp, destination: Qmp, src_mark: int, dst_mark: int, timeout: float) -> MigrationResult:
    status = source.wait_migration(after=src_mark, timeout=timeout)
    if status != "completed":
        raise VmError(f"migration {status}: {source.query_migrate().get('error-desc', 'no reason given')}")
    stop = source.wait_event("STOP", after=src_mark, timeout=5)
    resume = destination.wait_event("RESUME", after=dst_mark, timeout=timeout)
    dst_status = destination.wait_migration(after=dst_mark, timeout=timeout)
    if dst_status != "completed":
        raise VmError(f"incoming migration on {destination.socket_path} ended {dst_status}")
    return _result(source, status, stop, resume)
