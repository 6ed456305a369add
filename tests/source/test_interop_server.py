"""Black-box interop tests of `nbd-postcopy serve` with NBD peers nobody here wrote.

Clients: nbdinfo, nbdcopy, python3-libnbd, qemu-img and nbdkit's own `nbd` plugin, plus raw sockets
for garbage. Every test starts the server as a process and talks to it over a socket. The tests that
check plain NBD behaviour also run against `nbdkit file` (the reference in tests/servers.py), which
shows that they check something real.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for_path
from tests.servers import SERVER_KINDS, TRANSPORTS, RunningServer, free_tcp_port, serve, write_image

PAGE = 4096
IMAGE_SIZE = 16 * 1024 * 1024
# Zero ranges of the test image, as (offset, length): never written, so they are holes in the file.
IMAGE_HOLES = [(0, 16 * PAGE), (4 * 1024 * 1024, 65 * PAGE), (IMAGE_SIZE - 32 * PAGE, 32 * PAGE)]
METRICS_PREFIX = "nbd_postcopy_server_"

# NBD wire constants used by the raw-socket tests (from the NBD protocol document).
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_GO = 7
NBD_REP_MAGIC = 0x3E889045565A9
NBD_REP_ERR_UNSUP = (1 << 31) + 1
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_CMD_READ = 0
NBD_EINVAL = 22


@dataclass(frozen=True)
class Image:
    path: Path
    data: bytes


@pytest.fixture
def image() -> Iterator[Image]:
    """A 16 MiB image of random bytes with some zero (hole) ranges, and its content. Fresh for every
    test, so that a server that wrongly allocates the holes cannot spoil the next test.

    Name: /dev/shm/nbdpc-test-UUID.img   Scope: function   Depends: nothing
    """
    path = Path(f"/dev/shm/nbdpc-test-{uuid.uuid4().hex}.img")
    try:
        write_image(path, IMAGE_SIZE, IMAGE_HOLES)
        yield Image(path, path.read_bytes())
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture(params=SERVER_KINDS)
def server(request, image: Image, run_dir: Path) -> Iterator[RunningServer]:
    """The server under test, then the reference, serving `image` on a Unix socket and loopback TCP.

    Name: run_dir/KIND.sock + a free port   Scope: function   Depends: image, run_dir
    """
    with serve(request.param, run_dir, image=image.path) as running:
        yield running


@pytest.fixture
def postcopy_server(image: Image, run_dir: Path) -> Iterator[RunningServer]:
    """`nbd-postcopy serve --file` on `image`, for tests of its own features (no reference to run).

    Name: run_dir/nbd-postcopy.sock + a free port   Scope: function   Depends: image, run_dir
    """
    with serve("nbd-postcopy", run_dir, image=image.path) as running:
        yield running


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a client to completion; fail the test with its output if it fails."""
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, **kwargs)
    assert result.returncode == 0, f"{argv} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@contextlib.contextmanager
def client(uri: str, structured: bool = True, meta_context: str | None = None) -> Iterator[nbd.NBD]:
    """A python3-libnbd handle connected to `uri`; disconnects on exit."""
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if meta_context:
        h.add_meta_context(meta_context)
    h.connect_uri(uri)
    try:
        yield h
    finally:
        with contextlib.suppress(nbd.Error):  # the server may be gone already
            h.shutdown()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- nbdinfo ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nbdinfo_json_reports_size_read_only_and_block_sizes(server: RunningServer, transport: str):
    info = json.loads(run(["nbdinfo", "--json", server.uri(transport)]).stdout)
    (export,) = info["exports"]
    assert info["protocol"] == "newstyle-fixed"
    assert export["export-size"] == IMAGE_SIZE
    assert export["is_read_only"] is True
    minimum, preferred, maximum = (export[f"block_size_{k}"] for k in ("minimum", "preferred", "maximum"))
    assert 1 <= minimum <= preferred <= maximum


def test_nbdinfo_list_shows_the_export(server: RunningServer):
    info = json.loads(run(["nbdinfo", "--list", "--json", server.uri()]).stdout)
    assert server.export in [e["export-name"] for e in info["exports"]]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("export_name", ["named", "default"])
