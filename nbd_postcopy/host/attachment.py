"""The attachment: the postcopy device as an active swap area, and its one state record.

    attachment = attach(AttachOptions(["source=URI", "pages=N", "key=FILE"], name="vm1"))
    status("vm1")                     # [{"name": "vm1", "device": "/dev/loop3", ...}]
    detach("vm1", target=Target(pid, address, length))

attach runs these steps, each with its undo, and rolls back every step done so far (in reverse) when one
fails or a stop signal arrives:

    step                                                  undo
    1. the state directory (and a registry link)          remove both
    2. nbdkit (and nbdfuse) under the supervisor          unmount FUSE; stop the supervisor, then nbdkit
    3. the block device: losetup --direct-io=on or        losetup -d / nbd-client -d
       nbd-client
    4. swapon                                             swapoff

detach runs the whole undo list (after completion); every undo first checks whether there is anything
to undo, so detach can be re-run after a partial failure. A failed swapoff stops it there: the pages on
the device are still needed.

Every attachment is registered in the run directory (NBD_POSTCOPY_RUN_DIR, default /run/nbd-postcopy)
as NAME: its state directory, or a link to it. The state directory holds the record (`State`), written
after every step as STATE/state.json (which readers read) and STATE/state (shell-sourceable, for
people and scripts), and optionally STATE/target (`Target`), which the stager writes for detach.
The supervisor (`python -m nbd_postcopy.host.supervisor`) writes STATE/pids and STATE/log.

Human-readable lines (the "attached ..." line, warnings, errors, the rollback) go to a `Reporter`; the
default one logs them, scripts/setup-swap.sh prints them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..common import linux
from ..common.units import PAGE_SIZE, human_bytes
from ..device.control import ControlError, request
from .completion import complete_range

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SETUP_SWAP = REPO / "scripts" / "setup-swap.sh"
DEFAULT_RUN_DIR = Path("/run/nbd-postcopy")
MAX_PRIORITY = 32767
MAX_STATE_DIR_LENGTH = 80  # the state directory holds Unix sockets (at most 108 bytes per path)
STOP_TIMEOUT = 30.0  # seconds to wait for the supervisor and nbdkit to exit
TRANSPORTS = ("auto", "nbd", "fuse")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
KEY_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*=.*", re.DOTALL)

STATE_JSON = "state.json"
STATE_SHELL = "state"
TARGET_FILE = "target"
PIDS_FILE = "pids"


class AttachmentError(Exception):
    """attach, detach or status refused or failed; the message says why (one line, maybe a log tail)."""

    reported = False  # True once the message went to the Reporter (attach reports it before rolling back)


class UsageError(AttachmentError):
    """Bad options: exit status 2."""


class Interrupted(BaseException):
    """A stop signal (HUP, INT, QUIT, TERM) arrived while `stop_signals_raise` was active."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def command_prefix() -> list[str]:
    """How a person runs these commands here: scripts/setup-swap.sh in a checkout, else nbd-postcopy swap."""
    return [str(SETUP_SWAP)] if SETUP_SWAP.is_file() else ["nbd-postcopy", "swap"]


def default_prog() -> str:
    return "setup-swap.sh" if SETUP_SWAP.is_file() else "nbd-postcopy swap"


def detach_command(name: str, pid: int | None = None, address: int = 0, length: int = 0) -> str:
    """The shell command that detaches `name` (completing that range of process `pid` first, if given)."""
    argv = [*command_prefix(), "detach", name]
    if pid is not None:
        argv += ["--pid", str(pid), "--address", f"{address:#x}", "--length", str(length)]
    return shlex.join(argv)


# --- where things are ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the environment decides (README, "Environment"): read once per command."""

    run_dir: Path = DEFAULT_RUN_DIR
    zswap_switch: str = linux.ZSWAP_SWITCH
    standin_plugin: str = ""  # testing aid: an nbdkit plugin with its arguments instead of plugin/postcopy.py
    plugin_file: Path = REPO / "plugin" / "postcopy.py"

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            run_dir=Path(env.get("NBD_POSTCOPY_RUN_DIR") or DEFAULT_RUN_DIR),
            zswap_switch=env.get("NBD_POSTCOPY_ZSWAP_ENABLED") or linux.ZSWAP_SWITCH,
            standin_plugin=env.get("NBD_POSTCOPY_NBDKIT_PLUGIN", ""),
            plugin_file=Path(env.get("NBD_POSTCOPY_PLUGIN_FILE") or REPO / "plugin" / "postcopy.py"),
        )

    def entry(self, name: str) -> Path:
        """The registry entry of `name`: its state directory, or a link to it."""
        return self.run_dir / name

    def is_registered(self, name: str) -> bool:
        return os.path.lexists(self.entry(name))

    def state_dir_of(self, name: str) -> Path:
        return Path(os.path.realpath(self.entry(name)))

    def names(self) -> list[str]:
        """Every registered attachment name, sorted."""
        try:
            entries = os.listdir(self.run_dir)
        except FileNotFoundError:
            return []
        return sorted(entry for entry in entries if not entry.startswith("."))


