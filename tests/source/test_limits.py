"""`nbd-postcopy serve` under hostile clients: its memory, descriptors and connections stay bounded.

Each test runs the real command and measures its process (/proc/PID/status, /proc/PID/fd) while raw
clients misbehave: bursts of huge READs never read, abandoned TLS connections, silent STARTTLS, thousands
of idle connections, requests trickled a byte at a time.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nbd_postcopy.nbd import wire
from nbd_postcopy.nbd.protocol import MAX_BLOCK
from nbd_postcopy.nbd.wire import REQUEST, REQUEST_MAGIC, Command, Info, Option
from tests.conftest import wait_for_path
from tests.servers import free_tcp_port, write_image

MIB = 1 << 20
IMAGE_SIZE = 64 * MIB
# The documented bound: one connection holds at most max(16 MiB of unsent replies, one 32 MiB reply).
PER_CONNECTION_BOUND = 32 * MIB
SLACK = 48 * MIB  # Python's own growth, the TLS layer's buffers, allocator fragmentation


@pytest.fixture
def big_image(run_dir: Path) -> Path:
    path = Path("/var/tmp") / f"{run_dir.name}-limits.img"  # on disk: its pages are page cache, not shmem
    write_image(path, IMAGE_SIZE, holes=[])
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


class Served:
    """`nbd-postcopy serve` on a Unix socket and a loopback port, with its metrics."""

    def __init__(self, processes, run_dir: Path, *args: str):
        self.socket = run_dir / "limits.sock"
        self.port, self.metrics_port = free_tcp_port(), free_tcp_port()
        self.log = run_dir / "limits.log"
        argv = [sys.executable, "-m", "nbd_postcopy.cli", "-v", "serve", "--listen", f"unix:{self.socket}",
                "--listen", f"tcp:127.0.0.1:{self.port}", "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                "--export", "ram", *args]
        with open(self.log, "wb") as log:
            self.proc = processes.start(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for_path(self.socket, proc=self.proc)
        deadline = time.monotonic() + 10  # the TCP listener and the metrics endpoint come up after the socket
        for port in (self.port, self.metrics_port):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline and self.proc.poll() is None, self.log_text()
                    time.sleep(0.02)

    def status_kib(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def anon_bytes(self) -> int:
        return self.status_kib("RssAnon") * 1024

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def option(opt: int, data: bytes = b"") -> bytes:
    return wire.OptionRequestHeader.build(dict(option=opt, length=len(data))) + data


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("server closed")
        data += chunk
    return data


def skip_option_replies(sock: socket.socket, until_ack_of: int) -> None:
    while True:
        header = wire.OptionReplyHeader.parse(recv_exactly(sock, 20))
        recv_exactly(sock, header.length)
        if int(header.option) == until_ack_of and int(header.reply) == wire.Reply.ACK:
            return


def raw_connect(served: Served, tls_context: ssl.SSLContext | None = None) -> socket.socket:
    """A raw client up to transmission (simple replies), over TLS if a context is given."""
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    recv_exactly(sock, 18)  # greeting
    sock.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    if tls_context is not None:
        sock.sendall(option(Option.STARTTLS))
        skip_option_replies(sock, Option.STARTTLS)
        sock = tls_context.wrap_socket(sock, server_hostname="localhost")
    sock.sendall(option(Option.GO, wire.InfoRequest.build(dict(name="ram", requests=[Info.BLOCK_SIZE]))))
    skip_option_replies(sock, Option.GO)
    return sock


def burst(sock: socket.socket, count: int, length: int = MAX_BLOCK) -> None:
    """`count` READs of `length` bytes in one write; no reply is ever read."""
    sock.sendall(b"".join(REQUEST.pack(REQUEST_MAGIC, 0, Command.READ, i + 1, (i * MIB) % (IMAGE_SIZE - length),
                                       length) for i in range(count)))


def client_tls_context(tls_files: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls_files / "ca-cert.pem"))
    context.load_cert_chain(tls_files / "client-cert.pem", tls_files / "client-key.pem")
    return context


def tls_args(tls_files: Path) -> list[str]:
    return ["--tls-cert", str(tls_files / "server-cert.pem"), "--tls-key", str(tls_files / "server-key.pem"),
            "--tls", "require"]


def settle(seconds: float = 1.5) -> None:
    time.sleep(seconds)


@pytest.fixture
def pid_source(big_image: Path):
    """A process holding the image in anonymous memory; yields the serve arguments for it."""
    code = ("import mmap, sys; data = open(sys.argv[1], 'rb').read(); m = mmap.mmap(-1, len(data)); m.write(data); "
            "import ctypes; print(hex(ctypes.addressof(ctypes.c_char.from_buffer(m))), flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(big_image)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        address = holder.stdout.readline().strip()
        yield ["--pid", str(holder.pid), "--address", address, "--length", str(IMAGE_SIZE)]
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "pid"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_burst_of_huge_reads_never_read_keeps_memory_bounded(processes, run_dir, big_image, request, kind, tls):
    source = ["--file", str(big_image)] if kind == "file" else request.getfixturevalue("pid_source")
    tls_files = request.getfixturevalue("tls_files") if tls else None
    served = Served(processes, run_dir, *source, *(tls_args(tls_files) if tls else []))
    sock = raw_connect(served, client_tls_context(tls_files) if tls else None)
    try:
        before = served.anon_bytes()
        burst(sock, 80)  # 2.5 GiB of replies asked for in one write
        settle()
        grown = served.anon_bytes() - before
        assert grown < PER_CONNECTION_BOUND + SLACK, f"RssAnon grew by {grown / MIB:.0f} MiB"
        assert served.metric("nbd_postcopy_server_backlog_bytes") <= PER_CONNECTION_BOUND + MIB
        assert served.metric('nbd_postcopy_server_requests_total{command="read"}') < 80
    finally:
        sock.close()


@pytest.mark.slow
def test_abandoned_tls_floods_give_their_memory_back(processes, run_dir, big_image, tls_files):
    served = Served(processes, run_dir, "--file", str(big_image), *tls_args(tls_files))
    context = client_tls_context(tls_files)
    start = served.anon_bytes()
    for _ in range(3):
        socks = [raw_connect(served, context) for _ in range(4)]
        for sock in socks:
            burst(sock, 8)
        settle(0.5)
        for sock in socks:
            sock.close()  # replies left unread
        settle()
    grown = served.anon_bytes() - start
    assert grown < SLACK, f"RssAnon grew by {grown / MIB:.0f} MiB over three rounds"
    assert served.metric("nbd_postcopy_server_clients") == 0


@pytest.mark.slow
def test_silent_starttls_clients_are_closed_and_leave_no_descriptors(processes, run_dir, big_image, tls_files):
    served = Served(processes, run_dir, "--file", str(big_image), *tls_args(tls_files), "--handshake-timeout", "1")
    baseline = served.descriptors()
    socks = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        recv_exactly(sock, 18)
        sock.sendall(struct.pack(">I", 3) + option(Option.STARTTLS))
        skip_option_replies(sock, Option.STARTTLS)
        socks.append(sock)  # and then nothing: no TLS hello
    try:
        settle(3.5)
        for sock in socks:
            assert sock.recv(1) == b""  # the server hung up
        assert served.descriptors() <= baseline
        assert served.metric("nbd_postcopy_server_clients") == 0
    finally:
        for sock in socks:
            sock.close()
    assert "TLS handshake failed" in served.log_text()


@pytest.mark.slow
def test_two_thousand_idle_connections_are_capped(processes, run_dir, big_image):
    served = Served(processes, run_dir, "--file", str(big_image), "--max-connections", "100")
    before = served.anon_bytes()
    socks = []
    try:
        for _ in range(2000):
            socks.append(socket.socket(socket.AF_UNIX))
            socks[-1].connect(str(served.socket))
        settle()
        assert served.metric("nbd_postcopy_server_clients") == 100
        assert served.metric('nbd_postcopy_server_connections_refused_total{reason="limit"}') == 1900
        assert served.anon_bytes() - before < 32 * MIB
        refused_lines = served.log_text().count("already 100 connections")
        assert 1 <= refused_lines <= 3  # rate-limited: one line per 10 s, not 1900
    finally:
        for sock in socks:
            sock.close()
    settle(1.0)
    assert served.metric("nbd_postcopy_server_clients") == 0


@pytest.mark.parametrize("how", ["trickle", "write_without_payload", "handshake_never_finished"])
def test_slow_or_incomplete_clients_are_dropped(processes, run_dir, big_image, how):
    served = Served(processes, run_dir, "--file", str(big_image), "--handshake-timeout", "1")
    if how == "handshake_never_finished":
        sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        recv_exactly(sock, 18)
        sock.sendall(struct.pack(">I", 3))  # and no option ever
        reason = "handshake_timeout"
    else:
        sock = raw_connect(served)
        reason = "incomplete_request"
        if how == "write_without_payload":
            sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, Command.WRITE, 1, 0, 4096))  # 4 KiB promised, none sent
    try:
        started = time.monotonic()
        request = REQUEST.pack(REQUEST_MAGIC, 0, Command.READ, 7, 0, 4096)
        sock.settimeout(0.4)
        closed = False
        for i in range(12):  # a byte every 0.4 s, 4.8 s in all: never a whole request within the deadline
            try:
                if how == "trickle":
                    sock.sendall(request[i : i + 1])
                closed = sock.recv(65536) == b""
            except socket.timeout:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            if closed:
                break
        assert closed and 1.0 <= time.monotonic() - started < 4.5
        assert served.metric(f'nbd_postcopy_server_connections_refused_total{{reason="{reason}"}}') == 1
    finally:
        sock.close()


def test_idle_connections_are_closed_after_the_idle_timeout(processes, run_dir, big_image):
    served = Served(processes, run_dir, "--file", str(big_image), "--idle-timeout", "1")
    sock = raw_connect(served)
    try:
        sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, Command.READ, 1, 0, 4096))
        assert len(recv_exactly(sock, 16 + 4096)) == 16 + 4096
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed about a second after the last request
        assert served.metric('nbd_postcopy_server_connections_refused_total{reason="idle_timeout"}') == 1
    finally:
        sock.close()


def test_a_client_reads_everything_of_a_burst_in_the_end(processes, run_dir, big_image):
    """The bound only delays replies: a client that does read gets every one of them, right."""
    served = Served(processes, run_dir, "--file", str(big_image))
    sock = raw_connect(served)
    data = big_image.read_bytes()
    try:
        burst(sock, 12, length=8 * MIB)  # 96 MiB asked for, more than the backlog bound
        seen = {}
        for _ in range(12):
            magic, error, handle = struct.unpack(">IIQ", recv_exactly(sock, 16))
            assert magic == wire.SIMPLE_REPLY_MAGIC and error == 0
            seen[handle] = recv_exactly(sock, 8 * MIB)
        for handle, payload in seen.items():
            offset = ((handle - 1) * MIB) % (IMAGE_SIZE - 8 * MIB)
            assert payload == data[offset : offset + 8 * MIB]
    finally:
        sock.close()
