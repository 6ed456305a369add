"""Working-set record and replay: the guest pages a restored VM demands first, remembered for the next restore.

Recording (always on, cheap): every demand fetch names its first slot; the recorder keeps the guest page
that slot holds, in first-fault order, without repeats, up to RECORD_LIMIT pages. The control command
`workingset` hands the list out. Guest pages, not slots: staging maps slots afresh on every restore.

Replay (plugin key replay=FILE): a file of guest pages (one decimal number a line, `#` comments) that
the prefetcher pulls first after arming, before its sweep; each page with the few pages after it (a swap
cluster). The file is checked once every key is read (numbers only, below pages=) and resolved to slots
once staging has mapped them.

    write_workingset(path, pages, comment)    # atomic: a temporary file, then rename
    read_workingset(path, limit_pages)        # -> [guest page, ...]
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

RECORD_LIMIT = 4096  # guest pages recorded per restore (16 MiB of first faults)
REPLAY_SPAN = 8  # pages prefetched from each recorded page on (a swap cluster: page-cluster 3)


class WorkingSetError(ValueError):
    """A working-set file that cannot be used (the message names the file and the line)."""


class WorkingSetRecorder:
    """A fault listener (Device.add_fault_listener) keeping the first demand-faulted guest pages in order."""

    def __init__(self, guest_of, limit: int = RECORD_LIMIT):
        self._guest_of = guest_of  # slot -> guest page or None (Device.guest_of)
        self.limit = limit
        self._pages: dict[int, None] = {}  # insertion-ordered, without repeats
        self._lock = threading.Lock()

    def __call__(self, slot: int, seconds: float) -> None:
        if len(self._pages) >= self.limit:
            return
        guest = self._guest_of(slot)
        if guest is None:
            return
        with self._lock:
            if len(self._pages) < self.limit:
                self._pages.setdefault(guest)

    def pages(self) -> list[int]:
        with self._lock:
            return list(self._pages)


def read_workingset(path: str | os.PathLike, limit_pages: int) -> list[int]:
    """The guest pages in the file, in order and without repeats; WorkingSetError if a line is not a page
    number below `limit_pages`."""
    pages: dict[int, None] = {}  # insertion-ordered, without repeats
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkingSetError(f"cannot read working set {path}: {getattr(exc, 'strerror', None) or exc}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not line.isdigit() or int(line) >= limit_pages:
            raise WorkingSetError(f"{path} line {number}: {line!r} is not a guest page number below {limit_pages}")
        pages.setdefault(int(line))
    return list(pages)


def write_workingset(path: str | os.PathLike, pages: list[int], comment: str = "") -> None:
    """Write `pages` so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    with open(temporary, "w") as out:
        out.write(header + "".join(f"{page}\n" for page in pages))
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