class Reporter:
    """Where an attachment's lines go. This one logs them; the command line prints them (swap_cli)."""

    def __init__(self, prog: str | None = None, progress: TextIO | None = None):
        self.prog = prog or default_prog()  # names the command in hints ("run: PROG detach NAME")
        self.progress = progress  # completion's progress bar; None: quiet

    def info(self, message: str) -> None:
        log.info("%s", message)

    def warning(self, message: str) -> None:
        log.warning("%s", message)

    def error(self, message: str) -> None:
        log.error("%s", message)


class CollectingReporter(Reporter):
    """Keeps every line (for a caller that quotes them in its own error message)."""

    def __init__(self, prog: str | None = None):
        super().__init__(prog)
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    def warning(self, message: str) -> None:
        self.lines.append(f"warning: {message}")

    def error(self, message: str) -> None:
        self.lines.append(message)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


# --- the state record ----------------------------------------------------------------------------------


@dataclass
class State:
    """One attachment, as STATE/state.json holds it (and STATE/state, in the same order and names)."""

    name: str
    state_dir: str
    transport: str  # "fuse" or "nbd"
    device: str = ""  # the swap device: loop_device or nbd_device
    loop_device: str = ""
    nbd_device: str = ""
    fuse_dir: str = ""
    fuse_disk: str = ""
    socket: str = ""  # nbdkit's NBD socket
    control: str = ""  # the plugin's control socket ("" for a stand-in plugin)
    supervisor_pid: int | None = None
    nbdkit_pid: int | None = None
    nbdfuse_pid: int | None = None
    priority: int = MAX_PRIORITY
    discard: bool = True
    size_bytes: int | None = None
    standin: bool = False
    attached_at: str = ""  # UTC, once swapon succeeded
    plugin_args: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> State:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not {"name", "state_dir", "transport"} <= data.keys():
            raise ValueError("not an attachment record (want an object with name, state_dir and transport)")
        return cls(**{key: value for key, value in data.items() if key in known})

    def to_shell(self) -> str:
        """The same record as shell assignments that bash sources to the same values."""
        lines = ["# nbd-postcopy attachment (shell-sourceable; programs read state.json beside it)"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "plugin_args":
                lines.append("plugin_args=(" + "".join(f" {shlex.quote(arg)}" for arg in value) + " )")
            else:
                lines.append(f"{f.name}={shlex.quote(_shell_value(value))}")
        return "\n".join(lines) + "\n"

    def save(self) -> None:
        """Write STATE/state and STATE/state.json, each atomically (a reader sees the old or the new one)."""
        directory = Path(self.state_dir)
        try:
            _write_atomically(directory / STATE_SHELL, self.to_shell())
            _write_atomically(directory / STATE_JSON, self.to_json())
        except OSError as exc:
            raise AttachmentError(f"cannot write the state in {directory}: {exc.strerror or exc}") from None

    @classmethod
    def load(cls, state_dir: str | os.PathLike) -> State:
        """The record in `state_dir`. FileNotFoundError when there is none; AttachmentError when unreadable."""
        path = Path(state_dir) / STATE_JSON
        try:
            text = path.read_text()
        except FileNotFoundError:
            if (Path(state_dir) / STATE_SHELL).exists():
                raise AttachmentError(f"{path.parent / STATE_SHELL} has no {STATE_JSON} beside it: it was written by "
                                      "an older setup-swap.sh; take it down with that version") from None
            raise
        try:
            return cls.from_json(text)
        except (ValueError, TypeError) as exc:
            raise AttachmentError(f"cannot read {path}: {exc}") from None

    def adopt_pids(self) -> None:
        """Take the PIDs from STATE/pids when the record has none (the supervisor got ready, and then the
        attach that started it was interrupted before recording them)."""
        if self.supervisor_pid is not None:
            return
        try:
            text = (Path(self.state_dir) / PIDS_FILE).read_text()
        except OSError:
            return
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key in ("supervisor_pid", "nbdkit_pid", "nbdfuse_pid") and value.isdigit():
                setattr(self, key, int(value))


def _shell_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Target:
    """The process range that detach completes: STATE/target (target_pid=, target_address=, target_length=)."""

    pid: int
    address: int
    length: int

    def save(self, state_dir: str | os.PathLike) -> Path:
        path = Path(state_dir) / TARGET_FILE
        _write_atomically(path, f"target_pid={self.pid}\ntarget_address={self.address:#x}\n"
                                f"target_length={self.length}\n")
        return path

    @classmethod
    def load(cls, state_dir: str | os.PathLike) -> Target | None:
        """The recorded target, or None when there is none. ValueError when the file is malformed."""
        try:
            text = (Path(state_dir) / TARGET_FILE).read_text()
        except FileNotFoundError:
            return None
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        try:
            return cls(int(fields["target_pid"]), int(fields["target_address"], 0), int(fields["target_length"], 0))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{Path(state_dir) / TARGET_FILE}: want target_pid=, target_address= and "
                             f"target_length= lines ({exc})") from None


