"""Thin wrappers over the Linux interfaces staging and completion drive (x86_64, run as root).

Syscalls (through ctypes): pidfd_open, process_madvise, process_vm_readv/writev, fallocate (hole
punching), an unlocked read-only file mapping (mmap, munlock, mprotect, mincore). Unix socket paths: removing
a stale one before listening.
/proc and /sys readers: maps, pagemap, kpageflags, kpagecgroup, swaps, vmstat, zswap, process liveness
and VmLck, mounts, loop devices. CPU lists and the calling thread's affinity.
Every failure is an OSError whose message says which call on which process or file failed.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import select
import signal
import socket
import stat
import subprocess
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .units import PAGE_SIZE

MADV_WILLNEED = 3
MADV_PAGEOUT = 21

SYS_PIDFD_OPEN = 434
SYS_PROCESS_MADVISE = 440
SYS_MOVE_PAGES = 279  # x86_64
MPOL_MF_MOVE = 1 << 1
IOV_MAX = 1024
# The kernel caps one vectored transfer at MAX_RW_COUNT (INT_MAX rounded down to a page).
MAX_RW_COUNT = 0x7FFFF000

PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_PFN_MASK = (1 << 55) - 1
KPF_MMAP = 11  # /proc/kpageflags bits (Documentation/admin-guide/mm/pagemap.rst)
KPF_SWAPCACHE = 13
KPF_SWAPBACKED = 14

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
MADV_POPULATE_READ = 22  # Linux >= 5.14
_MAP_FAILED = ctypes.c_void_p(-1).value
PROT_NONE = 0  # (the mmap module has PROT_READ and PROT_WRITE only)


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _os_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def pidfd_open(pid: int) -> int:
    """A pidfd for `pid`; OSError(ESRCH) with a clear message when the process does not exist."""
    fd = _libc.syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            raise OSError(err, f"process {pid} does not exist")
        raise _os_error(f"pidfd_open({pid})")
    return fd


def process_madvise(pidfd: int, address: int, length: int, advice: int) -> None:
    """Apply `advice` to [address, address+length) of the process behind `pidfd`, the whole range."""
    done = 0
    while done < length:
        part = min(length - done, MAX_RW_COUNT)
        iov = IoVec(address + done, part)
        n = _libc.syscall(
            SYS_PROCESS_MADVISE, ctypes.c_int(pidfd), ctypes.byref(iov), ctypes.c_size_t(1),
            ctypes.c_int(advice), ctypes.c_uint(0),
        )
        if n < 0:
            raise _os_error(f"process_madvise(advice={advice}) on {address + done:#x}+{part:#x}")
        if n == 0:
            raise OSError(errno.EIO, f"process_madvise(advice={advice}) made no progress at {address + done:#x}")
        done += n


def _buffer_address(buf: bytes | bytearray | memoryview) -> int:
    """Address of the memory behind bytes or a writable buffer (which must not be resized meanwhile)."""
    if isinstance(buf, bytes):
        return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _vm_transfer(func, what: str, pid: int, local: bytes | bytearray | memoryview, address: int) -> None:
    length = len(local)
    base = _buffer_address(local)
    done = 0
    while done < length:
        part = min(length - done, MAX_RW_COUNT)
        liov = IoVec(base + done, part)
        riov = IoVec(address + done, part)
        n = func(ctypes.c_int(pid), ctypes.byref(liov), ctypes.c_ulong(1), ctypes.byref(riov), ctypes.c_ulong(1),
                 ctypes.c_ulong(0))
        if n < 0:
            raise _os_error(f"{what} of {part} bytes at {address + done:#x} in process {pid}")
        if n == 0:
            raise OSError(errno.EFAULT, f"{what} at {address + done:#x} in process {pid} transferred nothing")
        done += n


def process_vm_writev(pid: int, data: bytes | bytearray | memoryview, address: int) -> None:
    """Write `data` into process `pid` at `address` (all of it, or OSError)."""
    _vm_transfer(_libc.process_vm_writev, "process_vm_writev", pid, data, address)


def process_vm_readv(pid: int, buffer: bytearray | memoryview, address: int) -> None:
    """Fill `buffer` from process `pid` at `address`; faults swapped pages in like a touch would."""
    _vm_transfer(_libc.process_vm_readv, "process_vm_readv", pid, buffer, address)


def write_proc_mem(pid: int, data: bytes | bytearray | memoryview, address: int) -> None:
    """Write through /proc/PID/mem: the fallback when process_vm_writev is not allowed."""
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += os.pwrite(mem.fileno(), view[done:], address + done)


# --- /proc/PID/maps --------------------------------------------------------------------------------


_drain_page = mmap.mmap(-1, PAGE_SIZE)  # one page of our own, for drain_lru_batches()


def drain_lru_batches() -> bool:
    """Drain every CPU's LRU batches (folio batches hold a reference to each page added to or moved on
    an LRU list lately, which keeps such a page from being reclaimed), as page migration does before it
    starts: move_pages(2) of one page of our own to the node it is on. False where move_pages is not
    available (a kernel without NUMA)."""
    _drain_page[0] = 1  # present
    page = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(_drain_page)))
    status = ctypes.c_int(-1)
    if _libc.syscall(SYS_MOVE_PAGES, 0, ctypes.c_ulong(1), ctypes.byref(page), None, ctypes.byref(status), 0) != 0:
        return False  # status query (no drain): ENOSYS without NUMA
    node = ctypes.c_int(max(status.value, 0))
    return _libc.syscall(SYS_MOVE_PAGES, 0, ctypes.c_ulong(1), ctypes.byref(page), ctypes.byref(node),
                         ctypes.byref(status), MPOL_MF_MOVE) == 0


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset + length) of a file: it reads as zeros, the size stays."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise _os_error(f"cannot punch a hole of {length} bytes at {offset}")


def remove_stale_socket(path: str) -> None:
    """Before listening on `path`: unlink a socket left there that nobody listens on. A live socket
    raises FileExistsError with errno EADDRINUSE, any other file FileExistsError (EEXIST)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
    raise FileExistsError(errno.EADDRINUSE, f"{path} is in use by another process")


