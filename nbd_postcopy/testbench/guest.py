"""The test guest: a Debian cloud kernel plus an initramfs that runs the memory checker (data/memcheck.c).

The kernel comes from the Debian package behind `linux-image-cloud-amd64`, downloaded with
`apt-get download` and unpacked with `dpkg -x` (never installed on the host). The initramfs holds
busybox, an /init script and memcheck compiled with `gcc -static`. Both are cached under `cache_dir`;
the initramfs by a hash of its inputs, so a re-run is instant and an edit to memcheck.c rebuilds it.

This module also knows memcheck's output: `parse_console_line` turns a serial console line into an
event, and `expected_page` reproduces the pattern of one page (for tests that look for or corrupt a
guest page from the host).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import re
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..common.units import PAGE_SIZE

DEFAULT_CACHE_DIR = Path("/var/cache/nbd-postcopy/guest")
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
INITRAMFS_FORMAT = 1  # bump when the layout below changes, to invalidate cached images

INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
echo "INIT starting memcheck"
/bin/memcheck
echo "INIT memcheck exited with status $?"
poweroff -f
"""


class GuestBuildError(Exception):
    """The guest kernel or initramfs could not be prepared; the message says why and what to do."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initramfs: Path


def prepare_guest(cache_dir: Path | str = DEFAULT_CACHE_DIR) -> GuestImage:
    """Return the guest kernel and initramfs, fetching or building whatever is not cached yet."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    return GuestImage(kernel=_kernel(cache), initramfs=_initramfs(cache))


# --- kernel ------------------------------------------------------------------------------------


def _kernel(cache: Path) -> Path:
    # Any kernel fetched before will do: asking apt alone takes over a second.
    cached = sorted((cache / "kernel").glob("*/vmlinuz-*"))
    if cached:
        return cached[-1]
    package = versioned_kernel_package(KERNEL_METAPACKAGE)
    kernel_dir = cache / "kernel" / package
    with unpacked_package(package, cache) as unpacked:
        found = sorted((unpacked / "boot").glob("vmlinuz-*"))
        if not found:
            raise GuestBuildError(f"{package} holds no boot/vmlinuz-*")
        kernel_dir.mkdir(parents=True, exist_ok=True)
        target = kernel_dir / found[-1].name
        os.replace(found[-1], target)  # same filesystem: the temp dir is inside the cache
    return target


def versioned_kernel_package(metapackage: str) -> str:
    """The concrete package a kernel metapackage depends on, e.g. linux-image-6.1.0-56-cloud-amd64."""
    out = run(["apt-cache", "depends", metapackage], f"asking apt-cache about {metapackage}")
    match = re.search(r"^\s*Depends:\s*(linux-image-\S+)", out, re.MULTILINE)
    if not match:
        raise GuestBuildError(
            f"apt-cache depends {metapackage} names no linux-image-* package "
            f"(is this Debian with its package lists? try 'apt-get update'):\n{out.strip()}"
        )
    return match.group(1)


def _versioned_kernel_package() -> str:
    return versioned_kernel_package(KERNEL_METAPACKAGE)


@contextlib.contextmanager
def unpacked_package(package: str, cache: Path) -> Iterator[Path]:
    """Download `package` with apt-get and unpack it (dpkg -x) into a temporary directory inside
    `cache` (so files can be moved out of it with os.replace); yields the unpacked root."""
    with tempfile.TemporaryDirectory(dir=cache, prefix="download-") as tmp:
        deb = _download(package, Path(tmp))
        unpacked = Path(tmp) / "root"
        run(["dpkg", "-x", str(deb), str(unpacked)], f"unpacking {deb.name}")
        yield unpacked


