"""The swap path (nbdkit, nbdfuse) runs in a memcg whose memory is never swapped out: under reclaim of that
memcg, while a staged workload faults its pages in through the device, nothing of nbdfuse goes to swap and
every page comes back right. Without the guard, the same reclaim swaps nbdfuse's own memory out: during a
migration the postcopy device is the highest-priority swap area, so it would land there, and a swap-in that
needs it would wait for itself. (The control run gives the swap path's pages an ordinary, higher-priority
swap device to go to instead, so that it shows the hazard without deadlocking the machine.)"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from nbd_postcopy.device.control import request
from nbd_postcopy.host.memcg import Memcg, task_memcg
from nbd_postcopy.host.staging import stage_range
from tests import servers
from tests.swapdev import attached_postcopy_swap, plain_swap_device
from tests.workload import Workload

pytestmark = [pytest.mark.slow, pytest.mark.root]


def vm_swap_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSwap:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("guard", ["on", "swappable"])
def test_reclaim_of_the_swap_path_while_pages_fault_in(swap_lock, processes, run_dir, codec, monkeypatch, guard):
    monkeypatch.setenv("NBD_POSTCOPY_SWAP_GUARD", guard)
    image = run_dir / "ram.img"
    servers.write_image(image, 32 << 20)
    with servers.serve("nbd-postcopy", run_dir, image=image) as source:
        keys = {"source": source.uri("unix"), "size": 32 << 20, "key": run_dir / "key"}
        with attached_postcopy_swap(run_dir, keys, priority=32000) as swap:
            version, path = task_memcg(swap.nbdfuse_pid)
            assert path.name.startswith("nbd-postcopy-swap-path-")
            assert task_memcg(swap.nbdkit_pid)[1] == path
            memcg = Memcg(version, path, created=False)
            setting = "memory.swappiness" if version == 1 else "memory.swap.max"
            assert (path / setting).read_text().strip() == ("0" if guard == "on" else (path / setting).read_text().strip())
            work = Workload(processes, 32, "--fresh")
            stage_range(work.pid, work.address, work.length, codec, swap.device, control=str(swap.control),
                        quiet=True)
            request(str(swap.control), "arm")
            with plain_swap_device(64, priority=32767):  # where reclaim puts swappable pages now
                result = {}
                reader = threading.Thread(target=lambda: result.update(work.command(f"verify-image {image}")))
                reader.start()
                for _ in range(20):  # reclaim the swap path's memcg over and over while pages fault in
                    memcg.purge()
                reader.join(120)
                swapped = vm_swap_kib(swap.nbdfuse_pid)
            assert result["mismatched_pages"] == 0
            if guard == "on":
                assert swapped == 0 and vm_swap_kib(swap.nbdkit_pid) == 0
            else:
                assert swapped > 0, "the control run should have swapped nbdfuse's memory out"
            work.exit()
