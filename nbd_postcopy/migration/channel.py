"""The control channel between the two hosts of a migration: `nbd-postcopy migrate --to` (the sender, on
the source host) and `nbd-postcopy receive` (the receiver, on the destination host).

One TCP connection, one JSON object per line (at most MAX_LINE bytes), each with a "type". With
certificates, both ends speak TLS and each accepts only a peer whose certificate is signed by its
`--tls-ca` (the receiver requires a client certificate; the sender checks the receiver's certificate
against the host name it dialled). Without certificates everything runs in clear, and the caller warns.

    sender -> receiver                              receiver -> sender
    hello    {version, guest_bytes, memdev}         welcome  {version}      (the VM's shape matches)
    source   {uri, instance}  (page server, gated)  ready    {migration_port} (staged, armed, listening)
    released {}               (the source is gone)  resumed  {}
    abort    {reason}                               progress {remaining, pages}
                                                    local    {}             (every page is local)
                                                    done     {report}
                                                    error    {message}

Every message is checked against MESSAGES before it is sent and when it arrives: a peer that sends
anything else is a ChannelError, never a guess. See docs/DESIGN.md, "Two hosts".
"""

from __future__ import annotations

import json
import select
import shutil
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

PROTOCOL_VERSION = 1
MAX_LINE = 64 * 1024
# type -> the fields it carries and their JSON types
MESSAGES: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {"version": int, "guest_bytes": int, "memdev": str},
    "welcome": {"version": int},
    "source": {"uri": str, "instance": str},
    "ready": {"migration_port": int},
    "resumed": {},
    "progress": {"remaining": int, "pages": int},
    "local": {},
    "released": {},
    "done": {"report": dict},
    "error": {"message": str},
    "abort": {"reason": str},
}


class ChannelError(Exception):
    """The channel broke, timed out, or the peer sent something that is not this protocol."""


class PeerFailed(ChannelError):
    """The peer reported a failure ("error" or "abort"); the message is the peer's."""


@dataclass(frozen=True)
class Message:
    type: str
    fields: dict

    def __getitem__(self, name: str):
        return self.fields[name]