def _download(package: str, into: Path) -> Path:
    # _apt cannot write into a private temp dir: let apt download as root instead of warning.
    argv = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package]
    try:
        run(argv, f"downloading {package}", cwd=into)
    except GuestBuildError:
        run(["apt-get", "update", "-q"], "refreshing the package lists (apt-get update)")
        run(argv, f"downloading {package} (after apt-get update)", cwd=into)
    debs = list(into.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise GuestBuildError(f"apt-get download {package} left {len(debs)} .deb files in {into}")
    return debs[0]


# --- initramfs ---------------------------------------------------------------------------------


def memcheck_source() -> bytes:
    return resources.files(__package__).joinpath("data/memcheck.c").read_bytes()


def build_memcheck(output: Path) -> Path:
    """Compile memcheck.c into a static binary at `output`."""
    with tempfile.TemporaryDirectory(prefix="memcheck-") as tmp:
        source = Path(tmp) / "memcheck.c"
        source.write_bytes(memcheck_source())
        run(["gcc", "-static", "-O2", "-Wall", "-o", str(output), str(source)], "compiling memcheck.c")
    return output


def _initramfs(cache: Path) -> Path:
    if not BUSYBOX.is_file():
        raise GuestBuildError(f"{BUSYBOX} is missing: install the Debian package busybox-static")
    busybox = BUSYBOX.read_bytes()
    digest = hashlib.sha256()
    for part in (str(INITRAMFS_FORMAT).encode(), INIT_SCRIPT.encode(), memcheck_source(), busybox):
        digest.update(hashlib.sha256(part).digest())
    target = cache / f"initramfs-{digest.hexdigest()[:16]}.cpio.gz"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp:
        memcheck = build_memcheck(Path(tmp) / "memcheck").read_bytes()
        archive = Newc()
        for directory in ("bin", "dev", "proc", "sys", "tmp"):
            archive.add(directory, stat.S_IFDIR | 0o755)
        archive.add("dev/console", stat.S_IFCHR | 0o600, device=(5, 1))
        archive.add("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode())
        archive.add("bin/busybox", stat.S_IFREG | 0o755, busybox)
        archive.add("bin/memcheck", stat.S_IFREG | 0o755, memcheck)
        write_gzipped(archive, target)
    return target


def write_gzipped(archive: Newc, target: Path) -> None:
    """Write the finished archive gzipped to `target`, atomically (a partial file never has its name)."""
    part = target.with_name(target.name + ".part")
    with open(part, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(archive.finish())
    os.replace(part, target)


class Newc:
    """A minimal writer of the "newc" cpio format the kernel unpacks into its initial rootfs."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", device: tuple[int, int] = (0, 0)) -> None:
        self._entry(name, mode, data, device)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", (0, 0))
        return self._out.getvalue()

    def _entry(self, name: str, mode: int, data: bytes, device: tuple[int, int]) -> None:
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, device[0], device[1], len(encoded), 0)
        self._ino += 1
        self._out.write(b"070701" + "".join(f"{v:08x}" for v in fields).encode() + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))


def run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a build step; its failure becomes a GuestBuildError that quotes the tool's stderr."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise GuestBuildError(f"{what}: {argv[0]} is not installed") from None
    if done.returncode != 0:
        raise GuestBuildError(f"{what} failed ({' '.join(argv)}, exit {done.returncode}):\n{done.stderr.strip()}")
    return done.stdout


# --- memcheck's pattern and console lines ------------------------------------------------------

_MASK = (1 << 64) - 1
_STEP = 0x9E3779B97F4A7C15


def _mix(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def expected_page(seed: int, page: int, generation: int = 0) -> bytes:
    """The 4 KiB memcheck writes at buffer page `page` (mirrors fill_page in memcheck.c)."""
    base = _mix(seed ^ _mix(page ^ _mix((generation + _STEP) & _MASK))) | 1
    words = [(base + i * _STEP) & _MASK for i in range(PAGE_SIZE // 8)]
    return struct.pack(f"<{len(words)}Q", *words)


@dataclass(frozen=True)
class Heartbeat:
    counter: int
    guest_time: float  # seconds since memcheck started, by the guest's clock
    host_time: float  # time.monotonic() on the host when the line arrived


@dataclass(frozen=True)
class PassOk:
    number: int
    host_time: float


@dataclass(frozen=True)
class Failure:
    line: str  # a "FAIL ..." line: one wrong page, or a pass summary
    host_time: float


@dataclass(frozen=True)
class Started:
    mib: int
    pages: int
    seed: int
    mode: str
    host_time: float


ConsoleEvent = Heartbeat | PassOk | Failure | Started

_HEARTBEAT = re.compile(r"HEARTBEAT (\d+) t=(\d+\.\d+)")
_OK = re.compile(r"\bOK pass=(\d+)")
_FAIL = re.compile(r"\bFAIL .*")
_START = re.compile(r"MEMCHECK start mib=(\d+) pages=(\d+) seed=(\d+) mode=(\w+)")


def parse_console_line(line: str, host_time: float) -> ConsoleEvent | None:
    """The memcheck event in one console line, or None. Tolerates kernel messages mixed into the line."""
    if m := _HEARTBEAT.search(line):
        return Heartbeat(int(m.group(1)), float(m.group(2)), host_time)
    if m := _OK.search(line):
        return PassOk(int(m.group(1)), host_time)
    if m := _FAIL.search(line):
        return Failure(m.group(0), host_time)
    if m := _START.search(line):
        return Started(int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4), host_time)
    return None
