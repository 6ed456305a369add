"""A snapshot directory on disk: what `nbd-postcopy snapshot` writes and `nbd-postcopy restore` reads.

    DIR/manifest.json   what the snapshot is: sizes, checksums, the machine it fits, timings (written last)
    DIR/state           QEMU's migration stream with x-ignore-shared: device state only, no RAM
    DIR/ram             guest RAM, sparse: zero pages are holes (read-only)
    DIR/workingset      optional: the guest pages the last restore demanded first (device/workingset.py)

A snapshot is built in a sibling directory (DIR.partial-XXXX) and renamed to DIR once its manifest is
written, so DIR either does not exist or is whole; a directory without manifest.json is not a snapshot.
`load()` checks the manifest and the files' sizes; `verify()` also their SHA-256 checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..common.units import PAGE_SIZE
from ..nbd.zeros import zero_runs

FORMAT = "nbd-postcopy-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
STATE = "state"
RAM = "ram"
WORKINGSET = "workingset"
CHUNK = 1 << 20  # bytes read per call while copying or hashing
ZERO_CHUNK = bytes(CHUNK)


class SnapshotError(Exception):
    """A snapshot directory that cannot be used, or cannot be written: one line saying why."""


@dataclass
class Manifest:
    memdev: str  # the memory backend's id
    machine: dict  # what the restoring QEMU must match: {"type", "ram_bytes", "vcpus"}
    ram: dict  # {"file", "bytes", "data_bytes", "sha256"}
    state: dict  # {"file", "bytes", "sha256"}
    consistency: str = "RAM copied while the VM was stopped"
    qemu: str = ""
    created: str = ""
    timings: dict = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SnapshotError(f"{where} is not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SnapshotError(f"{where} is not an nbd-postcopy snapshot manifest")
        if data.get("version") != VERSION:
            raise SnapshotError(f"{where} has version {data.get('version')!r}; this nbd-postcopy reads {VERSION}")
        try:
            manifest = cls(**{key: data[key] for key in ("memdev", "machine", "ram", "state")},
                           **{key: data[key] for key in ("consistency", "qemu", "created", "timings") if key in data})
            for part, keys in ((manifest.ram, ("file", "bytes", "sha256")), (manifest.state, ("file", "bytes", "sha256")),
                               (manifest.machine, ("type", "ram_bytes"))):
                for key in keys:
                    part[key]  # noqa: B018 (present)
        except (KeyError, TypeError) as exc:
            raise SnapshotError(f"{where} lacks {exc}") from None
        if manifest.machine["ram_bytes"] != manifest.ram["bytes"]:  # QEMU is checked against one, the file the other
            raise SnapshotError(f"{where} is inconsistent: the machine's RAM is {manifest.machine['ram_bytes']} "
                                f"bytes, the RAM file's {manifest.ram['bytes']}")
        return manifest


# --- reading ------------------------------------------------------------------------------------


def load(directory: Path) -> Manifest:
    """The manifest of snapshot `directory`, after checking that its files are there with their sizes."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise SnapshotError(f"{directory} is not a directory")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SnapshotError(f"{directory} is not a snapshot: it has no {MANIFEST} (a snapshot still being "
                            "written has none)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"cannot read {path}: {exc}") from None
    manifest = Manifest.from_json(text, str(path))
    for part in (manifest.ram, manifest.state):
        _check_size(directory / part["file"], part["bytes"])
    return manifest


def verify(directory: Path, manifest: Manifest) -> None:
    """Compare the SHA-256 checksums of the RAM and device state files with the manifest's."""
    for what, part in (("device state", manifest.state), ("RAM", manifest.ram)):
        path = Path(directory) / part["file"]
        if file_sha256(path) != part["sha256"]:
            raise SnapshotError(f"the {what} file {path} does not match its checksum in the manifest: the snapshot "
                                "was changed or damaged; refused")


def _check_size(path: Path, expected: int) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SnapshotError(f"snapshot file {path} is missing ({exc.strerror})") from None
    if size != expected:
        raise SnapshotError(f"snapshot file {path} has {size} bytes, the manifest says {expected}: "
                            f"{'truncated' if size < expected else 'changed'}; refused")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def workingset_comment(manifest: Manifest) -> str:
    """The first line of a snapshot's working-set file: whose RAM its page numbers are about."""
    return f"working set of the snapshot with RAM sha256 {manifest.ram['sha256']}"


# --- writing ------------------------------------------------------------------------------------


@dataclass
class CopyStats:
    bytes: int  # the copy's size
    data_bytes: int  # bytes written (pages that are not all zeros)
    seconds: float


def copy_sparse(source_fd: int, source_offset: int, length: int, target: Path, seek_data: bool = True) -> CopyStats:
    """Copy `length` bytes from `source_fd` at `source_offset` into a new sparse file `target`: only
    pages that are not all zeros are written; the rest stay holes. With `seek_data`, the source's own
    holes (SEEK_DATA/SEEK_HOLE) are skipped without reading them."""
    started = time.monotonic()
    written = 0
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(target, "wb") as out:
        out_fd = out.fileno()
        for start, end in _data_extents(source_fd, source_offset, length, seek_data):
            offset = start
            while offset < end:
                count = min(CHUNK, end - offset)
                got = os.preadv(source_fd, [view[:count]], source_offset + offset)
                if got != count:
                    raise SnapshotError(f"short read of guest RAM at offset {offset} ({got} of {count} bytes)")
                chunk = buffer if count == CHUNK else buffer[:count]  # (bytes-like compares are memcmp)
                if chunk != ZERO_CHUNK[:count]:
                    written += _write_nonzero_pages(out_fd, chunk, offset)
                offset += count
        os.ftruncate(out_fd, length)
    return CopyStats(length, written, time.monotonic() - started)


def _data_extents(fd: int, base: int, length: int, seek_data: bool) -> list[tuple[int, int]]:
    """[start, end) ranges (relative to `base`) that may hold data: all of it unless `seek_data`."""
    if not seek_data:
        return [(0, length)]
    extents = []
    offset = 0
    while offset < length:
        try:
            start = os.lseek(fd, base + offset, os.SEEK_DATA) - base
        except OSError:  # ENXIO: no data after offset
            break
        if start >= length:
            break
        end = min(os.lseek(fd, base + start, os.SEEK_HOLE) - base, length)
        extents.append((start - start % PAGE_SIZE, end))
        offset = end
    return extents


def _write_nonzero_pages(fd: int, chunk: bytearray, offset: int) -> int:
    """Write the runs of pages of `chunk` that are not all zeros at `offset` + their place; returns bytes written."""
    view = memoryview(chunk)
    written = 0
    for start, end, zero in zero_runs(chunk):
        if not zero:
            written += os.pwrite(fd, view[start:end], offset + start)
    return written


def begin(directory: Path) -> Path:
    """A new empty directory beside `directory` to build the snapshot in; SnapshotError if `directory`
    already holds something."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise SnapshotError(f"{directory} already exists and is not empty: remove it or choose another --to")
    directory.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{directory.name}.partial-", dir=directory.parent))


def finish(partial: Path, directory: Path, manifest: Manifest) -> None:
    """Flush the files to disk, write the manifest last, make the files read-only, and rename the whole
    directory into place. (The copies are flushed here, not while they are written: that is while the VM
    is paused.)"""
    for name in (RAM, STATE):
        os.chmod(partial / name, 0o444)
        _fsync(partial / name)
    path = partial / MANIFEST
    with open(path, "w") as out:
        out.write(manifest.to_json())
        out.flush()
        os.fsync(out.fileno())
    _fsync(partial, os.O_DIRECTORY)
    try:
        os.rename(partial, directory)  # replaces an empty directory, fails on a full one
    except OSError as exc:
        raise SnapshotError(f"cannot move the snapshot into {directory}: {exc.strerror}") from None
    _fsync(Path(directory).parent, os.O_DIRECTORY)


def abandon(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)


def _fsync(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
