"""The source page server: an asyncio loop around the sans-I/O `ServerConnection`.

One `PageServer` serves one read-only source under one export name (the default export "" names it
too) on any number of Unix and TCP listeners. Each connection may keep many requests in flight;
replies go out as soon as each is ready, so they may be out of order. Reads wait for the freeze gate.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import gc
import itertools
import logging
import os
import socket
import ssl
import time

from ..common.linux import remove_stale_socket
from ..common.ratelog import RateLimitedLog
from ..common.units import ListenAddress
from .gate import Gate
from .metrics import ServerMetrics
from ..nbd.protocol import (
    NEED_DATA,
    BlockStatusReply,
    BlockStatusRequest,
    CacheReply,
    CacheRequest,
    ErrorReply,
    ExportInfo,
    ProtocolError,
    ReadReply,
    ReadRequest,
    StartTLS,
    State,
    TLSEstablished,
    TransmissionStarted,
)
from ..nbd.server_core import ServerConnection
from .priority import set_socket_role
from .sources import Source
from ..nbd.wire import REQUEST, Errno

log = logging.getLogger(__name__)

SOCKET_BUFFER = 4 * 1024 * 1024
IOV_MAX = 1024  # buffers per sendmsg()
MAX_HELD = 1024  # parsed requests one client may have waiting (behind the closed gate, or for room)
MAX_BACKLOG = 16 * 1024 * 1024  # reply bytes one connection may have unsent before it takes no more requests
TRANSPORT_WINDOW = 1024 * 1024  # reply bytes handed to a (TLS) transport ahead of what it has sent
TRANSPORT_CHUNK = 256 * 1024  # bytes per transport write (one TLS record each, at most 16 KiB inside)
RECV_BUFFER = 256 * 1024  # bytes read from a client at most at once
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds to finish the handshake, or a message once begun
DEFAULT_IDLE_TIMEOUT = 3600.0  # seconds without a request before a connection is closed (0: never)
SWEEP_INTERVAL = 1.0


class PageServer:
    """One read-only source under one export name, on any number of listeners, within fixed limits.

    Limits (docs/DESIGN.md, "Bounded server"): at most `max_connections` clients; a client must finish the
    handshake, and any message it starts, within `handshake_timeout` seconds; a connection with no request
    for `idle_timeout` seconds (0: never) is closed; and one connection holds at most MAX_BACKLOG bytes of
    replies not yet sent (or one reply, if that is larger): beyond that it takes no more requests until
    the client reads. So the replies in memory never exceed max_connections * max(MAX_BACKLOG, MAX_BLOCK).
    """

    def __init__(self, source: Source, export_name: str, gate: Gate, metrics: ServerMetrics,
                 tls: str = "none", tls_context: ssl.SSLContext | None = None, instance: str = "",
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT):
        if tls != "none" and tls_context is None:
            raise ValueError("TLS needs a certificate and key")
        self.source = source
        self.export = ExportInfo(export_name, source.size, description=source.description, instance=instance)
        self.gate = gate
        self.metrics = metrics
        self.tls = tls
        self.tls_context = tls_context
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        # One receive buffer for every connection: the loop runs one callback at a time and each consumes
        # (or the core copies) what was read before it returns, so idle connections cost no buffer.
        self.recv_buffer = memoryview(bytearray(RECV_BUFFER))
        self.refusals = RateLimitedLog(log)
        self._servers: list[asyncio.base_events.Server] = []
        self._unix_paths: list[str] = []
        self._connections: set[_NbdConnection] = set()
        self._tasks: list[asyncio.Task] = []
        self._last_collect = 0.0
        metrics.gate_open.set(1 if gate.is_open else 0)
        metrics.backlog_bytes.set_function(lambda: sum(c.backlog() for c in self._connections))

    def new_connection(self) -> ServerConnection:
        return ServerConnection({self.export.name: self.export}, self.export.name, self.tls)

    async def listen(self, address: ListenAddress) -> None:
        loop = asyncio.get_running_loop()
        factory = lambda: _NbdConnection(self)  # noqa: E731
        try:
            if address.kind == "unix":
                remove_stale_socket(address.path)
                server = await loop.create_unix_server(factory, address.path)
                self._unix_paths.append(address.path)
            else:
                server = await loop.create_server(factory, address.host, address.port, reuse_address=True)
        except OSError as exc:
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise OSError(exc.errno, f"cannot listen on {address}: {reason}") from exc
        self._servers.append(server)
        if not self._tasks:
            self._tasks = [asyncio.ensure_future(self._sweep()), asyncio.ensure_future(self._answer_after_gate())]
        log.info("serving %s (%d bytes) as export %r on %s, instance id %s", self.source.description,
                 self.source.size, self.export.name, address, self.export.instance or "(none)")

    def refuse(self, connection: _NbdConnection, reason: str, message: str) -> None:
        """Close a connection that broke a limit: counted, and logged at most every 10 s per reason."""
        self.metrics.refused[reason].inc()
        self.refusals.warning(reason, "%s: %s", connection.peer, message)
        connection.abort()

    async def _answer_after_gate(self) -> None:
        await self.gate.wait()
        for connection in list(self._connections):
            connection.answer_held()

    async def _sweep(self) -> None:
        """Once a second: close connections past their handshake, message or idle deadline."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for c in list(self._connections):
                if c.state_is_handshake() and now - c.connected_at > self.handshake_timeout:
                    self.refuse(c, "handshake_timeout", f"no complete handshake within {self.handshake_timeout:g}s")
                elif c.partial_since is not None and now - c.partial_since > self.handshake_timeout:
                    self.refuse(c, "incomplete_request",
                                f"a request started {now - c.partial_since:.0f}s ago was never completed")
                elif self.idle_timeout and c.idle() and now - c.last_request > self.idle_timeout:
                    self.refuse(c, "idle_timeout", f"no request for {self.idle_timeout:g}s")

    def collect_cycles(self) -> None:
        """A closed TLS connection leaves its unsent replies in a reference cycle of asyncio's SSL
        objects: collect it now (at most once a second) rather than at the next full collection."""
        now = time.monotonic()
        if now - self._last_collect >= 1.0:
            self._last_collect = now
            asyncio.get_running_loop().call_soon(gc.collect)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            connection.close()
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._servers.clear()
        self._unix_paths.clear()


