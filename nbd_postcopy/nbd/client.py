"""A blocking, thread-safe, pipelined NBD client to the source server, for the nbdkit plugin's threads.

One socket. Any thread may call `read()`, `read_many()` or `block_status()`; the request goes out at
once and the caller waits for its reply. Replies are taken off the socket by one thread at a time and
handed to their callers by handle: by a waiting caller itself when no one else is reading (so a lone
request costs no thread switch), otherwise by whoever reads, or by the reader thread when the callers
that were reading have left. The reader thread also notices a connection lost while idle, reconnects
with exponential backoff and re-sends every request still waiting; callers wait up to their own
timeout and then get `SourceUnavailable`.

Every connection must reach the same source: a `SourceIdentity`, shared by all clients of one device,
learns the server's instance id (and, over TLS, its certificate) on the first connection, or takes a
pinned id, and refuses any later connection to a server that differs (docs/DESIGN.md, "Source
identity"). A refused connection is dropped before any request goes out on it, so its data is never read.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import hashlib
import threading
import time
from typing import Callable

from .client_core import ClientConnection
from .protocol import (
    NEED_DATA,
    BlockStatusDone,
    CacheDone,
    ConnectionClosed,
    ProtocolError,
    ReadDone,
    Ready,
    RequestFailed,
    StartTLS,
    TLSEstablished,
)
from .uri import NbdAddress, parse_nbd_uri
from .wire import Command

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
BACKOFF_START = 0.05
BACKOFF_MAX = 2.0
IDLE_CHECK = 0.5  # how often the reader thread looks at an idle connection
_FOLLOWER_POLL = 0.05  # a waiting caller re-checks whether it should read this often
_RECV_SIZE = 1 << 20  # bytes taken off the socket at most per read, into a buffer allocated once per link
# A blocking receive of the rest of a reply returns after this long without data (then deadlines are checked).
_RCVTIMEO_SECONDS = 0.05  # how long a plaintext socket's recv() blocks at most
_RCVTIMEO = struct.pack("ll", 0, int(_RCVTIMEO_SECONDS * 1e6))  # as a struct timeval


class SourceUnavailable(Exception):
    """The source did not answer in time (it is down, or unreachable)."""


class SourceError(Exception):
    """The source answered a request with an NBD error."""

    def __init__(self, errno: int, message: str = ""):
        super().__init__(f"source error {errno}" + (f": {message}" if message else ""))
        self.errno = errno
        self.message = message


class IdentityMismatch(ProtocolError):
    """A server answered that is not the source this device first reached (or was pinned to)."""


REFUSAL_LOG_INTERVAL = 30.0  # seconds between repeated log lines about the same refused server


class SourceIdentity:
    """Who the source is: its instance id and, over TLS, its certificate's SHA-256.

    Learned from the first connection that completes a handshake (or `instance` is pinned from the
    start), then required of every later one. `check()` raises IdentityMismatch for another server.
    Thread-safe: the demand and prefetch clients of one device share one.
    """

    def __init__(self, instance: str | None = None, on_refused: Callable[[str], None] | None = None):
        self._lock = threading.Lock()
        self.pinned = instance is not None
        self.instance = instance
        self.certificate: str | None = None
        self._known = self.pinned  # the instance id is settled
        self._certificate_known = False
        self._on_refused = on_refused
        self.refusals = 0
        self._last_log = -REFUSAL_LOG_INTERVAL

    def check(self, instance: str | None, certificate: str | None, uri: str) -> None:
        with self._lock:
            if not self._known:
                self.instance, self._known = instance, True
                if instance is None:
                    log.warning("the source %s reports no instance id (it is not nbd-postcopy serve): after a "
                                "reconnect, a different server of the same size would not be recognised", uri)
                else:
                    log.info("the source %s is instance %s", uri, instance)
            if not self._certificate_known:
                self.certificate, self._certificate_known = certificate, True
            problems = []
            if instance != self.instance:
                problems.append(f"instance id {instance or '(none)'}, expected {self.instance or '(none)'}")
            if certificate != self.certificate:
                problems.append("another TLS certificate")
            if not problems:
                return
            self.refusals += 1
            now = time.monotonic()
            quiet = now - self._last_log < REFUSAL_LOG_INTERVAL
            if not quiet:
                self._last_log = now
        reason = f"{uri} is not the same source ({'; '.join(problems)}): refused, nothing read from it"
        if not quiet:
            log.error("%s (refusal %d; repeats are logged every %gs)", reason, self.refusals, REFUSAL_LOG_INTERVAL)
        if self._on_refused is not None:
            self._on_refused(reason)
        raise IdentityMismatch(reason)


def peer_certificate_digest(sock: socket.socket) -> str | None:
    """SHA-256 (hex) of the TLS peer's certificate; None on a plain socket."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest() if der else None


