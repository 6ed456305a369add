"""Keep the postcopy device's nbdkit (and nbdfuse) alive after the script that attached it has exited.

    python -m nbd_postcopy.host.supervisor --state-dir DIR [--transport fuse|nbd] [--threads N]
        [--stack-kib K] -- PLUGIN [KEY=VALUE...]

nbdkit 1.32 keeps its `--swap` memory lock only in the foreground (`-f`), and in the foreground it dies
with its parent (PR_SET_PDEATHSIG). This process is that parent. It detaches into its own session, starts

    nbdkit -f --swap -t N -U DIR/nbdkit.sock PLUGIN KEY=VALUE...     (waits for the socket)
    nbdfuse DIR/fuse/disk --unix DIR/nbdkit.sock                     (fuse only; waits for the file)

with a small stack limit, MALLOC_ARENA_MAX=2 and, where allowed, PR_SET_IO_FLUSHER, writes DIR/pids,
and then only watches. A child that dies is reported loudly in DIR/log and never restarted: a new
nbdkit would not know which slot holds which guest page. SIGTERM stops nbdfuse (fusermount3 -u), then
nbdkit, and the supervisor exits once both are gone. The invoking process returns only when the children
are ready (exit 0, `NAME=VALUE` lines with the PIDs on stdout) or have failed to start (exit 1).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .memcg import SWAP_PATH_PREFIX, Memcg

PR_SET_IO_FLUSHER = 57
# Testing aid: "off" runs the children without their memcg; "swappable" in a memcg of their own that may swap.
SWAP_GUARD_ENV = "NBD_POSTCOPY_SWAP_GUARD"
WATCHED_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class StartupError(Exception):
    """A child failed to start; the message says which and why."""


class Stopped(Exception):
    """A stop signal arrived while the children were still starting."""


@dataclass
class Layout:
    """Where everything lives in the state directory."""

    state_dir: Path

    @property
    def socket(self) -> Path:
        return self.state_dir / "nbdkit.sock"

    @property
    def fuse_dir(self) -> Path:
        return self.state_dir / "fuse"

    @property
    def disk(self) -> Path:
        return self.fuse_dir / "disk"

    @property
    def log(self) -> Path:
        return self.state_dir / "log"

    @property
    def pids(self) -> Path:
        return self.state_dir / "pids"


def log(message: str) -> None:
    """One timestamped line in the log (stderr is the log once detached)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} supervisor[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def child_setup(stack_kib: int, cgroup_procs: Path | None) -> Callable[[], None]:
    """Return the pre-exec hook for nbdkit and nbdfuse: into the never-swapped memcg, bounded stacks, unblocked
    signals, IO_FLUSHER."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        if cgroup_procs is not None:  # before exec, so that everything the child ever allocates is charged there
            with open(cgroup_procs, "w") as procs:
                procs.write(str(os.getpid()))
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        # glibc sizes new thread stacks from RLIMIT_STACK, and mlockall pins every byte of them.
        limit = stack_kib * 1024
        resource.setrlimit(resource.RLIMIT_STACK, (limit, limit))
        # Marks the process as part of the I/O path, so its allocations do not recurse into I/O reclaim.
        # prctl(2): preserved across execve. Needs CAP_SYS_RESOURCE; without it the child runs as before
        # (the supervisor has logged that).
        libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0)

    return setup


def io_flusher_allowed() -> bool:
    """Whether PR_SET_IO_FLUSHER works here (tried in a throwaway child, as the hook does)."""
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        os._exit(0 if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def describe_exit(returncode: int) -> str:
    """Popen.returncode in words."""
    return f"exit status {returncode}" if returncode >= 0 else f"signal {signal.Signals(-returncode).name}"


class Supervisor:
    """Starts the children, watches them, stops them on request. All signals arrive via sigtimedwait."""

    def __init__(self, layout: Layout, transport: str, threads: int, stack_kib: int, plugin: list[str]):
        self.layout = layout
        self.transport = transport
        self.threads = threads
        self.stack_kib = stack_kib
        self.plugin = plugin
        self.children: dict[str, subprocess.Popen] = {}
        self.memcg: Memcg | None = None  # where the children run: their memory is never swapped out
        self.reported: set[str] = set()  # roles whose exit is in the log
        self.stopping = False

    # -- starting -------------------------------------------------------------------------------
    def nbdkit_argv(self) -> list[str]:
        return ["nbdkit", "-f", "--swap", "-t", str(self.threads), "-U", str(self.layout.socket), *self.plugin]

    def nbdfuse_argv(self) -> list[str]:
        return ["nbdfuse", str(self.layout.disk), "--unix", str(self.layout.socket)]

    def spawn(self, role: str, argv: list[str]) -> None:
        env = dict(os.environ, MALLOC_ARENA_MAX="2")
        log(f"starting {role}: {' '.join(argv)}")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,
            stderr=sys.stderr,
            env=env,
            preexec_fn=child_setup(self.stack_kib, self.memcg.path / "cgroup.procs" if self.memcg else None),
        )
        self.children[role] = proc
        log(f"{role} pid {proc.pid}")

    def wait_ready(self, role: str, ready: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            sig = signal.sigtimedwait(WATCHED_SIGNALS, 0.05)
            if sig is not None and sig.si_signo in STOP_SIGNALS:
                raise Stopped(f"stopped by {signal.Signals(sig.si_signo).name} while waiting for {what}")
            proc = self.children[role]
            if proc.poll() is not None:
                raise StartupError(
                    f"{role} exited ({describe_exit(proc.returncode)}) before {what} appeared; see {self.layout.log}"
                )
            if time.monotonic() > deadline:
                raise StartupError(f"{what} did not appear within {timeout:.0f}s; see {self.layout.log}")

    def start(self, timeout: float) -> None:
        if not io_flusher_allowed():
            log("warning: PR_SET_IO_FLUSHER refused (needs CAP_SYS_RESOURCE); children run without it")
        self.start_swap_guard()
        self.layout.socket.unlink(missing_ok=True)  # nbdkit 1.32 leaves its socket behind
        self.spawn("nbdkit", self.nbdkit_argv())
        self.wait_ready("nbdkit", self.layout.socket.is_socket, f"nbdkit socket {self.layout.socket}", timeout)
        if self.transport == "fuse":
            self.layout.fuse_dir.mkdir(exist_ok=True)
            self.spawn("nbdfuse", self.nbdfuse_argv())
            self.wait_ready("nbdfuse", self.layout.disk.exists, f"FUSE disk {self.layout.disk}", timeout)
        self.write_pids()
        log("ready")

    def start_swap_guard(self) -> None:
        """The children run in a memcg that may not swap: a page the swap-in path needs must never be
        swapped out to the device it serves. nbdkit is also mlocked; nbdfuse is not, so this is its guard."""
        mode = os.environ.get(SWAP_GUARD_ENV, "on")
        if mode == "off":
            log(f"warning: {SWAP_GUARD_ENV}=off: the swap path runs without its never-swapped memcg (testing aid)")
            return
        try:
            self.memcg = Memcg.never_swapped(f"{SWAP_PATH_PREFIX}{os.getpid()}", swappable=mode == "swappable")
        except OSError as exc:
            log(f"warning: no never-swapped memcg for the swap path ({exc}); nbdfuse's memory could be swapped "
                "out, to this very device under pressure")
            return
        log(f"swap path in memcg {self.memcg.path} (its memory is never swapped out)")

    def remove_swap_guard(self) -> None:
        if self.memcg is None:
            return
        try:
            self.memcg.remove(self.memcg.path.parent)
        except OSError as exc:
            log(f"warning: {exc}")

    def write_pids(self) -> None:
        lines = [f"supervisor_pid={os.getpid()}"]
        lines += [f"{role}_pid={proc.pid}" for role, proc in self.children.items()]
        tmp = self.layout.pids.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.rename(self.layout.pids)

    # -- watching -------------------------------------------------------------------------------
    def alive(self) -> list[str]:
        return [role for role, proc in self.children.items() if proc.poll() is None]

    def reap(self) -> None:
        """Log every child exit not logged yet."""
        for role, proc in self.children.items():
            if role not in self.reported and proc.poll() is not None:
                self.reported.add(role)
                if self.stopping:
                    log(f"{role} (pid {proc.pid}) exited: {describe_exit(proc.returncode)}")
                elif role == "nbdfuse" and proc.returncode == 0:
                    # nbdfuse ends with status 0 only when its mount goes away: detach unmounted it.
                    log(f"nbdfuse (pid {proc.pid}) exited after its mount was removed (detach unmounts it first)")
                else:
                    log(
                        f"ERROR: {role} (pid {proc.pid}) died unexpectedly: {describe_exit(proc.returncode)}. "
                        "It is NOT restarted (a new nbdkit would not know the slot map): swap-ins from this "
                        "device will fail. Detach it."
                    )

    def watch(self) -> int:
        while self.alive():
            sig = signal.sigwaitinfo(WATCHED_SIGNALS)
            self.reap()  # first: a child may have exited just before the stop request
            if sig.si_signo in STOP_SIGNALS and not self.stopping:
                log(f"{signal.Signals(sig.si_signo).name}: stopping")
                self.stop()
                self.reap()
        if self.stopping:
            log("all children gone; exiting")
            return 0
        log("ERROR: all children are gone; exiting")
        return 1

    # -- stopping -------------------------------------------------------------------------------
    def stop(self, grace: float = 10.0) -> None:
        """nbdfuse first (unmount, as its manual asks), then nbdkit; SIGKILL what outlives the grace."""
        self.stopping = True
        fuse = self.children.get("nbdfuse")
        if fuse is not None and fuse.poll() is None:
            unmount = subprocess.run(["fusermount3", "-u", str(self.layout.fuse_dir)], capture_output=True, text=True)
            if unmount.returncode != 0:
                log(f"fusermount3 -u failed ({unmount.stderr.strip()}); sending SIGTERM to nbdfuse")
                fuse.terminate()
            self.wait_gone(fuse, grace)
        nbdkit = self.children.get("nbdkit")
        if nbdkit is not None and nbdkit.poll() is None:
            nbdkit.terminate()
            self.wait_gone(nbdkit, grace)
        self.layout.socket.unlink(missing_ok=True)

    def wait_gone(self, proc: subprocess.Popen, grace: float) -> None:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"pid {proc.pid} still running after {grace:.0f}s; sending SIGKILL")
            proc.kill()
            proc.wait()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m nbd_postcopy.host.supervisor",
        description="Run nbdkit (and nbdfuse) for one postcopy device and keep them alive. "
        "Started by scripts/setup-swap.sh attach; stopped with SIGTERM by setup-swap.sh detach.",
    )
    parser.add_argument("--state-dir", type=Path, required=True, help="the attachment's state directory (exists)")
    parser.add_argument("--transport", choices=("fuse", "nbd"), default="fuse",
                        help="fuse: also run nbdfuse STATE/fuse/disk; nbd: nbdkit only (nbd-client connects)")
    parser.add_argument("--threads", type=int, default=4, help="nbdkit -t: threads per connection (default 4)")
    parser.add_argument("--stack-kib", type=int, default=1024,
                        help="stack limit of the children in KiB; sizes their (locked) thread stacks (default 1024)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each child (default 60)")
    parser.add_argument("--foreground", action="store_true", help="do not detach; log to stderr")
    parser.add_argument("plugin", nargs="+", metavar="PLUGIN [KEY=VALUE...]", help="nbdkit plugin and its arguments")
    args = parser.parse_args(argv)
    if not args.state_dir.is_dir():
        parser.error(f"state directory {args.state_dir} does not exist")
    if args.threads < 1 or args.stack_kib < 64:
        parser.error("--threads must be >= 1 and --stack-kib >= 64")
    return args


def serve(args: argparse.Namespace, report: Callable[[str], None]) -> int:
    """Start the children, report readiness (or the failure), then watch until they are gone."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED_SIGNALS)
    layout = Layout(args.state_dir.resolve())
    supervisor = Supervisor(layout, args.transport, args.threads, args.stack_kib, args.plugin)
    try:
        try:
            supervisor.start(args.timeout)
        except (StartupError, Stopped, OSError) as exc:
            log(f"ERROR: start failed: {exc}")
            supervisor.stop()
            report(f"error: {exc}\n")
            return 1
        report(layout.pids.read_text())
        return supervisor.watch()
    finally:
        supervisor.remove_swap_guard()


def detach(args: argparse.Namespace) -> int:
    """Fork a session leader that logs to STATE/log; return when it reports ready or failed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        logfd = os.open(Layout(args.state_dir).log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for fd, target in ((null, 0), (logfd, 1), (logfd, 2)):
            os.dup2(fd, target)
        os.closerange(3, write_end)
        os.closerange(write_end + 1, 65536)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)

        def report(message: str) -> None:
            os.write(write_end, message.encode())
            os.close(write_end)

        status = 1
        try:
            status = serve(args, report)
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    if message.startswith("supervisor_pid="):
        sys.stdout.write(message)
        return 0
    reason = message.removeprefix("error: ").strip() or f"supervisor died during start; see {Layout(args.state_dir).log}"
    print(f"supervisor: {reason}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.foreground:

        def report(message: str) -> None:
            sys.stdout.write(message)
            sys.stdout.flush()

        return serve(args, report)
    return detach(args)


if __name__ == "__main__":
    sys.exit(main())
