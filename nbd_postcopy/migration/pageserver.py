"""The migration driver's page server: `nbd-postcopy serve` as a child process, kept alive until released.

    server = PageServerProcess(ram_args, listen=["unix:/run/x.sock"], log_path=work / "server.log")
    server.start()            # gate closed; returns once it listens
    server.open_gate()        # the source has stopped (SIGUSR1)
    server.watch()            # from now on a server that dies is restarted at once, on the same RAM,
    ...                       # addresses, instance id and (open) gate: the device's clients reconnect
    server.stop()

The instance id is chosen here and passed to every incarnation (`serve --instance-id`), so the device
recognises the restarted server as the same source (docs/DESIGN.md, "Source identity"); `instance` is
also what the device is pinned to (`source-id=`).
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from ..common.linux import terminate

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
RESTART_CHECK = 0.05  # seconds between looks at the server process while watching


class PageServerError(Exception):
    """The page server did not start (the message has the end of its log)."""


class PageServerProcess:
    def __init__(self, source_args: list[str], listen: list[str], log_path: Path, extra_args: list[str] = (),
                 instance: str | None = None):
        self.source_args = list(source_args)
        self.listen = list(listen)
        self.log_path = Path(log_path)
        self.extra_args = list(extra_args)
        self.instance = instance or uuid.uuid4().hex
        self.gate_open = False
        self.restarts = 0
        self.process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._watching = threading.Event()
        self._stopped = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def argv(self) -> list[str]:
        listens = [arg for spec in self.listen for arg in ("--listen", spec)]
        return [sys.executable, "-m", "nbd_postcopy.cli", "serve", *self.source_args, *listens,
                "--gate", "open" if self.gate_open else "closed", "--instance-id", self.instance, *self.extra_args]

    def start(self) -> None:
        """Start the server and return once it accepts connections on every address."""
        for spec in self.listen:
            if spec.startswith("unix:"):  # a stale socket of an incarnation that died would look ready
                Path(spec[5:]).unlink(missing_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(_listening(spec) for spec in self.listen):
            if self.process.poll() is not None:
                raise PageServerError(f"the source page server exited with status {self.process.returncode}:\n"
                                      + self.log_tail())
            if time.monotonic() > deadline:
                raise PageServerError(f"the source page server did not listen on {', '.join(self.listen)} within "
                                      f"{START_TIMEOUT:g}s:\n" + self.log_tail())
            time.sleep(0.02)

    def open_gate(self) -> None:
        """The source is frozen: let pages go (this incarnation and every later one)."""
        with self._lock:
            self.gate_open = True
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGUSR1)

    def watch(self) -> None:
        """From now on, restart the server whenever it dies, until stop()."""
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="page-server-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self._stopped.wait(RESTART_CHECK):
            with self._lock:
                process = self.process
                if process is None or process.poll() is None or self._stopped.is_set():
                    continue
                log.error("the source page server (pid %d) died (%s); restarting it on the same RAM",
                          process.pid, _describe(process.returncode))
                try:
                    self.start()
                except PageServerError as exc:
                    log.error("restarting the page server failed: %s", exc)
                    continue
                self.restarts += 1
                log.warning("the page server is back (pid %d, restart %d, instance %s)", self.process.pid,
                            self.restarts, self.instance)

    def stop(self) -> None:
        self._stopped.set()
        if self._watcher is not None:
            self._watcher.join(5)
        with self._lock:
            process = self.process
            if process is not None:
                terminate(process)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""


def _listening(spec: str) -> bool:
    kind, _, rest = spec.partition(":")
    if kind == "unix":
        return Path(rest).is_socket()
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1" if ":" not in host else "::1"
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True
    except OSError:
        return False


def _describe(returncode: int) -> str:
    return f"exit status {returncode}" if returncode >= 0 else f"signal {signal.Signals(-returncode).name}"