class _Request:
    __slots__ = ("command", "offset", "length", "into", "done", "result", "error", "_pending")

    def __init__(self, command: int, offset: int, length: int, into: memoryview | None = None):
        self.command, self.offset, self.length = command, offset, length
        self.into = into  # a READ's payload goes here (written only under the client's lock), else to result
        self.done = False
        self.result = None
        self.error: Exception | None = None
        self._pending = threading.Lock()  # held until the request finishes (cheaper than an Event)
        self._pending.acquire()

    def finish(self) -> None:
        """Wake the waiter; `done` was set under the client's lock, by exactly one thread."""
        self._pending.release()

    def wait(self, timeout: float) -> None:
        if self._pending.acquire(timeout=timeout):
            self._pending.release()


class _Link:
    """One connected socket and the protocol state that belongs to it."""

    def __init__(self, sock: socket.socket, conn: ClientConnection, ready: Ready):
        self.sock, self.conn, self.ready = sock, conn, ready
        self.handles: dict[int, _Request] = {}
        self.send_lock = threading.Lock()  # one writer at a time; TLS also needs reads serialised
        self.alive = True
        # Replies are read into this buffer (by the thread holding the client's _read_lock): a fresh
        # 1 MiB bytes object per recv() costs an mmap, page faults and a munmap every time.
        self.recv_buffer = memoryview(bytearray(_RECV_SIZE))
        self.kept = 0  # the buffer starts with this much of a READ reply the fast path takes whole...
        self.wanted = 0  # ...once this many more bytes are there


