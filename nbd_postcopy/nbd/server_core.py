"""The server role of the sans-I/O NBD protocol core (see protocol.py for how a core is driven).

`ServerConnection` answers the whole handshake from its export table and rejects what a read-only
export cannot do, so the application only sees `ReadRequest`, `CacheRequest`, `BlockStatusRequest`
and the connection-level events, and answers with `ReadReply`, `BlockStatusReply`, `CacheReply` or
`ErrorReply`, in any order.
"""

from __future__ import annotations

from construct import ConstructError

from . import wire
from .protocol import (
    BASE_ALLOCATION_ID,
    IDENTITY_NAMESPACE,
    IDENTITY_PREFIX,
    MAX_META_QUERIES,
    MAX_OPTION_DATA,
    NEED_DATA,
    ROLES,
    ROLE_PREFIX,
    SERVER_TRANSITIONS,
    BlockStatusRequest,
    CacheReply,
    CacheRequest,
    Connection,
    Disconnect,
    ErrorReply,
    Event,
    ExportInfo,
    Greeted,
    LocalProtocolError,
    ReadReply,
    ReadRequest,
    RemoteProtocolError,
    StartTLS,
    State,
    TLSEstablished,
    TransmissionStarted,
    option_name,
)
from .wire import (
    BASE_ALLOCATION,
    CHUNK_DATA,
    CHUNK_DONE,
    CHUNK_HEADER,
    CHUNK_HOLE,
    CHUNK_NONE,
    CMD_READ,
    MAX_STRING,
    OFFSET_DATA_HEADER,
    OFFSET_HOLE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U32,
    ChunkFlag,
    ChunkType,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    Info,
    Option,
    Reply,
)
from .zeros import zero_runs


def _option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return wire.OptionReplyHeader.build(dict(option=option, reply=reply, length=len(payload))) + payload


