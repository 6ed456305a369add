"""SourceClient against the real `nbd-postcopy serve` and nbdkit (a reference peer): pipelining from
many threads, reconnecting through server restarts, and timeouts."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from nbd_postcopy.nbd.client import (
    IdentityMismatch,
    SourceClient,
    SourceError,
    SourceIdentity,
    SourceUnavailable,
    _Request,
)
from nbd_postcopy.nbd.client_core import ClientConnection
from nbd_postcopy.nbd.protocol import NEED_DATA, ErrorReply, ExportInfo, ReadReply
from nbd_postcopy.nbd.server_core import ServerConnection
from nbd_postcopy.nbd.wire import Command, Errno
from nbd_postcopy.source.sources import MAX_SCAN_DATA

from tests.conftest import wait_for_path
from tests.servers import free_tcp_port, write_image_with_zeros

SIZE = 8 << 20
PAGE = 4096


@pytest.fixture
def image(run_dir: Path) -> tuple[Path, bytes]:
    """8 MiB of random data with a zero run at pages 64..127. Name: run_dir/ram.img  Scope: function"""
    path = run_dir / "ram.img"
    return path, write_image_with_zeros(path, SIZE, (64 * PAGE, 64 * PAGE))


def start_server(processes, run_dir: Path, kind: str, image: Path, *extra) -> tuple[subprocess.Popen, Path]:
    sock = run_dir / f"{kind}.sock"
    if kind == "nbd-postcopy":
        argv = [sys.executable, "-m", "nbd_postcopy.cli", "serve", "--file", image, "--export", "ram",
                "--listen", f"unix:{sock}", *extra]
    else:  # the reference, written by others
        argv = ["nbdkit", "--foreground", "--readonly", "--exit-with-parent", "--unix", sock, "file", image]
    proc = processes.start(argv, stderr=subprocess.DEVNULL)
    wait_for_path(sock, proc=proc)
    return proc, sock


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # a crash: no goodbye, the socket file stays behind
    proc.wait(10)


@pytest.mark.parametrize("kind", ["nbd-postcopy", "nbdkit"])
def test_reads_and_block_status(processes, run_dir, image, kind):
    path, data = image
    _, sock = start_server(processes, run_dir, kind, path)
    client = SourceClient(f"nbd+unix:///ram?socket={sock}", name="test")
    try:
        assert client.size == SIZE and client.connected
        assert client.read(0, PAGE) == data[:PAGE]
        assert client.read(SIZE - 10, 10) == data[-10:]
        ranges = [(random.randrange(SIZE // PAGE) * PAGE, PAGE) for _ in range(300)] + [(0, SIZE)]
        for (offset, length), got in zip(ranges, client.read_many(ranges)):
            assert got == data[offset : offset + length]
        out = bytearray(SIZE + PAGE)  # a whole-image reply comes in pieces: the rest lands in one receive
        views = [memoryview(out)[:PAGE], memoryview(out)[PAGE:]]
        client.read_many_into([(SIZE - PAGE, PAGE), (0, SIZE)], views)
        assert out == data[-PAGE:] + data
        with pytest.raises(ValueError, match="a view of 10 bytes"):
            client.read_many_into([(0, PAGE)], [memoryview(out)[:10]])
        extents = client.block_status(0, SIZE)
        assert sum(n for n, _ in extents) <= SIZE
        if kind == "nbd-postcopy":
            # one answer scans at most MAX_SCAN_DATA bytes of data: the rest needs another request
            (data_length, _), (hole, hole_flags), (rest, rest_flags) = extents
            assert (data_length, hole, hole_flags, rest_flags) == (64 * PAGE, 64 * PAGE, 3, 0)
            assert min(SIZE, MAX_SCAN_DATA) <= 128 * PAGE + rest <= SIZE
        with pytest.raises(ValueError, match="outside the source"):
            client.read(SIZE - 1, 2)
    finally:
        client.close()
    assert not client.connected


def test_pipelined_reads_from_many_threads(processes, run_dir, image):
    path, data = image
    _, sock = start_server(processes, run_dir, "nbd-postcopy", path)
    client = SourceClient(f"nbd+unix:///ram?socket={sock}")
    failures = []

    def worker(seed: int):
        rng = random.Random(seed)
        for _ in range(200):
            offset, length = rng.randrange(SIZE - 70000), rng.randint(1, 65536)
            if client.read(offset, length, timeout=10) != data[offset : offset + length]:
                failures.append((offset, length))

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        client.close()
    assert failures == []


def test_source_error_is_raised_with_its_errno(processes, run_dir):
    sock = run_dir / "err.sock"
    proc = processes.start(["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock, "--filter=error",
                            "memory", "1M", "error-pread=EPERM", "error-pread-rate=100%"], stderr=subprocess.DEVNULL)
    wait_for_path(sock, proc=proc)
    client = SourceClient(f"nbd+unix:///?socket={sock}")
    try:
        with pytest.raises(SourceError) as info:
            client.read(0, PAGE)
        assert info.value.errno == 1
        assert client.connected  # an error reply is not a lost connection
    finally:
        client.close()


def test_server_restart_during_an_outage(processes, run_dir, image):
    path, data = image
    proc, sock = start_server(processes, run_dir, "nbd-postcopy", path, "--instance-id", "source-1")
    states = []
    client = SourceClient(f"nbd+unix:///ram?socket={sock}", on_state=lambda up, why: states.append((up, why)))
    try:
        assert client.read(0, PAGE) == data[:PAGE]
        kill(proc)
        results, errors = [], []

        def reader(offset: int):
            try:
                results.append((offset, client.read(offset, PAGE, timeout=20)))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(i * PAGE * 7,)) for i in range(10)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the reads are issued while nothing listens
        assert not client.connected and not results
        start_server(processes, run_dir, "nbd-postcopy", path, "--instance-id", "source-1")  # same RAM, same id
        for t in threads:
            t.join(30)
        assert errors == []
        assert sorted(results) == [(i * PAGE * 7, data[i * PAGE * 7 : i * PAGE * 7 + PAGE]) for i in range(10)]
        assert states[0][0] is False and states[-1][0] is True
    finally:
        client.close()


def test_requests_in_flight_are_resent_after_reconnect(processes, run_dir, image):
    path, data = image
    proc, sock = start_server(processes, run_dir, "nbd-postcopy", path, "--gate", "closed", "--instance-id", "src")
    client = SourceClient(f"nbd+unix:///ram?socket={sock}")
    try:
        result = {}
        reader = threading.Thread(target=lambda: result.update(data=client.read_many([(0, PAGE), (PAGE, PAGE)],
                                                                                     timeout=20)))
        reader.start()
        time.sleep(0.3)  # both requests now wait behind the closed gate
        kill(proc)
        start_server(processes, run_dir, "nbd-postcopy", path, "--instance-id", "src")
        reader.join(30)
        assert result["data"] == [data[:PAGE], data[PAGE : 2 * PAGE]]
    finally:
        client.close()


def test_outage_longer_than_the_timeout_is_source_unavailable(processes, run_dir, image):
    path, _ = image
    proc, sock = start_server(processes, run_dir, "nbd-postcopy", path)
    client = SourceClient(f"nbd+unix:///ram?socket={sock}", name="demand")
    try:
        kill(proc)
        started = time.monotonic()
        with pytest.raises(SourceUnavailable, match=f"demand: no reply from nbd\\+unix:///ram\\?socket={sock} "
                                                    "within 0.5s"):
            client.read(0, PAGE, timeout=0.5)
        assert 0.5 <= time.monotonic() - started < 3
    finally:
        client.close()


def test_a_late_reply_never_lands_in_the_buffer_of_a_caller_that_gave_up(processes, run_dir, image):
    path, data = image
    proc, sock = start_server(processes, run_dir, "nbd-postcopy", path, "--gate", "closed")
    client = SourceClient(f"nbd+unix:///ram?socket={sock}")
    try:
        buffer = bytearray(b"\xaa" * PAGE)
        with pytest.raises(SourceUnavailable):
            client.read_many_into([(0, PAGE)], [memoryview(buffer)], timeout=0.3)
        proc.send_signal(signal.SIGUSR1)  # open the gate: the reply to the abandoned read comes now
        assert client.read(PAGE, PAGE, timeout=10) == data[PAGE : 2 * PAGE]  # (it came before this one)
        assert buffer == b"\xaa" * PAGE
    finally:
        client.close()


def test_no_server_at_start_is_source_unavailable(run_dir):
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="cannot connect to .* within 0.3s"):
        SourceClient(f"nbd+unix:///?socket={run_dir}/nothing.sock", connect_timeout=0.3)
    assert time.monotonic() - started < 2


def test_close_wakes_waiting_callers(processes, run_dir, image):
    path, _ = image
    start_server(processes, run_dir, "nbd-postcopy", path, "--gate", "closed")
    client = SourceClient(f"nbd+unix:///ram?socket={run_dir}/nbd-postcopy.sock")
    errors = []

    def reader():
        try:
            client.read(0, PAGE, timeout=20)
        except SourceUnavailable as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.3)  # the read waits behind the closed gate
    client.close()
    thread.join(5)
    assert not thread.is_alive() and errors and "closed" in errors[0]
    with pytest.raises(SourceUnavailable, match="is closed"):
        client.read(0, PAGE)


# --- the reply fast path agrees with the core ------------------------------------------------------
def _transmitting_pair(structured: bool, data: bytes) -> tuple[ServerConnection, ClientConnection]:
    """A server core and a client core, handshake done in memory."""
    server = ServerConnection({"ram": ExportInfo("ram", len(data))}, "ram")
    client = ClientConnection("ram", structured_replies=structured)
    client.receive_data(server.data_to_send())
    while client.ready is None:
        while client.next_event() is not NEED_DATA:
            pass
        server.receive_data(client.data_to_send())
        while server.next_event() is not NEED_DATA:
            pass
        client.receive_data(server.data_to_send())
        client.next_event()
    return server, client


def _dispatch_outcomes(structured: bool, data: bytes, splits: list[int]) -> list:
    """Send a mix of reads, answer them with the server core (data, zeroes, holes, an error, a reply
    nobody waits for) and dispatch the reply bytes in pieces cut at `splits`; what each caller got."""
    server, conn = _transmitting_pair(structured, data)
    page = 4096
    ranges = [(0, page), (page, 3 * page), (16 * page, page), (15 * page, 3 * page), (100, 5000),
              (len(data) - page, page), (2 * page, page), (8 * page, 2 * page), (3 * page, page)]
    client = SourceClient.__new__(SourceClient)
    client._lock = threading.Lock()
    link = SimpleNamespace(conn=conn, handles={}, recv_buffer=bytearray(1 << 20))
    requests = [_Request(Command.READ, offset, length) for offset, length in ranges]
    server.receive_data(client._register(link, requests))
    replies = []
    while (event := server.next_event()) is not NEED_DATA:
        if event.offset == 2 * page:
            replies += server.send_parts(ErrorReply(event.handle, Errno.EIO, "bad page"))
        else:
            replies += server.send_parts(ReadReply(event.handle, data[event.offset : event.offset + event.length]))
    del link.handles[min(h for h, r in link.handles.items() if r.offset == 3 * page)]  # its caller gave up
    stream = b"".join(bytes(part) for part in replies)
    cuts = [0] + [c for c in splits if 0 < c < len(stream)] + [len(stream)]
    kept = b""  # the start of a reply the fast path takes whole, presented again with what follows
    for a, b in zip(cuts, cuts[1:]):
        piece = kept + stream[a:b]
        count, _ = client._dispatch(link, memoryview(bytearray(piece)))
        kept = piece[len(piece) - count :] if count else b""
    assert not kept and not conn._inflight and not link.handles
    return [(r.done, r.result, repr(r.error)) for r in requests]


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("splits", [[99999], [1], [27, 4200], list(range(0, 80000, 999)), [4124, 8248, 20000, 30000]],
                         ids=["whole", "one-byte", "in-headers", "every-999", "near-boundaries"])
def test_reply_fast_path_gives_callers_what_the_core_gives(monkeypatch, structured, splits):
    data = bytearray(os.urandom(64 * 4096))
    data[16 * 4096 : 17 * 4096] = bytes(4096)
    taken = []
    take = ClientConnection.take_read_replies

    def counting_take(conn, buffer):
        result = take(conn, buffer)
        taken.append(result[0])
        return result

    monkeypatch.setattr(ClientConnection, "take_read_replies", counting_take)
    fast = _dispatch_outcomes(structured, bytes(data), splits)
    assert any(taken) or splits[0] < 100  # after a cut inside a reply the core keeps the rest
    monkeypatch.setattr(ClientConnection, "take_read_replies", lambda conn, buffer: (0, []))
    general = _dispatch_outcomes(structured, bytes(data), splits)
    assert fast == general
    assert all(done for done, _, _ in general[:3]) and general[0][1] == bytes(data[:4096])


# --- the source's identity ----------------------------------------------------------------------


def test_a_restarted_source_of_another_image_is_refused_and_never_read(processes, run_dir, image):
    """The same address, the same size, another machine's pages: refused until the timeout, never read."""
    path, data = image
    other = run_dir / "other.img"
    other.write_bytes(bytes(reversed(data)))
    proc, sock = start_server(processes, run_dir, "nbd-postcopy", path)
    refusals = []
    client = SourceClient(f"nbd+unix:///ram?socket={sock}", identity=SourceIdentity(on_refused=refusals.append))
    try:
        assert client.read(0, PAGE) == data[:PAGE]
        kill(proc)
        port = free_tcp_port()
        start_server(processes, run_dir, "nbd-postcopy", other, "--metrics-listen", f"127.0.0.1:{port}")
        with pytest.raises(SourceUnavailable):
            client.read(PAGE, PAGE, timeout=2)
        assert refusals and "is not the same source (instance id" in refusals[0]
        assert client.identity.refusals == len(refusals)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "nbd_postcopy_server_read_bytes_total 0.0" in metrics  # not one byte was read from it
    finally:
        client.close()