def find_by_device(device: str, settings: Settings | None = None) -> State | None:
    """The record of the attachment whose swap device is `device` (any path naming it), or None."""
    settings = settings or Settings.from_environ()
    for name in settings.names():
        try:
            state = State.load(settings.state_dir_of(name))
        except (OSError, AttachmentError):
            continue
        if state.device and linux.same_file(state.device, device):
            return state
    return None


def record_target(device: str, target: Target, settings: Settings | None = None) -> Path | None:
    """Tell detach what to complete: write STATE/target for the attachment of `device`. Returns the file,
    or None when `device` is not a registered attachment."""
    state = find_by_device(device, settings)
    return target.save(state.state_dir) if state is not None else None


# --- stop signals ----------------------------------------------------------------------------------------


class _SignalGuard:
    depth = 0  # > 0 while a step runs: a stop signal waits for its end
    pending: int | None = None


_guard = _SignalGuard()
STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)


def _on_stop_signal(signum: int, frame) -> None:
    if _guard.depth:
        _guard.pending = _guard.pending or signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While active (main thread only), HUP, INT, QUIT and TERM raise Interrupted; one that arrives during
    a step is raised when the step has finished, so an interrupted attach knows everything it must undo."""
    previous = {signum: signal.signal(signum, _on_stop_signal) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _guard.pending = None


@contextlib.contextmanager
def _step() -> Iterator[None]:
    """A step that runs to its end; a stop signal that arrived meanwhile is raised afterwards."""
    _guard.depth += 1
    try:
        yield
    finally:
        _guard.depth -= 1
    if _guard.depth == 0 and _guard.pending is not None:
        signum, _guard.pending = _guard.pending, None
        raise Interrupted(signum)


# --- attach ----------------------------------------------------------------------------------------------


@dataclass
class AttachOptions:
    plugin_keys: list[str]  # KEY=VALUE for plugin/postcopy.py (or appended to the stand-in plugin)
    name: str | None = None  # default: the first free postcopyN
    priority: int = MAX_PRIORITY
    transport: str = "auto"
    state_dir: Path | None = None  # default: RUN_DIR/NAME
    threads: int = 4
    discard: bool = True

    def check(self) -> None:
        """UsageError for the first bad option."""
        if self.name is not None and not NAME_PATTERN.fullmatch(self.name):
            raise UsageError(f"bad name '{self.name}': use [A-Za-z0-9][A-Za-z0-9_.-]*, at most 32 characters")
        check_number("--priority", self.priority, 0, MAX_PRIORITY)
        check_number("--threads", self.threads, 1, 64)
        if self.transport not in TRANSPORTS:
            raise UsageError(f"bad --transport '{self.transport}': want auto, nbd or fuse")
        for key in self.plugin_keys:
            if not KEY_PATTERN.fullmatch(key):
                raise UsageError(f"bad plugin argument '{key}': want KEY=VALUE")


def check_number(option: str, value: object, low: int, high: int) -> int:
    """`value` (an int, or the digits given on the command line) as an int in [low, high], else UsageError."""
    text = str(value)
    if not re.fullmatch(r"[0-9]+", text) or not low <= int(text) <= high:
        raise UsageError(f"bad {option} '{text}': want {low}..{high}")
    return int(text)


def attach(options: AttachOptions, settings: Settings | None = None, report: Reporter | None = None) -> Attachment:
    """Attach the device as swap (see the module doc); returns the attachment, or raises AttachmentError
    (refused or failed: then nothing is left behind, or the error says what is) or UsageError."""
    settings = settings or Settings.from_environ()
    report = report or Reporter()
    options.check()
    if not settings.standin_plugin and not options.plugin_keys:
        raise UsageError("no plugin keys: give at least source=URI, pages=N (or size=BYTES) and key=FILE after --")
    transport = _refusals(options, settings)
    name = options.name or _first_free_name(settings)
    if settings.is_registered(name):
        raise AttachmentError(f"the name '{name}' is taken ({settings.entry(name)} exists); see "
                              f"'{report.prog} status {name}', or pick another --name")
    if options.state_dir is not None and os.path.lexists(options.state_dir):
        raise AttachmentError(f"--state-dir {options.state_dir} already exists; give a path that does not exist yet")
    state_dir = os.path.realpath(options.state_dir or settings.entry(name))
    if len(state_dir) > MAX_STATE_DIR_LENGTH:
        raise AttachmentError(f"state directory path {state_dir} is too long for Unix sockets "
                              f"(at most {MAX_STATE_DIR_LENGTH} characters)")
    state = State(name=name, state_dir=state_dir, transport=transport, priority=options.priority,
                  discard=options.discard, standin=bool(settings.standin_plugin))
    attachment = Attachment(state, settings, report)
    attachment._attach(options)
    return attachment


def _refusals(options: AttachOptions, settings: Settings) -> str:
    """Refuse before anything is created; returns the transport to use."""
    if os.geteuid() != 0:
        raise AttachmentError("must run as root (swapon, losetup and FUSE mounts need it)")
    if linux.zswap_enabled(settings.zswap_switch):
        raise AttachmentError(
            f"zswap is on ({settings.zswap_switch} = {linux.zswap_setting(settings.zswap_switch)}): it would keep "
            "swapped-out pages compressed in RAM and never send them to the device. Turn it off first: "
            "echo N > /sys/module/zswap/parameters/enabled")
    transport = options.transport
    if transport == "auto":
        transport = "nbd" if _kernel_has_nbd() else "fuse"
    elif transport == "nbd" and not _kernel_has_nbd():
        raise AttachmentError("--transport nbd: this kernel has no nbd module (modprobe -n nbd fails); "
                              "use --transport fuse")
    tools = ["nbdkit", "losetup", "swapon", "swapoff"]
    tools += ["nbdfuse", "fusermount3"] if transport == "fuse" else ["nbd-client", "modprobe"]
    if settings.standin_plugin:
        tools.append("mkswap")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise AttachmentError(f"missing tool(s): {' '.join(missing)} (PATH={os.environ.get('PATH', '')}); "
                              "install them: scripts/install.sh")
    if not settings.standin_plugin:
        if _run(["nbdkit", "python", "--version"])[0] != 0:
            raise AttachmentError("missing tool: nbdkit's python plugin (Debian package nbdkit-plugin-python)")
        if not settings.plugin_file.is_file():
            raise AttachmentError(f"missing plugin file {settings.plugin_file}")
    return transport


def _kernel_has_nbd() -> bool:
    if os.path.isdir("/sys/module/nbd"):
        return True
    try:
        return subprocess.run(["modprobe", "-n", "-q", "nbd"], capture_output=True).returncode == 0
    except OSError:
        return False


def _first_free_name(settings: Settings) -> str:
    i = 0
    while settings.is_registered(f"postcopy{i}"):
        i += 1
    return f"postcopy{i}"


def _free_nbd_device() -> str | None:
    for entry in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:] or 0)):
        if not (entry / "pid").exists() and (entry / "size").read_text().strip() == "0":
            return f"/dev/{entry.name}"
    return None


def _run(argv: list[str]) -> tuple[int, str]:
    """Run a tool; returns its exit status and its output (stdout and stderr, trailing newlines removed)."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace")
    except OSError as exc:
        return 127, f"{argv[0]}: {exc.strerror or exc}"
    return done.returncode, done.stdout.rstrip("\n")


