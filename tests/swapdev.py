"""Attach the real postcopy swap device for a test, through the attachment API, and always take it down.

    from tests.swapdev import attached_postcopy_swap

    def test_something(run_dir, swap_lock):
        with attached_postcopy_swap(run_dir, {"source": uri, "pages": 16384, "key": keyfile}) as swap:
            ...  # swap.device is an active swap area (priority 32767); swap.control is the plugin's socket

Name: attached_postcopy_swap (context manager)   Scope: the `with` block
Depends: root, nbdkit + plugin/postcopy.py (or a stand-in plugin, see `standin`), nbdfuse, losetup,
the `run_dir` fixture (short paths for the Unix sockets) and, in the caller, the `swap_lock` fixture.

It attaches in-process (nbd_postcopy.host.attachment, the code behind scripts/setup-swap.sh). On exit
it detaches with no completion (`detach NAME --no-complete`); then, whatever happened, it checks and
force-cleans by itself: swapoff if the device is still in /proc/swaps, losetup -d (or nbd-client -d),
fusermount3 -u, and
it ends the supervisor, nbdkit and nbdfuse by PID. A detach that failed, or left something for the
force-clean, fails the test (unless the body already raised).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from nbd_postcopy.common.linux import find_swap, is_mounted, loop_backing_file, process_matches
from nbd_postcopy.device.markers import MarkerCodec
from nbd_postcopy.host import attachment
from nbd_postcopy.host.attachment import (
    STATE_JSON,
    Attachment,
    AttachmentError,
    AttachOptions,
    CollectingReporter,
    Settings,
    State,
)

REPO = Path(__file__).resolve().parent.parent
SETUP_SWAP = REPO / "scripts" / "setup-swap.sh"


class AttachError(RuntimeError):
    """attach failed; the message holds what it reported."""


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


def in_proc_swaps(device: str) -> bool:
    return find_swap(device) is not None


def processes_mentioning(text: str) -> list[int]:
    """Live processes (other than this one) whose command line mentions `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()) and process_matches(int(entry.name), text):
            found.append(int(entry.name))
    return found


def thread_affinities(pid: int) -> dict[int, frozenset[int]]:
    """The CPUs each thread of `pid` may run on, by thread id."""
    return {int(tid): frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


class AffinityWatch:
    """Samples, every 20 ms until stopped, the CPUs each thread of the nbdkit and page server processes
    whose command line mentions `needle` may run on. `last` holds each thread's latest sample:
    {"nbdkit": {(pid, tid): CPUs}, "serve": {...}}."""

    def __init__(self, needle: str):
        self.needle = needle
        self.last: dict[str, dict[tuple[int, int], frozenset[int]]] = {"nbdkit": {}, "serve": {}}
        self.argvs: dict[str, list[list[str]]] = {"nbdkit": [], "serve": []}  # each process's command line, once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "AffinityWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def check_auto(self, page_server_too: bool) -> None:
        """`--prefetch-cpus auto` on a host of two CPUs or more: in each nbdkit seen, the prefetcher thread
        alone on the last CPU; with `page_server_too`, every thread of each page server seen there too."""
        allowed = frozenset(os.sched_getaffinity(0))
        if len(allowed) < 2:
            return
        last = frozenset({max(allowed)})
        pids = {pid for pid, _ in self.last["nbdkit"]}
        assert pids, "no nbdkit seen"
        for pid in pids:
            threads = [cpus for (owner, _), cpus in self.last["nbdkit"].items() if owner == pid]
            assert threads.count(last) == 1 and set(threads) == {last, allowed}, self.last
        if page_server_too:
            assert self.last["serve"] and set(self.last["serve"].values()) == {last}, self.last

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for pid in processes_mentioning(self.needle):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if cmdline == Path(f"/proc/{_parent(pid)}/cmdline").read_bytes():
                        continue  # a child between fork and exec (e.g. a library running `uname`), not a server
                    argv = cmdline.split(b"\0")
                    kind = "nbdkit" if argv[0].endswith(b"nbdkit") else "serve" if b"serve" in argv else None
                    if kind:
                        if not any(pid == owner for owner, _ in self.last[kind]):
                            self.argvs[kind].append([arg.decode() for arg in argv if arg])
                        self.last[kind].update(((pid, tid), cpus) for tid, cpus in thread_affinities(pid).items())
                except OSError:  # it exited meanwhile
                    pass


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def swaps_line(device: str) -> list[str]:
    """The /proc/swaps row of `device`, split (AssertionError when it is not an active swap area)."""
    real = os.path.realpath(device)
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        if line.split()[0] == real:
            return line.split()
    raise AssertionError(f"{device} is not in /proc/swaps")


def loops_backed_under(directory: Path) -> list[str]:
    return [
        f"/dev/{loop.name}"
        for loop in Path("/sys/block").glob("loop*")
        if (loop_backing_file(f"/dev/{loop.name}") or "").startswith(str(directory))
    ]


def assert_nothing_left(state_dir: Path, name: str) -> None:
    """No registry entry, state directory, mount, loop device or process of attachment `name` remains."""
    registry = Path(os.environ.get("NBD_POSTCOPY_RUN_DIR", "/run/nbd-postcopy"))
    assert not registry.joinpath(name).exists() and not registry.joinpath(name).is_symlink(), f"registry entry {name}"
    assert not state_dir.exists(), f"state directory {state_dir}"
    assert not any(str(state_dir) in line for line in Path("/proc/mounts").read_text().splitlines())
    assert not loops_backed_under(state_dir)
    assert not processes_mentioning(str(state_dir))


def path_without(run_dir: Path, *tools: str) -> str:
    """A PATH (RUN_DIR/bin) holding links to every system command except `tools`."""
    bin_dir = run_dir / "bin"
    bin_dir.mkdir()
    for directory in ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"):  # later ones win
        for entry in os.scandir(directory):
            if entry.name not in tools:
                link = bin_dir / entry.name
                link.unlink(missing_ok=True)
                link.symlink_to(entry.path)
    return str(bin_dir)


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
    discard: bool = True,
    transport: str = "auto",
    env: Mapping[str, str] | None = None,
) -> Iterator[AttachedSwap]:
    """Attach the postcopy device with `plugin_keys` (e.g. source=, pages=, key=) and yield it.

    `standin` (e.g. "memory size=64M") runs that nbdkit plugin instead of plugin/postcopy.py, with a
    mkswap'd header: the testing aid NBD_POSTCOPY_NBDKIT_PLUGIN. `env` holds more of the environment
    variables attach reads (README, "Environment"). The state directory is RUN_DIR/swap-NAME.
    """
    name = name or f"t{uuid.uuid4().hex[:10]}"
    state_dir = Path(run_dir) / f"swap-{name}"
    env = dict(os.environ, **(env or {}))
    if standin is not None:
        env["NBD_POSTCOPY_NBDKIT_PLUGIN"] = standin
    settings = Settings.from_environ(env)
    keys = [f"{key}={value}" for key, value in plugin_keys.items()]
    report = CollectingReporter("setup-swap.sh")
    try:
        attachment.attach(AttachOptions(keys, name=name, priority=priority, state_dir=state_dir, discard=discard,
                                        transport=transport),
                          settings, report)
    except attachment.AttachmentError as exc:
        raise AttachError(f"attach failed: {exc}\n{report.text}") from exc
    state = State.load(state_dir)
    swap = AttachedSwap(
        name=name,
        device=state.device,
        state_dir=state_dir,
        control=Path(state.control) if state.control else None,
        socket=Path(state.socket),
        fuse_dir=Path(state.fuse_dir) if state.fuse_dir else None,
        supervisor_pid=state.supervisor_pid,
        nbdkit_pid=state.nbdkit_pid,
        nbdfuse_pid=state.nbdfuse_pid,
        priority=state.priority,
        size_bytes=state.size_bytes,
        attach_output=report.text,
    )
    body_failed = False
    try:
        yield swap
    except BaseException:
        body_failed = True
        raise
    finally:
        problems = []
        report = CollectingReporter("setup-swap.sh")
        try:
            attachment.detach(name, complete=False, settings=settings, report=report)
        except attachment.AttachmentError as exc:
            problems.append(f"detach failed: {exc}\n{report.text}")
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


def detach_left_behind(directory: Path) -> list[str]:
    """Take down every swap attachment whose state lies under `directory` (without completion), and return
    their names. A driver that fails, or a process the test killed, can leave its device attached at swap
    priority 32767, where the next test's pages would go; its state directory would be deleted under it."""
    left = []
    for record in list(directory.rglob(STATE_JSON)):  # (detach removes directories the walk would enter)
        try:
            left_over = Attachment.load(record.parent)
        except (OSError, ValueError, AttachmentError):
            continue  # not an attachment's record
        left.append(left_over.name)
        print(f"{left_over.name} was left attached ({left_over.state.device}); detaching it")
        try:
            left_over.detach(complete=False)
        except AttachmentError as exc:
            print(f"could not detach {left_over.name}: {exc}")
    return left


def remove_run_dir(directory: Path) -> None:
    """Remove a test's or benchmark's scratch directory, after taking down any attachment left in it."""
    detach_left_behind(directory)
    shutil.rmtree(directory, ignore_errors=True)
