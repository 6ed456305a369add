"""Start an NBD server under test, wait until it listens, and stop it by PID.

Used by the interop tests and the benchmarks alike. Two kinds of server serve the same image:

    nbd-postcopy   `nbd-postcopy serve`, the server under test (one process, Unix socket + TCP)
    nbdkit         `nbdkit --readonly file`, a reference written by others (one process per socket)

The reference proves that a test checks something real: a test that fails against nbdkit is wrong.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

SERVER_KINDS = ("nbd-postcopy", "nbdkit")
TRANSPORTS = ("unix", "tcp")

# What the reference advertises, so `nbdinfo` shows block sizes for it too.
REFERENCE_BLOCK_SIZES = {"minimum": 1, "preferred": 4096, "maximum": 32 * 1024 * 1024}


@dataclass
class RunningServer:
    """A listening server: where to reach it and the processes behind it."""

    kind: str
    export: str
    unix_socket: Path
    tcp_port: int
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The PID of the process behind the Unix socket (the only one for nbd-postcopy)."""
        return self.procs[0].pid

    def uri(self, transport: str = "unix", export: str | None = None) -> str:
        name = quote(self.export if export is None else export, safe="")
        if transport == "unix":
            return f"nbd+unix:///{name}?socket={self.unix_socket}"
        if transport == "tcp":
            return f"nbd://127.0.0.1:{self.tcp_port}/{name}"
        raise ValueError(f"unknown transport {transport!r} (want one of {TRANSPORTS})")

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def log_text(self) -> str:
        return "\n".join(f"--- {log} ---\n{log.read_text(errors='replace')}" for log in self.logs if log.exists())


def free_tcp_port() -> int:
    """A loopback port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postcopy_argv(
    source: Sequence[str], unix_socket: Path, tcp_port: int, export: str, extra: Sequence[str] = ()
) -> list[str]:
    """The command line of `nbd-postcopy serve`; `source` is `--file PATH` or `--pid/--address/--length`."""
    return [
        sys.executable, "-m", "nbd_postcopy.cli", "serve", *source,
        "--listen", f"unix:{unix_socket}", "--listen", f"tcp:127.0.0.1:{tcp_port}",
        "--export", export, *extra,
    ]  # fmt: skip


def nbdkit_argv(image: Path, listen: Sequence[str], export: str, block_sizes: bool) -> list[str]:
    """The command line of the reference: nbdkit's C file plugin, read-only, in the foreground."""
    argv = ["nbdkit", "--readonly", "--foreground", "--exit-with-parent", *listen]
    params = [f"file={image}"]
    if export:
        argv += ["--filter=exportname"]
        params += [f"exportname={export}", f"default-export={export}"]
    if block_sizes:
        argv += ["--filter=blocksize-policy"]
        params += [f"blocksize-{k}={v}" for k, v in REFERENCE_BLOCK_SIZES.items()]
    return argv + ["file", *params]


@contextlib.contextmanager
def serve(
    kind: str,
    run_dir: Path,
    *,
    image: Path | None = None,
    source: Sequence[str] | None = None,
    export: str = "ram",
    extra: Sequence[str] = (),
    block_sizes: bool = True,
    timeout: float = 15.0,
) -> Iterator[RunningServer]:
    """Start a server of `kind` on a Unix socket in `run_dir` and on a loopback TCP port; yield it
    once both accept connections; stop every process it started (SIGTERM, then SIGKILL) on exit.

    `image` is the file to serve; nbd-postcopy alternatively takes `source` (its source options) and
    `extra` (more options, e.g. `--gate closed`). `block_sizes=False` runs plain `nbdkit file`.
    """
    server = RunningServer(kind, export, run_dir / f"{kind}.sock", free_tcp_port())
    try:
        if kind == "nbd-postcopy":
            src = source if source is not None else ["--file", str(image)]
            _start(server, postcopy_argv(src, server.unix_socket, server.tcp_port, export, extra), run_dir)
        elif kind == "nbdkit":
            if image is None or source is not None or extra:
                raise ValueError("the nbdkit reference serves an image file and takes no extra options")
            for listen in (["--unix", str(server.unix_socket)], ["--ipaddr", "127.0.0.1", "--port", str(server.tcp_port)]):
                _start(server, nbdkit_argv(image, listen, export, block_sizes), run_dir)
        else:
            raise ValueError(f"unknown server kind {kind!r} (want one of {SERVER_KINDS})")
        _wait_listening(server, timeout)
        yield server
    finally:
        stop(server)


def _start(server: RunningServer, argv: list[str], run_dir: Path) -> None:
    log = run_dir / f"{server.kind}-{len(server.procs)}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server.procs.append(proc)
    server.logs.append(log)


def _wait_listening(server: RunningServer, timeout: float) -> None:
    """Wait until a connection to each socket succeeds; fail early if a process exits."""
    deadline = time.monotonic() + timeout
    pending = {"unix": (socket.AF_UNIX, str(server.unix_socket)), "tcp": (socket.AF_INET, ("127.0.0.1", server.tcp_port))}
    while pending:
        for proc in server.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{server.kind} exited with status {proc.returncode} before listening:\n{server.log_text()}")
        for name, (family, address) in list(pending.items()):
            with socket.socket(family) as sock:
                try:
                    sock.connect(address)
                except OSError:
                    continue
            del pending[name]
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{server.kind} not listening on {sorted(pending)} after {timeout}s:\n{server.log_text()}")
        time.sleep(0.02)


def stop(server: RunningServer, timeout: float = 5.0) -> None:
    """SIGTERM each process this module started, by PID; SIGKILL what is still there after `timeout`."""
    for proc in server.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in server.procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_image(path: Path, size: int, holes: Sequence[tuple[int, int]] = (), chunk: int = 1 << 20) -> None:
    """Write a `size`-byte image of random bytes to `path`, leaving each (offset, length) in `holes`
    unwritten, so it reads as zeros and is a hole in the file (what untouched guest RAM is in a
    memory-backend-file on /dev/shm)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, chunk):
            end = min(offset + chunk, size)
            for data_start, data_end in _data_ranges(offset, end, holes):
                f.seek(data_start)
                f.write(os.urandom(data_end - data_start))


def write_image_with_zeros(path: Path, size: int, zeros: tuple[int, int]) -> bytes:
    """Write `size` random bytes to `path` with the (offset, length) range `zeros` written as zeros
    (data, not a hole); returns the image."""
    data = bytearray(os.urandom(size))
    offset, length = zeros
    data[offset : offset + length] = bytes(length)
    path.write_bytes(data)
    return bytes(data)


def _data_ranges(start: int, end: int, holes: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The parts of [start, end) outside every hole, in order."""
    for hole_start, hole_length in sorted(holes):
        hole_end = hole_start + hole_length
        if hole_end <= start or hole_start >= end:
            continue
        if hole_start > start:
            yield start, hole_start
        start = max(start, hole_end)
    if start < end:
        yield start, end