_REQUEST_KINDS = (ReadRequest, BlockStatusRequest, CacheRequest)


class _NbdConnection(asyncio.BufferedProtocol):
    """One client connection: feeds bytes to the core, answers its events, writes replies.

    Requests the core parses wait in `_held` (at most MAX_HELD) until the freeze gate is open and the
    connection's backlog of unsent replies leaves room; while they cannot all be taken, reading pauses.
    A buffered protocol reading into the server's one receive buffer: a plain Protocol would get a fresh
    bytes object per read (an mmap and munmap for every request).
    """

    def __init__(self, server: PageServer):
        self.server = server
        self.conn = server.new_connection()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.connected_at = self.last_request = time.monotonic()
        self.partial_since: float | None = None  # when the current incomplete message began
        self._held: collections.deque = collections.deque()  # (request event, perf_counter at arrival)
        self._closing = False
        self._released = False
        self._writing_paused = False  # the transport's buffer is above its window (TLS, or the handshake)
        self._reading_paused = False
        # Plaintext transmission bypasses the transport's write buffer, which copies every reply:
        # replies go out with sendmsg() straight from the source's pages, and only what the socket
        # does not take at once is queued (as views, uncopied) until it is writable again.
        self._sock: socket.socket | None = None
        self._direct = False
        self._queue: collections.deque[memoryview] = collections.deque()
        self._queued = 0

    # state the server looks at
    def backlog(self) -> int:
        """Reply bytes accepted for sending but not sent yet."""
        transport = self.transport
        return self._queued + (transport.get_write_buffer_size() if transport is not None else 0)

    def state_is_handshake(self) -> bool:
        return self.conn.state in (State.GREETING, State.OPTIONS, State.TLS_HANDSHAKE)

    def idle(self) -> bool:
        return not self._held and not self._queue and not self._closing

    # asyncio callbacks
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.peer = str(transport.get_extra_info("peername") or "unix client")
        if len(self.server._connections) >= self.server.max_connections:
            self._released = True  # nothing was set up
            self.server.refuse(self, "limit", f"refused: already {self.server.max_connections} connections "
                                              "(--max-connections)")
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            # asyncio's socket wrapper hides sendmsg(): write through a duplicate descriptor.
            self._sock = socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno()))
            self._sock.setblocking(False)
        transport.set_write_buffer_limits(high=TRANSPORT_WINDOW - 1, low=TRANSPORT_WINDOW // 2)
        self.server._connections.add(self)
        self.server.metrics.clients.inc()
        transport.write(self.conn.data_to_send())  # the greeting

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()

    def _release(self) -> None:
        """Give back what this connection holds; idempotent. Also runs when a TLS handshake failed, after
        which asyncio never calls connection_lost here (the duplicate descriptor would keep the socket
        open for good)."""
        if self._released:
            return
        self._released = True
        self._held.clear()
        if self._sock is not None:
            if self._queue:
                asyncio.get_running_loop().remove_writer(self._sock.fileno())
                self._queue.clear()
                self._queued = 0
            self._sock.close()
        if self in self.server._connections:
            self.server._connections.discard(self)
            self.server.metrics.clients.dec()
        if self.conn.tls_active or self.conn.state is State.TLS_HANDSHAKE:
            self.server.collect_cycles()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._queue and not self._direct:
            self._feed_transport()
        self.answer_held()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._process()
        # Keep our side open until the replies still owed are out (answer_held closes it then). asyncio
        # cannot do that for TLS transports, and warns when asked to.
        return not self.conn.tls_active

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.recv_buffer

    def buffer_updated(self, nbytes: int) -> None:
        done = self._fast_reads(nbytes) if self._fast_path_open() else 0
        if done < nbytes:
            self.conn.receive_data(self.server.recv_buffer[done:nbytes])  # the core copies what it keeps
            self._process()
        else:
            self.partial_since = None

    def _fast_path_open(self) -> bool:
        """True when plain READs may be answered without events: plaintext transmission with direct sends,
        the gate open, nothing held (the core still checks its own state in take_plain_read)."""
        return (self._direct and not self._closing and not self._held and not self.transport.is_closing()
                and self.server.gate.is_open)

    def _fast_reads(self, nbytes: int) -> int:
        """Answer the leading plain READ requests in the receive buffer (ServerConnection.take_plain_read);
        return the bytes consumed. The first request that is anything else, whose source read fails or
        that the backlog has no room for, and all after it, go to the core, so replies keep their order
        and match the slow path's bytes."""
        data = self.server.recv_buffer[:nbytes]
        conn, server = self.conn, self.server
        read = server.source.read
        observe = server.metrics.request_seconds.observe
        out: list = []
        done = requests = served = 0
        room = MAX_BACKLOG - self._queued
        while (request := conn.take_plain_read(data, done)) is not None:
            started = time.perf_counter()
            handle, offset, length = request
            if length > room and (served or self._queued):
                break  # no room: the core holds it until the client has read what is queued
            try:
                payload = read(offset, length)
            except OSError:
                break  # the core's path reports it
            if len(payload) != length:
                break
            out += conn.plain_read_reply(handle, offset, payload)
            observe(time.perf_counter() - started)
            done += REQUEST.size
            requests += 1
            served += length
            room -= length
        if out:
            self.last_request = time.monotonic()
            server.metrics.requests_by_command["read"].inc(requests)
            server.metrics.read_bytes.inc(served)
            self._send_direct(out)
        return done

    def _process(self) -> None:
        """Take events from the core and handle them: a request is answered as it is parsed, unless the gate
        is closed or the backlog has no room for its reply; then it and every later one wait in `_held`."""
        conn = self.conn
        out: list = []
        room = MAX_BACKLOG - self.backlog()
        gate_open = self.server.gate.is_open
        try:
            while len(self._held) < MAX_HELD:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                kind = type(event)
                if kind in _REQUEST_KINDS:
                    size = event.length if kind is ReadRequest else 0
                    if gate_open and not self._held and (size <= room or not (out or room < MAX_BACKLOG)):
                        out += self._answer(event, time.perf_counter())  # at once, as it is parsed
                        room -= size
                        self.last_request = time.monotonic()
                    else:
                        self._held.append((event, time.perf_counter()))
                elif kind is StartTLS:
                    out.append(conn.data_to_send())
                    self._write(out)
                    # The client's TLS hello must reach the TLS layer, not this protocol: stop reading now.
                    self.transport.pause_reading()
                    asyncio.ensure_future(self._start_tls())
                    return
                elif kind is TransmissionStarted:
                    out.append(conn.data_to_send())  # the handshake's last answer goes before any reply
                    self._direct = (self._sock is not None and not conn.tls_active
                                    and self.transport.get_write_buffer_size() == 0)
                    if self._sock is not None and self._sock.family != socket.AF_UNIX:
                        set_socket_role(self._sock, conn.client_role)  # its class under --prefetch-bandwidth
                    log.debug("%s: export %r, structured replies %s, block status %s, role %s", self.peer,
                              event.export.name, event.structured_replies, event.base_allocation,
                              conn.client_role or "-")
                else:  # Disconnect, ConnectionClosed
                    self._closing = True
                    break
        except ProtocolError as exc:
            self.server.metrics.protocol_errors.inc()
            self.server.refusals.warning("protocol", "%s: dropping the connection: %s", self.peer, exc)
            out.append(conn.data_to_send())  # e.g. the NBD_REP_ERR_TOO_BIG that explains why
            self._write(out)
            self.close()  # no waiting for held requests: nothing from this peer can be trusted
            return
        if conn.mid_message and len(self._held) < MAX_HELD:
            if self.partial_since is None:
                self.partial_since = time.monotonic()
        else:
            self.partial_since = None
        pending = conn.data_to_send()
        if pending:
            out.append(pending)
        self._write(out)
        self.answer_held()

    # answering
    def answer_held(self) -> None:
        """Answer held requests while the gate is open and the backlog has room; then take more from the
        core if it holds more, and pause or resume reading to match."""
        if self._released or self.transport is None or self.transport.is_closing():
            return
        if self._held and self.server.gate.is_open:
            out: list = []
            room = MAX_BACKLOG - self.backlog()
            while self._held:
                event, started = self._held[0]
                size = event.length if type(event) is ReadRequest else 0
                if size > room and (out or self.backlog()):
                    break
                self._held.popleft()
                out += self._answer(event, started)
                room -= size
            if out:
                self.last_request = time.monotonic()
                self._write(out)
            if len(self._held) < MAX_HELD and self.conn.mid_message and not self._closing:
                self._process()  # requests the core kept while _held was full
                return
        self._update_reading()
        if self._closing:
            self._close_when_idle()

    def _update_reading(self) -> None:
        full = len(self._held) >= MAX_HELD or self.backlog() >= MAX_BACKLOG
        pause = self._closing or full
        if pause != self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _answer(self, event, started: float) -> list:
        server = self.server
        metrics = server.metrics
        kind = type(event)
        try:
            if kind is ReadRequest:
                metrics.requests_by_command["read"].inc()
                reply = self.conn.send_parts(ReadReply(event.handle, server.source.read(event.offset, event.length)))
                metrics.read_bytes.inc(event.length)
            elif kind is BlockStatusRequest:
                metrics.requests_by_command["block_status"].inc()
                extents = server.source.extents(event.offset, event.length)
                reply = self.conn.send_parts(BlockStatusReply(event.handle, tuple(extents)))
            else:
                metrics.requests_by_command["cache"].inc()
                reply = self.conn.send_parts(CacheReply(event.handle))
        except OSError as exc:
            log.error("%s: reading %s at %d+%d failed: %s", self.peer, server.source.description, event.offset,
                      event.length, exc)
            reply = self.conn.send_parts(ErrorReply(event.handle, Errno.EIO, f"source read failed: {exc}"))
        metrics.request_seconds.observe(time.perf_counter() - started)
        return reply

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(self.transport, self, self.server.tls_context, server_side=True,
                                                  ssl_handshake_timeout=self.server.handshake_timeout)
        except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError) as exc:
            self.server.metrics.protocol_errors.inc()
            self.server.refusals.warning("tls", "%s: TLS handshake failed: %s", self.peer,
                                         exc or type(exc).__name__)
            self.abort()
            return
        self.transport.set_write_buffer_limits(high=TRANSPORT_WINDOW - 1, low=TRANSPORT_WINDOW // 2)
        self.conn.send(TLSEstablished())
        self._process()

    def _write(self, out: list) -> None:
        """Send reply buffers: straight to the socket (plaintext transmission), else through the transport
        a window at a time, so that TLS never encrypts more than TRANSPORT_WINDOW ahead of the socket."""
        transport = self.transport
        if not out or transport is None or transport.is_closing():
            return
        if self._direct:
            self._send_direct(out)
            return
        for part in out:
            view = memoryview(part).cast("B")
            if len(view):
                self._queue.append(view)
                self._queued += len(view)
        self._feed_transport()

    def _feed_transport(self) -> None:
        """Hand queued replies to the transport while its buffer is below the window: pieces of at most
        TRANSPORT_CHUNK bytes, small buffers joined (each write is a TLS record)."""
        transport, queue = self.transport, self._queue
        while queue and not self._writing_paused and transport.get_write_buffer_size() < TRANSPORT_WINDOW:
            parts, size = [], 0
            while queue and size < TRANSPORT_CHUNK:
                head = queue.popleft()
                if size + len(head) > TRANSPORT_CHUNK:
                    queue.appendleft(head[TRANSPORT_CHUNK - size :])
                    head = head[: TRANSPORT_CHUNK - size]
                parts.append(head)
                size += len(head)
            self._queued -= size
            transport.write(parts[0] if len(parts) == 1 else b"".join(parts))
        self._update_reading()

    def _send_direct(self, parts: list) -> None:
        if not self._queue:
            try:
                sent = self._sock.sendmsg(parts[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                log.info("%s: send failed: %s", self.peer, exc)
                self.abort()
                return
            if sent == sum(len(p) for p in parts):
                return
            asyncio.get_running_loop().add_writer(self._sock.fileno(), self._flush)
        else:
            sent = 0
        for part in parts:
            view = memoryview(part).cast("B")
            if sent >= len(view):
                sent -= len(view)
                continue
            self._queue.append(view[sent:])
            self._queued += len(view) - sent
            sent = 0
        self._update_reading()

    def _flush(self) -> None:
        queue = self._queue
        while queue:
            try:
                sent = self._sock.sendmsg(list(itertools.islice(queue, IOV_MAX)))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("%s: send failed: %s", self.peer, exc)
                self.abort()
                return
            self._queued -= sent
            while sent:
                head = queue[0]
                if sent < len(head):
                    queue[0] = head[sent:]
                    break
                sent -= len(head)
                queue.popleft()
        asyncio.get_running_loop().remove_writer(self._sock.fileno())
        self.answer_held()

    def _close_when_idle(self) -> None:
        if not self._held and not self._queue and self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now: unsent replies are discarded."""
        self._closing = True
        if self.transport is not None:
            self.transport.abort()
        self._release()


async def run_server(server: PageServer, addresses: list[ListenAddress], stop: asyncio.Event) -> None:
    """Listen on every address, serve until `stop` is set, then shut down cleanly."""
    try:
        for address in addresses:
            await server.listen(address)
        await stop.wait()
    finally:
        await server.close()
