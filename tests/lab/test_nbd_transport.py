"""The kernel nbd transport end to end, as a Debian 12 host runs it: `setup-swap.sh attach --transport nbd`
(nbd-client -swap on /dev/nbdN) with the real plugin and `nbd-postcopy serve`, stage, arm, demand faults,
byte-exact read-back through real swap-ins, completion and detach, and nothing left behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nbd_postcopy.common import linux
from nbd_postcopy.device.control import request
from tests import servers
from tests.swapdev import REPO, attached_postcopy_swap, in_proc_swaps, processes_mentioning, run_setup_swap
from tests.workload import Workload

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.root]

MIB = 16


def swapped_pages(work: Workload) -> int:
    with linux.Pagemap(work.pid) as pagemap:
        return sum(linux.is_swapped(e) for e in pagemap.entries(work.address, work.pages))


def test_nbd_transport_stage_arm_fault_complete_detach(swap_lock, processes, run_dir):
    image = run_dir / "ram.img"
    servers.write_image(image, MIB << 20)
    (run_dir / "key").write_bytes(os.urandom(32))
    with servers.serve("nbd-postcopy", run_dir, image=image, timeout=120) as source:  # TCG: a slow start
        keys = {"source": source.uri("tcp"), "size": MIB << 20, "key": run_dir / "key"}
        with attached_postcopy_swap(run_dir, keys, attach_args=("--transport", "nbd")) as swap:
            assert swap.device.startswith("/dev/nbd"), swap.attach_output
            assert f"attached {swap.name}: {swap.device}" in swap.attach_output
            nbd = Path("/sys/block") / Path(swap.device).name
            assert (nbd / "pid").exists()  # nbd-client's connection is up
            assert in_proc_swaps(swap.device)

            work = Workload(processes, MIB, "--fresh")
            staged = subprocess.run(
                [REPO / ".venv" / "bin" / "nbd-postcopy", "stage", "--pid", str(work.pid), "--address",
                 hex(work.address), "--length", str(work.length), "--key", run_dir / "key", "--device",
                 swap.device, "--control", swap.control],
                capture_output=True, text=True, timeout=600)
            assert staged.returncode == 0, staged.stdout + staged.stderr
            assert swapped_pages(work) == work.pages
            assert request(str(swap.control), "status")["mapped"] == work.pages

            assert request(str(swap.control), "arm")["armed"]
            pswpin = linux.vmstat("pswpin")["pswpin"]
            # Touch every 64th page while the prefetcher runs: those faults go through nbd to the source.
            assert work.command("touch 64")["pages"] == work.pages // 64
            assert request(str(swap.control), "status")["fetched_demand"] > 0

            detach = run_setup_swap("detach", swap.name, timeout=600, env={
                "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"})
            assert detach.returncode == 0, detach.stdout + detach.stderr
            assert "brought in" in detach.stdout + detach.stderr
            assert linux.vmstat("pswpin")["pswpin"] - pswpin >= work.pages
            assert swapped_pages(work) == 0
            assert work.command(f"verify-image {image}")["mismatched_pages"] == 0

            # Nothing is left: no swap area, no nbd connection, no nbdkit or supervisor.
            assert not in_proc_swaps(swap.device)
            assert not (nbd / "pid").exists()
            assert processes_mentioning(str(swap.state_dir)) == []
            assert not swap.state_dir.exists()
            work.exit()