def _log_tail(path: Path, lines: int = 8) -> str:
    """The last lines of a log, indented, for an error message ("" when there is no log)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    if not text.strip():
        return ""
    tail = text.rstrip("\n").split("\n")[-lines:]
    return f"\nlast lines of {path}:\n" + "\n".join(f"  {line}" for line in tail)


class _StopHere(Exception):
    """An undo step failed in a way that forbids the following ones (swapoff: the pages are still needed)."""


class Attachment:
    """One attachment: its record plus what attach, detach and status do with it."""

    def __init__(self, state: State, settings: Settings | None = None, report: Reporter | None = None):
        self.state = state
        self.settings = settings or Settings.from_environ()
        self.report = report or Reporter()
        self._failures: list[str] = []

    @classmethod
    def load(cls, state_dir: str | os.PathLike, settings: Settings | None = None,
             report: Reporter | None = None) -> Attachment:
        """The attachment whose state is in `state_dir` (FileNotFoundError when there is none)."""
        state = State.load(os.path.realpath(state_dir))
        state.adopt_pids()
        return cls(state, settings, report)

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def state_dir(self) -> Path:
        return Path(self.state.state_dir)

    def summary(self) -> str:
        s = self.state
        return (f"attached {s.name}: {s.device} (swap priority {s.priority}, {human_bytes(s.size_bytes or 0)}, "
                f"nbdkit pid {s.nbdkit_pid})")

    # -- attach ---------------------------------------------------------------------------------------------
    def _attach(self, options: AttachOptions) -> None:
        undo: list[Callable[[], None]] = []
        try:
            with _step():
                self._make_state_dir(options, undo)
            with _step():
                undo += [self._stop_processes, self._unmount]
                self._start_supervisor(options.threads)
            with _step():
                undo.append(self._disconnect)
                self._connect()
            with _step():
                undo.append(self._swapoff)
                self._swapon()
        except BaseException as exc:
            if isinstance(exc, AttachmentError):
                self.report.error(str(exc))
                exc.reported = True
            if undo:
                self._roll_back(undo)
            raise
        self.report.info(self.summary())

    def _roll_back(self, undo: list[Callable[[], None]]) -> None:
        with _step():  # a second signal must not cut the rollback short
            self.report.error("undoing the steps done so far")
            if self._undo(reversed(undo)):
                self.report.error("undone; nothing is left behind")
            else:
                self.report.error(f"could not undo everything; see above and run: {self.report.prog} detach "
                                  f"{self.name}")

    def _make_state_dir(self, options: AttachOptions, undo: list[Callable[[], None]]) -> None:
        s = self.state
        for directory, parents in ((self.settings.run_dir, True), (Path(s.state_dir), False)):
            try:
                directory.mkdir(parents=parents, exist_ok=parents)
            except OSError as exc:
                raise AttachmentError(f"cannot create {directory}: {exc.strerror}") from None
        undo.append(self._remove_state_dir)
        if options.state_dir is not None:
            try:
                os.symlink(s.state_dir, self.settings.entry(s.name))
            except OSError as exc:
                raise AttachmentError(f"cannot register {self.settings.entry(s.name)}: {exc.strerror}") from None
        directory = Path(s.state_dir)
        s.socket = str(directory / "nbdkit.sock")
        if s.transport == "fuse":
            s.fuse_dir, s.fuse_disk = str(directory / "fuse"), str(directory / "fuse" / "disk")
        if s.standin:
            s.plugin_args = [*self.settings.standin_plugin.split(), *options.plugin_keys]
        else:
            s.plugin_args = ["python", str(self.settings.plugin_file), *options.plugin_keys]
            if not any(key.startswith("control=") for key in options.plugin_keys):
                s.plugin_args.append(f"control={directory / 'control.sock'}")
        for arg in s.plugin_args:
            if arg.startswith("control="):
                s.control = arg.removeprefix("control=")
        s.save()

    def _start_supervisor(self, threads: int) -> None:
        """nbdkit (and nbdfuse) under the supervisor, which detaches and reports the PIDs once ready."""
        s = self.state
        argv = [sys.executable, "-m", "nbd_postcopy.host.supervisor", "--state-dir", s.state_dir,
                "--transport", s.transport, "--threads", str(threads), "--", *s.plugin_args]
        # Its own session: a Ctrl-C at the terminal must not cut the start short (we roll back instead).
        starter = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", start_new_session=True)
        try:
            output = starter.communicate()[0]
        except BaseException:
            # Interrupted here (in-process): it returns once the supervisor is ready or has failed, and then
            # the undo knows the PIDs (STATE/pids).
            with contextlib.suppress(Exception):
                starter.communicate(timeout=180)
            raise
        if starter.returncode != 0:
            reason = "\n".join(line.removeprefix("supervisor: ") for line in output.rstrip("\n").split("\n"))
            raise AttachmentError(f"starting nbdkit failed: {reason}{_log_tail(Path(s.state_dir) / 'log')}")
        for line in output.splitlines():
            key, _, value = line.partition("=")
            if key in ("supervisor_pid", "nbdkit_pid", "nbdfuse_pid") and value.isdigit():
                setattr(s, key, int(value))
        s.save()

    def _connect(self) -> None:
        s = self.state
        if s.transport == "fuse":
            status, out = _run(["losetup", "--find", "--show", "--direct-io=on", s.fuse_disk])
            if status != 0:
                raise AttachmentError(f"losetup --direct-io=on {s.fuse_disk} failed: {out}")
            s.loop_device = s.device = out
            s.save()
            loop = os.path.basename(s.loop_device)
            try:
                dio = Path(f"/sys/block/{loop}/loop/dio").read_text().strip()
            except OSError:
                dio = "missing"
            if dio != "1":
                raise AttachmentError(f"{s.loop_device} does not use direct I/O (/sys/block/{loop}/loop/dio = "
                                      f"{dio}): its page cache would answer swap-ins with stale data")
        else:
            if not os.path.isdir("/sys/module/nbd"):
                status, out = _run(["modprobe", "nbd"])
                if status != 0:
                    raise AttachmentError(f"modprobe nbd failed: {out}")
            device = _free_nbd_device()
            if device is None:
                raise AttachmentError("no free /dev/nbdN device")
            s.nbd_device = device
            status, out = _run(["nbd-client", "-unix", s.socket, device, "-block-size", str(PAGE_SIZE), "-swap"])
            if status != 0:
                raise AttachmentError(f"nbd-client -unix {s.socket} {device} failed: {out}")
            s.device = device
            s.save()
        try:
            fd = os.open(s.device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                s.size_bytes = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        except OSError as exc:
            raise AttachmentError(f"cannot read the size of {s.device}: {exc.strerror}") from None

    def _swapon(self) -> None:
        s = self.state
        if s.standin:
            status, out = _run(["mkswap", "-q", s.device])
            if status != 0:
                raise AttachmentError(f"mkswap {s.device} (stand-in plugin) failed: {out}")
        args = ["-p", str(s.priority)] + (["--discard=pages"] if s.discard else [])
        status, out = _run(["swapon", *args, s.device])
        if status != 0:
            raise AttachmentError(f"swapon {' '.join(args)} {s.device} failed: {out or 'no message'} "
                                  "(does the plugin write a valid swap header in slot 0?)")
        s.attached_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        s.save()

    # -- the undo steps (detach runs them all, in this order) -----------------------------------------------
    def _undo(self, steps: Iterable[Callable[[], None]]) -> bool:
        """Run undo steps in order, each only where there is something to undo; True when nothing remains."""
        self._failures = []
        try:
            for undo in steps:
                with _step():
                    undo()
        except _StopHere:
            pass
        return not self._failures

    def _fail(self, message: str) -> None:
        self.report.error(message)
        self._failures.append(message)

    def _teardown_steps(self) -> list[Callable[[], None]]:
        return [self._swapoff, self._disconnect, self._unmount, self._stop_processes, self._remove_state_dir]

    def _swapoff(self) -> None:
        s = self.state
        if not s.device or linux.find_swap(s.device) is None:
            return
        status, out = _run(["swapoff", s.device])
        if status != 0:
            self._fail(f"swapoff {s.device} failed: {out or 'no message'}. Nothing else was touched (the pages on "
                       "the device are still needed); free memory or fix the source, then run detach again.")
            raise _StopHere

    def _disconnect(self) -> None:
        s = self.state
        if s.fuse_disk:
            for loop in linux.loops_backed_by(s.fuse_disk):  # the recorded one, or one losetup made unrecorded
                status, out = _run(["losetup", "-d", loop])
                if status != 0:
                    self._fail(f"losetup -d {loop} failed: {out or 'no message'}")
        if s.nbd_device and os.path.exists(f"/sys/block/{os.path.basename(s.nbd_device)}/pid"):
            status, out = _run(["nbd-client", "-d", s.nbd_device])
            if status != 0:
                self._fail(f"nbd-client -d {s.nbd_device} failed: {out or 'no message'}")

    def _unmount(self) -> None:
        s = self.state
        if not s.fuse_dir or not linux.is_mounted(s.fuse_dir):
            return
        # The loop device may let go of the file a moment after losetup -d returns: retry briefly.
        out = ""
        for _ in range(50):
            status, out = _run(["fusermount3", "-u", s.fuse_dir])
            if status == 0:
                break
            time.sleep(0.1)
        if linux.is_mounted(s.fuse_dir):
            self._fail(f"fusermount3 -u {s.fuse_dir} failed: {out or 'no message'}")

    def _stop_processes(self) -> None:
        s = self.state
        s.adopt_pids()
        supervisor = supervisor_needle(s.state_dir)
        if s.supervisor_pid and linux.process_matches(s.supervisor_pid, supervisor):
            with contextlib.suppress(OSError):
                os.kill(s.supervisor_pid, signal.SIGTERM)
            if not linux.wait_process_gone(s.supervisor_pid, supervisor, STOP_TIMEOUT):
                self._fail(f"the supervisor (pid {s.supervisor_pid}) did not exit within {STOP_TIMEOUT:.0f}s; "
                           f"see {s.state_dir}/log")
        if s.nbdkit_pid and linux.process_matches(s.nbdkit_pid, s.socket):  # the supervisor was gone or left it
            with contextlib.suppress(OSError):
                os.kill(s.nbdkit_pid, signal.SIGTERM)
            if not linux.wait_process_gone(s.nbdkit_pid, s.socket, STOP_TIMEOUT):
                self._fail(f"nbdkit (pid {s.nbdkit_pid}) did not exit within {STOP_TIMEOUT:.0f}s")
        if s.nbdfuse_pid and s.fuse_disk and linux.process_matches(s.nbdfuse_pid, s.fuse_disk):
            self._fail(f"nbdfuse (pid {s.nbdfuse_pid}) is still running although its mount is gone")

    def _remove_state_dir(self) -> None:
        if self._failures:
            return
        try:
            _remove_registration(self.settings, self.name, self.state_dir)
        except OSError as exc:
            self._fail(f"cannot remove {exc.filename}: {exc.strerror or exc}")

    # -- detach -----------------------------------------------------------------------------------------------
    def detach(self, complete: bool = True, target: Target | None = None) -> None:
        """Complete (unless told not to), then take every step down; AttachmentError if something remains."""
        if complete:
            self._complete(target)
        if not self._undo(self._teardown_steps()):
            raise AttachmentError(f"{self.name} is only partly detached; fix the above and run: "
                                  f"{self.report.prog} detach {self.name}")
        self.report.info(f"detached {self.name}" + (f": {self.state.device}" if self.state.device else ""))

    def _complete(self, target: Target | None) -> None:
        """Pre-page the target's pages still on the device; a failure is a warning (swapoff reads them in)."""
        if target is None:
            try:
                target = Target.load(self.state_dir)
            except ValueError as exc:
                self.report.warning(f"{exc}; skipping completion (swapoff reads the rest in)")
                return
        if target is None:
            self.report.info(f"no target process known (no --pid, no {self.state_dir / TARGET_FILE}): skipping "
                             "completion; swapoff reads the rest in")
            return
        control = self.state.control if self.state.control and _is_socket(self.state.control) else None
        shown = f"--pid {target.pid} --address {target.address:#x} --length {target.length}"
        self.report.info(f"completing: nbd-postcopy complete {shown}" + (f" --control {control}" if control else ""))
        progress = self.report.progress
        try:
            result = complete_range(target.pid, target.address, target.length, control=control,
                                    quiet=progress is None, stream=progress)
        except Exception as exc:
            self.report.warning(f"completion failed ({exc}); continuing with swapoff, which reads every remaining "
                                "page in")
            return
        self.report.info(result.summary())

    # -- status -----------------------------------------------------------------------------------------------
    def status(self) -> dict:
        return _status_entry(self.name, self.state_dir, self.state)


