"""The kernel lab: run a command on Debian 12's own kernel, in a QEMU TCG guest that uses this machine's userland.

    result = run_in_lab("uname -r", time_limit=60)
    result.status, result.output   # 0, "6.1.0-56-amd64"

Some of what a real host does cannot run on the development kernel (no `nbd` module, no memory
controller on cgroup v2, no netem). Debian 12's generic kernel (the package behind
`linux-image-amd64`, unpacked, never installed) has all three, so the lab boots it with a small
busybox initramfs that loads the virtio and 9p modules, mounts this machine's `/` read-only over 9p,
puts fresh tmpfs on /tmp, /run, /var/tmp and /dev/shm, mounts /dev, /proc, /sys and cgroup2 (alone, at
/sys/fs/cgroup, with the memory controller enabled for the root's children, as systemd does), loads the modules the tests need (nbd, sch_netem, veth, loop, fuse) and
`switch_root`s into it. The command then runs as root with the host's PATH, in the caller's working
directory (the checkout is at the same path), with stdin from /dev/null.

Results come back two ways: the console (the command's stdout and stderr, between two sentinel lines
that also carry its exit status) and `shares`, host directories the caller owns, mounted writable at
the same path in the guest. Nothing else the guest writes reaches the host.

The kernel's modules and the initramfs are cached in /var/cache/nbd-postcopy/lab (`prepare_lab()`);
the first run downloads the kernel package (about 70 MB). A boot takes 5 to 15 s under TCG (by load).
QEMU always runs with `-accel tcg` (KVM hangs on this machine kind) and is stopped by PID when the
command ends, on timeout and on any exception (KeyboardInterrupt included).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .guest import BUSYBOX, GuestBuildError, Newc, unpacked_package, versioned_kernel_package, write_gzipped
from .vm import QEMU, Console

DEFAULT_CACHE_DIR = Path("/var/cache/nbd-postcopy/lab")
KERNEL_METAPACKAGE = "linux-image-amd64"
# Loaded in the initramfs, with their dependencies first: the root filesystem, then what tests use.
ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
LAB_MODULES = ("nbd", "sch_netem", "veth", "loop", "fuse")
LAB_FORMAT = 2  # bump when the initramfs layout changes
ENV_MARKER = "NBD_POSTCOPY_LAB"  # set to 1 for the command: tests use it to know they run in the lab
NINEP = "trans=virtio,version=9p2000.L,msize=512000"

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
fail() {{ echo "LAB-INIT-FAILED: $*"; poweroff -f; }}
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko || fail "insmod $m"
done
mkdir -p /newroot
mount -t 9p -o {NINEP},ro,cache=loose hostroot /newroot || fail "mounting the host root over 9p"
for d in tmp run var/tmp; do mount -t tmpfs -o mode=1777 tmpfs /newroot/$d || fail "tmpfs on /$d"; done
mount -t devtmpfs devtmpfs /newroot/dev || fail "devtmpfs"
mkdir -p /newroot/dev/shm /newroot/dev/pts /newroot/run/lock /newroot/run/lab
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t proc proc /newroot/proc || fail "proc"
mount -t sysfs sysfs /newroot/sys || fail "sysfs"
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup || fail "cgroup2"
echo +memory > /newroot/sys/fs/cgroup/cgroup.subtree_control || fail "enabling the memory controller"
i=0
while read -r mode path; do
    mkdir -p "/newroot$path"
    mount -t 9p -o {NINEP},cache=none,$mode "share$i" "/newroot$path" || fail "mounting share $path"
    i=$((i + 1))
done < /lab/shares
ip link set lo up || fail "loopback"
cp /lab/run.sh /newroot/run/lab/run.sh
mkdir -p /newroot/run/lab/bin && cp /lab/modprobe /newroot/run/lab/bin/modprobe
cd /newroot
exec switch_root /newroot /bin/sh /run/lab/run.sh
"""


# This machine's userland has no kmod; the lab loads its modules at boot, so its modprobe only checks.
MODPROBE_SCRIPT = """#!/bin/sh
# The kernel lab's modprobe: every module the lab offers is loaded at boot (nbd_postcopy/testbench/lab.py).
for arg; do
    case $arg in
    -*) ;;
    *) [ -d "/sys/module/$arg" ] || { echo "modprobe: module $arg is not loaded in the lab" >&2; exit 1; } ;;
    esac
done
"""


class LabError(Exception):
    """The lab could not be built or booted, or the guest died before the command ended."""


