"""scripts/setup-swap.sh end to end: real nbdkit with plugin/postcopy.py, nbdfuse, loop, kernel swap.

The source is a real `nbd-postcopy serve` on a sparse image: an unarmed device never fetches, so its
contents do not matter here. Every test checks that nothing is left behind: no swap area, loop device,
FUSE mount, process, registry entry or state directory.
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
from tests.swapdev import (
    SETUP_SWAP,
    AttachError,
    attached_postcopy_swap,
    in_proc_swaps,
    is_mounted,
    loop_backing_file,
    process_matches,
    processes_mentioning,
    run_setup_swap,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (swap, loop devices, FUSE)")

REGISTRY = Path(os.environ.get("NBD_POSTCOPY_RUN_DIR", "/run/nbd-postcopy"))
GUEST_PAGES = 16384  # 64 MiB
LOCKED_BOUND_KIB = 1024 * 1024  # nbdkit's locked memory must stay well below this (see the README)


@pytest.fixture
def plugin_keys(run_dir, processes) -> dict[str, object]:
    """Keys for a 64 MiB postcopy device whose source is a real `nbd-postcopy serve` on a sparse image.

    Name: plugin_keys   Scope: function   Depends: run_dir, processes
    An unarmed device never fetches, so the image's contents do not matter here.
    """
    image = run_dir / "source.img"
    with open(image, "wb") as f:
        f.truncate(GUEST_PAGES * 4096)
    sock = run_dir / "source.sock"
    server = processes.start(["nbd-postcopy", "serve", "--file", image, "--listen", f"unix:{sock}"])
    wait_for_path(sock, proc=server)
    key = run_dir / "key"
    key.write_bytes(os.urandom(32))
    return {"source": f"nbd+unix:///?socket={sock}", "pages": GUEST_PAGES, "key": key}


def swaps_line(device: str) -> list[str]:
    real = os.path.realpath(device)
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        if line.split()[0] == real:
            return line.split()
    raise AssertionError(f"{device} is not in /proc/swaps")


def vm_locked_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck line")


def loops_backed_under(directory: Path) -> list[str]:
    return [
        f"/dev/{loop.name}"
        for loop in Path("/sys/block").glob("loop*")
        if (loop_backing_file(f"/dev/{loop.name}") or "").startswith(str(directory))
    ]


def assert_nothing_left(state_dir: Path, name: str) -> None:
    assert not REGISTRY.joinpath(name).exists() and not REGISTRY.joinpath(name).is_symlink(), f"registry entry {name}"
    assert not state_dir.exists(), f"state directory {state_dir}"
    assert not any(str(state_dir) in line for line in Path("/proc/mounts").read_text().splitlines())
    assert not loops_backed_under(state_dir)
    assert not processes_mentioning(str(state_dir))


def attach(run_dir: Path, name: str, keys: dict, *options: str, env: dict | None = None,
           preexec: list[str] = ()) -> subprocess.CompletedProcess:
    argv = [*preexec, str(SETUP_SWAP), "attach", "--name", name, "--state-dir", str(run_dir / name), *options,
            "--", *(f"{k}={v}" for k, v in keys.items())]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=dict(os.environ, **(env or {})))


# --- attach / status / detach -----------------------------------------------------------------------


@pytest.mark.slow
def test_attach_status_detach(run_dir, plugin_keys, swap_lock):
    name = f"t{os.getpid()}a"
    with attached_postcopy_swap(run_dir, plugin_keys, name=name) as swap:
        assert swap.attach_output.startswith(f"attached {name}: {swap.device} (swap priority 32767, ")
        assert f"nbdkit pid {swap.nbdkit_pid})" in swap.attach_output

        # The swap area: the plugin's own header, guest pages plus headroom, the highest priority.
        fields = swaps_line(swap.device)
        assert int(fields[2]) * 1024 == swap.size_bytes - 4096  # every slot but the header
        assert swap.size_bytes >= (GUEST_PAGES + 1) * 4096
        assert int(fields[4]) == 32767
        assert Path(f"/sys/block/{Path(swap.device).name}/loop/dio").read_text().strip() == "1"

        # nbdkit is memory-locked, and the lock is bounded.
        locked = vm_locked_kib(swap.nbdkit_pid)
        print(f"nbdkit with plugin/postcopy.py (64 MiB device, -t 4): VmLck {locked} KiB")
        assert 0 < locked < LOCKED_BOUND_KIB

        text = run_setup_swap("status", name, check=True).stdout
        assert f"{name}: {swap.device} (fuse, " in text
        assert "swap: active, priority 32767" in text
        assert f"nbdkit {swap.nbdkit_pid} alive" in text
        assert "plugin: armed " in text

        (entry,) = json.loads(run_setup_swap("status", name, "--json", check=True).stdout)
        assert entry["device"] == swap.device and entry["swap_active"] and entry["priority"] == 32767
        nbdkit = entry["processes"]["nbdkit"]
        assert (nbdkit["pid"], nbdkit["state"]) == (swap.nbdkit_pid, "alive") and nbdkit["locked_kib"] > 0
        assert entry["plugin"]["armed"] is False and "remaining" in entry["plugin"]

        everything = json.loads(run_setup_swap("status", "--json", check=True).stdout)
        assert name in [e["name"] for e in everything]
    assert not in_proc_swaps(swap.device)
    assert_nothing_left(swap.state_dir, name)


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


# --- refusals ---------------------------------------------------------------------------------------


def test_refuses_when_zswap_is_on(run_dir, plugin_keys):
    switch = run_dir / "zswap-enabled"
    switch.write_text("Y\n")
    result = attach(run_dir, "tzswap", plugin_keys, env={"NBD_POSTCOPY_ZSWAP_ENABLED": str(switch)})
    assert result.returncode == 1
    assert f"zswap is on ({switch} = Y)" in result.stderr
    assert "echo N > /sys/module/zswap/parameters/enabled" in result.stderr
    assert_nothing_left(run_dir / "tzswap", "tzswap")


@pytest.mark.slow
def test_refuses_when_real_zswap_is_on(run_dir, plugin_keys, swap_lock):
    knob = Path("/sys/module/zswap/parameters/enabled")
    before = knob.read_text().strip()
    try:
        knob.write_text("Y")
        result = attach(run_dir, "tzswap2", plugin_keys)
    finally:
        knob.write_text(before)
    assert result.returncode == 1
    assert f"zswap is on ({knob} = Y)" in result.stderr
    assert_nothing_left(run_dir / "tzswap2", "tzswap2")


def path_without(run_dir: Path, *tools: str) -> str:
    """A PATH holding links to every system command except `tools`."""
    bin_dir = run_dir / "bin"
    bin_dir.mkdir()
    for directory in ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"):  # later ones win
        for entry in os.scandir(directory):
            if entry.name not in tools:
                link = bin_dir / entry.name
                link.unlink(missing_ok=True)
                link.symlink_to(entry.path)
    return str(bin_dir)


def test_refuses_when_a_tool_is_missing(run_dir, plugin_keys):
    result = attach(run_dir, "ttool", plugin_keys, env={"PATH": path_without(run_dir, "nbdfuse", "fusermount3")})
    assert result.returncode == 1
    assert "missing tool(s): nbdfuse fusermount3" in result.stderr
    assert_nothing_left(run_dir / "ttool", "ttool")


def test_refuses_when_not_root(run_dir, plugin_keys):
    result = attach(run_dir, "troot", plugin_keys, preexec=["setpriv", "--reuid=65534", "--regid=65534",
                                                             "--clear-groups"])
    assert result.returncode == 1
    assert "setup-swap.sh: attach: must run as root" in result.stderr
    assert_nothing_left(run_dir / "troot", "troot")


@pytest.mark.slow
def test_refuses_a_taken_name(run_dir, plugin_keys, swap_lock):
    name = f"t{os.getpid()}d"
    with attached_postcopy_swap(run_dir, plugin_keys, name=name) as swap:
        result = attach(run_dir, name, plugin_keys)
        assert result.returncode == 1
        assert f"the name '{name}' is taken" in result.stderr
        assert not (run_dir / name).exists()
        # The first attachment is untouched.
        assert swaps_line(swap.device)
        assert process_matches(swap.nbdkit_pid, "nbdkit")
    assert_nothing_left(swap.state_dir, name)


def test_bad_plugin_key_leaves_nothing(run_dir, plugin_keys):
    """nbdkit refuses the key after the state directory exists: attach undoes it all."""
    result = attach(run_dir, "tbadkey", {**plugin_keys, "no-such-key": "1"})
    assert result.returncode == 1
    assert "starting nbdkit failed" in result.stderr
    assert "no-such-key" in result.stderr  # the plugin's own complaint, from the log
    assert "undone; nothing is left behind" in result.stderr
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


# --- usage ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["attach", "detach", "status"])
def test_help_per_command(command):
    result = run_setup_swap(command, "--help", check=True)
    assert result.stdout.startswith(f"Usage: setup-swap.sh {command}")


def test_usage_errors():
    assert run_setup_swap("--help", check=True).stdout.startswith("Usage: setup-swap.sh COMMAND")
    for args, message in [
        (("frobnicate",), "unknown command 'frobnicate'"),
        (("attach", "--priority", "40000", "--", "a=b"), "bad --priority '40000'"),
        (("attach", "--transport", "tcp", "--", "a=b"), "bad --transport 'tcp'"),
        (("attach", "--name", "../x", "--", "a=b"), "bad name '../x'"),
        (("attach", "--", "notakey"), "bad plugin argument 'notakey'"),
        (("attach",), "no plugin keys"),
        (("detach",), "give exactly one NAME"),
        (("detach", "x", "--pid", "1"), "--pid, --address and --length go together"),
    ]:
        result = run_setup_swap(*args)
        assert result.returncode == 2, args
        assert message in result.stderr, (args, result.stderr)


def test_detach_of_an_unknown_name_is_a_no_op():
    result = run_setup_swap("detach", "never-attached-here")
    assert result.returncode == 0
    assert "never-attached-here is not attached; nothing to do" in result.stdout


def test_status_of_an_unknown_name_fails():
    result = run_setup_swap("status", "never-attached-here")
    assert result.returncode == 1
    assert "never-attached-here is not attached" in result.stderr


def test_swapdev_reports_attach_failure(run_dir, plugin_keys):
    with pytest.raises(AttachError, match="no-such-key"):
        with attached_postcopy_swap(run_dir, {**plugin_keys, "no-such-key": 1}, name="tswapdev"):
            pass
    assert_nothing_left(run_dir / "swap-tswapdev", "tswapdev")


# --- detach -----------------------------------------------------------------------------------------

TARGET_CHILD = r"""
import ctypes, mmap, sys
size = 1 << 20
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf[:] = b"x" * size
address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
print(hex(address), size, flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_detach_runs_completion_for_the_recorded_target(run_dir, plugin_keys, swap_lock):
    """detach reads STATE/target (written by the stager) and runs nbd-postcopy complete on it first."""
    target = subprocess.Popen([sys.executable, "-c", TARGET_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    name = f"t{os.getpid()}c"
    state_dir = run_dir / name
    try:
        address, length = target.stdout.readline().split()
        result = attach(run_dir, name, plugin_keys)
        assert result.returncode == 0, result.stderr
        (state_dir / "target").write_text(f"target_pid={target.pid}\ntarget_address={address}\ntarget_length={length}\n")
        detach = run_setup_swap("detach", name, timeout=300)
        assert detach.returncode == 0, detach.stderr
        assert f"completing: nbd-postcopy complete --pid {target.pid} --address {address} --length {length}" \
            f" --control {state_dir / 'control.sock'}" in detach.stdout
        assert f"detached {name}: /dev/loop" in detach.stdout
    finally:
        run_setup_swap("detach", name, "--no-complete", timeout=300)
        target.stdin.close()
        target.wait(10)
    assert_nothing_left(state_dir, name)


@pytest.mark.slow
def test_detach_stops_at_a_failing_swapoff(run_dir, plugin_keys, swap_lock):
    """swapoff failing (e.g. ENOMEM) must leave the device and nbdkit alone: the pages are still needed."""
    bin_dir = Path(path_without(run_dir, "swapoff"))
    (bin_dir / "swapoff").write_text("#!/bin/sh\necho \"swapoff: $1: swapoff failed: Cannot allocate memory\" >&2\n"
                                     "exit 255\n")
    (bin_dir / "swapoff").chmod(0o755)
    with attached_postcopy_swap(run_dir, plugin_keys) as swap:
        result = run_setup_swap("detach", swap.name, "--no-complete", env={"PATH": str(bin_dir)})
        assert result.returncode == 1
        assert f"swapoff {swap.device} failed: swapoff: {swap.device}: swapoff failed: Cannot allocate memory" \
            in result.stderr
        assert "Nothing else was touched" in result.stderr
        assert f"{swap.name} is only partly detached" in result.stderr
        assert in_proc_swaps(swap.device)
        assert loop_backing_file(swap.device) == str(swap.fuse_dir / "disk")
        assert is_mounted(swap.fuse_dir)
        assert process_matches(swap.nbdkit_pid, "nbdkit") and process_matches(swap.supervisor_pid, "supervisor")
    assert_nothing_left(swap.state_dir, swap.name)


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