def test_named_and_default_export_serve_the_image(server: RunningServer, image: Image, transport: str, export_name: str):
    uri = server.uri(transport, export=server.export if export_name == "named" else "")
    assert int(run(["nbdinfo", "--size", uri]).stdout) == IMAGE_SIZE
    with client(uri) as h:
        assert h.pread(PAGE, 16 * PAGE) == image.data[16 * PAGE : 17 * PAGE]


# --- nbdcopy and qemu-img --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_nbdcopy_256mib_random_image_is_byte_identical(kind: str, run_dir: Path):
    big = Path(f"/dev/shm/nbdpc-test-{uuid.uuid4().hex}.img")
    copy = big.with_suffix(".copy")
    try:
        write_image(big, 256 * 1024 * 1024)
        with serve(kind, run_dir, image=big) as running:
            run(["nbdcopy", running.uri(), copy])
        assert copy.stat().st_size == big.stat().st_size
        assert sha256_file(copy) == sha256_file(big)
    finally:
        big.unlink(missing_ok=True)
        copy.unlink(missing_ok=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_qemu_img_compare_finds_uri_and_file_identical(server: RunningServer, image: Image, transport: str):
    result = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri(transport), image.path])
    assert "Images are identical" in result.stdout


# --- python3-libnbd --------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_random_preads_match_the_image(server: RunningServer, image: Image, structured: bool):
    rng = random.Random(20261125)
    with client(server.uri(), structured=structured) as h:
        assert h.get_structured_replies_negotiated() == structured
        for _ in range(400):
            length = rng.choice([1, 512, PAGE, 3 * PAGE + 17, 64 * 1024, 1024 * 1024])
            offset = rng.randrange(0, IMAGE_SIZE - length + 1)
            if rng.random() < 0.5:
                offset -= offset % PAGE  # half of them page-aligned, like swap-ins
            assert h.pread(length, offset) == image.data[offset : offset + length], (offset, length)
        # Reads that cover a hole, straddle its edges, and the last byte.
        for offset, length in [(0, 64 * 1024), (4 * 1024 * 1024 - 100, 70 * PAGE), (IMAGE_SIZE - 1, 1)]:
            assert h.pread(length, offset) == image.data[offset : offset + length], (offset, length)


def test_structured_read_sends_zero_pages_as_hole_chunks(postcopy_server: RunningServer, image: Image):
    """A structured read answers zero pages with OFFSET_HOLE chunks instead of bytes (issue 2; the
    protocol allows but does not require it, so this is not asked of the reference)."""
    chunks: list[tuple[int, int, int]] = []  # (offset, length, status)

    def on_chunk(subbuf: bytes, offset: int, status: int, error) -> int:
        chunks.append((offset, len(subbuf), status))
        return 0

    hole_start, hole_length = IMAGE_HOLES[1]
    offset, length = hole_start - 4 * PAGE, hole_length + 8 * PAGE  # data, the hole, data
    with client(postcopy_server.uri()) as h:
        data = h.pread_structured(length, offset, on_chunk)
    assert data == image.data[offset : offset + length]
    holes = [(o, n) for o, n, status in chunks if status == nbd.READ_HOLE]
    assert sum(n for _, n in holes) == hole_length, chunks
    assert all(hole_start <= o and o + n <= hole_start + hole_length for o, n in holes), chunks