class LabTimeout(LabError):
    """The command did not end within its time limit; QEMU was stopped. `output` is what it printed so far."""

    def __init__(self, message: str, output: str):
        super().__init__(message)
        self.output = output


@dataclass(frozen=True)
class LabImage:
    kernel: Path
    initramfs: Path
    release: str  # the kernel release, e.g. 6.1.0-56-amd64


@dataclass(frozen=True)
class LabResult:
    status: int  # the command's exit status
    output: str  # its stdout and stderr (the console lines between the sentinels)
    seconds: float  # from starting QEMU to the end sentinel
    console_log: Path


# --- building ------------------------------------------------------------------------------------


def prepare_lab(cache_dir: Path | str = DEFAULT_CACHE_DIR) -> LabImage:
    """Return the lab's kernel and initramfs, fetching or building whatever is not cached yet."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    kernel_dir = _kernel_dir(cache)
    kernel = next(kernel_dir.glob("vmlinuz-*"))
    return LabImage(kernel, _initramfs(cache, kernel_dir), kernel.name.removeprefix("vmlinuz-"))


def _modules_digest() -> str:
    return hashlib.sha256(" ".join(ROOT_MODULES + LAB_MODULES).encode()).hexdigest()[:8]


def _kernel_dir(cache: Path) -> Path:
    """cache/kernel/PACKAGE-DIGEST/: vmlinuz-RELEASE and modules/NAME.ko with modules/order (load order)."""
    # Any kernel fetched before with the same module list will do: asking apt alone takes over a second.
    cached = sorted((cache / "kernel").glob(f"*-{_modules_digest()}/modules/order"))
    if cached:
        return cached[-1].parent.parent
    package = versioned_kernel_package(KERNEL_METAPACKAGE)
    target = cache / "kernel" / f"{package}-{_modules_digest()}"
    with unpacked_package(package, cache) as unpacked:
        kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise GuestBuildError(f"{package} holds no boot/vmlinuz-*")
        release = kernels[-1].name.removeprefix("vmlinuz-")
        available = {_module_name(p): p for p in (unpacked / "lib" / "modules" / release).rglob("*.ko*")}
        order = load_order(ROOT_MODULES + LAB_MODULES, available)
        building = target.with_name(target.name + ".build")
        (building / "modules").mkdir(parents=True, exist_ok=True)
        os.replace(kernels[-1], building / kernels[-1].name)
        for name in order:
            (building / "modules" / f"{name}.ko").write_bytes(_decompressed(available[name]))
        (building / "modules" / "order").write_text("\n".join(order) + "\n")
        os.replace(building, target)
    return target


def _module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def _decompressed(path: Path) -> bytes:
    """A module's bytes, uncompressed (busybox insmod loads plain .ko files)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        raise GuestBuildError(f"{path.name}: zstd-compressed modules are not supported")
    return data


