"""The control channel between `migrate --to` and `receive`: messages checked both ways, mutual TLS that
accepts only peers signed by the configured CA, and plaintext refused when TLS is configured."""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

import pytest

from nbd_postcopy.migration.channel import (
    MAX_LINE,
    Channel,
    ChannelError,
    Listener,
    PeerFailed,
    TlsFiles,
    connect,
    decode,
    encode,
)


def other_ca(run_dir: Path) -> Path:
    """A second CA with its own client and server certificates (same names as in tls_files)."""
    d = run_dir / "other-ca"
    d.mkdir()

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=other CA")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", *ec, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                "-out", f"{name}-cert.pem", "-days", "2", "-extfile", "san.ext")
    return d


def files(d: Path, role: str, ca: Path | None = None) -> TlsFiles:
    return TlsFiles(d / f"{role}-cert.pem", d / f"{role}-key.pem", (ca or d) / "ca-cert.pem")


def serve_one(listener: Listener, result: dict) -> threading.Thread:
    def run():
        try:
            with listener.accept(timeout=10) as channel:
                hello = channel.expect("hello", timeout=5)
                result["hello"] = hello.fields
                result["tls"] = channel.tls
                channel.send("welcome", version=1)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_messages_are_checked_both_ways():
    assert decode(encode("hello", version=1, guest_bytes=4096, memdev="ram0")).fields == {
        "version": 1, "guest_bytes": 4096, "memdev": "ram0"}
    for bad in (b'{"type": "hello"}', b"[1]", b"not json", b'{"type": "frob"}',
                b'{"type": "welcome", "version": true}', b'{"type": "welcome", "version": 1, "extra": 2}'):
        with pytest.raises(ChannelError):
            decode(bad)
    with pytest.raises(ChannelError, match="expected"):
        encode("progress", remaining=1)


def test_plaintext_round_trip_and_peer_failure():
    with Listener("127.0.0.1", 0, None) as listener:
        result = {}
        thread = serve_one(listener, result)
        with connect("127.0.0.1", listener.address[1], None) as channel:
            channel.send("hello", version=1, guest_bytes=1 << 20, memdev="ram0")
            assert channel.expect("welcome", timeout=5)["version"] == 1
        thread.join(10)
        assert result == {"hello": {"version": 1, "guest_bytes": 1 << 20, "memdev": "ram0"}, "tls": False}
    a, b = socket.socketpair()
    left, right = Channel(a, "right"), Channel(b, "left")  # each named by its peer
    left.send("error", message="the destination QEMU is gone")
    with pytest.raises(PeerFailed, match="the destination QEMU is gone"):
        right.receive(timeout=1)
    with pytest.raises(ChannelError, match="no message from left within 0.2s"):
        right.receive(timeout=0.2)
    a.sendall(b"x" * (MAX_LINE + 10))
    with pytest.raises(ChannelError, match="longer than"):
        right.receive(timeout=1)
    left.close()
    right.close()


def test_mutual_tls_round_trip(tls_files):
    with Listener("127.0.0.1", 0, files(tls_files, "server")) as listener:
        result = {}
        thread = serve_one(listener, result)
        with connect("127.0.0.1", listener.address[1], files(tls_files, "client")) as channel:
            assert channel.tls
            channel.send("hello", version=1, guest_bytes=4096, memdev="ram0")
            channel.expect("welcome", timeout=5)
        thread.join(10)
        assert result["tls"] is True and "error" not in result


def test_a_sender_from_another_ca_or_in_clear_is_refused(run_dir, tls_files):
    other = other_ca(run_dir)
    with Listener("127.0.0.1", 0, files(tls_files, "server")) as listener:
        result = {}
        thread = serve_one(listener, result)
        port = listener.address[1]
        with pytest.raises(ChannelError):  # the sender's certificate is signed by another CA
            with connect("127.0.0.1", port, files(other, "client", ca=tls_files)) as channel:
                channel.send("hello", version=1, guest_bytes=4096, memdev="ram0")
                channel.expect("welcome", timeout=5)
        with pytest.raises(ChannelError):  # plaintext against a TLS receiver
            with connect("127.0.0.1", port, None) as channel:
                channel.send("hello", version=1, guest_bytes=4096, memdev="ram0")
                channel.expect("welcome", timeout=5)
        with connect("127.0.0.1", port, files(tls_files, "client")) as channel:  # the right one still gets in
            channel.send("hello", version=1, guest_bytes=4096, memdev="ram0")
            channel.expect("welcome", timeout=5)
        thread.join(10)
        assert "error" not in result and len(listener.refused) == 2


def test_a_receiver_from_another_ca_is_refused_by_the_sender(run_dir, tls_files):
    other = other_ca(run_dir)
    with Listener("127.0.0.1", 0, files(other, "server")) as listener:
        threading.Thread(target=lambda: _accept_quietly(listener), daemon=True).start()
        with pytest.raises(ChannelError, match="TLS with the receiver at 127.0.0.1:.* failed"):
            connect("127.0.0.1", listener.address[1], files(tls_files, "client"))


def _accept_quietly(listener: Listener) -> None:
    try:
        listener.accept(timeout=5).close()
    except (ChannelError, OSError):  # refused, or the listener closed when the test ended
        pass


def test_tls_options_go_together(tls_files):
    assert TlsFiles.from_options(None, None, None) is None
    with pytest.raises(ChannelError, match="all three"):
        TlsFiles.from_options(str(tls_files / "server-cert.pem"), None, None)
    with pytest.raises(ChannelError, match="does not exist"):
        TlsFiles.from_options("/nope/cert", "/nope/key", "/nope/ca")