class FileView:
    """A read-only shared mapping of a whole file that is never locked in memory, even in a process
    that called mlockall(MCL_FUTURE) (nbdkit --swap): the kernel neither reads the file in when it is
    mapped nor pins the pages read through it. Copying out of it is a plain memcpy, several times
    cheaper here than pread()'s copy from the page cache. Call populate() on a range before copying
    out of it: a page fault that has to read the disk must not happen while the copy holds the GIL.
    The source server uses it too, serving pages that resident() finds in memory straight from `view`."""

    def __init__(self, fd: int, length: int):
        self.length = length
        # Mapped inaccessible first (MCL_FUTURE would populate and lock an accessible mapping at once),
        # unlocked, and only then made readable.
        address = _libc.mmap(None, length, PROT_NONE, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            raise _os_error(f"mmap of {length} bytes")
        try:
            if _libc.munlock(address, length) != 0:
                raise _os_error("munlock")
            if _libc.mprotect(address, length, mmap.PROT_READ) != 0:
                raise _os_error("mprotect")
        except OSError:
            _libc.munmap(address, length)
            raise
        self.address = address
        self.view = memoryview((ctypes.c_char * length).from_address(address)).cast("B")
        self._vector = ctypes.create_string_buffer(0)  # mincore's answer, one byte a page; grown on demand

    def resident(self, offset: int, length: int) -> bool:
        """True if every page of [offset, offset + length) is in memory (mincore), so that reading it
        faults nothing in; False if not, or if mincore failed. Not thread-safe: one answer vector is reused."""
        first = offset - offset % PAGE_SIZE
        pages = (offset + length - first + PAGE_SIZE - 1) // PAGE_SIZE
        if pages > len(self._vector):
            self._vector = ctypes.create_string_buffer(pages)
        if _libc.mincore(self.address + first, pages * PAGE_SIZE, self._vector):
            return False
        return b"\0" not in ctypes.string_at(self._vector, pages)

    def populate(self, offset: int, length: int) -> bool:
        """Fault [offset, offset + length) in (ctypes releases the GIL meanwhile). False if that failed,
        an I/O error for instance: then read that range with pread(), as touching it could raise SIGBUS."""
        return _libc.madvise(self.address + offset, length, MADV_POPULATE_READ) == 0

    def close(self) -> None:
        """Unmap; every slice of `view` must be gone (a later access would crash the process)."""
        if self.address:
            self.view.release()
            _libc.munmap(self.address, self.length)
            self.address = 0


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    inode: int
    path: str

    @property
    def anonymous_private_writable(self) -> bool:
        # Anonymous: no backing inode; heap and [stack] count, special mappings like [vvar] do not.
        return (self.perms[0:2] == "rw" and self.perms[3] == "p" and self.inode == 0
                and (self.path in ("", "[heap]", "[stack]") or self.path.startswith("[anon:")))


def read_maps(pid: int) -> list[Mapping]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise OSError(errno.ESRCH, f"process {pid} does not exist") from None
    except OSError as exc:
        raise OSError(exc.errno, f"cannot read /proc/{pid}/maps: {exc.strerror}") from None
    maps = []
    for line in lines:
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        path = fields[5].strip() if len(fields) > 5 else ""
        maps.append(Mapping(start, end, fields[1], int(fields[4]), path))
    return maps


def uncovered_ranges(pid: int, address: int, length: int) -> list[tuple[int, int]]:
    """Parts of [address, address+length) that are NOT inside an anonymous private writable mapping."""
    holes = []
    pos, end = address, address + length
    for m in read_maps(pid):
        if m.end <= pos or not m.anonymous_private_writable:
            continue
        if m.start >= end:
            break
        if m.start > pos:
            holes.append((pos, m.start))
        pos = max(pos, m.end)
        if pos >= end:
            break
    if pos < end:
        holes.append((pos, end))
    return holes


# --- pagemap and physical page flags ----------------------------------------------------------------


def is_present(entry: int) -> bool:
    return bool(entry & PM_PRESENT)


def is_swapped(entry: int) -> bool:
    return bool(entry & PM_SWAP)


def swap_type(entry: int) -> int:
    return entry & 0x1F


def swap_offset(entry: int) -> int:
    return (entry >> 5) & ((1 << 50) - 1)


def pfn(entry: int) -> int:
    return entry & PM_PFN_MASK


# Byte-wise views of pagemap entries (little endian): the top byte holds bits 63 (present) and 62 (swap),
# the low byte the swap type. bytes.translate masks them in C, which keeps huge ranges fast.
_PRESENT_SWAP_BITS = bytes(b & 0xC0 for b in range(256))
_SWAP_TYPE_BITS = bytes(b & 0x1F for b in range(256))


def all_swapped_out(entries: array) -> bool:
    """Whether every entry is a swap entry (bit 62) and none is present (bit 63)."""
    top = entries.tobytes()[7::8].translate(_PRESENT_SWAP_BITS)
    return top.count(0x40) == len(entries)


def common_swap_type(entries: array) -> int | None:
    """The swap type all entries share, or None if they differ (meaningful for swap entries only)."""
    if not entries:
        return None
    low = entries.tobytes()[0::8].translate(_SWAP_TYPE_BITS)
    return low[0] if low.count(low[0]) == len(low) else None


class Pagemap:
    """Reads /proc/PID/pagemap entries (root sees PFNs and swap entries)."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise OSError(errno.ESRCH, f"process {pid} does not exist") from None

    def entries(self, address: int, npages: int) -> array:
        """One 64-bit entry per page from `address` on."""
        want = npages * 8
        data = os.pread(self._fd, want, (address // PAGE_SIZE) * 8)
        if len(data) != want:
            raise OSError(errno.EIO, f"short read of /proc/{self.pid}/pagemap at {address:#x}")
        out = array("Q")
        out.frombytes(data)
        return out

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "Pagemap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


KPAGE_READ_GAP = 8  # ascending PFNs this close together are read in one pread (measured: fewer syscalls)


def _read_kpage_table(path: str, pfns: Sequence[int]) -> array:
    """One 64-bit entry of a /proc/kpage* table per PFN, in the order given.

    A process's frames come mostly in ascending runs, so each run is one pread.
    """
    out = array("Q", bytes(8 * len(pfns)))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        i, n = 0, len(pfns)
        while i < n:
            j = i
            while j + 1 < n and 0 < pfns[j + 1] - pfns[j] <= KPAGE_READ_GAP:
                j += 1
            first = pfns[i]
            values = array("Q")
            values.frombytes(os.pread(fd, (pfns[j] - first + 1) * 8, first * 8))
            for k in range(i, j + 1):
                out[k] = values[pfns[k] - first]
            i = j + 1
    finally:
        os.close(fd)
    return out


def page_flags(pfns: Sequence[int]) -> array:
    """/proc/kpageflags for each PFN, in the order given."""
    return _read_kpage_table("/proc/kpageflags", pfns)


def page_cgroups(pfns: Sequence[int]) -> array:
    """/proc/kpagecgroup for each PFN, in the order given: the inode number of the memcg it is charged to."""
    return _read_kpage_table("/proc/kpagecgroup", pfns)


def _runs(sorted_values: list[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs in a sorted list, as (start, length)."""
    i = 0
    while i < len(sorted_values):
        j = i
        while j + 1 < len(sorted_values) and sorted_values[j + 1] == sorted_values[j] + 1:
            j += 1
        yield sorted_values[i], j - i + 1
        i = j + 1


def page_runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Page indices grouped into consecutive runs (start, count)."""
    return list(_runs(sorted(indices)))


# --- swap areas and counters ------------------------------------------------------------------------


@dataclass(frozen=True)
class SwapArea:
    """One row of /proc/swaps (sizes in KiB, as the kernel prints them)."""

    filename: str
    kind: str
    size_kib: int
    used_kib: int
    priority: int

    @property
    def free_pages(self) -> int:
        return (self.size_kib - self.used_kib) * 1024 // PAGE_SIZE

    @property
    def size_pages(self) -> int:
        return self.size_kib * 1024 // PAGE_SIZE


def read_swaps() -> list[SwapArea]:
    with open("/proc/swaps") as f:
        return parse_swaps(f.read())


def parse_swaps(text: str) -> list[SwapArea]:
    """The rows of /proc/swaps text (the first line is the header)."""
    areas = []
    for row in text.splitlines()[1:]:
        # The filename may contain spaces; the four other columns never do.
        name, kind, size, used, prio = row.rsplit(None, 4)
        areas.append(SwapArea(name.replace("\\040", " ").rstrip(), kind, int(size), int(used), int(prio)))
    return areas


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same block device (by device number) or the same file."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    if stat.S_ISBLK(sa.st_mode) and stat.S_ISBLK(sb.st_mode):
        return sa.st_rdev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def find_swap(device: str) -> SwapArea | None:
    """The active swap area backed by `device` (any path naming the same block device or file)."""
    for area in read_swaps():
        if same_file(area.filename, device):
            return area
    return None


def vmstat(*names: str) -> dict[str, int]:
    """Counters from /proc/vmstat (all of them when no names are given)."""
    values = {}
    with open("/proc/vmstat") as f:
        for line in f:
            key, value = line.split()
            if not names or key in names:
                values[key] = int(value)
    missing = set(names) - values.keys()
    if missing:
        raise OSError(errno.ENOENT, f"/proc/vmstat has no counter {', '.join(sorted(missing))}")
    return values


ZSWAP_SWITCH = "/sys/module/zswap/parameters/enabled"


def zswap_setting(switch: str = ZSWAP_SWITCH) -> str | None:
    """What the zswap switch reads ("Y", "N", ...), or None when it cannot be read (no zswap)."""
    try:
        with open(switch) as f:
            return f.read().strip()
    except OSError:
        return None


def zswap_enabled(switch: str = ZSWAP_SWITCH) -> bool:
    """Whether zswap is on: it would keep swapped-out pages compressed in RAM, away from the device."""
    return (zswap_setting(switch) or "")[:1] in ("Y", "y", "1")


# --- processes, mounts, loop devices -----------------------------------------------------------------


def terminate(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM a child we started, SIGKILL it if it is still there after `timeout`, and reap it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        reap(process, timeout)


def reap(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Reap a child we started and already asked to stop, SIGKILLing it if it is still there after `timeout`."""
    if not wait_child_exit(process, timeout):
        process.kill()
    process.wait()


def wait_child_exit(process: subprocess.Popen, timeout: float) -> bool:
    """Wait until our child `process` has exited (True) or `timeout` seconds have passed (False), waking the
    moment it exits: Popen.wait(timeout) polls with sleeps that double up to 50 ms, which cost `migrate`
    up to 30 ms of its time to release the source. The child is not reaped here (Popen.wait does that)."""
    if process.poll() is not None:  # reaped (its pid may belong to another process by now)
        return True
    try:
        pidfd = os.pidfd_open(process.pid)  # an unreaped child's pid cannot be reused
    except OSError:  # no pidfd on this kernel
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def process_matches(pid: int | None, needle: str) -> bool:
    """PID is a live process (not a zombie) whose command line, arguments joined by spaces, contains `needle`."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return False
    return state != "Z" and needle in cmdline


def wait_process_gone(pid: int, needle: str, timeout: float) -> bool:
    """Wait until process_matches(pid, needle) is false; False if it still is after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while process_matches(pid, needle):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def vm_locked_kib(pid: int) -> int | None:
    """The process's locked memory (VmLck in /proc/PID/status), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _unescape_mount_field(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[str]:
    """Every mount point, as /proc/mounts lists them."""
    with open("/proc/mounts") as f:
        return [_unescape_mount_field(line.split()[1]) for line in f]


def is_mounted(path: str | os.PathLike) -> bool:
    """Whether something is mounted on `path` (exactly that path)."""
    return str(path) in mount_points()


def loop_backing_file(device: str) -> str | None:
    """The file behind loop device `device` (/dev/loopN), or None when it is not a bound loop device."""
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/backing_file") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def loops_backed_by(path: str) -> list[str]:
    """Every loop device (/dev/loopN) whose backing file is `path`."""
    found = []
    for entry in sorted(os.listdir("/sys/block")):
        if entry.startswith("loop") and loop_backing_file(entry) == path:
            found.append(f"/dev/{entry}")
    return found


def read_direct(path: str, offset: int, length: int = PAGE_SIZE) -> bytes:
    """Read from a block device or file with O_DIRECT, so no page cache can answer instead of the device."""
    buf = mmap.mmap(-1, length)  # page aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        n = os.preadv(fd, [buf], offset)
        if n != length:
            raise OSError(errno.EIO, f"short O_DIRECT read of {path} at {offset}: {n} of {length} bytes")
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (for a listener started right after)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# --- CPU affinity -------------------------------------------------------------------------------------


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPUs in the kernel's list format ("1", "0-3,6"), as taskset -c and cpuset.cpus take them. The
    CPUs must be ones this process may run on (so that a typo fails here, not as an empty affinity)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{text!r} is not a CPU list (e.g. 1, or 0-3,6)")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"{part.strip()!r}: the range runs backwards")
        cpus.update(range(low, high + 1))
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise ValueError(f"CPU {format_cpu_list(cpus - allowed)} is not one this process may use "
                         f"({format_cpu_list(allowed)})")
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The kernel's list format: {0, 1, 2, 5} -> "0-2,5"."""
    return ",".join(str(start) if count == 1 else f"{start}-{start + count - 1}" for start, count in _runs(sorted(cpus)))


def pin_this_thread(cpus: frozenset[int]) -> None:
    """Run the calling thread (not the whole process) on `cpus` only."""
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        raise OSError(exc.errno, f"sched_setaffinity to CPUs {format_cpu_list(cpus)}: {exc.strerror}") from None
