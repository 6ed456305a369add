"""scripts/setup-swap.sh itself, end to end: real nbdkit with plugin/postcopy.py, nbdfuse, loop, kernel swap.

These run the script (help, usage errors, the attach / status / detach round trip, rollback on failure
and on a signal, running as non-root); test_attachment.py drives the same code through its Python API.
The source is a real `nbd-postcopy serve` on a sparse image (the plugin_keys fixture): an unarmed device
never fetches, so its contents do not matter here. Every test checks that nothing is left behind: no
swap area, loop device, FUSE mount, process, registry entry or state directory.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nbd_postcopy.host.attachment import State
from tests.conftest import wait_for_path
from tests.host.conftest import GUEST_PAGES
from tests.swapdev import (
    SETUP_SWAP,
    AttachError,
    assert_nothing_left,
    attached_postcopy_swap,
    in_proc_swaps,
    path_without,
    process_matches,
    run_setup_swap,
    swaps_line,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (swap, loop devices, FUSE)")

LOCKED_BOUND_KIB = 1024 * 1024  # nbdkit's locked memory must stay well below this (see the README)


def vm_locked_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck line")


def attach(run_dir: Path, name: str, keys: dict, *options: str, env: dict | None = None,
           preexec: list[str] = ()) -> subprocess.CompletedProcess:
    argv = [*preexec, str(SETUP_SWAP), "attach", "--name", name, "--state-dir", str(run_dir / name), *options,
            "--", *(f"{k}={v}" for k, v in keys.items())]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=dict(os.environ, **(env or {})))


# --- attach / status / detach -----------------------------------------------------------------------


@pytest.mark.slow
def test_attach_status_detach(run_dir, plugin_keys, swap_lock):
    name = f"t{os.getpid()}a"
    state_dir = run_dir / name
    try:
        result = attach(run_dir, name, plugin_keys)
        assert result.returncode == 0, result.stderr
        state = State.load(state_dir)
        assert result.stdout.startswith(f"attached {name}: {state.device} (swap priority 32767, ")
        assert f"nbdkit pid {state.nbdkit_pid})" in result.stdout

        # The swap area: the plugin's own header, guest pages plus headroom, the highest priority.
        fields = swaps_line(state.device)
        assert int(fields[2]) * 1024 == state.size_bytes - 4096  # every slot but the header
        assert state.size_bytes >= (GUEST_PAGES + 1) * 4096
        assert int(fields[4]) == 32767
        assert Path(f"/sys/block/{Path(state.device).name}/loop/dio").read_text().strip() == "1"

        # nbdkit is memory-locked, and the lock is bounded.
        locked = vm_locked_kib(state.nbdkit_pid)
        print(f"nbdkit with plugin/postcopy.py (64 MiB device, -t 4): VmLck {locked} KiB")
        assert 0 < locked < LOCKED_BOUND_KIB

        text = run_setup_swap("status", name, check=True).stdout
        assert f"{name}: {state.device} (fuse, " in text
        assert "swap: active, priority 32767" in text
        assert f"nbdkit {state.nbdkit_pid} alive" in text
        assert "plugin: armed " in text

        (entry,) = json.loads(run_setup_swap("status", name, "--json", check=True).stdout)
        assert entry["device"] == state.device and entry["swap_active"] and entry["priority"] == 32767
        nbdkit = entry["processes"]["nbdkit"]
        assert (nbdkit["pid"], nbdkit["state"]) == (state.nbdkit_pid, "alive") and nbdkit["locked_kib"] > 0
        assert entry["plugin"]["armed"] is False and "remaining" in entry["plugin"]

        everything = json.loads(run_setup_swap("status", "--json", check=True).stdout)
        assert name in [e["name"] for e in everything]

        detach = run_setup_swap("detach", name, timeout=300)
        assert detach.returncode == 0, detach.stderr
        assert f"no target process known (no --pid, no {state_dir}/target)" in detach.stdout
        assert f"detached {name}: {state.device}" in detach.stdout
        assert not in_proc_swaps(state.device)
    finally:
        run_setup_swap("detach", name, "--no-complete", timeout=300)
    assert_nothing_left(state_dir, name)


PAGEOUT_CHILD = r"""
import hashlib, mmap, os, sys, time
device, size = os.path.realpath(sys.argv[1]), int(sys.argv[2])
def used_kib():
    for line in open("/proc/swaps").readlines()[1:]:
        if line.split()[0] == device:
            return int(line.split()[3])
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf[:] = os.urandom(size)
digest = hashlib.sha256(buf).hexdigest()
buf.madvise(21)  # MADV_PAGEOUT: to the highest-priority swap device
deadline = time.monotonic() + 10
while used_kib() < size // 1024 // 2 and time.monotonic() < deadline:
    time.sleep(0.05)