@dataclass(frozen=True)
class TlsFiles:
    """--tls-cert, --tls-key and --tls-ca: all three, or none."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_options(cls, cert: str | None, key: str | None, ca: str | None) -> TlsFiles | None:
        given = [x for x in (cert, key, ca) if x]
        if not given:
            return None
        if len(given) != 3:
            raise ChannelError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        for path in (cert, key, ca):
            if not Path(path).is_file():
                raise ChannelError(f"TLS file {path} does not exist")
        return cls(Path(cert), Path(key), Path(ca))

    def layout(self, directory: Path, role: str) -> Path:
        """Copy the files into `directory` under the names libnbd's tls-certificates= and QEMU's
        tls-creds-x509 read: ca-cert.pem, ROLE-cert.pem, ROLE-key.pem (ROLE client or server)."""
        directory.mkdir(mode=0o700, exist_ok=True)
        shutil.copyfile(self.ca, directory / "ca-cert.pem")
        shutil.copyfile(self.cert, directory / f"{role}-cert.pem")
        shutil.copyfile(self.key, directory / f"{role}-key.pem")
        return directory

    def context(self, server_side: bool) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
            context.load_verify_locations(self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ChannelError(f"cannot load the TLS certificate, key or CA: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED  # both ways: the receiver demands a client certificate
        return context


def check(message_type: str, fields: dict) -> None:
    """Raise ChannelError unless `fields` is exactly what MESSAGES says `message_type` carries."""
    spec = MESSAGES.get(message_type)
    if spec is None:
        raise ChannelError(f"unknown message type {message_type!r}")
    if set(fields) != set(spec):
        raise ChannelError(f"{message_type}: fields {sorted(fields)}, expected {sorted(spec)}")
    for name, kind in spec.items():
        value = fields[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ChannelError(f"{message_type}: {name} is {type(value).__name__}, expected {kind}")


def encode(message_type: str, **fields) -> bytes:
    check(message_type, fields)
    line = json.dumps({"type": message_type, **fields}, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ChannelError(f"{message_type}: message of {len(line)} bytes is over {MAX_LINE}")
    return line


def decode(line: bytes) -> Message:
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChannelError(f"not a JSON line: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ChannelError("a message must be a JSON object with a string 'type'")
    message_type = obj.pop("type")
    check(message_type, obj)
    return Message(message_type, obj)


class Channel:
    """One end of an established channel. Blocking; every receive has a deadline."""

    def __init__(self, sock: socket.socket, peer: str):
        _keepalive(sock)
        self._sock = sock
        self.peer = peer
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._buffer = bytearray()

    def send(self, message_type: str, **fields) -> None:
        data = encode(message_type, **fields)
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ChannelError(f"sending {message_type} to {self.peer} failed: {exc}") from None

    def receive(self, timeout: float) -> Message:
        """The next message; PeerFailed if it is an error or abort."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                raise ChannelError(f"{self.peer} sent a line longer than {MAX_LINE} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChannelError(f"no message from {self.peer} within {timeout:g}s")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except OSError as exc:
                raise ChannelError(f"the channel to {self.peer} failed: {exc}") from None
            if not chunk:
                raise ChannelError(f"{self.peer} closed the channel")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        if len(line) > MAX_LINE:
            raise ChannelError(f"{self.peer} sent a line longer than {MAX_LINE} bytes")
        message = decode(line)
        if message.type in ("error", "abort"):
            raise PeerFailed(message.fields.get("message") or message.fields.get("reason"))
        return message

    def poll(self) -> Message | None:
        """The next message if one has arrived, else None at once (PeerFailed for error or abort)."""
        if b"\n" not in self._buffer:
            pending = self._sock.pending() if self.tls else 0
            if not pending and not select.select([self._sock], [], [], 0)[0]:
                return None
        return self.receive(timeout=5.0)

    def expect(self, message_type: str, timeout: float) -> Message:
        message = self.receive(timeout)
        if message.type != message_type:
            raise ChannelError(f"{self.peer} sent {message.type} where {message_type} was due")
        return message

    def local_address(self) -> str:
        """This end's address: where the peer can reach this host."""
        return self._sock.getsockname()[0]

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def connect(host: str, port: int, tls: TlsFiles | None, timeout: float = 30.0) -> Channel:
    """The sender's end: dial the waiting receiver."""
    peer = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ChannelError(f"cannot reach the receiver at {peer}: {exc.strerror or exc}") from None
    if tls is None:
        return Channel(sock, peer)
    try:
        return Channel(tls.context(server_side=False).wrap_socket(sock, server_hostname=host), peer)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise ChannelError(f"TLS with the receiver at {peer} failed: {_ssl_reason(exc)}") from None


class Listener:
    """The receiver's end: listens on ADDR:PORT and accepts one sender."""

    def __init__(self, host: str, port: int, tls: TlsFiles | None):
        self.tls = tls
        self._context = tls.context(server_side=True) if tls else None
        try:
            self._sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                              reuse_port=False)
        except OSError as exc:
            raise ChannelError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.address = self._sock.getsockname()[:2]
        self.refused: list[str] = []  # peers that failed the TLS handshake, with the reason

    def accept(self, timeout: float | None = None, on_refused=None) -> Channel:
        """The first sender that completes the TLS handshake (if configured). A peer that fails it (no
        certificate, one from another CA, plaintext) is closed, noted in `refused` and passed to
        `on_refused(text)`; ChannelError only on the deadline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._sock.settimeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
            try:
                sock, address = self._sock.accept()
            except (socket.timeout, TimeoutError):
                raise ChannelError(f"no sender connected within {timeout:g}s") from None
            peer = f"{address[0]}:{address[1]}"
            if self._context is None:
                return Channel(sock, peer)
            sock.settimeout(10.0)
            try:
                return Channel(self._context.wrap_socket(sock, server_side=True), peer)
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                self.refused.append(f"{peer}: {_ssl_reason(exc)}")
                if on_refused is not None:
                    on_refused(self.refused[-1])

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _keepalive(sock: socket.socket) -> None:
    """Notice a peer that vanished without closing (a host down, a link cut) within about 40 s."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, option) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _ssl_reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "verify_message", None)
    return str(reason or exc)
