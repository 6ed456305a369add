"""A dedicated memory cgroup for the target process, so its swap cache can be purged on its own.

Why (docs/DESIGN.md, "Dedicated memcg before the markers"): reclaiming a memcg drops the clean
swap-cache pages charged to it, which makes every later touch a real swap-in. Charges do not move with
a task here, so the target must be moved into the memcg BEFORE its pages are written.
Supports cgroup v1 (`/sys/fs/cgroup/memory`, `memory.force_empty`) and, where the memory controller is on
cgroup v2, `memory.reclaim` (this machine has the memory controller on v1; tests/lab/test_memcg_v2.py
runs the v2 path on Debian 12's kernel in the kernel lab).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

from ..common.units import PAGE_SIZE

log = logging.getLogger(__name__)

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
AUTO_PREFIX = "nbd-postcopy-stage-"
NONE = "none"  # --memcg none: stage in the target's own memcg (InPlace)
SWAP_PATH_PREFIX = "nbd-postcopy-swap-path-"


def _v2_root() -> Path | None:
    for root in V2_ROOTS:
        try:
            if "memory" in (root / "cgroup.controllers").read_text().split():
                return root
        except OSError:
            continue
    return None


def task_memcg(pid: int) -> tuple[int, Path]:
    """(cgroup version, directory) of the memcg process `pid` is in now."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except FileNotFoundError:
        raise OSError(errno.ESRCH, f"process {pid} does not exist") from None
    unified = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") and V1_ROOT.is_dir():
            return 1, V1_ROOT / path.lstrip("/")
        if controllers == "":
            unified = path
    root = _v2_root()
    if unified is not None and root is not None:
        return 2, root / unified.lstrip("/")
    raise OSError(errno.ENOTSUP, "no memory cgroup controller found (neither cgroup v1 nor v2 has one)")


def find_by_inode(version: int, inode: int) -> Path | None:
    """The memcg directory whose inode is `inode` (what /proc/kpagecgroup reports), if it still exists."""
    root = V1_ROOT if version == 1 else _v2_root()
    if root is None:
        return None
    for directory, _, _ in os.walk(root):
        try:
            if os.stat(directory).st_ino == inode:
                return Path(directory)
        except FileNotFoundError:
            continue
    return None