def test_a_pinned_identity_refuses_any_other_server_from_the_start(processes, run_dir, image):
    path, data = image
    _, sock = start_server(processes, run_dir, "nbd-postcopy", path, "--instance-id", "right-one")
    with pytest.raises(SourceUnavailable, match="not the same source"):
        SourceClient(f"nbd+unix:///ram?socket={sock}", identity=SourceIdentity("wrong-one"), connect_timeout=0.5)
    client = SourceClient(f"nbd+unix:///ram?socket={sock}", identity=SourceIdentity("right-one"))
    try:
        assert client.read(0, PAGE) == data[:PAGE]
    finally:
        client.close()


def test_clients_sharing_an_identity_agree_on_one_source(processes, run_dir, image):
    path, _ = image
    proc, sock = start_server(processes, run_dir, "nbd-postcopy", path)
    identity = SourceIdentity()
    first = SourceClient(f"nbd+unix:///ram?socket={sock}", identity=identity)
    try:
        kill(proc)
        sock.unlink()  # so that waiting for the socket waits for the new server
        start_server(processes, run_dir, "nbd-postcopy", path)  # the same image, but another process
        with pytest.raises(SourceUnavailable, match="not the same source"):
            SourceClient(f"nbd+unix:///ram?socket={sock}", identity=identity, connect_timeout=0.5)
    finally:
        first.close()


