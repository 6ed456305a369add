"""`nbd-postcopy serve`: the asyncio server in-process with the client core, and the real command.

Third-party clients against the server are in test_interop_server.py.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nbd_postcopy.nbd.client import SourceClient, SourceUnavailable
from nbd_postcopy.source import gate as gate_module
from nbd_postcopy.source.gate import Gate, watch_qmp
from nbd_postcopy.source.metrics import ServerMetrics
from nbd_postcopy.nbd.client_core import ClientConnection
from nbd_postcopy.nbd.protocol import MAX_BLOCK, NEED_DATA, BlockStatusDone, CacheDone, ReadDone, Ready
from nbd_postcopy.source.server import PageServer, _NbdConnection
from nbd_postcopy.common.units import parse_listen, parse_size
from nbd_postcopy.source.sources import MAX_SCAN_DATA, FileSource, ProcessSource, SourceOpenError
from nbd_postcopy.nbd.wire import REQUEST, REQUEST_MAGIC, Command, CommandFlag

from tests.conftest import wait_for_path
from tests.servers import free_tcp_port, write_image_with_zeros

SIZE = 4 << 20
PAGE = 4096
SERVE = [sys.executable, "-m", "nbd_postcopy.cli", "serve"]


@pytest.fixture
def image(run_dir: Path) -> tuple[Path, bytes]:
    """A 4 MiB image, random except pages 16..31 (zero). Name: run_dir/ram.img  Scope: function"""
    path = run_dir / "ram.img"
    return path, write_image_with_zeros(path, SIZE, (16 * PAGE, 16 * PAGE))


# --- in-process: the asyncio server with the client core ----------------------------------------
class CoreClient:
    """The sans-I/O client core on asyncio streams."""

    def __init__(self, reader, writer, conn: ClientConnection):
        self.reader, self.writer, self.conn = reader, writer, conn
        self.ready: Ready | None = None
        self.done: dict[int, object] = {}

    @classmethod
    async def connect(cls, path: str, export: str = "", **kwargs) -> "CoreClient":
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer, ClientConnection(export, **kwargs))
        while client.ready is None:
            await client._pump()
        return client

    async def _pump(self) -> None:
        event = self.conn.next_event()
        out = self.conn.data_to_send()
        if out:
            self.writer.write(out)
        if event is NEED_DATA:
            data = await self.reader.read(1 << 20)
            self.conn.receive_data(data)
            if not data:
                raise ConnectionError("server closed the connection")
        elif isinstance(event, Ready):
            self.ready = event
        else:
            self.done[event.handle] = event

    def send(self, handle_and_bytes: tuple[int, bytes]) -> int:
        handle, data = handle_and_bytes
        self.writer.write(data)
        return handle

    async def wait(self, handles: list[int], timeout: float = 5.0) -> list:
        async def gather():
            while not all(h in self.done for h in handles):
                await self._pump()
        await asyncio.wait_for(gather(), timeout)
        return [self.done.pop(h) for h in handles]

    def close(self) -> None:
        self.writer.close()


async def started_server(run_dir: Path, image_path: Path, gate_open: bool = True, tls: str = "none",
                         context: ssl.SSLContext | None = None) -> tuple[PageServer, str]:
    metrics = ServerMetrics(CollectorRegistry())
    gate = Gate(gate_open, on_open=lambda: metrics.gate_open.set(1))
    server = PageServer(FileSource(image_path), "ram", gate, metrics, tls=tls, tls_context=context)
    path = str(run_dir / "server.sock")
    await server.listen(parse_listen(f"unix:{path}"))
    return server, path


def test_many_clients_with_many_requests_in_flight(run_dir, image):
    path, data = image

    async def main():
        server, sock = await started_server(run_dir, path)
        try:
            clients = [await CoreClient.connect(sock, export) for export in ("", "ram", "", "ram")]
            assert clients[0].ready.size == SIZE and clients[0].ready.base_allocation
            plans = []
            for i, client in enumerate(clients):
                ranges = [((i * 97 + k * 131) % (SIZE // PAGE - 8) * PAGE + k, 1 + (k * 4099) % 30000)
                          for k in range(64)]
                handles = [client.send(client.conn.read(o, n)) for o, n in ranges]
                plans.append((client, ranges, handles))
            for client, ranges, handles in plans:
                for (offset, length), event in zip(ranges, await client.wait(handles)):
                    assert isinstance(event, ReadDone) and bytes(event.data) == data[offset : offset + length]
            assert server.metrics.clients._value.get() == 4
            assert server.metrics.registry.get_sample_value("nbd_postcopy_server_requests_total",
                                                            {"command": "read"}) == 256
            for client in clients:
                client.close()
        finally:
            await server.close()
        assert not Path(sock).exists()

    asyncio.run(main())


def test_block_status_reports_zero_pages_as_holes(run_dir, image):
    path, _ = image

    async def main():
        server, sock = await started_server(run_dir, path)
        try:
            client = await CoreClient.connect(sock)
            [event] = await client.wait([client.send(client.conn.block_status(0, SIZE))])
            assert isinstance(event, BlockStatusDone)
            # One answer scans at most MAX_SCAN_DATA bytes of data (it runs on the event loop): the rest is
            # for the client to ask again.
            (data, _), (hole, flags), (rest, rest_flags) = event.extents
            assert (data, hole, flags, rest_flags) == (16 * PAGE, 16 * PAGE, 3, 0)
            assert min(SIZE, MAX_SCAN_DATA) <= 32 * PAGE + rest <= SIZE
            client.close()
        finally:
            await server.close()

    asyncio.run(main())


def test_closed_gate_holds_reads_until_it_opens(run_dir, image):
    path, data = image

    async def main():
        server, sock = await started_server(run_dir, path, gate_open=False)
        try:
            client = await CoreClient.connect(sock)
            handles = [client.send(client.conn.read(0, PAGE)), client.send(client.conn.cache(0, SIZE)),
                       client.send(client.conn.block_status(0, PAGE))]
            with pytest.raises(asyncio.TimeoutError):
                await client.wait(handles, timeout=0.3)
            assert server.metrics.gate_open._value.get() == 0
            server.gate.open("test")
            read, cache, status = await client.wait(handles)
            assert bytes(read.data) == data[:PAGE]
            assert isinstance(cache, CacheDone) and isinstance(status, BlockStatusDone)
            assert server.metrics.gate_open._value.get() == 1
            client.close()
        finally:
            await server.close()

    asyncio.run(main())


def test_more_requests_than_may_park_behind_the_gate_all_get_answered(run_dir, image):
    path, data = image

    async def main():
        server, sock = await started_server(run_dir, path, gate_open=False)
        try:
            client = await CoreClient.connect(sock)
            handles = [client.send(client.conn.read(i % 1000 * PAGE, PAGE)) for i in range(1500)]
            await asyncio.sleep(0.3)  # the server parks 1024, then stops reading this client
            server.gate.open("test")
            events = await client.wait(handles, timeout=20)
            assert all(bytes(e.data) == data[i % 1000 * PAGE : i % 1000 * PAGE + PAGE] for i, e in enumerate(events))
            client.close()
        finally:
            await server.close()

    asyncio.run(main())


def test_garbage_drops_that_client_and_others_keep_working(run_dir, image):
    path, data = image

    async def main():
        server, sock = await started_server(run_dir, path)
        try:
            good = await CoreClient.connect(sock)
            bad = await CoreClient.connect(sock)
            bad.writer.write(b"\xff" * 28)
            assert await asyncio.wait_for(bad.reader.read(), 5) == b""  # the server hung up on it
            [event] = await good.wait([good.send(good.conn.read(PAGE, PAGE))])
            assert bytes(event.data) == data[PAGE : 2 * PAGE]
            assert server.metrics.protocol_errors._value.get() == 1
            good.close()
        finally:
            await server.close()

    asyncio.run(main())


class FakeQMP:
    """A QMP server on a Unix socket whose guest reports `statuses` in turn (then the last one), and
    that sends a STOP event after query number `stop_after`, if given."""

    def __init__(self, path: str, statuses: list[str], stop_after: int | None = None):
        self.path, self.statuses, self.stop_after = path, list(statuses), stop_after
        self.queries = 0

    async def handle(self, reader, writer):
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        async for command in self._commands(reader):
            if command["execute"] == "query-status":
                status = self.statuses[min(self.queries, len(self.statuses) - 1)]
                self.queries += 1
                writer.write(b'{"event": "RESUME", "data": {}, "timestamp": {}}\n')  # noise to skip
                reply = {"return": {"running": status == "running", "status": status}}
            else:
                reply = {"return": {}}
            if "id" in command:
                reply["id"] = command["id"]
            writer.write(json.dumps(reply).encode() + b"\n")
            if self.queries == self.stop_after and command["execute"] == "query-status":
                writer.write(b'{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}\n')
        writer.close()

    @staticmethod
    async def _commands(reader):
        """The JSON objects the client sends, as they come (qemu.qmp ends them with no newline)."""
        decoder, buffer = json.JSONDecoder(), ""
        while chunk := await reader.read(4096):
            buffer += chunk.decode()
            while buffer.strip():
                try:
                    command, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break
                buffer = buffer.lstrip()[end:]
                yield command


@pytest.mark.parametrize("final", ["paused", "postmigrate", "finish-migrate"])
def test_qmp_gate_opens_when_qemu_stops(run_dir, final):
    async def main():
        qmp = FakeQMP(str(run_dir / "qmp.sock"), ["running", "running", final])
        gate = Gate(False)
        watcher = asyncio.ensure_future(watch_qmp(gate, qmp.path, poll_interval=0.02))
        await asyncio.sleep(0.1)  # the socket does not exist yet: the watcher keeps retrying
        assert not gate.is_open
        server = await asyncio.start_unix_server(qmp.handle, qmp.path)
        try:
            await asyncio.wait_for(watcher, 10)
            assert gate.is_open and qmp.queries == 3
        finally:
            server.close()

    asyncio.run(main())


def test_qmp_gate_opens_on_the_stop_event(run_dir, caplog):
    async def main():
        qmp = FakeQMP(str(run_dir / "qmp.sock"), ["running"], stop_after=2)
        server = await asyncio.start_unix_server(qmp.handle, qmp.path)
        gate = Gate(False)
        try:
            await asyncio.wait_for(watch_qmp(gate, qmp.path, poll_interval=0.05), 10)
            assert gate.is_open and qmp.queries == 2  # opened by the event, not by a status
        finally:
            server.close()

    with caplog.at_level(logging.INFO, logger="nbd_postcopy.source.gate"):
        asyncio.run(main())
    assert "freeze gate open (QEMU at" in caplog.text and "reports a STOP event" in caplog.text


def test_qmp_gate_waiting_for_qemu_says_so_once_then_reminds_rarely(run_dir, caplog, monkeypatch):
    monkeypatch.setattr(gate_module, "REMINDER_INTERVAL", 0.3)
    path = str(run_dir / "qmp.sock")

    async def main():
        qmp = FakeQMP(path, ["running", "paused"])
        gate = Gate(False)
        watcher = asyncio.ensure_future(watch_qmp(gate, path, poll_interval=0.01))
        await asyncio.sleep(1.0)  # ~100 attempts on a missing socket
        assert not gate.is_open
        server = await asyncio.start_unix_server(qmp.handle, path)
        try:
            await asyncio.wait_for(watcher, 10)
            assert gate.is_open
        finally:
            server.close()

    with caplog.at_level(logging.INFO, logger="nbd_postcopy.source.gate"):
        asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "waiting" in r.getMessage()]
    assert warnings[0] == (f"freeze gate: waiting for QMP socket {path} (QEMU not there yet); retrying every "
                           "0.01 s; pages stay held until the source stops")
    assert 2 <= len(warnings) <= 5, warnings  # the first, then a reminder every 0.3 s: not one per attempt
    assert all("(for " in w for w in warnings[1:])
    assert f"freeze gate watching QEMU over QMP socket {path}" in caplog.text


def test_tls_required_in_process_with_the_client_core(run_dir, image, tls_files):
    path, data = image
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files / "server-cert.pem", tls_files / "server-key.pem")

    async def main():
        server, sock = await started_server(run_dir, path, tls="require", context=context)
        try:
            uri = f"nbds+unix:///ram?socket={sock}&tls-ca-file={tls_files / 'ca-cert.pem'}"
            client = await asyncio.to_thread(SourceClient, uri)
            try:
                assert await asyncio.to_thread(client.read, 0, 3 * PAGE) == data[: 3 * PAGE]
            finally:
                await asyncio.to_thread(client.close)
        finally:
            await server.close()

    asyncio.run(main())


# --- sources ---------------------------------------------------------------------------------------
def test_process_source_reads_another_address_space_range():
    buffer = ctypes.create_string_buffer(os.urandom(8 * PAGE) + bytes(8 * PAGE), 16 * PAGE)
    address = ctypes.addressof(buffer)
    source = ProcessSource(os.getpid(), address, 16 * PAGE)
    try:
        assert source.size == 16 * PAGE
        assert source.read(100, 5000) == buffer.raw[100:5100]
        extents = source.extents(0, 16 * PAGE)
        assert sum(n for n, _ in extents) == 16 * PAGE and extents[-1][1] == 3
    finally:
        source.close()


def test_source_errors_are_clear(run_dir):
    with pytest.raises(SourceOpenError, match="cannot open source file .*No such file"):
        FileSource(run_dir / "missing")
    (run_dir / "empty").write_bytes(b"")
    with pytest.raises(SourceOpenError, match="is empty"):
        FileSource(run_dir / "empty")
    with pytest.raises(SourceOpenError, match="no process with pid"):
        ProcessSource(999_999_999, 0x1000, PAGE)
    with pytest.raises(SourceOpenError, match="is 0x10\\+0x1000 mapped"):
        ProcessSource(os.getpid(), 0x10, PAGE)


def test_listen_and_size_specs():
    assert str(parse_listen("unix:/run/x.sock")) == "unix:/run/x.sock"
    assert (parse_listen("tcp:[::1]:10809").host, parse_listen("tcp:[::1]:10809").port) == ("::1", 10809)
    for bad in ("udp:1.2.3.4:5", "tcp:localhost", "tcp::80", "unix:", "tcp:h:99999", "/path"):
        with pytest.raises(ValueError, match="not a listen address|out of range"):
            parse_listen(bad)
    assert parse_size("1G") == 1 << 30 and parse_size("0x1000") == 4096 and parse_size("64MiB") == 64 << 20


# --- the real command ------------------------------------------------------------------------------
def start_serve(processes, run_dir: Path, *args, log: str = "serve.log") -> tuple[subprocess.Popen, Path]:
    sock = run_dir / "serve.sock"
    out = open(run_dir / log, "wb")
    argv = [sys.executable, "-m", "nbd_postcopy.cli", "-v", "serve", "--listen", f"unix:{sock}", *args]
    proc = processes.start(argv, stdout=out, stderr=subprocess.STDOUT)
    wait_for_path(sock, proc=proc)
    return proc, sock


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_removes_the_socket(processes, run_dir, image, signum):
    proc, sock = start_serve(processes, run_dir, "--file", image[0])
    client = SourceClient(f"nbd+unix:///?socket={sock}")  # a connected client must not hold shutdown up
    try:
        proc.send_signal(signum)
        assert proc.wait(10) == 0
        assert not sock.exists()
    finally:
        client.close()


def test_cpus_keeps_every_thread_of_the_server_on_those_cpus(processes, run_dir, image):
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    last = max(allowed)
    proc, sock = start_serve(processes, run_dir, "--file", image[0], "--cpus", str(last),
                             "--metrics-listen", f"127.0.0.1:{free_tcp_port()}")
    client = SourceClient(f"nbd+unix:///?socket={sock}")
    try:
        assert client.read(0, PAGE, timeout=10) == image[1][:PAGE]
        threads = os.listdir(f"/proc/{proc.pid}/task")
        assert len(threads) > 1  # the metrics server's thread started after the pinning
        assert all(os.sched_getaffinity(int(task)) == {last} for task in threads)
    finally:
        client.close()


def test_sigusr1_opens_the_closed_gate(processes, run_dir, image):
    proc, sock = start_serve(processes, run_dir, "--file", image[0], "--gate", "closed", log="gate.log")
    client = SourceClient(f"nbd+unix:///?socket={sock}")
    try:
        result = {}
        reader = threading.Thread(target=lambda: result.update(data=client.read(0, PAGE, timeout=10)))
        reader.start()
        time.sleep(0.5)
        assert "data" not in result
        proc.send_signal(signal.SIGUSR1)
        reader.join(10)
        assert result["data"] == image[1][:PAGE]
    finally:
        client.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    assert "freeze gate open (SIGUSR1)" in (run_dir / "gate.log").read_text()


def test_metrics_endpoint_passes_promtool(processes, run_dir, image):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, sock = start_serve(processes, run_dir, "--file", image[0], "--metrics-listen", f"127.0.0.1:{port}")
    client = SourceClient(f"nbd+unix:///?socket={sock}")
    try:
        client.read_many([(0, PAGE), (PAGE, 2 * PAGE)])
        client.block_status(0, SIZE)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        client.close()
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line.startswith("nbd_postcopy_server")}
    assert samples['nbd_postcopy_server_requests_total{command="read"}'] == 2
    assert samples['nbd_postcopy_server_requests_total{command="block_status"}'] == 1
    assert samples["nbd_postcopy_server_read_bytes_total"] == 3 * PAGE
    assert samples["nbd_postcopy_server_request_seconds_count"] == 3
    assert samples["nbd_postcopy_server_gate_open"] == 1
    assert samples["nbd_postcopy_server_clients"] == 1
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def nbdinfo(uri: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=30)


def test_tls_require_with_nbdinfo(processes, run_dir, image, tls_files):
    proc, sock = start_serve(processes, run_dir, "--file", image[0], "--export", "ram",
                             "--tls-cert", tls_files / "server-cert.pem", "--tls-key", tls_files / "server-key.pem",
                             "--tls", "require")
    ok = nbdinfo(f"nbds+unix:///ram?socket={sock}&tls-certificates={tls_files / 'ca-only'}")
    assert ok.returncode == 0, ok.stderr
    info = json.loads(ok.stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == SIZE
    plain = nbdinfo(f"nbd+unix:///ram?socket={sock}")
    assert plain.returncode != 0
    assert proc.poll() is None


def test_tls_ca_requires_a_client_certificate(processes, run_dir, image, tls_files):
    proc, sock = start_serve(processes, run_dir, "--file", image[0],
                             "--tls-cert", tls_files / "server-cert.pem", "--tls-key", tls_files / "server-key.pem",
                             "--tls-ca", tls_files / "ca-cert.pem", "--tls", "require")
    assert nbdinfo(f"nbds+unix:///?socket={sock}&tls-certificates={tls_files / 'with-client'}").returncode == 0
    assert nbdinfo(f"nbds+unix:///?socket={sock}&tls-certificates={tls_files / 'ca-only'}").returncode != 0
    client = SourceClient(f"nbds+unix:///?socket={sock}&tls-certificates={tls_files / 'with-client'}")
    try:
        assert client.read_many([(0, PAGE), (SIZE - PAGE, PAGE)]) == [image[1][:PAGE], image[1][-PAGE:]]
    finally:
        client.close()
    with pytest.raises(SourceUnavailable):
        SourceClient(f"nbds+unix:///?socket={sock}&tls-certificates={tls_files / 'ca-only'}", connect_timeout=0.5)
    assert proc.poll() is None


@pytest.mark.parametrize("args, message", [
    (["--file", "/nonexistent/ram"], "cannot open source file /nonexistent/ram: No such file"),
    (["--pid", "999999999", "--address", "0x1000", "--length", "4096"], "no process with pid 999999999"),
    (["--pid", "1", "--address", "zz", "--length", "4096"], "address must be a number"),
    (["--pid", "1", "--length", "4096"], "--pid needs --address"),
    (["--file", "{image}", "--pid", "1"], "either --file"),
    (["--file", "{image}", "--tls", "require"], "--tls require needs --tls-cert"),
])
def test_clear_errors(run_dir, image, args, message):
    args = [a.replace("{image}", str(image[0])) for a in args]
    result = subprocess.run([*SERVE, "--listen", f"unix:{run_dir}/x.sock", *args], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_cpu_it_may_not_use_is_a_usage_error(image):
    result = subprocess.run([*SERVE, "--file", str(image[0]), "--listen", "unix:/nonexistent/x.sock", "--cpus", "4095"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "argument --cpus: CPU 4095 is not one this process may use" in result.stderr


def test_bad_listen_spec_is_a_usage_error(image):
    result = subprocess.run([*SERVE, "--file", str(image[0]), "--listen", "tcp:nohost"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "argument --listen: not a listen address: 'tcp:nohost'" in result.stderr


def test_busy_port_and_live_socket_are_refused(processes, run_dir, image):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([*SERVE, "--file", str(image[0]), "--listen", f"tcp:127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and f"cannot listen on tcp:127.0.0.1:{port}: address already in use" in result.stderr
    proc, sock = start_serve(processes, run_dir, "--file", image[0])
    second = subprocess.run([*SERVE, "--file", str(image[0]), "--listen", f"unix:{sock}"], capture_output=True,
                            text=True, timeout=30)
    assert second.returncode == 1 and "address already in use" in second.stderr
    assert proc.poll() is None and sock.exists()


@pytest.mark.slow
def test_qmp_gate_opens_when_a_real_qemu_stops(processes, run_dir, image):
    """QEMU with two QMP monitors: the server watches one, the test stops the guest through the other."""
    watched, control = run_dir / "qmp-gate.sock", run_dir / "qmp-test.sock"
    processes.start(["qemu-system-x86_64", "-accel", "tcg", "-machine", "none", "-nodefaults", "-display", "none",
                     "-qmp", f"unix:{watched},server=on,wait=off", "-qmp", f"unix:{control},server=on,wait=off"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_path(control)
    proc, sock = start_serve(processes, run_dir, "--file", image[0], "--gate", f"qmp:{watched}", log="qmp.log")
    client = SourceClient(f"nbd+unix:///?socket={sock}")
    try:
        result = {}
        reader = threading.Thread(target=lambda: result.update(data=client.read(0, PAGE, timeout=20)))
        reader.start()
        time.sleep(1.0)
        assert "data" not in result  # QEMU is running: the gate holds the read
        with socket.socket(socket.AF_UNIX) as qmp:
            qmp.connect(str(control))
            stream = qmp.makefile("rw")
            stream.readline()  # greeting
            for command in ("qmp_capabilities", "stop"):
                stream.write(json.dumps({"execute": command}) + "\n")
                stream.flush()
                while "return" not in json.loads(stream.readline()):
                    pass
        reader.join(20)
        assert result["data"] == image[1][:PAGE]
    finally:
        client.close()
    # the STOP event opens it (or query-status, should it see the pause first)
    assert re.search(r"freeze gate open \(QEMU at \S+ (reports a STOP event|reports status 'paused')\)",
                     (run_dir / "qmp.log").read_text())


def test_file_source_skips_holes_without_allocating_them():
    path = Path(f"/dev/shm/nbdpc-test-{os.getpid()}-sparse.img")
    try:
        with open(path, "wb") as f:
            f.truncate(64 * PAGE * 16)
            f.seek(64 * PAGE)
            f.write(os.urandom(64 * PAGE) + bytes(64 * PAGE) + os.urandom(64 * PAGE))
        allocated = path.stat().st_blocks
        source = FileSource(path)
        try:
            assert source.extents(0, source.size) == [(64 * PAGE, 3), (64 * PAGE, 0), (64 * PAGE, 3), (64 * PAGE, 0),
                                                      (source.size - 256 * PAGE, 3)]
            assert bytes(source.read(0, 64 * PAGE)) == bytes(64 * PAGE)  # a large read of a hole
            assert bytes(source.read(source.size - PAGE, PAGE)) == bytes(PAGE)
        finally:
            source.close()
        assert path.stat().st_blocks == allocated
    finally:
        path.unlink(missing_ok=True)


# --- the READ fast path agrees with the core -----------------------------------------------------
def _request(command: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)


def _fast_path_workload(size: int) -> list[bytes]:
    """Request bytes in several writes: plain reads, zero and mixed pages, unaligned and last-page reads,
    flags, bad ranges, other commands, a repeated handle and a request split across two writes."""
    read, last = Command.READ, size - PAGE
    first = b"".join([
        _request(read, 1, 0, PAGE), _request(read, 2, PAGE, 3 * PAGE), _request(read, 3, 100, 5000),
        _request(read, 4, last, PAGE), _request(read, 4, 2 * PAGE, PAGE),  # handle 4 again, once free
        _request(read, 5, 16 * PAGE, PAGE),  # a zero page
        _request(read, 6, 8 * PAGE, PAGE),  # back to plain reads after the core took one
    ])
    second = b"".join([
        _request(read, 7, 15 * PAGE, 3 * PAGE),  # data, zeroes, data
        _request(read, 8, 0, PAGE, flags=CommandFlag.DF), _request(read, 9, last, 2 * PAGE),
        _request(read, 10, 0, 0), _request(read, 11, 0, MAX_BLOCK + 1), _request(Command.CACHE, 12, 0, PAGE),
        _request(Command.FLUSH, 13, 0, 0), _request(Command.BLOCK_STATUS, 14, 0, 64 * PAGE),
        _request(read, 15, 31 * PAGE, 2 * PAGE), _request(Command.WRITE, 16, 0, 8) + bytes(8),
    ])
    third = _request(read, 17, 5 * PAGE, PAGE) + _request(read, 18, 6 * PAGE, PAGE)
    return [first, second, third[:40], third[40:], _request(read, 19, 7 * PAGE, PAGE), _request(Command.DISC, 0, 0, 0)]


async def _replies(sock: str, structured: bool, writes: list[bytes]) -> bytes:
    """Negotiate, send `writes` one at a time, and return every byte the server sends until it hangs up."""
    client = await CoreClient.connect(sock, "ram", structured_replies=structured)
    assert client.ready.structured_replies == structured
    for chunk in writes:
        client.writer.write(chunk)
        await client.writer.drain()
        await asyncio.sleep(0.02)
    received = bytearray(client.conn._buf)
    while chunk := await asyncio.wait_for(client.reader.read(1 << 20), 5):
        received += chunk
    client.close()
    return bytes(received)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_read_fast_path_sends_the_same_bytes_as_the_core(run_dir, image, monkeypatch, structured):
    path, _ = image
    writes = _fast_path_workload(SIZE)
    taken = []
    fast_reads = _NbdConnection._fast_reads

    def counting(self, nbytes):
        done = fast_reads(self, nbytes)
        taken.append(done // 28)
        return done

    async def run(fast: bool) -> tuple[bytes, dict]:
        server, sock = await started_server(run_dir, path)
        try:
            with monkeypatch.context() as patch:
                patch.setattr(_NbdConnection, "_fast_reads", counting)
                if not fast:
                    patch.setattr(_NbdConnection, "_fast_path_open", lambda self: False)
                replies = await _replies(sock, structured, writes)
        finally:
            await server.close()
        samples = {s.name + str(s.labels): s.value for m in server.metrics.registry.collect() for s in m.samples
                   if "_bucket" not in s.name and "created" not in s.name and "sum" not in s.name}
        return replies, samples

    general, general_metrics = asyncio.run(run(fast=False))
    assert not taken
    fast, fast_metrics = asyncio.run(run(fast=True))
    assert sum(taken) >= 7, taken  # the fast path did answer the plain reads
    assert fast == general
    assert fast_metrics == general_metrics


def test_an_export_name_over_the_nbd_limit_is_a_usage_error(image):
    result = subprocess.run([*SERVE, "--file", str(image[0]), "--listen", "unix:/tmp/never.sock", "--export", "x" * 5000],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "export name of 5000 bytes: NBD allows at most 4096" in result.stderr
    assert "Traceback" not in result.stderr