class Memcg:
    """One memcg directory. `created` says whether this object made it (and so may remove it)."""

    def __init__(self, version: int, path: Path, created: bool):
        self.version = version
        self.path = path
        self.created = created
        self.collateral_bytes = 0  # other memory than the target's that purge() paged out (InPlace only)

    @classmethod
    def open_or_create(cls, version: int, path: Path) -> "Memcg":
        try:
            path.mkdir()
            return cls(version, path, created=True)
        except FileExistsError:
            return cls(version, path, created=False)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create memcg {path}: {exc.strerror}") from None

    in_place = False  # see InPlace

    @classmethod
    def for_target(cls, pid: int, name: str = "auto") -> tuple["Memcg", Path]:
        """The memcg to stage `pid` in, and the memcg it is in now (to go back to).

        `auto` makes a fresh child of the target's current memcg (so its limits still apply); on cgroup v2
        a cgroup that holds processes cannot give its children a memory controller (the "no internal
        processes" rule: a systemd service or scope is such a leaf), and then `auto` stages in place, as
        `none` does. Any other name is a path below the memory hierarchy's root, made if missing.
        """
        version, current = task_memcg(pid)
        if name == NONE:
            return InPlace(version, current), current
        if name == "auto":
            memcg = cls.open_or_create(version, current / f"{AUTO_PREFIX}{pid}")
        else:
            root = V1_ROOT if version == 1 else _v2_root()
            assert root is not None
            memcg = cls.open_or_create(version, root / name.strip("/"))
        if version == 2 and not (memcg.path / "memory.reclaim").exists():
            if memcg.created:
                memcg.path.rmdir()
            if name == "auto":
                log.info("cgroup v2: %s cannot have a memory-controlled child; staging in place", current)
                return InPlace(version, current), current
            raise OSError(errno.ENOTSUP, f"cgroup v2: {memcg.path} has no memory controller (its parent's "
                          "cgroup.subtree_control lacks +memory); pick a cgroup that has one with --memcg NAME")
        return memcg, current

    @property
    def inode(self) -> int:
        """What /proc/kpagecgroup reports for pages charged to this memcg."""
        return os.stat(self.path).st_ino

    def _write(self, name: str, value: str) -> None:
        try:
            with open(self.path / name, "w") as f:
                f.write(value)
        except OSError as exc:
            raise OSError(exc.errno, f"writing {value!r} to {self.path / name}: {exc.strerror}") from None

    @classmethod
    def never_swapped(cls, name: str, swappable: bool = False) -> "Memcg":
        """A new memcg at the top of the hierarchy whose memory is never swapped out (docs/DESIGN.md, "The
        swap path must not be swapped out"): cgroup v2 `memory.swap.max` 0; v1 `memory.swappiness` 0,
        which keeps reclaim of this memcg to file pages. OSError if neither can be had."""
        version, _ = task_memcg(os.getpid())
        root = V1_ROOT if version == 1 else _v2_root()
        memcg = cls.open_or_create(version, root / name)
        if swappable:  # (a testing aid: the same place without the guard)
            return memcg
        try:
            if version == 1:
                memcg._write("memory.swappiness", "0")
            else:
                memcg._write("memory.swap.max", "0")
        except OSError:
            memcg.remove(root)
            raise
        return memcg

    def move(self, pid: int) -> None:
        """Move the whole process (all its threads) into this memcg."""
        self._write("cgroup.procs", str(pid))

    def tasks(self) -> list[int]:
        return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]

    def stat(self) -> dict[str, int]:
        values = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            key, value = line.split()
            values[key] = int(value)
        return values

    def swapcached_bytes(self) -> int:
        return self.stat().get("swapcached", 0)

    def writeback_bytes(self) -> int:
        """Bytes under writeback (swap writeback included): v1 calls it writeback, v2 file_writeback."""
        return self.stat().get("writeback" if self.version == 1 else "file_writeback", 0)

    def purge(self) -> None:
        """Reclaim everything charged to the memcg that can be reclaimed (clean swap cache included).

        The kernel gives up with EBUSY (v1) or EAGAIN (v2) when some memory cannot be reclaimed; that is
        not an error here: the caller verifies what matters.
        """
        try:
            if self.version == 1:
                self._write("memory.force_empty", "0")
            else:
                current = int((self.path / "memory.current").read_text())
                self._write("memory.reclaim", str(max(current, PAGE_SIZE)))
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.EAGAIN):
                raise

    def remove(self, move_tasks_to: Path) -> None:
        """Move any tasks to `move_tasks_to` and remove the directory (only if this object created it)."""
        if not self.created or not self.path.exists():
            return
        parent = Memcg(self.version, move_tasks_to, created=False)
        for pid in self.tasks():
            try:
                parent.move(pid)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise OSError(exc.errno, f"cannot remove memcg {self.path}: {exc.strerror}") from None
                time.sleep(0.02)  # exiting tasks leave the cgroup a moment after they are gone
        raise OSError(errno.EBUSY, f"memcg {self.path} still busy; remove it with: rmdir {self.path}")


class InPlace(Memcg):
    """Staging without a dedicated memcg: the target stays in its own memcg, which is never reclaimed in
    whole (that would page the target's other memory out, onto the postcopy device).

    On cgroup v2, purge() asks `memory.reclaim` for as many bytes as the memcg has in the swap cache. The
    kernel does not take those pages only: in the lab, an idle process of the same cgroup had all its
    memory paged out too (docs/DESIGN.md, "Staging in place, on cgroup v2 leaves"). So purge() measures
    what it took of the memcg's mapped anonymous memory (memory.stat `anon`, which staged pages are no
    longer part of) into `collateral_bytes`, and logs it. Cgroup v1 has no bounded
    reclaim (`memory.force_empty` takes everything), so there purge() does nothing and each page leaves
    the swap cache through staging's read-touch fallback alone. That converges only while swap is less
    than half full: above that, a swap-in frees the page's swap slot (the kernel's vm_swap_full()), and
    the page-out that follows writes it to a new slot, back into the swap cache."""

    in_place = True

    def __init__(self, version: int, path: Path):
        super().__init__(version, path, created=False)
        if version == 2 and path != _v2_root() and not (path / "memory.stat").exists():
            raise OSError(errno.ENOTSUP, f"cgroup v2: {path} has no memory controller (its parent's "
                          "cgroup.subtree_control lacks +memory), so staging in place could not check its swap "
                          "cache; stage in a cgroup that has one with --memcg NAME")

    def move(self, pid: int) -> None:
        pass

    def purge(self) -> None:
        if self.version == 1:
            return
        before = self.stat()
        cached = before.get("swapcached", 0)
        if not cached:
            return
        try:
            self._write("memory.reclaim", str(cached))
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.EAGAIN):
                raise
        taken = before.get("anon", 0) - self.stat().get("anon", 0)
        if taken > 0:
            self.collateral_bytes += taken
            log.warning("purging the swap cache in place also paged out %d MiB of other anonymous memory of %s "
                        "(onto the swap device)", taken >> 20, self.path)

    def stat(self) -> dict[str, int]:
        if self.version == 2 and self.path == _v2_root():
            return {}  # the cgroup v2 root has no memory.stat
        return super().stat()