print(used_kib(), digest, hashlib.sha256(buf).hexdigest(), flush=True)
"""


@pytest.mark.slow
def test_attachment_outlives_the_script(run_dir, plugin_keys, swap_lock):
    """attach runs in a shell that exits; the device keeps working: pages go out to it and come back."""
    name = f"t{os.getpid()}o"
    keys = " ".join(f"{k}={v}" for k, v in plugin_keys.items())
    shell = subprocess.run(
        ["bash", "-c", f'{SETUP_SWAP} attach --name {name} --state-dir {run_dir / name} -- {keys}; echo "shell $$"'],
        capture_output=True, text=True, timeout=120,
    )
    state_dir = run_dir / name
    try:
        assert shell.returncode == 0, shell.stderr
        shell_pid = int(shell.stdout.split("shell ")[1])
        assert not Path(f"/proc/{shell_pid}").exists()  # the shell is gone
        state = State.load(state_dir)
        supervisor, nbdkit, device = state.supervisor_pid, state.nbdkit_pid, state.device
        assert process_matches(supervisor, "nbd_postcopy.host.supervisor") and process_matches(nbdkit, "nbdkit")
        assert os.getsid(supervisor) == supervisor

        # Reads travel loop (direct I/O) -> nbdfuse -> nbdkit -> plugin: the header it wrote comes back.
        fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
        try:
            header = mmap.mmap(-1, 4096)
            assert os.preadv(fd, [header], 0) == 4096
            assert header[-10:] == b"SWAPSPACE2"
        finally:
            os.close(fd)
        size = 8 << 20
        child = subprocess.run([sys.executable, "-c", PAGEOUT_CHILD, device, str(size)], capture_output=True,
                               text=True, timeout=60, check=True)
        used_kib, written, read_back = child.stdout.split()
        assert int(used_kib) >= size // 1024 // 2  # the pages went out to this device
        assert written == read_back  # and came back exactly
        stats = run_setup_swap("status", name, "--json", check=True)
        assert json.loads(stats.stdout)[0]["processes"]["nbdkit"]["state"] == "alive"
    finally:
        detach = run_setup_swap("detach", name, "--no-complete", timeout=300)
    assert detach.returncode == 0, detach.stderr
    assert_nothing_left(state_dir, name)


def test_works_through_a_symlink_from_any_directory(run_dir):
    """The script finds its checkout (and runs that checkout's code) when called through a link."""
    link = run_dir / "setup-swap"
    link.symlink_to(SETUP_SWAP)
    result = subprocess.run([str(link), "status", "--json"], capture_output=True, text=True, cwd="/",
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)


# --- refusals and rollback ----------------------------------------------------------------------------


def test_refuses_when_not_root(run_dir, plugin_keys):
    result = attach(run_dir, "troot", plugin_keys, preexec=["setpriv", "--reuid=65534", "--regid=65534",
                                                             "--clear-groups"])
    assert result.returncode == 1
    assert "setup-swap.sh: attach: must run as root" in result.stderr
    assert_nothing_left(run_dir / "troot", "troot")


def test_bad_plugin_key_leaves_nothing(run_dir, plugin_keys):
    """nbdkit refuses the key after the state directory exists: attach undoes it all."""
    result = attach(run_dir, "tbadkey", {**plugin_keys, "no-such-key": "1"})
    assert result.returncode == 1
    assert "setup-swap.sh: attach: starting nbdkit failed" in result.stderr
    assert "no-such-key" in result.stderr  # the plugin's own complaint, from the log
    assert "setup-swap.sh: attach: undoing the steps done so far" in result.stderr
    assert "setup-swap.sh: attach: undone; nothing is left behind" in result.stderr
    assert_nothing_left(run_dir / "tbadkey", "tbadkey")


@pytest.mark.slow
def test_failure_after_losetup_undoes_every_step(run_dir, plugin_keys, swap_lock):
    """swapon fails after nbdkit, nbdfuse and the loop device exist: all of them are undone."""
    bin_dir = Path(path_without(run_dir, "swapon"))
    (bin_dir / "swapon").write_text("#!/bin/sh\necho 'swapon: simulated failure' >&2\nexit 1\n")
    (bin_dir / "swapon").chmod(0o755)
    result = attach(run_dir, "tswapon", plugin_keys, env={"PATH": str(bin_dir)})
    assert result.returncode == 1
    assert "swapon -p 32767 --discard=pages /dev/loop" in result.stderr
    assert "simulated failure" in result.stderr
    assert "undone; nothing is left behind" in result.stderr
    assert_nothing_left(run_dir / "tswapon", "tswapon")


@pytest.mark.slow
def test_interrupted_attach_leaves_nothing(run_dir, plugin_keys, swap_lock):
    """SIGTERM while the supervisor starts: attach finishes that step, then undoes everything."""
    name = f"t{os.getpid()}i"
    state_dir = run_dir / name
    argv = [str(SETUP_SWAP), "attach", "--name", name, "--state-dir", str(state_dir), "--",
            *(f"{k}={v}" for k, v in plugin_keys.items())]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_path(state_dir / "log", proc=proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        run_setup_swap("detach", name, "--no-complete")
    assert proc.returncode == 143, stderr
    assert "undone; nothing is left behind" in stderr
    assert_nothing_left(state_dir, name)


def test_swapdev_reports_attach_failure(run_dir, plugin_keys):
    with pytest.raises(AttachError, match="no-such-key"):
        with attached_postcopy_swap(run_dir, {**plugin_keys, "no-such-key": 1}, name="tswapdev"):
            pass
    assert_nothing_left(run_dir / "swap-tswapdev", "tswapdev")


# --- usage ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["attach", "detach", "status"])
def test_help_per_command(command):
    result = run_setup_swap(command, "--help", check=True)
    assert result.stdout.startswith(f"Usage: setup-swap.sh {command}")


def test_usage_errors():
    assert run_setup_swap("--help", check=True).stdout.startswith("Usage: setup-swap.sh COMMAND")
    nothing = run_setup_swap()
    assert nothing.returncode == 2 and nothing.stderr.startswith("Usage: setup-swap.sh COMMAND")
    for args, message in [
        (("frobnicate",), "setup-swap.sh: unknown command 'frobnicate'"),
        (("attach", "--priority", "40000", "--", "a=b"), "setup-swap.sh: attach: bad --priority '40000'"),
        (("attach", "--threads", "0", "--", "a=b"), "bad --threads '0': want 1..64"),
        (("attach", "--transport", "tcp", "--", "a=b"), "bad --transport 'tcp'"),
        (("attach", "--name", "../x", "--", "a=b"), "bad name '../x'"),
        (("attach", "--name"), "--name needs a value"),
        (("attach", "--frob", "--", "a=b"), "unknown option '--frob' (plugin keys go after --)"),
        (("attach", "a=b"), "unknown option 'a=b' (plugin keys go after --)"),
        (("attach", "--", "notakey"), "bad plugin argument 'notakey'"),
        (("attach",), "no plugin keys"),
        (("detach",), "give exactly one NAME"),
        (("detach", "x", "--pid", "1"), "--pid, --address and --length go together"),
        (("detach", "x", "--frob"), "unknown option '--frob'"),
        (("status", "a", "b"), "give at most one NAME"),
    ]:
        result = run_setup_swap(*args)
        assert result.returncode == 2, args
        assert message in result.stderr, (args, result.stderr)
        if args != ("frobnicate",):
            assert f"Run 'setup-swap.sh {args[0]} --help' for usage." in result.stderr


def test_detach_of_an_unknown_name_is_a_no_op():
    result = run_setup_swap("detach", "never-attached-here")
    assert result.returncode == 0
    assert "never-attached-here is not attached; nothing to do" in result.stdout


def test_status_of_an_unknown_name_fails():
    result = run_setup_swap("status", "never-attached-here")
    assert result.returncode == 1
    assert "setup-swap.sh: status: never-attached-here is not attached" in result.stderr


def test_nbd_postcopy_swap_is_the_same_command():
    """`nbd-postcopy swap` (an installed product without scripts/) runs the same code, named so."""
    cli = [sys.executable, "-m", "nbd_postcopy.cli", "swap"]
    result = subprocess.run([*cli, "attach", "--help"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("Usage: nbd-postcopy swap attach")
    result = subprocess.run([*cli, "status", "a", "b"], capture_output=True, text=True)
    assert result.returncode == 2 and "nbd-postcopy swap: status: give at most one NAME" in result.stderr
    result = subprocess.run([*cli, "detach", "never-attached-here"], capture_output=True, text=True)
    assert result.returncode == 0 and "never-attached-here is not attached; nothing to do" in result.stdout