def test_block_status_reports_zero_ranges_and_data(server: RunningServer):
    with client(server.uri(), meta_context=nbd.CONTEXT_BASE_ALLOCATION) as h:
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        extents: list[tuple[int, int]] = []  # (length, flags), in order from offset 0

        def on_extents(context: str, offset: int, entries: list[int], error) -> int:
            if context == nbd.CONTEXT_BASE_ALLOCATION:
                extents.extend(zip(entries[0::2], entries[1::2]))
            return 0

        covered = 0
        while covered < IMAGE_SIZE:
            before = len(extents)
            h.block_status(IMAGE_SIZE - covered, covered, on_extents)
            assert len(extents) > before, f"no extent at offset {covered}"
            covered += sum(length for length, _ in extents[before:])
    zero_pages = {page for offset, length in IMAGE_HOLES for page in range(offset // PAGE, (offset + length) // PAGE)}
    position = 0
    for length, flags in extents:
        for page in range(position // PAGE, min(position + length, IMAGE_SIZE) // PAGE):
            is_zero = bool(flags & nbd.STATE_ZERO)
            assert is_zero == (page in zero_pages), f"page {page}: flags {flags:#x}"
        position += length


def test_serving_leaves_the_files_holes_unallocated(server: RunningServer, image: Image):
    """Untouched guest RAM is a hole in a memory-backend-file on /dev/shm: reading it through the
    server (copies, reads, block status) must not make the source host allocate it."""
    allocated = image.path.stat().st_blocks
    run(["nbdinfo", "--map", server.uri()])
    run(["nbdcopy", server.uri(), "null:"])
    with client(server.uri(), structured=False) as h:
        for offset, length in IMAGE_HOLES:
            assert h.pread(length, offset) == bytes(length)
    assert image.path.stat().st_blocks == allocated


def _read_many_in_flight(uri: str, image: Image, seed: int) -> int:
    """Queue 128 random reads on one connection before waiting for any; check every one. Returns the
    most reads seen in flight at once."""
    rng = random.Random(seed)
    with client(uri) as h:
        reads = []
        for _ in range(128):
            length = rng.choice([PAGE, 8 * PAGE, 64 * 1024])
            offset = rng.randrange(0, (IMAGE_SIZE - length) // PAGE + 1) * PAGE
            buf = nbd.Buffer(length)
            reads.append((h.aio_pread(buf, offset), buf, offset, length))
        most_in_flight = h.aio_in_flight()
        pending = {cookie for cookie, *_ in reads}
        deadline = time.monotonic() + 30
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} reads still pending"
            h.poll(1000)
            most_in_flight = max(most_in_flight, h.aio_in_flight())
            pending = {cookie for cookie in pending if not h.aio_command_completed(cookie)}
    for _, buf, offset, length in reads:
        assert buf.to_bytearray() == image.data[offset : offset + length], (offset, length)
    return most_in_flight


@pytest.mark.parametrize("connections", [1, 4])
def test_many_requests_in_flight_all_complete_correctly(server: RunningServer, image: Image, connections: int):
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        most_in_flight = list(pool.map(lambda seed: _read_many_in_flight(server.uri(), image, seed), range(connections)))
    assert all(n > 1 for n in most_in_flight), most_in_flight


def test_cache_command_succeeds(server: RunningServer, image: Image):
    with client(server.uri()) as h:
        assert h.can_cache()
        h.cache(1024 * 1024, 0)
        assert h.pread(PAGE, 0) == image.data[:PAGE]


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["pwrite", "trim", "zero"])
def test_writing_commands_get_eperm_from_the_server(server: RunningServer, image: Image, command: str):
    with client(server.uri()) as h:
        h.set_strict_mode(0)  # let libnbd send what a read-only export must refuse
        call = {"pwrite": lambda: h.pwrite(b"\xaa" * PAGE, 0), "trim": lambda: h.trim(PAGE, 0), "zero": lambda: h.zero(PAGE, 0)}
        with pytest.raises(nbd.Error) as refused:
            call[command]()
        assert refused.value.errno == "EPERM"
        assert "command failed" in refused.value.string  # the server's reply, not libnbd's own check
        assert h.pread(PAGE, 0) == image.data[:PAGE]  # still connected, and page 0 unchanged


@pytest.mark.parametrize("offset", [IMAGE_SIZE, IMAGE_SIZE - PAGE // 2, 1 << 40], ids=["at-end", "straddling-end", "far"])
def test_out_of_range_read_gets_einval_from_the_server(server: RunningServer, image: Image, offset: int):
    with client(server.uri()) as h:
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error) as refused:
            h.pread(PAGE, offset)
        assert refused.value.errno == "EINVAL"
        assert "command failed" in refused.value.string
        assert h.pread(PAGE, 16 * PAGE) == image.data[16 * PAGE : 17 * PAGE]


def _greeting(sock: socket.socket) -> None:
    data = _recv_exactly(sock, 18)
    magic, option_magic, _flags = struct.unpack(">QQH", data)
    assert (magic, option_magic) == (NBDMAGIC, IHAVEOPT), data


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"server closed after {len(data)} of {n} bytes"
        data += chunk
    return data


def _option(option: int, payload: bytes) -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(payload)) + payload


def _start_options(sock: socket.socket) -> None:
    """Read the greeting and answer it as a fixed-newstyle client: the option phase begins."""
    _greeting(sock)
    sock.sendall(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))


def _export_name(sock: socket.socket, export: str) -> None:
    """NBD_OPT_EXPORT_NAME: straight into transmission, with simple replies."""
    sock.sendall(_option(NBD_OPT_EXPORT_NAME, export.encode()))
    size, _transmission_flags = struct.unpack(">QH", _recv_exactly(sock, 10))
    assert size == IMAGE_SIZE


def _export_name_handshake(sock: socket.socket, export: str) -> None:
    _start_options(sock)
    _export_name(sock, export)


def _request(sock: socket.socket, command: int, handle: int, offset: int, length: int) -> int:
    """Send one request; return the error of its simple reply (the payload of a good READ is left unread)."""
    sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, command, handle, offset, length))
    magic, error, reply_handle = struct.unpack(">IIQ", _recv_exactly(sock, 16))
    assert (magic, reply_handle) == (NBD_SIMPLE_REPLY_MAGIC, handle)
    return error


