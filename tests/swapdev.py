"""Attach the real postcopy swap device for a test, through scripts/setup-swap.sh, and always take it down.

    from tests.swapdev import attached_postcopy_swap

    def test_something(run_dir, swap_lock):
        with attached_postcopy_swap(run_dir, {"source": uri, "pages": 16384, "key": keyfile}) as swap:
            ...  # swap.device is an active swap area (priority 32767); swap.control is the plugin's socket

Name: attached_postcopy_swap (context manager)   Scope: the `with` block
Depends: root, nbdkit + plugin/postcopy.py (or a stand-in plugin, see `standin`), nbdfuse, losetup,
the `run_dir` fixture (short paths for the Unix sockets) and, in the caller, the `swap_lock` fixture.

On exit it runs `setup-swap.sh detach NAME --no-complete`; then, whatever happened, it checks and
force-cleans by itself: swapoff if the device is still in /proc/swaps, losetup -d (or nbd-client -d),
fusermount3 -u, and
it ends the supervisor, nbdkit and nbdfuse by PID. A detach that failed, or left something for the
force-clean, fails the test (unless the body already raised).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from nbd_postcopy.device.markers import MarkerCodec

REPO = Path(__file__).resolve().parent.parent
SETUP_SWAP = REPO / "scripts" / "setup-swap.sh"


class AttachError(RuntimeError):
    """setup-swap.sh attach failed; the message holds its output."""


@dataclass
class AttachedSwap:
    """One attachment, as recorded in its state file."""

    name: str
    device: str
    state_dir: Path
    control: Path | None
    socket: Path
    fuse_dir: Path | None
    supervisor_pid: int
    nbdkit_pid: int
    nbdfuse_pid: int | None
    priority: int
    size_bytes: int
    attach_output: str

    @property
    def log(self) -> Path:
        """The supervisor's log (nbdkit's and nbdfuse's stderr go there too)."""
        return self.state_dir / "log"


def read_state(state_dir: Path) -> dict[str, str]:
    """The attachment's state file, read by bash itself (setup-swap.sh writes the values %q-quoted)."""
    names = ("name device state_dir control socket fuse_dir fuse_disk loop_device supervisor_pid nbdkit_pid "
             "nbdfuse_pid priority size_bytes transport").split()
    script = '. "$1/state" && shift && for v in "$@"; do printf "%s=%s\\0" "$v" "${!v}"; done'
    out = subprocess.run(["bash", "-c", script, "bash", str(state_dir), *names],
                         capture_output=True, text=True, check=True)
    return dict(item.split("=", 1) for item in out.stdout.split("\0") if item)


def in_proc_swaps(device: str) -> bool:
    real = os.path.realpath(device)
    with open("/proc/swaps") as swaps:
        return any(line.split()[0] == real for line in swaps.readlines()[1:])


def loop_backing_file(device: str) -> str | None:
    try:
        return Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


