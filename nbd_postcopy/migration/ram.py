"""Locate guest RAM inside a running QEMU process: the host mapping of a memory backend."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from ..common.qmp import Qmp, VmError

RAM_ID = "ram0"  # the memory backend's default id; source and destination must agree on it


class RamRegion(NamedTuple):
    address: int  # host virtual address of guest RAM in the QEMU process
    length: int
    path: str  # the mapping's backing file, "" for anonymous memory

    @property
    def file(self) -> str | None:
        """The backing file, if it can be read as a file (not a memfd, not a deleted file)."""
        if self.path and not self.path.endswith(" (deleted)") and Path(self.path).is_file():
            return self.path
        return None

    def serve_args(self, pid: int) -> list[str]:
        """`nbd-postcopy serve`'s source options for this RAM of QEMU process `pid`: the file, else the
        process's memory (a memfd or a deleted file)."""
        if self.file:
            return ["--file", self.file]
        return ["--pid", str(pid), "--address", hex(self.address), "--length", str(self.length)]


_SMAPS_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$")


def ram_region_of(pid: int, qmp: Qmp, memdev: str = RAM_ID) -> RamRegion:
    """Where memory backend `memdev` of QEMU process `pid` is mapped.

    QEMU 7.2 prints no host addresses (`info ramblock` has none), so this takes the backend's size from
    QMP query-memdev and finds the writable mapping of exactly that size in /proc/PID/smaps that QEMU
    marked MADV_DONTFORK (VmFlags "dc"), as it does every RAM block (and not its heaps or stacks).
    """
    sizes = {m["id"]: m["size"] for m in qmp.execute("query-memdev")}
    if memdev not in sizes:
        raise VmError(f"QEMU {pid} has no memory backend {memdev!r} (it has: {', '.join(sizes) or 'none'})")
    size = sizes[memdev]
    candidates = [region for region, flags in _writable_mappings(pid) if region.length == size and "dc" in flags]
    if len(candidates) != 1:
        raise VmError(
            f"expected one guest RAM mapping of {size} bytes for {memdev} in /proc/{pid}/smaps, found "
            f"{len(candidates)}: {', '.join(map(_describe, candidates)) or '-'}"
        )
    return candidates[0]


def _describe(region: RamRegion) -> str:
    return f"{region.address:#x} {region.path or '(anonymous)'}"


def _writable_mappings(pid: int) -> list[tuple[RamRegion, set[str]]]:
    """(region, VmFlags) of every writable mapping of process `pid`."""
    found: list[tuple[RamRegion, set[str]]] = []
    current: RamRegion | None = None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if m := _SMAPS_HEADER.match(line.rstrip("\n")):
                start, end = int(m.group(1), 16), int(m.group(2), 16)
                current = RamRegion(start, end - start, m.group(4)) if m.group(3).startswith("rw") else None
            elif line.startswith("VmFlags:") and current is not None:
                found.append((current, set(line.split()[1:])))
    return found