def _garbage_random(sock: socket.socket, export: str) -> None:
    sock.sendall(b"\xff" + os.urandom(4095))  # client flags with unknown bits set, then noise


def _garbage_truncated_handshake(sock: socket.socket, export: str) -> None:
    _start_options(sock)
    sock.sendall(_option(NBD_OPT_GO, export.encode())[:13])  # an option header cut short
    sock.shutdown(socket.SHUT_WR)


def _garbage_wrong_option_magic(sock: socket.socket, export: str) -> None:
    _start_options(sock)
    sock.sendall(struct.pack(">QII", 0x1122334455667788, NBD_OPT_GO, 0))


def _garbage_huge_option_length(sock: socket.socket, export: str) -> None:
    _start_options(sock)
    sock.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, 0xFFFFFFFF) + os.urandom(4096))


def _garbage_wrong_request_magic(sock: socket.socket, export: str) -> None:
    _export_name_handshake(sock, export)
    sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, NBD_CMD_READ, 1, 0, PAGE))


GARBAGE = {
    "random-bytes": _garbage_random,
    "truncated-handshake": _garbage_truncated_handshake,
    "wrong-option-magic": _garbage_wrong_option_magic,
    "huge-option-length": _garbage_huge_option_length,
    "wrong-request-magic": _garbage_wrong_request_magic,
}


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_gets_a_clean_disconnect_and_others_keep_being_served(server: RunningServer, image: Image, garbage: str):
    with client(server.uri()) as bystander:  # a client connected before the garbage arrives
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(server.unix_socket))
            GARBAGE[garbage](sock, server.export)
            received = 0
            try:
                while chunk := sock.recv(65536):  # error replies are fine; then the server must hang up
                    received += len(chunk)
                    assert received < 1 << 20, "server keeps talking to a garbage client"
            except ConnectionResetError:
                pass
        assert server.alive()
        assert bystander.pread(PAGE, 16 * PAGE) == image.data[16 * PAGE : 17 * PAGE]
        assert int(run(["nbdinfo", "--size", server.uri()]).stdout) == IMAGE_SIZE


def test_unknown_option_gets_err_unsup_and_the_handshake_goes_on(server: RunningServer, image: Image):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(server.unix_socket))
        _start_options(sock)
        sock.sendall(_option(0x7FFF, b"no such option"))
        magic, option, reply, length = struct.unpack(">QIII", _recv_exactly(sock, 20))
        assert (magic, option, reply) == (NBD_REP_MAGIC, 0x7FFF, NBD_REP_ERR_UNSUP)
        _recv_exactly(sock, length)  # an optional message for humans
        _export_name(sock, server.export)
        assert _request(sock, NBD_CMD_READ, 1, 16 * PAGE, PAGE) == 0
        assert _recv_exactly(sock, PAGE) == image.data[16 * PAGE : 17 * PAGE]


def test_unknown_command_gets_einval_and_the_connection_goes_on(server: RunningServer, image: Image):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(server.unix_socket))
        _export_name_handshake(sock, server.export)
        assert _request(sock, 0x7F, 1, 0, PAGE) == NBD_EINVAL
        assert _request(sock, NBD_CMD_READ, 2, 16 * PAGE, PAGE) == 0
        assert _recv_exactly(sock, PAGE) == image.data[16 * PAGE : 17 * PAGE]