def process_matches(pid: int | None, needle: str) -> bool:
    """PID is alive (not a zombie) and its command line mentions `needle`."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and needle in cmdline


def processes_mentioning(text: str) -> list[int]:
    """Live processes (other than this one) whose command line mentions `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()) and process_matches(int(entry.name), text):
            found.append(int(entry.name))
    return found


def run_setup_swap(*args: str, env: Mapping[str, str] | None = None, timeout: float = 120,
                   check: bool = False) -> subprocess.CompletedProcess:
    """Run scripts/setup-swap.sh with `args`; returns the completed process (text output)."""
    return subprocess.run([str(SETUP_SWAP), *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})), check=check)


def force_clean(swap: AttachedSwap) -> list[str]:
    """Remove whatever of `swap` still exists, by hand. Returns what had to be removed."""
    leftovers = []
    if in_proc_swaps(swap.device):
        leftovers.append(f"swap {swap.device}")
        subprocess.run(["swapoff", swap.device], check=False)
    disk = str(swap.fuse_dir / "disk") if swap.fuse_dir else None
    if swap.device.startswith("/dev/nbd") and Path(f"/sys/block/{Path(swap.device).name}/pid").exists():
        leftovers.append(f"nbd {swap.device}")
        subprocess.run(["nbd-client", "-d", swap.device], check=False, capture_output=True)
    if disk and loop_backing_file(swap.device) == disk:
        leftovers.append(f"loop {swap.device}")
        subprocess.run(["losetup", "-d", swap.device], check=False)
    if swap.fuse_dir and is_mounted(swap.fuse_dir):
        leftovers.append(f"FUSE mount {swap.fuse_dir}")
        if subprocess.run(["fusermount3", "-u", str(swap.fuse_dir)], check=False).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(swap.fuse_dir)], check=False)
    for role, pid, needle in (
        ("supervisor", swap.supervisor_pid, str(swap.state_dir)),
        ("nbdfuse", swap.nbdfuse_pid, disk or "\0"),
        ("nbdkit", swap.nbdkit_pid, str(swap.socket)),
    ):
        if process_matches(pid, needle):
            leftovers.append(f"{role} pid {pid}")
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while process_matches(pid, needle) and time.monotonic() < deadline:
                time.sleep(0.05)
            if process_matches(pid, needle):
                os.kill(pid, signal.SIGKILL)
    registry = Path(os.environ.get("NBD_POSTCOPY_RUN_DIR", "/run/nbd-postcopy")) / swap.name
    if registry.is_symlink() and Path(os.readlink(registry)) == swap.state_dir:
        leftovers.append(f"registry entry {registry}")
        registry.unlink()
    return leftovers


@contextlib.contextmanager
def attached_postcopy_swap(
    run_dir: Path,
    plugin_keys: Mapping[str, object],
    name: str | None = None,
    priority: int = 32767,
    *,
    standin: str | None = None,
    attach_args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[AttachedSwap]:
    """Attach the postcopy device with `plugin_keys` (e.g. source=, pages=, key=) and yield it.

    `standin` (e.g. "memory size=64M") runs that nbdkit plugin instead of plugin/postcopy.py, with a
    mkswap'd header: the testing aid NBD_POSTCOPY_NBDKIT_PLUGIN. `attach_args` go to `attach` before
    `--` (e.g. ("--no-discard",)). The state directory is RUN_DIR/swap-NAME.
    """
    name = name or f"t{uuid.uuid4().hex[:10]}"
    state_dir = Path(run_dir) / f"swap-{name}"
    env = dict(env or {})
    if standin is not None:
        env["NBD_POSTCOPY_NBDKIT_PLUGIN"] = standin
    keys = [f"{key}={value}" for key, value in plugin_keys.items()]
    result = run_setup_swap("attach", "--name", name, "--priority", str(priority), "--state-dir", str(state_dir),
                            *attach_args, "--", *keys, env=env)
    if result.returncode != 0:
        raise AttachError(f"setup-swap.sh attach failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    state = read_state(state_dir)
    swap = AttachedSwap(
        name=name,
        device=state["device"],
        state_dir=state_dir,
        control=Path(state["control"]) if state["control"] else None,
        socket=Path(state["socket"]),
        fuse_dir=Path(state["fuse_dir"]) if state["fuse_dir"] else None,
        supervisor_pid=int(state["supervisor_pid"]),
        nbdkit_pid=int(state["nbdkit_pid"]),
        nbdfuse_pid=int(state["nbdfuse_pid"]) if state["nbdfuse_pid"] else None,
        priority=int(state["priority"]),
        size_bytes=int(state["size_bytes"]),
        attach_output=result.stdout,
    )
    body_failed = False
    try:
        yield swap
    except BaseException:
        body_failed = True
        raise
    finally:
        problems = []
        try:
            detach = run_setup_swap("detach", name, "--no-complete", env=env, timeout=300)
            if detach.returncode != 0:
                problems.append(f"detach failed ({detach.returncode}): {detach.stdout}{detach.stderr}")
        except subprocess.TimeoutExpired:
            problems.append("detach did not finish within 300 s")
        leftovers = force_clean(swap)
        if leftovers:
            problems.append(f"force-cleaned after detach: {', '.join(leftovers)}")
        if problems and not body_failed:
            raise AssertionError(f"postcopy swap {name}: " + "; ".join(problems))


PLAIN_PRIORITY = 32000


@contextlib.contextmanager
def plain_swap_device(size_mib: int, priority: int = PLAIN_PRIORITY) -> Iterator[str]:
    """A plain swap area: sparse file in /var/tmp -> loop device (direct I/O) -> mkswap -> swapon.

    Name: /var/tmp/nbdpc-swap-XXXX on /dev/loopN   Scope: the `with` block   Depends: root; the caller
    holds `swap_lock`. swapoff, losetup -d and the file's removal happen in `finally`.
    """
    fd, path = tempfile.mkstemp(prefix="nbdpc-swap-", dir="/var/tmp")
    os.close(fd)
    loop = None
    active = False
    try:
        os.truncate(path, size_mib << 20)
        loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", path],
                              check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["mkswap", loop], check=True, capture_output=True)
        subprocess.run(["swapon", "-p", str(priority), loop], check=True)
        active = True
        yield loop
    finally:
        if active:
            subprocess.run(["swapoff", loop], check=False)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        os.unlink(path)


def marker_image(codec: MarkerCodec, pages: int, path: Path) -> Path:
    """A file holding what a staged range reads back on a plain device: marker i in page i."""
    with open(path, "wb") as f:
        for start in range(0, pages, 256):
            f.write(b"".join(codec.page(i) for i in range(start, min(start + 256, pages))))
    return path
