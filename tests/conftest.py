"""Fixtures shared by the whole suite. Each fixture owns what it creates and removes it in `finally`."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_postcopy.device.markers import MarkerCodec
from tests.swapdev import plain_swap_device, remove_run_dir

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PLUGIN = REPO / "plugin" / "postcopy.py"


@pytest.fixture
def run_dir():
    """A short private directory for Unix sockets and scratch files.

    Name: /tmp/nbdpc-XXXX   Scope: function   Depends: nothing
    (pytest's tmp_path can exceed the 108-byte limit of a Unix socket path.) At the end, any swap
    attachment whose state lies inside is detached before the directory goes (tests/swapdev.py).
    """
    path = Path(tempfile.mkdtemp(prefix="nbdpc-", dir="/tmp"))
    try:
        yield path
    finally:
        remove_run_dir(path)


@pytest.fixture
def swap_lock():
    """Serialises tests that activate swap or change global memory knobs, across pytest processes.

    Name: /run/lock/nbd-postcopy-tests.lock   Scope: function   Depends: nothing
    MADV_PAGEOUT picks the highest-priority swap device with free slots, so two swap tests running at
    once would steal each other's pages.
    """
    os.makedirs("/run/lock", exist_ok=True)
    with open("/run/lock/nbd-postcopy-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Processes:
    """Starts processes and ends exactly those, by PID, at teardown."""

    def __init__(self):
        self._procs: list[subprocess.Popen] = []

    def start(self, argv, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen([str(a) for a in argv], **kwargs)
        self._procs.append(proc)
        return proc

    def stop_all(self, timeout: float = 5.0):
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in reversed(self._procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes():
    """Name: processes   Scope: function   Depends: nothing. Yields a Processes; stops them all after."""
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


def wait_for_path(path: Path, timeout: float = 10.0, proc: subprocess.Popen | None = None):
    """Wait until `path` exists (a socket a server is about to listen on)."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


@pytest.fixture
def plain_swap(swap_lock) -> Iterator[str]:
    """Name: plain_swap (a 256 MiB plain swap device path)   Scope: function   Depends: swap_lock."""
    with plain_swap_device(256) as device:
        yield device


@pytest.fixture
def codec(run_dir) -> MarkerCodec:
    """Name: codec (a MarkerCodec; its key file is run_dir/key)   Scope: function   Depends: run_dir."""
    key = run_dir / "key"
    key.write_bytes(os.urandom(32))
    return MarkerCodec.from_file(key)


@pytest.fixture
def tls_files(run_dir: Path) -> Path:
    """A CA, a server certificate for localhost and a client certificate, made with openssl.

    Name: run_dir/tls   Scope: function   Depends: run_dir
    """
    d = run_dir / "tls"
    d.mkdir()

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]  # fast to make
    openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
            "-days", "2", "-subj", "/CN=nbd-postcopy test CA")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, extra in (("server", ["-extfile", "san.ext"]), ("client", [])):
        openssl("req", *ec, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
                "-subj", f"/CN={'localhost' if name == 'server' else 'client'}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2", *extra)
    for name, files in (("with-client", ["ca-cert.pem", "client-cert.pem", "client-key.pem"]),
                        ("ca-only", ["ca-cert.pem"])):
        (d / name).mkdir()
        for f in files:
            (d / name / f).write_bytes((d / f).read_bytes())
    return d