# --- nbdkit's nbd plugin as a proxy ------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nbdkit_nbd_plugin_proxies_the_server(server: RunningServer, image: Image, run_dir: Path, processes, transport: str):
    proxy_socket = run_dir / "proxy.sock"
    proxy = processes.start(
        ["nbdkit", "--readonly", "--foreground", "--exit-with-parent", "--unix", proxy_socket, "nbd", f"uri={server.uri(transport)}"],
        stdout=subprocess.DEVNULL,
    )
    wait_for_path(proxy_socket, proc=proxy)
    proxy_uri = f"nbd+unix:///?socket={proxy_socket}"
    info = json.loads(run(["nbdinfo", "--json", proxy_uri]).stdout)
    assert info["exports"][0]["export-size"] == IMAGE_SIZE
    copy = run_dir / "copy.img"
    run(["nbdcopy", proxy_uri, copy])
    assert copy.read_bytes() == image.data


# --- features of nbd-postcopy serve ------------------------------------------------------------------

# A process that copies a file into anonymous memory, prints the region's address, and waits until its
# stdin closes.
MEMORY_HOLDER = """
import ctypes, mmap, sys
content = open(sys.argv[1], "rb").read()
region = mmap.mmap(-1, len(content), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
region[:] = content
print(hex(ctypes.addressof(ctypes.c_char.from_buffer(region))), flush=True)
sys.stdin.read()
"""


def test_serves_a_range_of_another_process_memory(run_dir: Path, processes):
    content = run_dir / "content"
    content.write_bytes(os.urandom(8 * 1024 * 1024) + bytes(64 * PAGE) + os.urandom(PAGE))
    holder = processes.start([sys.executable, "-c", MEMORY_HOLDER, content], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address = holder.stdout.readline().strip()
        assert address.startswith("0x"), address
        length = content.stat().st_size
        source = ["--pid", str(holder.pid), "--address", address, "--length", str(length)]
        with serve("nbd-postcopy", run_dir, source=source) as running:
            assert int(run(["nbdinfo", "--size", running.uri()]).stdout) == length
            copy = run_dir / "copy"
            run(["nbdcopy", running.uri(), copy])
            assert copy.read_bytes() == content.read_bytes()
    finally:
        holder.stdin.close()


def test_closed_gate_holds_reads_until_sigusr1(image: Image, run_dir: Path):
    with serve("nbd-postcopy", run_dir, image=image.path, extra=["--gate", "closed"]) as running:
        with client(running.uri()) as h:  # the handshake is not gated, only reads are
            offset = 100 * PAGE
            buf = nbd.Buffer(PAGE)
            cookie = h.aio_pread(buf, offset)
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                h.poll(50)
            assert not h.aio_command_completed(cookie), "a read was served through a closed gate"
            os.kill(running.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not h.aio_command_completed(cookie):
                assert time.monotonic() < deadline, "the read did not complete after the gate opened"
                h.poll(100)
            assert buf.to_bytearray() == image.data[offset : offset + PAGE]
            assert h.pread(PAGE, 0) == image.data[:PAGE]  # the gate stays open


def _scrape(port: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in exposition `text`; fails if it is not there."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


def test_metrics_pass_promtool_and_count_reads(image: Image, run_dir: Path):
    port = free_tcp_port()
    with serve("nbd-postcopy", run_dir, image=image.path, extra=["--metrics-listen", f"127.0.0.1:{port}"]) as running:
        before = _scrape(port)
        check = subprocess.run(["promtool", "check", "metrics"], input=before, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"promtool:\n{check.stdout}{check.stderr}\n{before}"
        families = [f.name for f in text_string_to_metric_families(before)]
        assert families and all(name.startswith(METRICS_PREFIX) for name in families), families
        assert _sample(before, "nbd_postcopy_server_gate_open") == 1
        with client(running.uri()) as h:
            for page in range(20):
                h.pread(PAGE, page * PAGE)
            assert _sample(_scrape(port), "nbd_postcopy_server_clients") >= 1
        after = _scrape(port)
        reads = "nbd_postcopy_server_requests_total"
        assert _sample(after, reads, command="read") == _sample(before, reads, command="read") + 20
        read_bytes = "nbd_postcopy_server_read_bytes_total"
        assert _sample(after, read_bytes) == _sample(before, read_bytes) + 20 * PAGE


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_cleanly_and_removes_the_socket(postcopy_server: RunningServer, signum: int):
    with client(postcopy_server.uri()):  # a connected client must not keep the server from exiting
        os.kill(postcopy_server.pid, signum)
        assert postcopy_server.procs[0].wait(10) == 0, postcopy_server.log_text()
    assert not postcopy_server.unix_socket.exists()