class SourceClient:
    def __init__(self, uri: str, *, name: str = "source", connect_timeout: float = 5.0,
                 on_state: Callable[[bool, str], None] | None = None, identity: SourceIdentity | None = None,
                 role: str | None = None):
        self.address: NbdAddress = parse_nbd_uri(uri)
        self.identity = identity if identity is not None else SourceIdentity()
        self.role = role  # "demand" or "prefetch": the server queues this connection's replies by it
        self.uri = uri
        self.name = name
        self.connect_timeout = connect_timeout
        self._on_state = on_state
        self._lock = threading.Lock()  # guards _link, _waiting, the link's conn and handles
        self._wake_reader = threading.Condition(self._lock)
        self._read_lock = threading.Lock()  # held by the one thread reading the socket
        self._waiting: set[_Request] = set()
        self._closed = False
        self._size: int | None = None
        self._link: _Link | None = None
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._link = self._connect()
                break
            except (OSError, ProtocolError, ssl.SSLError) as exc:
                if time.monotonic() + BACKOFF_START >= deadline:
                    raise SourceUnavailable(f"{name}: cannot connect to {uri} within {connect_timeout:g}s: {exc}"
                                            ) from None
                time.sleep(BACKOFF_START)
        self._size = self._link.ready.size
        self._reader = threading.Thread(target=self._run, name=f"{name}-reader", daemon=True)
        self._reader.start()

    # public API
    @property
    def size(self) -> int:
        return self._size

    @property
    def connected(self) -> bool:
        link = self._link
        return link is not None and link.alive

    @property
    def base_allocation(self) -> bool:
        link = self._link
        return link is not None and link.ready.base_allocation

    def read(self, offset: int, length: int, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        return self.read_many([(offset, length)], timeout)[0]

    def read_many(self, ranges: list[tuple[int, int]], timeout: float | None = DEFAULT_TIMEOUT) -> list[bytes]:
        """Read every (offset, length) with all requests sent in one write; results in the same order."""
        requests = [_Request(Command.READ, offset, length) for offset, length in ranges]
        return self._call(requests, timeout)

    def read_many_into(self, ranges: list[tuple[int, int]], views: list[memoryview],
                       timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Like read_many(), but each payload is copied straight into its view (of the same length).
        Nothing is written into a view after this returns or raises: a reply that comes too late is
        dropped, so the caller may hand the memory back at once."""
        requests = []
        for (offset, length), view in zip(ranges, views, strict=True):
            if len(view) != length:
                raise ValueError(f"a view of {len(view)} bytes for a read of {length}")
            requests.append(_Request(Command.READ, offset, length, view))
        self._call(requests, timeout)

    def block_status(self, offset: int, length: int, timeout: float | None = DEFAULT_TIMEOUT
                     ) -> list[tuple[int, int]]:
        """base:allocation extents (length, flags) from `offset`; they may cover less than `length`."""
        if not self.base_allocation:
            raise SourceError(95, "the source did not agree to base:allocation block status")
        return list(self._call([_Request(Command.BLOCK_STATUS, offset, length)], timeout)[0])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            link = self._link
            waiting = [r for r in self._waiting if not r.done]
            for request in waiting:
                request.done = True
                request.error = SourceUnavailable(f"{self.name}: client for {self.uri} closed")
        for request in waiting:
            request.finish()
        if link is not None:
            try:
                self._write(link, link.conn.disconnect())
            except (OSError, ProtocolError):
                pass
            self._drop(link, "closed")
        with self._lock:
            self._wake_reader.notify()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=5)

    # sending
    def _call(self, requests: list[_Request], timeout: float | None) -> list:
        for request in requests:
            if request.length <= 0 or request.offset < 0 or request.offset + request.length > self._size:
                raise ValueError(f"range {request.offset}+{request.length} is outside the source "
                                 f"({self._size} bytes)")
        started = time.monotonic()
        with self._lock:
            if self._closed:
                raise SourceUnavailable(f"{self.name}: client for {self.uri} is closed")
            self._waiting.update(requests)
            link = self._link
            data = self._register(link, requests) if link is not None and link.alive else b""
        if data:
            self._send(link, data)
        deadline = None if timeout is None else started + timeout
        try:
            for request in requests:
                self._wait(request, deadline, timeout)
        except SourceUnavailable:
            with self._lock:
                self._waiting.difference_update(requests)
                current = self._link
                if current is not None:  # late replies to these handles will be ignored
                    for handle in [h for h, r in current.handles.items() if r in requests]:
                        del current.handles[handle]
            raise
        with self._lock:
            self._waiting.difference_update(requests)
        for request in requests:
            if request.error is not None:
                raise request.error
        return [request.result for request in requests]

    def _wait(self, request: _Request, deadline: float | None, timeout: float | None) -> None:
        """Wait for `request`, reading the socket ourselves whenever no other thread is."""
        while not request.done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise SourceUnavailable(
                    f"{self.name}: no reply from {self.uri} within {timeout:g}s "
                    f"({'connected' if self.connected else 'disconnected, reconnecting'})")
            if self._read_lock.acquire(blocking=False):
                link_up = True
                try:
                    while not request.done and link_up:
                        link_up = self._read_step(remaining)
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            break
                finally:
                    self._read_lock.release()
                    self._hand_over()
                if link_up:
                    continue
            # Another thread reads, or the link is down and the reader thread reconnects: wait.
            request.wait(_FOLLOWER_POLL if remaining is None else max(0.0, min(remaining, _FOLLOWER_POLL)))

    def _hand_over(self) -> None:
        """After reading for ourselves: if replies are still owed to others, the reader thread reads."""
        with self._lock:
            link = self._link
            if link is not None and (link.handles or not link.alive):
                self._wake_reader.notify()

    def _register(self, link: _Link, requests: list[_Request]) -> bytes:
        """Allocate handles on `link` (caller holds _lock); returns the request bytes to send."""
        out = []
        conn = link.conn
        for request in requests:
            if request.command == Command.READ:
                handle, data = conn.read(request.offset, request.length)
            else:
                handle, data = conn.block_status(request.offset, request.length)
            link.handles[handle] = request
            out.append(data)
        return b"".join(out)

    def _send(self, link: _Link, data: bytes) -> None:
        try:
            self._write(link, data)
        except OSError as exc:
            self._drop(link, f"send failed: {exc}")  # the reader reconnects and re-sends

    def _write(self, link: _Link, data: bytes) -> None:
        """Send all of `data`, waiting at most connect_timeout for the socket to take it."""
        sock = link.sock
        with link.send_lock:
            if isinstance(sock, ssl.SSLSocket):  # its reader holds send_lock too, so the timeout is ours
                sock.settimeout(self.connect_timeout)
                try:
                    sock.sendall(data)
                finally:
                    sock.settimeout(None)
                return
            view = memoryview(data)
            deadline = time.monotonic() + self.connect_timeout
            while view:
                try:
                    view = view[sock.send(view, socket.MSG_DONTWAIT):]
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not select.select([], [sock], [], remaining)[1]:
                        raise TimeoutError(f"the source took no data for {self.connect_timeout:g}s") from None

    # connecting
    def _connect(self) -> _Link:
        address = self.address
        if address.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = address.socket_path
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in address.host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = (address.host, address.port)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(target)
            conn = ClientConnection(address.export, tls=address.tls, identify=True, role=self.role)
            sock, ready = self._handshake(sock, conn)
            self.identity.check(ready.instance, peer_certificate_digest(sock), self.uri)
        except BaseException:
            sock.close()
            raise
        if self._size is not None and ready.size != self._size:
            sock.close()
            raise ProtocolError(f"the source export changed size from {self._size} to {ready.size} bytes")
        sock.settimeout(None)  # reads wait in select() or up to SO_RCVTIMEO; sends bound their own wait
        if not isinstance(sock, ssl.SSLSocket):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _RCVTIMEO)
        return _Link(sock, conn, ready)

    def _handshake(self, sock: socket.socket, conn: ClientConnection) -> tuple[socket.socket, Ready]:
        while True:
            event = conn.next_event()
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
            if event is NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                if not data:
                    raise ConnectionError("the source closed the connection during the handshake")
            elif isinstance(event, StartTLS):
                context = self.address.ssl_context()
                sock = context.wrap_socket(sock, server_hostname=self.address.host)
                conn.send(TLSEstablished())
            elif isinstance(event, Ready):
                return sock, event
            elif isinstance(event, ConnectionClosed):
                raise ConnectionError("the source closed the connection during the handshake")

    # reading (by whichever thread holds _read_lock)
    def _read_step(self, wait: float | None) -> bool:
        """Wait for replies, up to `wait` seconds (or less: a plaintext socket's recv() gives up after
        SO_RCVTIMEO), and dispatch them. False if the link is down (or lost now); True otherwise, whether
        or not anything arrived."""
        link = self._link
        if link is None or not link.alive:
            return False
        sock = link.sock
        buffer = link.recv_buffer[link.kept :]
        try:
            if isinstance(sock, ssl.SSLSocket):  # reads and writes of one SSL object must not overlap
                if not sock.pending() and not select.select([sock], [], [], wait)[0]:
                    return True
                with link.send_lock:
                    received = sock.recv_into(buffer)
            elif link.wanted:  # the rest of a reply is on its way: take it in one call (SO_RCVTIMEO bounds it)
                received = sock.recv_into(buffer, link.wanted, socket.MSG_WAITALL)
            elif wait is None or wait >= _RCVTIMEO_SECONDS:  # no select() first: SO_RCVTIMEO bounds the wait
                received = sock.recv_into(buffer)
            else:
                if not select.select([sock], [], [], wait)[0]:
                    return True
                received = sock.recv_into(buffer)
        except BlockingIOError:  # SO_RCVTIMEO passed with nothing received
            return True
        except (OSError, ValueError) as exc:  # ValueError: select() on a socket just closed
            self._drop(link, f"receive failed: {exc}")
            return False
        if not received:
            self._drop(link, "the source closed the connection")
            return False
        data = link.recv_buffer[: link.kept + received]
        try:
            link.kept, reply_size = self._dispatch(link, data)
        except ProtocolError as exc:
            log.error("%s: protocol error from %s: %s", self.name, self.uri, exc)
            self._drop(link, f"protocol error: {exc}")
            return False
        if link.kept:
            link.recv_buffer[: link.kept] = bytes(data[len(data) - link.kept :])
        link.wanted = reply_size - link.kept
        return True

    # the reader thread
    def _run(self) -> None:
        backoff = BACKOFF_START
        while not self._closed:
            link = self._link
            if link is None or not link.alive:
                link = self._reconnect(backoff)
                backoff = BACKOFF_START if link else min(backoff * 2, BACKOFF_MAX)
                continue
            with self._lock:
                if self._closed:
                    break
                if not link.handles or self._read_lock.locked():
                    self._wake_reader.wait(IDLE_CHECK)
            if not self._read_lock.acquire(blocking=False):
                continue  # a caller is reading
            try:
                # Replies owed to callers that stopped reading: read them. Otherwise just look
                # whether an idle connection was closed, without waiting.
                self._read_step(IDLE_CHECK if link.handles else 0)
            finally:
                self._read_lock.release()

    def _dispatch(self, link: _Link, data: memoryview) -> tuple[int, int]:
        """Hand the replies in `data` to their callers. Returns (kept, size): the last `kept` bytes
        of `data` are the start of a READ reply of `size` bytes that the fast path takes whole, to be
        presented again with the rest; (0, 0) if everything was used."""
        finished = []
        kept = reply_size = 0
        with self._lock:
            conn = link.conn
            taken, replies = conn.take_read_replies(data)
            for handle, start, stop in replies:
                waiter = link.handles.pop(handle, None)
                if waiter is not None and not waiter.done:  # else its caller gave up, or the client closed
                    if waiter.into is not None:
                        waiter.into[:] = data[start:stop]
                    else:
                        waiter.result = bytes(data[start:stop])
                    waiter.done = True
                    finished.append(waiter)
            data = data[taken:]
            if data:
                reply_size = conn.read_reply_size(data)
                if len(data) < reply_size <= len(link.recv_buffer):
                    kept, data = len(data), b""
                else:
                    reply_size = 0
                    conn.receive_data(data)
            while data:  # nothing fed: the core has no complete reply either
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, ConnectionClosed):
                    break
                request = link.handles.pop(event.handle, None)
                if request is None or request.done:
                    continue  # its caller gave up waiting, or the client was closed
                if isinstance(event, ReadDone):
                    if request.into is not None:
                        request.into[:] = event.data
                    else:
                        request.result = event.data
                elif isinstance(event, BlockStatusDone):
                    request.result = event.extents
                elif isinstance(event, RequestFailed):
                    request.error = SourceError(event.errno, event.message)
                elif isinstance(event, CacheDone):
                    request.result = None
                request.done = True
                finished.append(request)
        for request in finished:
            request.finish()
        return kept, reply_size

    def _drop(self, link: _Link, reason: str) -> None:
        with self._lock:
            if not link.alive:
                return
            link.alive = False
            self._wake_reader.notify()  # reconnect
        try:
            link.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader waiting in select()
        except OSError:
            pass
        link.sock.close()
        if not self._closed:
            log.warning("%s: lost the connection to %s: %s", self.name, self.uri, reason)
        self._notify(False, reason)

    def _reconnect(self, backoff: float) -> _Link | None:
        time.sleep(backoff)
        if self._closed:
            return None
        try:
            link = self._connect()
        except OSError as exc:  # the source is still away: keep trying quietly
            log.debug("%s: reconnecting to %s failed: %s", self.name, self.uri, exc)
            return None
        except IdentityMismatch:  # another server: the identity has logged it (rate-limited)
            return None
        except ProtocolError as exc:  # something answers, but not the source we had
            log.error("%s: reconnecting to %s failed: %s", self.name, self.uri, exc)
            return None
        with self._lock:
            if self._closed:
                link.sock.close()
                return None
            self._link = link
            pending = [r for r in self._waiting if not r.done]
            data = self._register(link, pending) if pending else b""
        log.warning("%s: reconnected to %s; re-sending %d requests", self.name, self.uri, len(pending))
        self._notify(True, f"reconnected, {len(pending)} requests re-sent")
        if data:
            self._send(link, data)
        return link

    def _notify(self, connected: bool, reason: str) -> None:
        if self._on_state is not None:
            try:
                self._on_state(connected, reason)
            except Exception:  # a broken callback must not stop the reader
                log.exception("%s: on_state callback failed", self.name)
