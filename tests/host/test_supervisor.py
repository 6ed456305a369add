"""The supervisor keeps nbdkit -f --swap and nbdfuse alive, reports loudly and never restarts nbdkit.

These run nbdkit's C `memory` plugin: the supervisor does not care which plugin it runs, and the
postcopy plugin itself is exercised through setup-swap.sh in test_setup_swap.py. No swap is activated.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.swapdev import is_mounted, process_matches

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)")


def start_detached(state_dir: Path, *plugin: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nbd_postcopy.host.supervisor", "--state-dir", str(state_dir), *extra, "--", *plugin],
        capture_output=True, text=True, timeout=60,
    )


def parse_pids(text: str) -> dict[str, int]:
    return {key: int(value) for key, value in (line.split("=") for line in text.split())}


def status_field(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(field)


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    return process_matches(pid, "")


@pytest.fixture
def state_dir(run_dir):
    """Name: RUN_DIR/state   Scope: function   Depends: run_dir. Ends leftover children, unmounts fuse."""
    path = run_dir / "state"
    path.mkdir()
    try:
        yield path
    finally:
        if is_mounted(path / "fuse"):
            subprocess.run(["fusermount3", "-u", "-z", str(path / "fuse")], check=False)
        pids = path / "pids"
        if pids.exists():
            for pid in parse_pids(pids.read_text()).values():
                if process_matches(pid, str(path)):
                    os.kill(pid, signal.SIGKILL)


def test_starts_detached_children_and_stops_on_sigterm(state_dir):
    started = start_detached(state_dir, "memory", "size=64M")
    assert started.returncode == 0, started.stderr
    pids = parse_pids(started.stdout)
    assert parse_pids((state_dir / "pids").read_text()) == pids
    supervisor, nbdkit, nbdfuse = pids["supervisor_pid"], pids["nbdkit_pid"], pids["nbdfuse_pid"]

    # Detached: its own session, and the process that started it has exited.
    assert os.getsid(supervisor) == supervisor != os.getsid(0)
    for child in (nbdkit, nbdfuse):
        assert int(status_field(child, "PPid")) == supervisor
    assert (state_dir / "fuse" / "disk").stat().st_size == 64 << 20

    # nbdkit is memory-locked (-f --swap), with bounded stacks and malloc arenas.
    locked_kib = int(status_field(nbdkit, "VmLck").split()[0])
    print(f"nbdkit (C memory plugin) VmLck: {locked_kib} KiB")
    assert locked_kib > 0
    limits = Path(f"/proc/{nbdkit}/limits").read_text()
    assert any(line.startswith("Max stack size") and line.split()[3] == str(1024 * 1024) for line in limits.splitlines())
    assert b"MALLOC_ARENA_MAX=2" in Path(f"/proc/{nbdkit}/environ").read_bytes().split(b"\0")

    os.kill(supervisor, signal.SIGTERM)
    wait_until(lambda: not any(alive(pid) for pid in (supervisor, nbdkit, nbdfuse)))
    assert not is_mounted(state_dir / "fuse")
    assert not (state_dir / "nbdkit.sock").exists()
    log = (state_dir / "log").read_text()
    assert "SIGTERM: stopping" in log and "all children gone" in log


def test_startup_failure_reports_and_leaves_nothing(state_dir):
    started = start_detached(state_dir, "memory", "no-such-key=1")
    assert started.returncode == 1
    assert "nbdkit exited (exit status 1) before nbdkit socket" in started.stderr
    assert str(state_dir / "log") in started.stderr
    assert "no-such-key" in (state_dir / "log").read_text()
    assert not (state_dir / "pids").exists()
    assert not is_mounted(state_dir / "fuse")


def test_child_death_is_loud_and_not_restarted(state_dir):
    """nbdkit dying must be logged as an error, not papered over; nbdfuse stays; both gone -> exit 1."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbd_postcopy.host.supervisor", "--state-dir", str(state_dir), "--foreground",
         "--", "memory", "size=16M"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        pids = parse_pids(proc.stdout.readline() + proc.stdout.readline() + proc.stdout.readline())
        nbdkit, nbdfuse = pids["nbdkit_pid"], pids["nbdfuse_pid"]
        os.kill(nbdkit, signal.SIGKILL)
        wait_until(lambda: not alive(nbdkit))
        time.sleep(0.3)
        assert proc.poll() is None and alive(nbdfuse)
        # Taking the mount away ends nbdfuse: now both children are gone without a stop request.
        subprocess.run(["fusermount3", "-u", str(state_dir / "fuse")], check=True)
        assert proc.wait(10) == 1
        stderr = proc.stderr.read()
        assert f"ERROR: nbdkit (pid {nbdkit}) died unexpectedly: signal SIGKILL" in stderr
        assert "NOT restarted" in stderr
        assert "ERROR: all children are gone" in stderr
        assert stderr.count("starting nbdkit") == 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def test_detach_order_is_quiet(state_dir):
    """detach unmounts FUSE before it sends SIGTERM: nbdfuse's exit then is expected, not an error."""
    started = start_detached(state_dir, "memory", "size=16M")
    assert started.returncode == 0, started.stderr
    pids = parse_pids(started.stdout)
    subprocess.run(["fusermount3", "-u", str(state_dir / "fuse")], check=True)
    # The supervisor notes nbdfuse's exit as expected (waiting for the line: "not alive" in /proc comes
    # before the supervisor can reap the child).
    wait_until(lambda: "exited after its mount was removed" in (state_dir / "log").read_text())
    assert alive(pids["supervisor_pid"]) and alive(pids["nbdkit_pid"])
    os.kill(pids["supervisor_pid"], signal.SIGTERM)
    wait_until(lambda: not alive(pids["supervisor_pid"]) and not alive(pids["nbdkit_pid"]))
    assert "ERROR" not in (state_dir / "log").read_text()