def supervisor_needle(state_dir: str | os.PathLike) -> str:
    """What the command line of the supervisor of `state_dir` contains (and no other process's)."""
    return f"nbd_postcopy.host.supervisor --state-dir {state_dir} "


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _remove_registration(settings: Settings, name: str, state_dir: Path) -> None:
    """Remove the state directory and the registry entry (a link to it)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(state_dir)
    entry = settings.entry(name)
    if entry.is_symlink() and os.readlink(entry) == str(state_dir):
        entry.unlink()


# --- detach and status by name ---------------------------------------------------------------------------


def detach(name: str, *, complete: bool = True, target: Target | None = None, settings: Settings | None = None,
           report: Reporter | None = None) -> None:
    """Complete `target` (else STATE/target) unless `complete` is false, then take NAME down completely.
    A name that is not attached is not an error. Raises AttachmentError when something remains."""
    settings = settings or Settings.from_environ()
    report = report or Reporter()
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"bad name '{name}'")
    if os.geteuid() != 0:
        raise AttachmentError("must run as root")
    if not settings.is_registered(name):
        report.info(f"{name} is not attached; nothing to do")
        return
    state_dir = settings.state_dir_of(name)
    try:
        attachment = Attachment.load(state_dir, settings, report)
    except FileNotFoundError:
        # An empty registry entry (attach died before writing any state): nothing was started. Unless
        # the state went missing while the device stayed up: then leave it to a person.
        mounted = [m for m in linux.mount_points() if m.startswith(f"{state_dir}/")]
        if mounted:
            raise AttachmentError(f"{name} has no state record ({state_dir / STATE_JSON}), but {mounted[0]} is "
                                  "still mounted: take it down by hand (swapoff, losetup -d, fusermount3 -u, stop "
                                  "its nbdkit), then run detach again") from None
        with _step():
            entry = settings.entry(name)
            shutil.rmtree(state_dir, ignore_errors=True)
            if entry.is_symlink():
                entry.unlink()
        report.info(f"detached {name} (it had no state: nothing was running)")
        return
    attachment.detach(complete, target)


def status(name: str | None = None, settings: Settings | None = None) -> list[dict]:
    """One dict per attachment (or just NAME), as `status --json` prints them (README, "status")."""
    settings = settings or Settings.from_environ()
    if name is not None:
        if not NAME_PATTERN.fullmatch(name):
            raise UsageError(f"bad name '{name}'")
        if not settings.is_registered(name):
            raise AttachmentError(f"{name} is not attached")
        names = [name]
    else:
        names = settings.names()
    entries = []
    for each in names:
        state_dir = settings.state_dir_of(each)
        try:
            state: State | None = State.load(state_dir)
            state.adopt_pids()
        except (OSError, AttachmentError):
            state = None
        entries.append(_status_entry(each, state_dir, state))
    return entries


def _status_entry(name: str, state_dir: Path, state: State | None) -> dict:
    s = state or State(name=name, state_dir=str(state_dir), transport="")
    area = linux.find_swap(s.device) if s.device else None

    def process(pid: int | None, needle: str) -> dict:
        alive = "" if pid is None else ("alive" if linux.process_matches(pid, needle) else "dead")
        return {"pid": pid, "state": alive}

    supervisor = process(s.supervisor_pid, supervisor_needle(state_dir))
    nbdkit = process(s.nbdkit_pid, s.socket)
    nbdkit["locked_kib"] = linux.vm_locked_kib(s.nbdkit_pid) if nbdkit["state"] == "alive" else None
    plugin = None
    if s.control and _is_socket(s.control):
        with contextlib.suppress(ControlError):
            plugin = request(s.control, "status")
    return {
        "name": name,
        "state_dir": str(state_dir),
        "device": s.device,
        "transport": s.transport,
        "size_bytes": s.size_bytes,
        "swap_active": area is not None,
        "swap_size_kib": area.size_kib if area else None,
        "swap_used_kib": area.used_kib if area else None,
        "priority": area.priority if area else (s.priority if state else None),
        "processes": {
            "supervisor": supervisor,
            "nbdkit": nbdkit,
            "nbdfuse": process(s.nbdfuse_pid, s.fuse_disk or "\0"),
        },
        "control_socket": s.control,
        "plugin": plugin,
    }