class ServerConnection(Connection):
    """The server side of one NBD connection, serving read-only exports."""

    _transitions = SERVER_TRANSITIONS

    def __init__(self, exports: dict[str, ExportInfo], default_export: str | None = None, tls: str = "none"):
        super().__init__()
        if tls not in ("none", "allow", "require"):
            raise LocalProtocolError(f"tls must be none, allow or require, got {tls!r}")
        if default_export is not None and default_export not in exports:
            raise LocalProtocolError(f"default export {default_export!r} is not in the export table")
        self.exports = exports
        self.default_export = default_export
        self.tls = tls
        self.tls_active = False
        self.no_zeroes = False
        self.structured_replies = False
        self.export: ExportInfo | None = None
        self._meta_export: str | None = None  # canonical export name of the last SET_META_CONTEXT
        self.client_role: str | None = None  # what the client said it is (ROLES), if it did
        self._base_allocation = False
        self._pending: dict[int, tuple[int, int, int, int]] = {}  # handle -> (command, offset, length, flags)
        self._out += wire.Greeting.build(
            dict(flags=dict(FIXED_NEWSTYLE=True, NO_ZEROES=True))
        )

    @property
    def base_allocation(self) -> bool:
        return self._base_allocation

    # receiving
    def next_event(self):
        while True:
            if not self._skip_discarded():
                return self._end_of_input()
            if self.state is State.TRANSMISSION:
                event = self._next_request()
            elif self.state is State.OPTIONS:
                event = self._next_option()
            elif self.state is State.GREETING:
                event = self._client_flags()
            else:  # TLS_HANDSHAKE waits for TLSEstablished; CLOSED ignores input
                return NEED_DATA
            if event is not None:
                return event

    def _client_flags(self):
        raw = self._take(4)
        if raw is None:
            return self._end_of_input()
        flags = U32.unpack(raw)[0]
        if not flags & ClientFlag.C_FIXED_NEWSTYLE:
            raise RemoteProtocolError("client does not speak the fixed newstyle handshake")
        if flags & ~int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES):
            raise RemoteProtocolError(f"client sent unknown handshake flags {flags:#x}")
        self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self._transition(Greeted)
        return None

    def _next_option(self):
        if len(self._buf) < 16:
            return self._end_of_input()
        try:
            header = wire.OptionRequestHeader.parse(bytes(self._buf[:16]))
        except ConstructError:
            raise RemoteProtocolError("bad option magic (the peer is not an NBD client)") from None
        option, length = int(header.option), header.length
        if length > MAX_OPTION_DATA:
            # Skipping gigabytes would let one client tie the server up: answer, then hang up.
            self._reply(option, Reply.ERR_TOO_BIG, f"option data of {length} bytes is too big")
            raise RemoteProtocolError(f"{option_name(option)} with {length} bytes of data", hint=Reply.ERR_TOO_BIG)
        if len(self._buf) < 16 + length:
            return self._end_of_input()
        data = bytes(self._buf[16 : 16 + length])
        del self._buf[: 16 + length]
        return self._handle_option(option, data)

    def _reply(self, option: int, reply: int, payload: bytes | str = b"") -> None:
        if isinstance(payload, str):
            payload = payload.encode("utf-8")[:MAX_STRING]
        self._out += _option_reply(option, reply, payload)

    def _handle_option(self, option: int, data: bytes):
        if option == Option.ABORT:
            self._reply(option, Reply.ACK)
            self._transition(Disconnect)
            return Disconnect()
        if option == Option.STARTTLS:
            return self._starttls(data)
        if self.tls == "require" and not self.tls_active:
            if option == Option.EXPORT_NAME:
                raise RemoteProtocolError("NBD_OPT_EXPORT_NAME before STARTTLS, but TLS is required",
                                          hint=Reply.ERR_TLS_REQD)
            self._reply(option, Reply.ERR_TLS_REQD, "this server requires TLS: send NBD_OPT_STARTTLS first")
            return None
        handler = {
            Option.EXPORT_NAME: self._opt_export_name,
            Option.LIST: self._opt_list,
            Option.STRUCTURED_REPLY: self._opt_structured_reply,
            Option.INFO: self._opt_info_or_go,
            Option.GO: self._opt_info_or_go,
            Option.SET_META_CONTEXT: self._opt_meta_context,
            Option.LIST_META_CONTEXT: self._opt_meta_context,
        }.get(option)
        if handler is None:
            self._reply(option, Reply.ERR_UNSUP, f"{option_name(option)} is not supported")
            return None
        try:
            return handler(option, data)
        except (ConstructError, UnicodeDecodeError) as exc:
            # The parser's own words name its internals: tell the peer only what was wrong.
            self._reply(option, Reply.ERR_INVALID, f"malformed {option_name(option)} data ({len(data)} bytes)")
            return None

    def _lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self.default_export is not None:
            return self.exports[self.default_export]
        return self.exports.get(name)

    def _starttls(self, data: bytes):
        option = Option.STARTTLS
        if data:
            self._reply(option, Reply.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        elif self.tls == "none":
            self._reply(option, Reply.ERR_UNSUP, "TLS is not configured on this server")
        elif self.tls_active:
            self._reply(option, Reply.ERR_INVALID, "TLS is already active")
        else:
            if self._buf:
                raise RemoteProtocolError("client sent data after NBD_OPT_STARTTLS before the TLS handshake")
            self._reply(option, Reply.ACK)
            self._transition(StartTLS)
            return StartTLS()
        return None

    def _opt_export_name(self, option: int, data: bytes):
        name = data.decode("utf-8")
        export = self._lookup(name)
        if export is None:
            # The spec gives NBD_OPT_EXPORT_NAME no error reply: the server just closes.
            raise RemoteProtocolError(f"client asked for unknown export {name!r}", hint=Reply.ERR_UNKNOWN)
        self._out += wire.ExportNameReply.build(dict(size=export.size, flags=export.flags))
        if not self.no_zeroes:
            self._out += wire.EXPORT_NAME_PADDING
        return self._start_transmission(export)

    def _opt_list(self, option: int, data: bytes):
        if data:
            self._reply(option, Reply.ERR_INVALID, "NBD_OPT_LIST takes no data")
            return None
        for export in self.exports.values():
            self._reply(option, Reply.SERVER, wire.ServerReply.build(dict(name=export.name,
                                                                           description=export.description)))
        self._reply(option, Reply.ACK)
        return None

    def _opt_structured_reply(self, option: int, data: bytes):
        if data:
            self._reply(option, Reply.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        else:
            self.structured_replies = True
            self._reply(option, Reply.ACK)
        return None

    def _opt_info_or_go(self, option: int, data: bytes):
        request = wire.InfoRequest.parse(data)
        if len(wire.InfoRequest.build(request)) != len(data):
            raise ConstructError("trailing bytes")
        export = self._lookup(request.name)
        if export is None:
            self._reply(option, Reply.ERR_UNKNOWN, f"no export named {request.name!r}")
            return None
        wanted = {int(r) for r in request.requests}
        self._reply(option, Reply.INFO, wire.InfoExport.build(dict(size=export.size, flags=export.flags)))
        self._reply(option, Reply.INFO, wire.InfoBlockSize.build(dict(
            minimum=export.min_block, preferred=export.preferred_block, maximum=export.max_block)))
        if Info.NAME in wanted:
            self._reply(option, Reply.INFO, wire.InfoName.build(dict(name=export.name)))
        if Info.DESCRIPTION in wanted and export.description:
            self._reply(option, Reply.INFO, wire.InfoDescription.build(dict(description=export.description)))
        self._reply(option, Reply.ACK)
        if option == Option.GO:
            return self._start_transmission(export)
        return None

    def _opt_meta_context(self, option: int, data: bytes):
        request = wire.MetaContextRequest.parse(data)
        if len(request.queries) > MAX_META_QUERIES:
            self._reply(option, Reply.ERR_TOO_BIG, f"more than {MAX_META_QUERIES} meta context queries")
            return None
        if option == Option.SET_META_CONTEXT and not self.structured_replies:
            self._reply(option, Reply.ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
            return None
        export = self._lookup(request.name)
        if export is None:
            self._reply(option, Reply.ERR_UNKNOWN, f"no export named {request.name!r}")
            return None
        queries = list(request.queries)
        if option == Option.LIST_META_CONTEXT:
            match = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            match = BASE_ALLOCATION in queries
        if match:
            self._reply(option, Reply.META_CONTEXT,
                        wire.MetaContextReply.build(dict(context_id=BASE_ALLOCATION_ID, name=BASE_ALLOCATION)))
        if option == Option.LIST_META_CONTEXT:
            roles = [q.removeprefix(ROLE_PREFIX) for q in queries if q.startswith(ROLE_PREFIX)]
            if roles and roles[-1] in ROLES:
                self.client_role = roles[-1]
        if option == Option.LIST_META_CONTEXT and export.instance and (
                not queries or any(q in (IDENTITY_NAMESPACE, IDENTITY_PREFIX, IDENTITY_PREFIX + export.instance)
                                for q in queries)):
            self._reply(option, Reply.META_CONTEXT,
                        wire.MetaContextReply.build(dict(context_id=0, name=IDENTITY_PREFIX + export.instance)))
        if option == Option.SET_META_CONTEXT:
            self._meta_export = export.name
            self._base_allocation = match
        self._reply(option, Reply.ACK)
        return None

    def _start_transmission(self, export: ExportInfo) -> TransmissionStarted:
        if self._meta_export != export.name:
            self._base_allocation = False
        self.export = export
        event = TransmissionStarted(export, self.structured_replies, self._base_allocation)
        self._transition(TransmissionStarted)
        return event

    def _next_request(self):
        buf = self._buf
        if len(buf) < 28:
            return self._end_of_input()
        magic, flags, command, handle, offset, length = REQUEST.unpack_from(buf)
        del buf[:28]
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        if command == CMD_READ:
            if self._check_request(handle, offset, length, self.export.max_block):
                self._pending[handle] = (command, offset, length, flags)
                return ReadRequest(handle, offset, length, flags)
        elif command == Command.BLOCK_STATUS:
            if not self._base_allocation:
                self._reject(handle, Errno.EINVAL, "no meta context was negotiated for block status")
            elif self._check_request(handle, offset, length, (1 << 32) - 1):
                self._pending[handle] = (command, offset, length, flags)
                return BlockStatusRequest(handle, offset, length, flags)
        elif command == Command.CACHE:
            if self._check_request(handle, offset, length, (1 << 32) - 1):
                self._pending[handle] = (command, offset, length, flags)
                return CacheRequest(handle, offset, length)
        elif command == Command.DISC:
            self._transition(Disconnect)
            self._buf.clear()
            return Disconnect()
        elif command == Command.WRITE:
            if length > self.export.max_block:
                raise RemoteProtocolError(f"WRITE of {length} bytes exceeds the maximum block size",
                                          hint=Errno.EOVERFLOW)
            # Skip the payload so the next request header is found where it belongs.
            self._discard = length
            self._reject(handle, Errno.EPERM, "the export is read-only")
        elif command in (Command.TRIM, Command.WRITE_ZEROES, Command.RESIZE):
            self._reject(handle, Errno.EPERM, "the export is read-only")
        elif command == Command.FLUSH:
            self._out += SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, handle)  # nothing to flush
        else:
            self._reject(handle, Errno.EINVAL, f"unknown command {command}")
        return None

    def _check_request(self, handle: int, offset: int, length: int, max_length: int) -> bool:
        if handle in self._pending:
            raise RemoteProtocolError(f"handle {handle:#x} is already in flight", hint=Errno.EINVAL)
        if length == 0 or length > max_length:
            self._reject(handle, Errno.EINVAL, f"length {length} must be between 1 and {max_length}")
        elif offset + length > self.export.size:
            self._reject(handle, Errno.EINVAL,
                         f"range {offset}+{length} is beyond the end of the export ({self.export.size} bytes)")
        else:
            return True
        return False

    def _reject(self, handle: int, error: int, message: str) -> None:
        self._out += self._error_bytes(handle, error, message)

    def _error_bytes(self, handle: int, error: int, message: str) -> bytes:
        if not self.structured_replies:
            return SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, error, handle)
        payload = wire.ErrorChunk.build(dict(error=error, message=message))
        return CHUNK_HEADER.pack(wire.STRUCTURED_REPLY_MAGIC, ChunkFlag.DONE, ChunkType.ERROR, handle,
                                 len(payload)) + payload

    # sending
    def send(self, event: Event) -> bytes:
        """The bytes for a reply event (or b"" for TLSEstablished)."""
        return b"".join(self.send_parts(event))

    def send_parts(self, event: Event) -> list:
        """Like send(), as a list of buffers to write in order: read data stays a view, uncopied."""
        event_type = type(event)
        self._transition(event_type)
        if event_type is TLSEstablished:
            self.tls_active = True
            return []
        request = self._pending.pop(event.handle, None)
        if request is None:
            raise LocalProtocolError(f"no request with handle {event.handle:#x} is waiting for a reply")
        command, offset, length, flags = request
        if event_type is ReadReply:
            if command != Command.READ:
                raise LocalProtocolError("ReadReply answers a READ only")
            if len(event.data) != length:
                raise LocalProtocolError(f"ReadReply carries {len(event.data)} bytes, the request wants {length}")
            return self._read_reply(event.handle, offset, event.data)
        if event_type is ErrorReply:
            return [self._error_bytes(event.handle, event.error, event.message)]
        if event_type is CacheReply:
            if command != Command.CACHE:
                raise LocalProtocolError("CacheReply answers a CACHE only")
            return [SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, event.handle)]
        if command != Command.BLOCK_STATUS:  # BlockStatusReply
            raise LocalProtocolError("BlockStatusReply answers a BLOCK_STATUS only")
        return [self._block_status_reply(event.handle, event.extents, length, flags)]

    # --- the fast path for the commonest request (the I/O layer may use it instead of receive_data) ---

    def take_plain_read(self, data, pos: int = 0) -> tuple[int, int, int] | None:
        """(handle, offset, length) if a whole READ with no flags, a free handle and a valid range starts at
        data[pos] and the core holds no partial input; the caller then answers it with plain_read_reply()
        and moves REQUEST.size bytes on. None for anything else: that and all that follows go to
        receive_data(), so every request is checked and answered exactly as the slow path would."""
        if self.state is not State.TRANSMISSION or self._buf or self._discard or len(data) - pos < REQUEST.size:
            return None
        magic, flags, command, handle, offset, length = REQUEST.unpack_from(data, pos)
        export = self.export
        if (magic != REQUEST_MAGIC or command != CMD_READ or flags or handle in self._pending
                or not 0 < length <= export.max_block or offset + length > export.size):
            return None
        return handle, offset, length

    def plain_read_reply(self, handle: int, offset: int, data) -> list:
        """The reply to a READ taken with take_plain_read(): the same parts send(ReadReply(...)) gives."""
        return self._read_reply(handle, offset, data)

    def _read_reply(self, handle: int, offset: int, data) -> list:
        if not self.structured_replies:
            return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle), data]
        runs = zero_runs(data)
        if len(runs) == 1:  # the common case: one chunk that carries the DONE flag itself
            if runs[0][2]:
                return [OFFSET_HOLE.pack(STRUCTURED_REPLY_MAGIC, CHUNK_DONE, CHUNK_HOLE, handle, 12, offset,
                                         len(data))]
            return [OFFSET_DATA_HEADER.pack(STRUCTURED_REPLY_MAGIC, CHUNK_DONE, CHUNK_DATA, handle, 8 + len(data),
                                            offset), data]
        view = memoryview(data).cast("B")
        parts = []
        for start, end, zero in runs:
            if zero:
                parts.append(OFFSET_HOLE.pack(STRUCTURED_REPLY_MAGIC, 0, CHUNK_HOLE, handle, 12, offset + start,
                                              end - start))
            else:
                parts.append(OFFSET_DATA_HEADER.pack(STRUCTURED_REPLY_MAGIC, 0, CHUNK_DATA, handle, 8 + end - start,
                                                     offset + start))
                parts.append(view[start:end])
        parts.append(CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, CHUNK_DONE, CHUNK_NONE, handle, 0))
        return parts

    @staticmethod
    def _block_status_reply(handle: int, extents, length: int, flags: int) -> bytes:
        """One BLOCK_STATUS chunk; extents are clipped to the requested length (and to one with REQ_ONE)."""
        words = [U32.pack(BASE_ALLOCATION_ID)]
        remaining = length
        for n, state in extents:
            n = min(n, remaining)
            words.append(wire.U64.pack(n << 32 | state))
            remaining -= n
            if not remaining or flags & CommandFlag.REQ_ONE:
                break
        payload = b"".join(words)
        return CHUNK_HEADER.pack(wire.STRUCTURED_REPLY_MAGIC, ChunkFlag.DONE, ChunkType.BLOCK_STATUS,
                                 handle, len(payload)) + payload
