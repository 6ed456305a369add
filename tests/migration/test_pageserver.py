"""The migration driver's page server process: started gated, opened, restarted on the same RAM and
identity when it dies, so the device's clients carry on."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from nbd_postcopy.migration.pageserver import PageServerError, PageServerProcess
from nbd_postcopy.nbd.client import SourceClient, SourceIdentity
from tests.servers import free_tcp_port, write_image_with_zeros

SIZE = 4 << 20
PAGE = 4096


def test_restarted_on_the_same_ram_and_identity_when_it_dies(run_dir):
    image = run_dir / "ram.img"
    data = write_image_with_zeros(image, SIZE, (0, PAGE))
    port = free_tcp_port()
    server = PageServerProcess(["--file", str(image)], [f"unix:{run_dir}/s.sock", f"tcp:127.0.0.1:{port}"],
                               run_dir / "server.log")
    try:
        server.start()
        identity = SourceIdentity(server.instance)  # the device pinned to this server, as the driver does it
        client = SourceClient(f"nbd://127.0.0.1:{port}", identity=identity, role="demand")
        try:
            result = {}
            reader = threading.Thread(target=lambda: result.update(data=client.read(PAGE, PAGE, timeout=10)))
            reader.start()
            time.sleep(0.3)
            assert "data" not in result  # the gate is closed
            server.open_gate()
            reader.join(10)
            assert result["data"] == data[PAGE : 2 * PAGE]
            server.watch()
            first = server.pid
            server.process.send_signal(signal.SIGKILL)
            started = time.monotonic()
            assert client.read(2 * PAGE, PAGE, timeout=10) == data[2 * PAGE : 3 * PAGE]
            assert time.monotonic() - started < 3 and server.restarts == 1 and server.pid != first
            assert identity.refusals == 0
        finally:
            client.close()
    finally:
        server.stop()
    assert not server.alive()


def test_a_server_that_cannot_start_says_why(run_dir):
    server = PageServerProcess(["--file", "/nonexistent/ram"], [f"unix:{run_dir}/s.sock"], run_dir / "server.log")
    with pytest.raises(PageServerError, match="cannot open source file /nonexistent/ram"):
        server.start()
    server.stop()
