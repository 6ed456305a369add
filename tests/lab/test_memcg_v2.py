"""Staging on cgroup v2 alone (no v1 memory hierarchy), as on a Debian 12 host: the swap cache is purged with
`memory.reclaim`, and a target in a cgroup that cannot have memory-controlled children is staged in place
(`auto` falls back to `--memcg none`). The swap device is the kernel nbd transport with nbdkit's `memory` stand-in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbd_postcopy.common import linux
from nbd_postcopy.host import memcg as memcg_module
from nbd_postcopy.host.memcg import AUTO_PREFIX, V1_ROOT, Memcg, task_memcg
from nbd_postcopy.host.staging import stage_range
from tests.swapdev import attached_postcopy_swap, marker_image
from tests.workload import Workload

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.root]

CGROUP2 = Path("/sys/fs/cgroup")
MIB = 16
LEAF_MIB = 44  # of the 64 MiB device: more than half, as in a migration
NEIGHBOUR_MIB = 8


@pytest.fixture
def nbd_swap(swap_lock, run_dir):
    """The nbd transport with the stand-in plugin (a mkswap'd nbdkit memory disk): any staged data reads back."""
    with attached_postcopy_swap(run_dir, {}, standin="memory size=64M", transport="nbd") as swap:
        yield swap


@pytest.fixture
def cgroup():
    """Make cgroups below the cgroup2 root by name; moves their tasks to the root and removes them after."""
    made: list[Path] = []

    def make(name: str) -> Path:
        path = CGROUP2 / name
        path.mkdir()
        made.append(path)
        return path

    yield make
    for path in reversed(made):
        if path.exists():
            Memcg(2, path, created=True).remove(CGROUP2)


@pytest.fixture
def reclaim_writes(monkeypatch):
    """The memcg files staging writes to, in order."""
    written: list[str] = []
    original = Memcg._write

    def spy(self, name, value):
        written.append(name)
        return original(self, name, value)

    monkeypatch.setattr(Memcg, "_write", spy)
    return written


def test_the_memory_controller_is_found_on_cgroup_v2_alone():
    assert not V1_ROOT.exists()
    assert "memory" in (CGROUP2 / "cgroup.controllers").read_text().split()
    assert memcg_module._v2_root() == CGROUP2
    assert task_memcg(os.getpid()) == (2, CGROUP2)


def test_staging_purges_the_swap_cache_with_memory_reclaim(nbd_swap, processes, run_dir, codec, reclaim_writes):
    work = Workload(processes, MIB, "--fresh")
    report = stage_range(work.pid, work.address, work.length, codec, nbd_swap.device, quiet=True)

    assert "memory.reclaim" in reclaim_writes and "memory.force_empty" not in reclaim_writes
    assert report.fallback_pages == 0  # memory.reclaim alone dropped every swap-cache page
    assert report.memcg_swapcached_bytes == 0
    assert task_memcg(work.pid) == (2, CGROUP2) and not list(CGROUP2.glob(AUTO_PREFIX + "*"))
    with linux.Pagemap(work.pid) as pagemap:
        assert all(linux.is_swapped(e) for e in pagemap.entries(work.address, work.pages))

    pswpin = linux.vmstat("pswpin")["pswpin"]
    image = marker_image(codec, work.pages, run_dir / "markers")
    assert work.command(f"verify-image {image}")["mismatched_pages"] == 0
    assert linux.vmstat("pswpin")["pswpin"] - pswpin >= work.pages  # every read was a real swap-in
    work.exit()


def test_a_target_in_a_leaf_cgroup_is_staged_in_place_or_in_a_named_memcg(nbd_swap, processes, run_dir, codec,
                                                                          cgroup):
    """Like a process in a systemd service's cgroup: its children get no memory controller (a cgroup with
    processes cannot enable one for them), so `auto` stages in place: the target never leaves its cgroup,
    whose swap-cache bytes (and only as many) `memory.reclaim` takes back. The range fills most of the
    device, as a migration's does: with swap more than half full, a read-touch frees a page's swap slot,
    so the read-touch fallback alone would never converge. A named memcg works too."""
    leaf = cgroup("nbd-postcopy-lab-service")
    work = Workload(processes, LEAF_MIB, "--fresh")
    Memcg(2, leaf, created=False).move(work.pid)

    report = stage_range(work.pid, work.address, work.length, codec, nbd_swap.device, quiet=True)
    assert task_memcg(work.pid) == (2, leaf) and not list(leaf.glob(AUTO_PREFIX + "*"))
    assert report.memcg_swapcached_bytes == 0
    with linux.Pagemap(work.pid) as pagemap:
        assert all(linux.is_swapped(e) for e in pagemap.entries(work.address, work.pages))
    pswpin = linux.vmstat("pswpin")["pswpin"]
    assert work.command(f"verify-image {marker_image(codec, work.pages, run_dir / 'markers')}")["mismatched_pages"] == 0
    assert linux.vmstat("pswpin")["pswpin"] - pswpin >= work.pages  # every read was a real swap-in

    work.exit()

    other = Workload(processes, MIB, "--fresh")
    Memcg(2, leaf, created=False).move(other.pid)
    cgroup("nbd-postcopy-lab-staging")
    report = stage_range(other.pid, other.address, other.length, codec, nbd_swap.device, quiet=True,
                         memcg_name="nbd-postcopy-lab-staging")
    assert report.memcg_swapcached_bytes == 0
    with linux.Pagemap(other.pid) as pagemap:
        assert all(linux.is_swapped(e) for e in pagemap.entries(other.address, other.pages))
    other.exit()


def test_staging_in_place_reports_the_other_memory_of_the_cgroup_it_paged_out(nbd_swap, processes, run_dir, codec,
                                                                              cgroup):
    """In place, `memory.reclaim` is asked for the cgroup's swap-cache bytes, which staging's page-outs left
    there, but the kernel takes other memory of the cgroup too: an idle helper process beside the target
    (its memory charged to the cgroup: filled after the move, as charges stay where a page was first
    charged) is paged out, onto the swap device, here every page of it (docs/DESIGN.md, "Staging in place,
    on cgroup v2 leaves"). Staging says so, with the amount; the helper's data stays intact."""
    leaf = cgroup("nbd-postcopy-lab-shared")
    neighbour = Workload(processes, NEIGHBOUR_MIB, "--fresh")
    target = Workload(processes, LEAF_MIB, "--fresh")
    for work in (neighbour, target):
        Memcg(2, leaf, created=False).move(work.pid)
    neighbour.command("fill 11")

    report = stage_range(target.pid, target.address, target.length, codec, nbd_swap.device, quiet=True)
    assert task_memcg(target.pid) == (2, leaf) and not list(leaf.glob(AUTO_PREFIX + "*"))  # in place
    assert report.memcg_swapcached_bytes == 0
    with linux.Pagemap(target.pid) as pagemap:
        assert all(linux.is_swapped(e) for e in pagemap.entries(target.address, target.pages))
    with linux.Pagemap(neighbour.pid) as pagemap:
        swapped = sum(linux.is_swapped(e) for e in pagemap.entries(neighbour.address, neighbour.pages))
    # memcg statistics are flushed lazily: the measured amount may be off by a few batches
    assert abs(report.memcg_collateral_bytes - swapped * 4096) <= 256 * 4096, (report.memcg_collateral_bytes, swapped)
    assert ("also paged out" in report.summary()) == (report.memcg_collateral_bytes > 0)
    assert neighbour.command("verify-seed")["mismatched_pages"] == 0
    target.exit()
    neighbour.exit()
