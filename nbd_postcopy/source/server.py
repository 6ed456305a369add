"""The source page server: an asyncio loop around the sans-I/O `ServerConnection`.

One `PageServer` serves one read-only source under one export name (the default export "" names it
too) on any number of Unix and TCP listeners. Each connection may keep many requests in flight;
replies go out as soon as each is ready, so they may be out of order. Reads wait for the freeze gate.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import logging
import os
import socket
import ssl
import time

from .gate import Gate
from ..common.linux import remove_stale_socket
from ..common.units import ListenAddress
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
    ServerConnection,
    StartTLS,
    TLSEstablished,
    TransmissionStarted,
)
from .sources import Source
from ..nbd.wire import REQUEST, Errno

log = logging.getLogger(__name__)

SOCKET_BUFFER = 4 * 1024 * 1024
IOV_MAX = 1024  # buffers per sendmsg()
MAX_PARKED = 1024  # requests one client may have waiting behind the closed gate
LARGE_WRITE = 64 * 1024  # buffers this big are written on their own rather than copied into a join
RECV_BUFFER = 256 * 1024  # bytes read from a client at most at once


class PageServer:
    def __init__(self, source: Source, export_name: str, gate: Gate, metrics: ServerMetrics,
                 tls: str = "none", tls_context: ssl.SSLContext | None = None):
        if tls != "none" and tls_context is None:
            raise ValueError("TLS needs a certificate and key")
        self.source = source
        self.export = ExportInfo(export_name, source.size, description=source.description)
        self.gate = gate
        self.metrics = metrics
        self.tls = tls
        self.tls_context = tls_context
        self._servers: list[asyncio.base_events.Server] = []
        self._unix_paths: list[str] = []
        self._connections: set[_NbdConnection] = set()
        metrics.gate_open.set(1 if gate.is_open else 0)

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
        log.info("serving %s (%d bytes) as export %r on %s", self.source.description, self.source.size,
                 self.export.name, address)

    async def close(self) -> None:
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


class _NbdConnection(asyncio.BufferedProtocol):
    """One client connection: feeds bytes to the core, answers its events, writes replies.

    A buffered protocol: the transport reads into our buffer, allocated once. (A plain Protocol gets a
    fresh 256 KiB bytes object per read: an mmap and munmap for every request.)
    """

    def __init__(self, server: PageServer):
        self.server = server
        self.conn = server.new_connection()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._waiting = 0  # requests parked behind the closed gate
        self._closing = False
        # Plaintext transmission bypasses the transport's write buffer, which copies every reply:
        # replies go out with sendmsg() straight from the source's pages, and only what the socket
        # does not take at once is queued (as views, uncopied) until it is writable again.
        self._sock: socket.socket | None = None
        self._direct = False
        self._queue: collections.deque[memoryview] = collections.deque()
        self._queued = 0
        self._reading_paused = False
        self._recv_buffer = memoryview(bytearray(RECV_BUFFER))

    # asyncio callbacks
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            # asyncio's socket wrapper hides sendmsg(): write through a duplicate descriptor.
            self._sock = socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno()))
            self._sock.setblocking(False)
        self.peer = str(transport.get_extra_info("peername") or "unix client")
        transport.set_write_buffer_limits(high=4 * SOCKET_BUFFER)
        self.server._connections.add(self)
        self.server.metrics.clients.inc()
        transport.write(self.conn.data_to_send())  # the greeting

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sock is not None:
            if self._queue:
                asyncio.get_running_loop().remove_writer(self._sock.fileno())
                self._queue.clear()
            self._sock.close()
        if self in self.server._connections:
            self.server._connections.discard(self)
            self.server.metrics.clients.dec()

    def pause_writing(self) -> None:
        self.transport.pause_reading()  # the client is not reading its replies: stop taking requests

    def resume_writing(self) -> None:
        if not self._closing:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._process()
        # Keep our side open until the replies still owed are out (_process closes it then). asyncio
        # cannot do that for TLS transports, and warns when asked to.
        return not self.conn.tls_active

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._recv_buffer

    def buffer_updated(self, nbytes: int) -> None:
        done = self._fast_reads(nbytes) if self._fast_path_open() else 0
        if done < nbytes:
            self.conn.receive_data(self._recv_buffer[done:nbytes])  # the core copies what it keeps
            self._process()

    def _fast_path_open(self) -> bool:
        """True when plain READs may be answered without events: plaintext transmission with direct sends,
        the gate open (the core still checks its own state in take_plain_read)."""
        return self._direct and not self._closing and not self.transport.is_closing() and self.server.gate.is_open

    def _fast_reads(self, nbytes: int) -> int:
        """Answer the leading plain READ requests in the receive buffer (ServerConnection.take_plain_read);
        return the bytes consumed. The first request that is anything else, or whose source read fails,
        and all after it go to the core, so replies keep their order and match the slow path's bytes."""
        data = memoryview(self._recv_buffer)[:nbytes]
        conn, server = self.conn, self.server
        read = server.source.read
        observe = server.metrics.request_seconds.observe
        out: list = []
        done = requests = served = 0
        while (request := conn.take_plain_read(data, done)) is not None:
            started = time.perf_counter()
            handle, offset, length = request
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
        if out:
            server.metrics.requests_by_command["read"].inc(requests)
            server.metrics.read_bytes.inc(served)
            self._send_direct(out)
        return done

    def _process(self) -> None:
        """Answer every event the core has ready."""
        conn = self.conn
        out: list = []
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                kind = type(event)
                if kind is ReadRequest or kind is BlockStatusRequest or kind is CacheRequest:
                    if self.server.gate.is_open:
                        out += self._answer(event, time.perf_counter())
                    else:
                        self._park(event)
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
                    log.debug("%s: export %r, structured replies %s, block status %s", self.peer,
                              event.export.name, event.structured_replies, event.base_allocation)
                else:  # Disconnect, ConnectionClosed
                    self._closing = True
                    break
        except ProtocolError as exc:
            log.warning("%s: dropping the connection: %s", self.peer, exc)
            self.server.metrics.protocol_errors.inc()
            out.append(conn.data_to_send())  # e.g. the NBD_REP_ERR_TOO_BIG that explains why
            self._write(out)
            self.close()  # no waiting for parked requests: nothing from this peer can be trusted
            return
        pending = conn.data_to_send()
        if pending:
            out.append(pending)
        self._write(out)
        if self._closing:
            self._close_when_idle()

    # answering
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

    def _park(self, event) -> None:
        self._waiting += 1
        if self._waiting == MAX_PARKED:  # take no more requests from this client until the gate opens
            self.transport.pause_reading()
        asyncio.ensure_future(self._answer_after_gate(event, time.perf_counter()))

    async def _answer_after_gate(self, event, started: float) -> None:
        try:
            await self.server.gate.wait()
            if self.transport is not None and not self.transport.is_closing():
                self._write(self._answer(event, started))
        finally:
            self._waiting -= 1
            if self._closing:
                self._close_when_idle()
            elif self._waiting == 0 and not self._reading_paused and self.transport is not None:
                self.transport.resume_reading()

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(self.transport, self, self.server.tls_context, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            log.warning("%s: TLS handshake failed: %s", self.peer, exc)
            self.server.metrics.protocol_errors.inc()
            self.close()
            return
        self.conn.send(TLSEstablished())
        self._process()

    def _write(self, out: list) -> None:
        """Write reply buffers: small ones joined into one write, large ones handed over uncopied."""
        transport = self.transport
        if not out or transport is None or transport.is_closing():
            return
        if self._direct:
            self._send_direct(out)
            return
        small: list = []
        for part in out:
            if len(part) < LARGE_WRITE:
                small.append(part)
                continue
            if small:
                transport.write(b"".join(small))
                small = []
            transport.write(part)
        if small:
            transport.write(small[0] if len(small) == 1 else b"".join(small))

    def _send_direct(self, parts: list) -> None:
        if not self._queue:
            try:
                sent = self._sock.sendmsg(parts[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                log.info("%s: send failed: %s", self.peer, exc)
                self.transport.abort()
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
        if self._queued > 4 * SOCKET_BUFFER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # the client is not reading its replies: stop taking requests

    def _flush(self) -> None:
        queue = self._queue
        while queue:
            try:
                sent = self._sock.sendmsg(list(itertools.islice(queue, IOV_MAX)))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("%s: send failed: %s", self.peer, exc)
                queue.clear()
                asyncio.get_running_loop().remove_writer(self._sock.fileno())
                self.transport.abort()
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
        if self._reading_paused and not self._closing:
            self._reading_paused = False
            self.transport.resume_reading()
        if self._closing:
            self._close_when_idle()

    def _close_when_idle(self) -> None:
        if self._waiting == 0 and not self._queue and self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()


async def run_server(server: PageServer, addresses: list[ListenAddress], stop: asyncio.Event) -> None:
    """Listen on every address, serve until `stop` is set, then shut down cleanly."""
    try:
        for address in addresses:
            await server.listen(address)
        await stop.wait()
    finally:
        await server.close()
