"""The kernel nbd transport end to end, as a Debian 12 host runs it: `setup-swap.sh attach --transport nbd`
(nbd-client -swap on /dev/nbdN) with the real plugin and `nbd-postcopy serve`, stage, arm, demand faults,
byte-exact read-back through real swap-ins, completion and detach, and nothing left behind."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from nbd_postcopy.common import linux
from nbd_postcopy.device.control import request
from tests import servers
from tests.swapdev import REPO, in_proc_swaps, processes_mentioning, run_setup_swap
from tests.workload import Workload

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.root]

MIB = 16


def swapped_pages(work: Workload) -> int:
    with linux.Pagemap(work.pid) as pagemap:
        return sum(linux.is_swapped(e) for e in pagemap.entries(work.address, work.pages))


def attach_nbd(run_dir: Path, name: str, keys: dict) -> tuple[str, Path]:
    """`setup-swap.sh attach --transport nbd` (the script's command line, whatever implements it);
    returns the device and the plugin's control socket."""
    state_dir = run_dir / f"swap-{name}"
    attach = run_setup_swap("attach", "--name", name, "--transport", "nbd", "--state-dir", str(state_dir), "--",
                            *(f"{key}={value}" for key, value in keys.items()), timeout=300)
    assert attach.returncode == 0, attach.stdout + attach.stderr
    match = re.search(rf"attached {name}: (/dev/nbd\d+) \(", attach.stdout)
    assert match, attach.stdout
    return match.group(1), state_dir / "control.sock"


def test_nbd_transport_stage_arm_fault_complete_detach(swap_lock, processes, run_dir):
    image = run_dir / "ram.img"
    servers.write_image(image, MIB << 20)
    (run_dir / "key").write_bytes(os.urandom(32))
    name = "labnbd"
    with servers.serve("nbd-postcopy", run_dir, image=image, timeout=120) as source:  # TCG: a slow start
        device, control = attach_nbd(run_dir, name, {"source": source.uri("tcp"), "size": MIB << 20,
                                                     "key": run_dir / "key"})
        try:
            nbd = Path("/sys/block") / Path(device).name
            assert (nbd / "pid").exists()  # nbd-client's connection is up
            assert in_proc_swaps(device)

            work = Workload(processes, MIB, "--fresh")
            staged = subprocess.run(
                [REPO / ".venv" / "bin" / "nbd-postcopy", "stage", "--pid", str(work.pid), "--address",
                 hex(work.address), "--length", str(work.length), "--key", run_dir / "key", "--device",
                 device, "--control", control],
                capture_output=True, text=True, timeout=600)
            assert staged.returncode == 0, staged.stdout + staged.stderr
            assert swapped_pages(work) == work.pages
            assert request(str(control), "status")["mapped"] == work.pages

            assert request(str(control), "arm")["armed"]
            pswpin = linux.vmstat("pswpin")["pswpin"]
            # Touch every 64th page while the prefetcher runs: those faults go through nbd to the source.
            assert work.command("touch 64")["pages"] == work.pages // 64
            assert request(str(control), "status")["fetched_demand"] > 0

            detach = run_setup_swap("detach", name, timeout=600, env={
                "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"})
            assert detach.returncode == 0, detach.stdout + detach.stderr
            assert "brought in" in detach.stdout + detach.stderr
            assert linux.vmstat("pswpin")["pswpin"] - pswpin >= work.pages
            assert swapped_pages(work) == 0
            assert work.command(f"verify-image {image}")["mismatched_pages"] == 0

            # Nothing is left: no swap area, no nbd connection, no nbdkit or supervisor, no state.
            assert not in_proc_swaps(device)
            assert not (nbd / "pid").exists()
            assert processes_mentioning(str(run_dir / f"swap-{name}")) == []
            assert not (run_dir / f"swap-{name}").exists()
            work.exit()
        finally:
            run_setup_swap("detach", name, "--no-complete", timeout=300)  # "nothing to do" after a clean run
