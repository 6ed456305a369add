"""Fixtures for the host tests that attach the real postcopy device."""

from __future__ import annotations

import os

import pytest

from tests.conftest import wait_for_path

GUEST_PAGES = 16384  # 64 MiB


@pytest.fixture
def plugin_keys(run_dir, processes) -> dict[str, object]:
    """Keys for a 64 MiB postcopy device whose source is a real `nbd-postcopy serve` on a sparse image.

    Name: plugin_keys   Scope: function   Depends: run_dir, processes
    An unarmed device never fetches, so the image's contents do not matter here.
    """
    image = run_dir / "source.img"
    with open(image, "wb") as f:
        f.truncate(GUEST_PAGES * 4096)
    sock = run_dir / "source.sock"
    server = processes.start(["nbd-postcopy", "serve", "--file", image, "--listen", f"unix:{sock}"])
    wait_for_path(sock, proc=server)
    key = run_dir / "key"
    key.write_bytes(os.urandom(32))
    return {"source": f"nbd+unix:///?socket={sock}", "pages": GUEST_PAGES, "key": key}