def test_a_server_without_identity_is_learned_as_none(processes, run_dir, image, caplog):
    """nbdkit reports no instance id: accepted with a warning; a server that has one is then another source."""
    path, data = image
    proc, sock = start_server(processes, run_dir, "nbdkit", path)
    identity = SourceIdentity()
    with caplog.at_level(logging.WARNING, logger="nbd_postcopy.nbd.client"):
        client = SourceClient(f"nbd+unix:///?socket={sock}", identity=identity)
    try:
        assert client.read(0, PAGE) == data[:PAGE]
        assert identity.instance is None and "reports no instance id" in caplog.text
    finally:
        client.close()


def test_a_restarted_source_with_another_certificate_is_refused_and_never_read(processes, run_dir, image,
                                                                             tls_files):
    """The same socket, image and instance id, and a certificate from the same CA, so TLS itself accepts it:
    another machine set up like the source. Only the certificate tells, and it is refused, never read."""
    path, data = image
    d = tls_files
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", "other-key.pem", "-out", "other.csr", "-subj", "/CN=localhost"],
                   cwd=d, check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", "other.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                    "-CAcreateserial", "-out", "other-cert.pem", "-days", "2", "-extfile", "san.ext"],
                   cwd=d, check=True, capture_output=True)

    def serve(name: str, *extra):
        return start_server(processes, run_dir, "nbd-postcopy", path, "--instance-id", "source-1", "--tls", "require",
                            "--tls-cert", d / f"{name}-cert.pem", "--tls-key", d / f"{name}-key.pem", *extra)

    proc, sock = serve("server")
    refusals = []
    client = SourceClient(f"nbds+unix:///ram?socket={sock}&tls-certificates={d / 'ca-only'}",
                          identity=SourceIdentity(on_refused=refusals.append))
    try:
        assert client.read(0, PAGE) == data[:PAGE]
        kill(proc)
        sock.unlink()  # so that waiting for the socket waits for the new server
        port = free_tcp_port()
        serve("other", "--metrics-listen", f"127.0.0.1:{port}")
        with pytest.raises(SourceUnavailable):
            client.read(PAGE, PAGE, timeout=2)
        assert refusals and "another TLS certificate" in refusals[0] and "instance id" not in refusals[0]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "nbd_postcopy_server_read_bytes_total 0.0" in metrics  # not one byte was read from it
    finally:
        client.close()


def test_identity_checks_the_tls_certificate_too():
    identity = SourceIdentity()
    identity.check("src", "aa" * 32, "nbds://x")
    identity.check("src", "aa" * 32, "nbds://x")
    with pytest.raises(IdentityMismatch, match="another TLS certificate"):
        identity.check("src", "bb" * 32, "nbds://x")
    with pytest.raises(IdentityMismatch, match="instance id other, expected src"):
        identity.check("other", "aa" * 32, "nbds://x")
    assert identity.refusals == 2
