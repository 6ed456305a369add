"""Save a running QEMU VM to a snapshot directory (snapshotdir.py) that `nbd-postcopy restore` resumes lazily.

  1. check the QEMU: its RAM is on a shared backend (as a migration source's), and note the machine
     options a restoring QEMU must match (machine type, RAM size, vCPUs);
  2. pause the guest (QMP stop);
  3. save its device state: QEMU's migration stream with x-ignore-shared (no RAM) into a Unix socket
     whose far end writes DIR/state (QEMU 7.2 has no file: URI);
  4. copy guest RAM, still paused, into the sparse file DIR/ram (zero pages stay holes);
  5. resume the guest (--keep-running), or leave it paused to quit at the end;
  6. checksum both files, write the manifest last and rename the directory into place; then quit the
     VM unless it keeps running.

The RAM is copied while the VM is stopped, so the snapshot is consistent; the pause covers steps 3
and 4 and is reported. A failure before the snapshot is whole resumes a guest that was running and
removes the partial directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from ..common.qmp import Qmp, VmError
from . import snapshotdir
from .destination import MigrateError, Narrator, check_shared_ram, drive, wait_migration_completed
from .ram import RAM_ID, RamRegion
from .snapshotdir import Manifest

log = logging.getLogger(__name__)

STATE_TIMEOUT = 120.0  # seconds for QEMU to write the device state


@dataclass
class SnapshotOptions:
    qmp: Path  # QMP socket of the running QEMU (one nobody else is connected to)
    to: Path  # the snapshot directory to create
    memdev: str = RAM_ID
    keep_running: bool = False  # resume the guest afterwards instead of quitting QEMU
    quiet: bool = False
    stream: TextIO | None = None


@dataclass
class SnapshotReport:
    directory: Path
    guest_bytes: int
    data_bytes: int  # RAM pages that are not all zeros (the rest are holes)
    state_bytes: int
    pause_ms: float  # stop to cont (--keep-running), or stop to the end of the RAM copy
    state_seconds: float
    ram_copy_seconds: float
    checksum_seconds: float
    total_seconds: float
    kept_running: bool

    def summary(self) -> str:
        return "\n".join([
            f"snapshot:                  {self.directory}",
            f"guest RAM:                 {self.guest_bytes >> 20} MiB ({self.data_bytes / 2**20:.1f} MiB of data, "
            "zero pages are holes)",
            f"device state:              {self.state_bytes / 2**20:.2f} MiB in {self.state_seconds:.2f} s",
            f"RAM copy:                  {self.ram_copy_seconds:.2f} s (while the VM was stopped)",
            f"pause:                     {self.pause_ms:.1f} ms" + ("" if self.kept_running else " (then quit)"),
            f"checksums:                 {self.checksum_seconds:.2f} s (after the pause)",
            f"total:                     {self.total_seconds:.2f} s",
            f"the VM:                    {'runs on' if self.kept_running else 'quit'}",
        ])


def snapshot(options: SnapshotOptions) -> SnapshotReport:
    return _Snapshot(options).run()


class _Snapshot(Narrator):
    name = "snapshot"

    def __init__(self, options: SnapshotOptions):
        self.o = options
        self.stream = options.stream if options.stream is not None else sys.stderr
        self.target = Path(options.to).absolute()
        self.partial: Path | None = None
        self.paused = False  # the VM is paused by us (a failure then resumes it)

    def run(self) -> SnapshotReport:
        return drive(self.o.qmp, "snapshotted", self._run, self._fail)

    def _run(self, qmp: Qmp) -> SnapshotReport:
        try:
            return self._steps(qmp)
        except OSError as exc:  # writing the snapshot directory (a full file system, for instance)
            raise MigrateError(f"the snapshot failed: {exc}") from None

    def _steps(self, qmp: Qmp) -> SnapshotReport:
        started = time.monotonic()
        pid = qmp.peer_pid()
        ram, machine, version = self._check(qmp, pid)
        self.partial = snapshotdir.begin(self.target)
        qmp.set_capabilities(x_ignore_shared=True, events=True)
        self.say(f"pausing the VM (QEMU pid {pid}) and saving its device state")
        qmp.execute("stop")
        self.paused, paused_at = True, time.monotonic()
        state_seconds = save_migration_stream(qmp, self.partial / snapshotdir.STATE)
        self.say(f"copying {ram.length >> 20} MiB of guest RAM ({ram.file or 'through /proc/PID/mem'})")
        copy = self._copy_ram(pid, ram)
        if self.o.keep_running:
            qmp.execute("cont")
            self.paused = False
        pause_ms = (time.monotonic() - paused_at) * 1000
        self.say(f"the VM was paused {pause_ms:.0f} ms" + ("; it runs again" if self.o.keep_running else ""))
        checksummed = time.monotonic()
        state_path, ram_path = self.partial / snapshotdir.STATE, self.partial / snapshotdir.RAM
        manifest = Manifest(
            memdev=self.o.memdev,
            machine=machine,
            ram={"file": snapshotdir.RAM, "bytes": ram.length, "data_bytes": copy.data_bytes,
                 "sha256": snapshotdir.file_sha256(ram_path)},
            state={"file": snapshotdir.STATE, "bytes": state_path.stat().st_size,
                   "sha256": snapshotdir.file_sha256(state_path)},
            qemu=version,
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        checksum_seconds = time.monotonic() - checksummed
        manifest.timings = {"pause_ms": round(pause_ms, 1), "state_seconds": round(state_seconds, 3),
                            "ram_copy_seconds": round(copy.seconds, 3), "checksum_seconds": round(checksum_seconds, 3)}
        snapshotdir.finish(self.partial, self.target, manifest)
        self.partial = None
        if not self.o.keep_running:
            self.say("the snapshot is whole: quitting the VM")
            qmp.execute("quit", timeout=10)
            self.paused = False
        return SnapshotReport(
            directory=self.target, guest_bytes=ram.length, data_bytes=copy.data_bytes,
            state_bytes=manifest.state["bytes"], pause_ms=pause_ms, state_seconds=state_seconds,
            ram_copy_seconds=copy.seconds, checksum_seconds=checksum_seconds,
            total_seconds=time.monotonic() - started, kept_running=self.o.keep_running,
        )

    def _check(self, qmp: Qmp, pid: int) -> tuple[RamRegion, dict, str]:
        ram = check_shared_ram(qmp, pid, self.o.memdev, qemu="the QEMU", owner="the VM")
        return ram, machine_of(qmp, ram.length), qemu_version(qmp)

    def _copy_ram(self, pid: int, ram: RamRegion) -> snapshotdir.CopyStats:
        try:
            return self._copy_ram_into(self.partial / snapshotdir.RAM, pid, ram)
        except OSError as exc:  # e.g. the file system is full
            raise MigrateError(f"copying guest RAM into {self.target.parent} failed: {exc.strerror or exc}") from None

    def _copy_ram_into(self, target: Path, pid: int, ram: RamRegion) -> snapshotdir.CopyStats:
        if ram.file:
            with open(ram.file, "rb") as source:
                if os.fstat(source.fileno()).st_size < ram.length:
                    raise MigrateError(f"{ram.file} is smaller than the guest RAM ({ram.length} bytes)")
                return snapshotdir.copy_sparse(source.fileno(), 0, ram.length, target)
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)  # memfd (or a deleted file): through the process
        try:
            return snapshotdir.copy_sparse(fd, ram.address, ram.length, target, seek_data=False)
        finally:
            os.close(fd)

    def _fail(self, qmp: Qmp, exc: BaseException) -> None:
        if self.partial is not None:
            snapshotdir.abandon(self.partial)
        if self.paused:
            try:
                qmp.execute("cont")
                self.say(f"failed ({exc}): the VM runs again, no snapshot was written")
            except VmError as cont_error:
                self.say(f"failed ({exc}), and resuming the VM failed too ({cont_error}): it is paused")


def machine_of(qmp: Qmp, ram_bytes: int) -> dict:
    """The machine options a restoring QEMU must match."""
    return {
        "type": qmp.execute("qom-get", path="/machine", property="type"),
        "ram_bytes": ram_bytes,
        "vcpus": len(qmp.execute("query-cpus-fast")),
    }


def qemu_version(qmp: Qmp) -> str:
    q = qmp.execute("query-version")["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']}"


def save_migration_stream(qmp: Qmp, path: Path) -> float:
    """Migrate the QEMU into file `path` (through a Unix socket read here: QEMU 7.2 has no file: URI, and
    an exec: child may still be writing when QEMU reports completion); returns the seconds it took.
    With x-ignore-shared set, the stream holds device state only."""
    started = time.monotonic()
    socket_dir = Path(tempfile.mkdtemp(prefix="nbdpc-snap-"))  # short: a Unix socket path has 107 bytes
    address = socket_dir / "state.sock"
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(address))
        listener.listen(1)
        listener.settimeout(STATE_TIMEOUT)
        received: list[BaseException] = []
        reader = threading.Thread(target=_receive_into, args=(listener, path, received), daemon=True)
        reader.start()
        mark = qmp.mark()
        qmp.migrate(f"unix:{address}")
        try:
            wait_migration_completed(qmp, mark, STATE_TIMEOUT)
            failure = None
        except MigrateError as exc:
            failure = exc
        # A failed write of the file (e.g. a full disk) ends QEMU's migration, or comes after QEMU has sent
        # everything into the socket: either way, say that.
        reader.join(5.0 if failure else STATE_TIMEOUT)
        if received:
            why = getattr(received[0], "strerror", None) or received[0]
            raise MigrateError(f"saving the device state failed: writing {path} failed: {why}")
        if failure or reader.is_alive():
            raise MigrateError(f"saving the device state failed: {failure or 'QEMU did not close the stream'}")
    finally:
        listener.close()
        shutil.rmtree(socket_dir, ignore_errors=True)
    return time.monotonic() - started


def _receive_into(listener: socket.socket, path: Path, errors: list[BaseException]) -> None:
    try:
        connection, _ = listener.accept()
        with connection, open(path, "wb") as out:
            connection.settimeout(STATE_TIMEOUT)
            while chunk := connection.recv(1 << 20):
                out.write(chunk)
    except BaseException as exc:  # reported by the caller
        errors.append(exc)