def modinfo_depends(module: bytes) -> list[str]:
    """The `depends=` list of a kernel module (its .modinfo ELF section)."""
    if module[:4] != b"\x7fELF" or module[4] != 2:
        raise GuestBuildError("not a 64-bit ELF kernel module")
    (shoff,) = struct.unpack_from("<Q", module, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", module, 0x3A)

    def section(index: int) -> tuple[int, int, int]:  # name offset, file offset, size
        base = shoff + index * shentsize
        (name,) = struct.unpack_from("<I", module, base)
        offset, size = struct.unpack_from("<QQ", module, base + 0x18)
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        if module[strtab + name:module.index(b"\0", strtab + name)] == b".modinfo":
            for entry in module[offset:offset + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [d for d in entry[8:].decode().split(",") if d]
            return []
    raise GuestBuildError("kernel module without a .modinfo section")


def load_order(wanted: Sequence[str], available: Mapping[str, Path]) -> list[str]:
    """`wanted` and everything they depend on, each after its dependencies."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise GuestBuildError(f"module dependency cycle: {' -> '.join(path + (name,))}")
        if name not in available:
            raise GuestBuildError(f"module {name} is not in the kernel package (built in, or missing?)")
        for dependency in modinfo_depends(_decompressed(available[name])):
            visit(dependency, path + (name,))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def _initramfs(cache: Path, kernel_dir: Path) -> Path:
    if not BUSYBOX.is_file():
        raise GuestBuildError(f"{BUSYBOX} is missing: install the Debian package busybox-static")
    busybox = BUSYBOX.read_bytes()
    modules = kernel_dir / "modules"
    order = (modules / "order").read_text().split()
    digest = hashlib.sha256()
    for part in (str(LAB_FORMAT).encode(), kernel_dir.name.encode(), INIT_SCRIPT.encode(), MODPROBE_SCRIPT.encode(),
                 busybox):
        digest.update(hashlib.sha256(part).digest())
    target = cache / f"initramfs-{digest.hexdigest()[:16]}.cpio.gz"
    if target.exists():
        return target
    archive = Newc()
    for directory in ("bin", "dev", "proc", "sys", "lab", "lib", "lib/modules"):
        archive.add(directory, stat.S_IFDIR | 0o755)
    archive.add("dev/console", stat.S_IFCHR | 0o600, device=(5, 1))
    archive.add("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode())
    archive.add("bin/busybox", stat.S_IFREG | 0o755, busybox)
    archive.add("lab/modprobe", stat.S_IFREG | 0o755, MODPROBE_SCRIPT.encode())
    for name in order:
        archive.add(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, (modules / f"{name}.ko").read_bytes())
    archive.add("lib/modules/order", stat.S_IFREG | 0o644, "\n".join(order).encode() + b"\n")
    write_gzipped(archive, target)
    return target


def run_script(command: str, cwd: Path, env: Mapping[str, str], token: str) -> str:
    """The script the guest runs after switch_root: the command between two sentinel lines, then poweroff."""
    exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())
    return (
        "#!/bin/sh\n"
        f"{exports}"
        f"cd {shlex.quote(str(cwd))} || echo 'lab: cannot cd to {cwd}'\n"
        f"echo 'LAB-BEGIN {token}'\n"
        f"/bin/sh -c {shlex.quote(command)} </dev/null 2>&1\n"
        "status=$?\n"
        "sync\n"
        f"echo \"LAB-END {token} status=$status\"\n"
        "/bin/busybox poweroff -f\n"
    )


HIDDEN_IN_LAB = (Path("/tmp"), Path("/run"), Path("/var/tmp"), Path("/dev/shm"))  # fresh tmpfs in the lab


def _under(path: Path, roots) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _run_initramfs(image: LabImage, script: str, shares: Sequence[tuple[Path, bool]], path: Path) -> Path:
    """The cached initramfs followed by a small uncompressed archive holding this run's script."""
    archive = Newc()
    archive.add("lab/run.sh", stat.S_IFREG | 0o755, script.encode())
    archive.add("lab/shares", stat.S_IFREG | 0o644,
                "".join(f"{'rw' if writable else 'ro'} {p}\n" for p, writable in shares).encode())
    base = image.initramfs.read_bytes()
    # The kernel skips zeros between archives; an uncompressed one must start 4-byte aligned.
    path.write_bytes(base + b"\0" * (-len(base) % 4) + archive.finish())
    return path


# --- running -------------------------------------------------------------------------------------


def default_env() -> dict[str, str]:
    """What the command's environment starts from: the host's PATH (and PYTHONPATH, if set)."""
    path = os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env = {
        "PATH": f"{path}:/run/lab/bin",  # last: the lab's modprobe stands in only where there is none
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONDONTWRITEBYTECODE": "1",  # the checkout is read-only in the guest
        "PYTHONUNBUFFERED": "1",
        ENV_MARKER: "1",
    }
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def in_lab() -> bool:
    """True when this process runs inside the lab (its command's environment says so)."""
    return os.environ.get(ENV_MARKER) == "1"


def qemu_command(image: LabImage, initramfs: Path, shares: Sequence[tuple[Path, bool]], memory_mib: int,
                 cpus: int) -> list[str]:
    argv = [
        QEMU, "-accel", "tcg", "-cpu", "max", "-nodefaults", "-display", "none", "-no-reboot",
        "-machine", "pc", "-m", f"{memory_mib}M", "-smp", str(cpus),
        "-kernel", str(image.kernel), "-initrd", str(initramfs),
        # zswap would keep pages in RAM instead of sending them to the swap device under test.
        "-append", "console=ttyS0 panic=-1 quiet zswap.enabled=0",
        "-chardev", "stdio,id=serial0,signal=off", "-serial", "chardev:serial0",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ]  # fmt: skip
    for index, (share, writable) in enumerate(shares):
        readonly = "" if writable else ",readonly=on"
        argv += ["-virtfs", f"local,path={share},mount_tag=share{index},security_model=none{readonly},multidevs=remap"]
    return argv


def run_in_lab(
    command: str | Sequence[str],
    *,
    time_limit: float = 300.0,
    memory_mib: int = 2048,
    cpus: int = 2,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    shares: Sequence[Path | str] = (),
    console_log: Path | str | None = None,
    on_line: Callable[[str], None] | None = None,
    image: LabImage | None = None,
) -> LabResult:
    """Boot the lab, run `command` (shell text, or an argv list) in it as root, and return its exit
    status and output. `time_limit` counts from starting QEMU; past it QEMU is stopped and LabTimeout
    raised. `cwd` defaults to this process's working directory, `env` is added to `default_env()`,
    `shares` are host directories mounted writable at the same path (`cwd` is added, read-only, when it
    lies where the lab has a fresh tmpfs, such as /tmp, as the host's root is read-only there). Every console line goes to
    `console_log` (default: a file in a temporary directory that is kept) and to `on_line` as it arrives.
    """
    if not isinstance(command, str):
        command = shlex.join(str(a) for a in command)
    image = image or prepare_lab()
    shares = [(Path(s).resolve(), True) for s in shares]
    for share, _ in shares:
        if not share.is_dir():
            raise LabError(f"share {share} is not a directory")
    cwd = Path(cwd or os.getcwd()).resolve()
    if _under(cwd, HIDDEN_IN_LAB) and not _under(cwd, [share for share, _ in shares]):
        shares.append((cwd, False))  # e.g. a checkout in /tmp, which the lab's fresh tmpfs would hide; read-only
    shares.sort(key=lambda share: len(share[0].parts))  # a share inside another is mounted after it
    token = uuid.uuid4().hex[:12]
    work = Path(tempfile.mkdtemp(prefix="nbdpc-lab-"))
    log_path = Path(console_log) if console_log else work / "console.log"
    script = run_script(command, cwd, {**default_env(), **(env or {})}, token)
    initramfs = _run_initramfs(image, script, shares, work / "initramfs")
    argv = qemu_command(image, initramfs, shares, memory_mib, cpus)
    stderr_path = work / "qemu.stderr"
    collector = _Collector(token, on_line)
    started = time.monotonic()
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                                start_new_session=True)
    try:
        console = Console(proc.stdout, log_path, "lab", on_line=collector.line)
        deadline = started + time_limit
        while not collector.ended.wait(0.2):
            if proc.poll() is not None:  # the guest died: read what it printed last
                console.join()
                break
            if time.monotonic() > deadline:
                raise LabTimeout(f"the lab command did not end within {time_limit:g}s (console: {log_path}): "
                                 f"{command}", collector.output())
        seconds = time.monotonic() - started
        if collector.status is None:
            qemu_err = stderr_path.read_text(errors="replace").strip()
            raise LabError(f"the lab guest stopped before the command ended (QEMU status {proc.poll()}"
                           f"{': ' + qemu_err if qemu_err else ''}); last console lines:\n{console.tail()}")
        try:
            proc.wait(10)  # the guest powers off
        except subprocess.TimeoutExpired:
            pass
        console.join()
        return LabResult(collector.status, collector.output(), seconds, log_path)
    finally:
        _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        initramfs.unlink(missing_ok=True)
        if console_log:  # else the temporary directory keeps the console log
            shutil.rmtree(work, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    """End QEMU by its PID: SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue


class _Collector:
    """Keeps the console lines between the sentinels, and the exit status from the end sentinel.

    `ended` is set at the end sentinel, or when the console closes without one.
    """

    def __init__(self, token: str, on_line: Callable[[str], None] | None):
        self._begin = f"LAB-BEGIN {token}"
        self._end = f"LAB-END {token} status="
        self._on_line = on_line
        self._lines: list[str] = []
        self._inside = False
        self._lock = threading.Lock()
        self.status: int | None = None
        self.ended = threading.Event()

    def line(self, line: str) -> None:
        if self._on_line is not None:
            self._on_line(line)
        with self._lock:
            if line.startswith("LAB-INIT-FAILED"):
                self._lines.append(line)
                self.ended.set()
            elif self._begin in line:
                self._inside = True
            elif self._end in line:
                self.status = int(line.split(self._end, 1)[1].split()[0])
                self._inside = False
                self.ended.set()
            elif self._inside:
                self._lines.append(line)

    def output(self) -> str:
        with self._lock:
            return "\n".join(self._lines)
