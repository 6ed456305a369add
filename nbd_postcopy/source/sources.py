"""Where the source server reads guest RAM from: a file or a range of another process's memory.

Both kinds answer `read(offset, length)` and `extents(offset, length)`, the base:allocation view that
reports all-zero 4 KiB pages as holes so that a client can skip them.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..common.linux import FileView
from ..nbd.zeros import zero_runs
from ..nbd.wire import StateFlag

ZERO_STATE = int(StateFlag.HOLE | StateFlag.ZERO)
MAX_EXTENTS = 1024  # extents in one block status answer
MAX_SCAN = 32 * 1024 * 1024  # bytes one block status answer covers at most; the client asks again for the rest
# Bytes of data (not holes) one block status answer reads and scans for zero pages: the scan runs on the
# server's event loop, so this bounds how long a demand read can wait behind it (~1 ms, not ~10 ms).
MAX_SCAN_DATA = 2 * 1024 * 1024


class SourceOpenError(Exception):
    """The source cannot be opened; the message says why, for the user."""


class Source:
    """Base of the sources: size, reads, and zero-page extents computed from reads."""

    size: int
    description: str

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) runs from `offset`: zero pages are HOLE|ZERO, the rest 0. May cover less."""
        return _merge(self._scan(offset, offset + min(length, MAX_SCAN)))

    def _scan(self, start: int, end: int) -> list[tuple[int, int]]:
        end = min(end, start + MAX_SCAN_DATA)
        return _zero_extents(self.read(start, end - start))


def _zero_extents(data) -> list[tuple[int, int]]:
    return [(stop - begin, ZERO_STATE if zero else 0) for begin, stop, zero in zero_runs(data)]


def _merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for length, flags in extents:
        if merged and merged[-1][1] == flags:
            merged[-1] = (merged[-1][0] + length, flags)
        elif len(merged) == MAX_EXTENTS:
            break
        else:
            merged.append((length, flags))
    return merged


class FileSource(Source):
    """A file or block device, e.g. a QEMU memory-backend-file on /dev/shm with share=on.

    Large ranges whose pages are all in memory are served straight from a read-only mapping, uncopied
    (mincore tells). Small ones, and ranges with pages not in memory, are read with pread: a read fault on a hole of a shmem file would
    allocate the page, and untouched guest RAM is exactly such a hole, while pread returns its zeros
    without allocating. Block status skips holes with SEEK_DATA and scans the rest for zero pages.
    (SEEK_HOLE is avoided: on shmem it walks every page up to the next hole, often the end of the file.)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise SourceOpenError(f"source file {self.path} is a directory; give the file holding guest RAM")
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceOpenError(f"cannot open source file {self.path}: {exc.strerror}") from exc
        try:
            self.size = os.lseek(self._fd, 0, os.SEEK_END)  # also right for block devices
            if self.size == 0:
                raise SourceOpenError(f"source file {self.path} is empty")
            self._map = FileView(self._fd, self.size)
        except OSError as exc:
            os.close(self._fd)
            raise SourceOpenError(f"cannot map source file {self.path}: {exc.strerror or exc}") from exc
        except SourceOpenError:
            os.close(self._fd)
            raise
        self.description = f"file {self.path}"

    def read(self, offset: int, length: int) -> bytes | memoryview:
        if length >= _MAP_READ and self._map.resident(offset, length):
            return self._map.view[offset : offset + length]
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise OSError(f"short read of {self.path} at {offset} (the file shrank?)")
        return data

    def _scan(self, start: int, end: int) -> list[tuple[int, int]]:
        extents: list[tuple[int, int]] = []
        pos = start
        scanned = 0
        while pos < end and len(extents) < MAX_EXTENTS and scanned < MAX_SCAN_DATA:
            try:
                data_at = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:  # ENXIO: a hole up to the end; otherwise no SEEK_DATA: scan it all
                data_at = self.size if exc.errno == errno.ENXIO else pos
            if data_at > pos:
                stop = min(data_at, end)
                extents.append((stop - pos, ZERO_STATE))
            else:
                stop = min(pos + _SCAN_STEP, end)
                extents += _zero_extents(self.read(pos, stop - pos))
                scanned += stop - pos
            pos = stop
        return extents

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


_SCAN_STEP = 512 * 1024  # after this much data, look for a hole to skip again
_MAP_READ = 64 * 1024  # smaller reads copy with pread, cheaper than asking mincore


class ProcessSource(Source):
    """A range of another process's address space, read with pread on /proc/PID/mem."""

    def __init__(self, pid: int, address: int, length: int):
        if length <= 0:
            raise SourceOpenError(f"--length must be positive, got {length}")
        if not Path(f"/proc/{pid}").is_dir():
            raise SourceOpenError(f"no process with pid {pid}")
        path = f"/proc/{pid}/mem"
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceOpenError(f"cannot open {path}: {exc.strerror} (needs root or ptrace rights)") from exc
        self.pid, self.address, self.size = pid, address, length
        self.description = f"pid {pid} memory {address:#x}+{length:#x}"
        for probe in {0, max(0, length - 1)}:
            try:
                os.pread(self._fd, 1, address + probe)
            except OSError as exc:
                os.close(self._fd)
                raise SourceOpenError(
                    f"cannot read {path} at {address + probe:#x}: {exc.strerror} "
                    f"(is {address:#x}+{length:#x} mapped in pid {pid}?)") from exc

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, self.address + offset)
        if len(data) != length:
            raise OSError(f"short read of pid {self.pid} memory at {self.address + offset:#x}")
        return data

    def close(self) -> None:
        os.close(self._fd)
