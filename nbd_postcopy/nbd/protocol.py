"""Sans-I/O NBD protocol core for both roles (fixed newstyle handshake, then transmission).

No sockets here, in the manner of h11: feed received bytes with `receive_data(data)` (b"" means EOF),
pull events with `next_event()` until it returns `NEED_DATA`, turn your own events into bytes with
`send(event)`, and write out whatever the core answered by itself with `data_to_send()`.

`ServerConnection` answers the whole handshake from its export table and rejects what a read-only
export cannot do, so the application only sees `ReadRequest`, `CacheRequest`, `BlockStatusRequest`
and the connection-level events, and answers with `ReadReply`, `BlockStatusReply`, `CacheReply` or
`ErrorReply`, in any order. `ClientConnection` negotiates structured replies, `base:allocation` and
an export with NBD_OPT_GO, then turns `read()`/`block_status()`/`cache()` into request bytes and
replies into `ReadDone`/`BlockStatusDone`/`CacheDone`/`RequestFailed` events.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from construct import ConstructError

from ..common.units import PAGE_SIZE
from . import wire
from .wire import (
    BASE_ALLOCATION,
    CHUNK_HEADER,
    MAX_STRING,
    OFFSET_DATA_HEADER,
    OFFSET_HOLE,
    REQUEST,
    SIMPLE_REPLY,
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
    TransmissionFlag,
)

MAX_BLOCK = 32 * 1024 * 1024  # largest READ payload either side accepts
MAX_OPTION_DATA = 64 * 1024  # larger option data is answered NBD_REP_ERR_TOO_BIG, then the server hangs up
MAX_CHUNK_PAYLOAD = MAX_BLOCK + 8  # an OFFSET_DATA chunk carrying a whole maximal read
MAX_EXTENTS = 8192  # block status descriptors in one reply
MAX_META_QUERIES = 256
BASE_ALLOCATION_ID = 1  # the context id the server gives base:allocation
# A page server's instance identity travels as a meta context name that NBD_OPT_LIST_META_CONTEXT reports
# (never selected for block status): "x-nbd-postcopy:instance=ID". See docs/DESIGN.md, "Source identity".
IDENTITY_NAMESPACE = "x-nbd-postcopy:"
IDENTITY_PREFIX = IDENTITY_NAMESPACE + "instance="
MAX_INSTANCE_ID = 128
# In the same listing a client may name its role, so that the server can queue its replies by it: a query
# "x-nbd-postcopy:role=demand" or "...=prefetch" (the server answers nothing for it).
ROLE_PREFIX = IDENTITY_NAMESPACE + "role="
ROLES = ("demand", "prefetch")
_U64_MAX = (1 << 64) - 1
_OFFSET_MAX = (1 << 63) - 1
_ZERO_BLOCK = bytes(64 * 1024)
# Plain ints for the per-request path (enum member lookups and flag arithmetic cost microseconds there).
_REQUEST_MAGIC, _SIMPLE_MAGIC, _CHUNK_MAGIC = wire.REQUEST_MAGIC, wire.SIMPLE_REPLY_MAGIC, wire.STRUCTURED_REPLY_MAGIC
_READ = int(Command.READ)
_DONE = int(ChunkFlag.DONE)
_DATA, _HOLE, _NONE = int(ChunkType.OFFSET_DATA), int(ChunkType.OFFSET_HOLE), int(ChunkType.NONE)


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""Returned by next_event() when more bytes must arrive before the next event."""


class ProtocolError(Exception):
    """A protocol violation. `hint` is the NBD errno or option reply error that fits, if any."""

    def __init__(self, message: str, hint: int | None = None):
        super().__init__(message)
        self.hint = hint


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol (or the current state) does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow; the connection cannot continue."""


def _check_string(what: str, value: str) -> None:
    if len(value.encode("utf-8")) > MAX_STRING:
        raise LocalProtocolError(f"{what} is longer than {MAX_STRING} bytes")
    if "\0" in value:
        raise LocalProtocolError(f"{what} contains a NUL character")


def _check_range(offset: int, length: int, max_length: int = (1 << 32) - 1) -> None:
    if not 0 <= offset <= _OFFSET_MAX:
        raise LocalProtocolError(f"offset {offset} out of range")
    if not 0 < length <= max_length:
        raise LocalProtocolError(f"length {length} must be between 1 and {max_length}")


def check_instance_id(instance: str) -> None:
    """An instance id: 1..128 characters from [A-Za-z0-9._-]."""
    if not 0 < len(instance) <= MAX_INSTANCE_ID or not all(c.isascii() and (c.isalnum() or c in "._-")
                                                             for c in instance):
        raise LocalProtocolError(f"instance id {instance!r:.60}: want 1..{MAX_INSTANCE_ID} characters from "
                                 "A-Z a-z 0-9 . _ -")


def _check_handle(handle: int) -> None:
    if not 0 <= handle <= _U64_MAX:
        raise LocalProtocolError(f"handle {handle} is not a 64-bit value")


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """One export of a server: what the handshake advertises about it."""

    name: str
    size: int
    description: str = ""
    min_block: int = 1
    preferred_block: int = PAGE_SIZE
    max_block: int = MAX_BLOCK
    instance: str = ""  # the serving process's identity, "" for none

    def __post_init__(self):
        _check_string("export name", self.name)
        _check_string("export description", self.description)
        if self.instance:
            check_instance_id(self.instance)
        if not 0 <= self.size <= _OFFSET_MAX:
            raise LocalProtocolError(f"export size {self.size} out of range")
        if not 1 <= self.min_block <= self.preferred_block <= self.max_block <= MAX_BLOCK:
            raise LocalProtocolError("block sizes must satisfy 1 <= min <= preferred <= max <= 32 MiB")

    @property
    def flags(self) -> int:
        """Transmission flags: always read-only, safe for many connections, CACHE accepted."""
        return int(
            TransmissionFlag.HAS_FLAGS
            | TransmissionFlag.READ_ONLY
            | TransmissionFlag.CAN_MULTI_CONN
            | TransmissionFlag.SEND_CACHE
        )


# --- events -------------------------------------------------------------------------------------
class Event:
    """Base of every event either role emits or accepts."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class StartTLS(Event):
    """Upgrade the transport to TLS now, then send(TLSEstablished()). Nothing else may be sent before."""


@dataclass(frozen=True, slots=True)
class TLSEstablished(Event):
    """The I/O layer finished the TLS handshake; negotiation continues inside it."""


@dataclass(frozen=True, slots=True)
class TransmissionStarted(Event):
    """Server: the client chose an export; requests follow."""

    export: ExportInfo
    structured_replies: bool
    base_allocation: bool


@dataclass(frozen=True, slots=True)
class ReadRequest(Event):
    handle: int
    offset: int
    length: int
    flags: int = 0

    def __post_init__(self):
        _check_handle(self.handle)
        _check_range(self.offset, self.length, MAX_BLOCK)


@dataclass(frozen=True, slots=True)
class CacheRequest(Event):
    handle: int
    offset: int
    length: int

    def __post_init__(self):
        _check_handle(self.handle)
        _check_range(self.offset, self.length)


@dataclass(frozen=True, slots=True)
class BlockStatusRequest(Event):
    handle: int
    offset: int
    length: int
    flags: int = 0

    def __post_init__(self):
        _check_handle(self.handle)
        _check_range(self.offset, self.length)

    @property
    def one_extent(self) -> bool:
        return bool(self.flags & CommandFlag.REQ_ONE)


@dataclass(frozen=True, slots=True)
class Disconnect(Event):
    """The peer ended the session politely (NBD_CMD_DISC or NBD_OPT_ABORT)."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The transport reached EOF at a message boundary."""


@dataclass(frozen=True, slots=True)
class ReadReply(Event):
    """Server -> client: the data of a ReadRequest (exactly its length)."""

    handle: int
    data: bytes | bytearray | memoryview

    def __post_init__(self):
        _check_handle(self.handle)


@dataclass(frozen=True, slots=True)
class BlockStatusReply(Event):
    """Server -> client: base:allocation extents as (length, flags) pairs, from the request offset."""

    handle: int
    extents: tuple[tuple[int, int], ...]

    def __post_init__(self):
        _check_handle(self.handle)
        if not 0 < len(self.extents) <= MAX_EXTENTS:
            raise LocalProtocolError(f"a block status reply needs 1..{MAX_EXTENTS} extents")
        for length, flags in self.extents:
            if not 0 < length < 1 << 32 or not 0 <= flags < 1 << 32:
                raise LocalProtocolError(f"bad extent ({length}, {flags})")


@dataclass(frozen=True, slots=True)
class CacheReply(Event):
    handle: int

    def __post_init__(self):
        _check_handle(self.handle)


@dataclass(frozen=True, slots=True)
class ErrorReply(Event):
    handle: int
    error: int
    message: str = ""

    def __post_init__(self):
        _check_handle(self.handle)
        if not 0 < self.error < 1 << 32:
            raise LocalProtocolError(f"error reply needs a nonzero NBD errno, got {self.error}")
        _check_string("error message", self.message)


@dataclass(frozen=True, slots=True)
class Ready(Event):
    """Client: the export is open."""

    size: int
    transmission_flags: int
    min_block: int
    preferred_block: int
    max_block: int
    structured_replies: bool
    base_allocation: bool
    instance: str | None = None  # the server's instance identity, if it reports one


@dataclass(frozen=True, slots=True)
class ReadDone(Event):
    handle: int
    data: bytes


@dataclass(frozen=True, slots=True)
class BlockStatusDone(Event):
    handle: int
    extents: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class CacheDone(Event):
    handle: int


@dataclass(frozen=True, slots=True)
class RequestFailed(Event):
    handle: int
    errno: int
    message: str = ""


# --- states -------------------------------------------------------------------------------------
class State(enum.Enum):
    GREETING = "greeting"  # waiting for the peer's greeting (client) or client flags (server)
    OPTIONS = "options"
    TLS_HANDSHAKE = "tls-handshake"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class _Greeted(Event):
    """Internal: the greeting exchange finished."""

    __slots__ = ()


_REPLY_EVENTS = (ReadReply, BlockStatusReply, CacheReply, ErrorReply)
_REQUEST_EVENTS = (ReadRequest, CacheRequest, BlockStatusRequest)

SERVER_TRANSITIONS: dict[tuple[State, type], State] = {
    (State.GREETING, _Greeted): State.OPTIONS,
    (State.OPTIONS, StartTLS): State.TLS_HANDSHAKE,
    (State.TLS_HANDSHAKE, TLSEstablished): State.OPTIONS,
    (State.OPTIONS, TransmissionStarted): State.TRANSMISSION,
    (State.OPTIONS, Disconnect): State.CLOSED,
    (State.TRANSMISSION, Disconnect): State.CLOSED,
    **{(State.TRANSMISSION, e): State.TRANSMISSION for e in _REQUEST_EVENTS + _REPLY_EVENTS},
    # Requests still in flight when the client disconnects get their replies.
    **{(State.CLOSED, e): State.CLOSED for e in _REPLY_EVENTS},
    **{(s, ConnectionClosed): State.CLOSED for s in State},
}

CLIENT_TRANSITIONS: dict[tuple[State, type], State] = {
    (State.GREETING, _Greeted): State.OPTIONS,
    (State.OPTIONS, StartTLS): State.TLS_HANDSHAKE,
    (State.TLS_HANDSHAKE, TLSEstablished): State.OPTIONS,
    (State.OPTIONS, Ready): State.TRANSMISSION,
    (State.TRANSMISSION, Disconnect): State.CLOSED,
    **{(State.TRANSMISSION, e): State.TRANSMISSION for e in _REQUEST_EVENTS},
    **{(s, ConnectionClosed): State.CLOSED for s in State},
}


class _Connection:
    """Buffering, EOF and the state table shared by both roles."""

    _transitions: dict[tuple[State, type], State]

    def __init__(self):
        self.state = State.GREETING
        self._buf = bytearray()
        self._out = bytearray()
        self._eof = False
        self._discard = 0  # payload bytes still to skip (WRITE payloads)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the transport; b"" means the peer closed its side."""
        if not data:
            self._eof = True
        elif self.state is not State.CLOSED:
            self._buf += data

    @property
    def mid_message(self) -> bool:
        """Part of a message has arrived and the rest has not (or a WRITE payload is still being skipped)."""
        return bool(self._buf) or bool(self._discard)

    def data_to_send(self) -> bytes:
        """Bytes the core produced by itself (handshake answers, rejections); empty if none."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _transition(self, event_type: type) -> None:
        try:
            self.state = self._transitions[(self.state, event_type)]
        except KeyError:
            raise LocalProtocolError(f"{event_type.__name__} is not allowed in state {self.state.value}") from None

    def _skip_discarded(self) -> bool:
        """Drop bytes owed to _discard; True once none are owed."""
        if self._discard:
            n = min(self._discard, len(self._buf))
            del self._buf[:n]
            self._discard -= n
        return not self._discard

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    def _end_of_input(self):
        """NEED_DATA, or the right event/error when the peer has closed."""
        if not self._eof:
            return NEED_DATA
        if self.state is State.CLOSED:
            return NEED_DATA
        if self._buf or self._discard:
            raise RemoteProtocolError("connection closed in the middle of a message")
        self._transition(ConnectionClosed)
        return ConnectionClosed()


# --- server -------------------------------------------------------------------------------------
def _option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return wire.OptionReplyHeader.build(dict(option=option, reply=reply, length=len(payload))) + payload


def _option_name(option: int) -> str:
    try:
        return f"NBD_OPT_{Option(option).name}"
    except ValueError:
        return f"option {option}"


class ServerConnection(_Connection):
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
        self._transition(_Greeted)
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
            raise RemoteProtocolError(f"{_option_name(option)} with {length} bytes of data", hint=Reply.ERR_TOO_BIG)
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
            self._reply(option, Reply.ERR_UNSUP, f"{_option_name(option)} is not supported")
            return None
        try:
            return handler(option, data)
        except (ConstructError, UnicodeDecodeError) as exc:
            # The parser's own words name its internals: tell the peer only what was wrong.
            self._reply(option, Reply.ERR_INVALID, f"malformed {_option_name(option)} data ({len(data)} bytes)")
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
        if magic != _REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        if command == _READ:
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
        if (magic != _REQUEST_MAGIC or command != _READ or flags or handle in self._pending
                or not 0 < length <= export.max_block or offset + length > export.size):
            return None
        return handle, offset, length

    def plain_read_reply(self, handle: int, offset: int, data) -> list:
        """The reply to a READ taken with take_plain_read(): the same parts send(ReadReply(...)) gives."""
        return self._read_reply(handle, offset, data)

    def _read_reply(self, handle: int, offset: int, data) -> list:
        if not self.structured_replies:
            return [SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, handle), data]
        runs = zero_runs(data)
        if len(runs) == 1:  # the common case: one chunk that carries the DONE flag itself
            if runs[0][2]:
                return [OFFSET_HOLE.pack(_CHUNK_MAGIC, _DONE, _HOLE, handle, 12, offset, len(data))]
            return [OFFSET_DATA_HEADER.pack(_CHUNK_MAGIC, _DONE, _DATA, handle, 8 + len(data), offset), data]
        view = memoryview(data).cast("B")
        parts = []
        for start, end, zero in runs:
            if zero:
                parts.append(OFFSET_HOLE.pack(_CHUNK_MAGIC, 0, _HOLE, handle, 12, offset + start, end - start))
            else:
                parts.append(OFFSET_DATA_HEADER.pack(_CHUNK_MAGIC, 0, _DATA, handle, 8 + end - start, offset + start))
                parts.append(view[start:end])
        parts.append(CHUNK_HEADER.pack(_CHUNK_MAGIC, _DONE, _NONE, handle, 0))
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


def zero_runs(data) -> list[tuple[int, int, bool]]:
    """(start, end, all_zero) runs of `data` at 4 KiB granularity (a zero tail shorter than a page counts).

    Most data pages have a nonzero first word, so those words are gathered in one strided C-level copy
    and only the pages whose first word is zero are compared in full, a whole candidate run at a time.
    """
    n = len(data)
    if n <= PAGE_SIZE:  # a single page: its first word usually settles it
        if n >= 8 and wire.U64.unpack_from(data)[0]:
            return [(0, n, False)]
        return [(0, n, _all_zero(memoryview(data).cast("B"), 0, n))] if n else []
    view = memoryview(data).cast("B")
    full = n // PAGE_SIZE
    firsts = view[: full * PAGE_SIZE].cast("Q")[:: PAGE_SIZE // 8].tolist() if full else []
    if n % PAGE_SIZE:
        firsts.append(int(not _all_zero(view, full * PAGE_SIZE, n)))
    if all(firsts):
        return [(0, n, False)] if n else []
    runs: list[tuple[int, int, bool]] = []
    i, pages = 0, len(firsts)
    while i < pages:
        j = i + 1
        if firsts[i]:
            while j < pages and firsts[j]:
                j += 1
            _add_run(runs, i * PAGE_SIZE, min(j * PAGE_SIZE, n), False)
        else:
            while j < pages and not firsts[j]:
                j += 1
            start, end = i * PAGE_SIZE, min(j * PAGE_SIZE, n)
            if _all_zero(view, start, end):
                _add_run(runs, start, end, True)
            else:  # some candidate page holds data further in: decide page by page
                for page in range(start, end, PAGE_SIZE):
                    stop = min(page + PAGE_SIZE, n)
                    _add_run(runs, page, stop, _all_zero(view, page, stop))
        i = j
    return runs


def _all_zero(view: memoryview, start: int, end: int) -> bool:
    for pos in range(start, end, len(_ZERO_BLOCK)):
        piece = bytes(view[pos : min(pos + len(_ZERO_BLOCK), end)])
        if piece != _ZERO_BLOCK[: len(piece)]:
            return False
    return True


def _add_run(runs: list, start: int, end: int, zero: bool) -> None:
    if runs and runs[-1][2] == zero:
        runs[-1] = (runs[-1][0], end, zero)
    else:
        runs.append((start, end, zero))


# --- client -------------------------------------------------------------------------------------
@dataclass(slots=True)
class _InFlight:
    command: int
    offset: int
    length: int
    buffer: bytearray | None = None
    received: int = 0
    extents: tuple = ()
    error: tuple[int, str] | None = None


class ClientConnection(_Connection):
    """The client side: fixed newstyle handshake with NBD_OPT_GO, then pipelined requests."""

    _transitions = CLIENT_TRANSITIONS

    def __init__(self, export_name: str, structured_replies: bool = True, tls: bool = False,
                 meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,), identify: bool = False,
                 role: str | None = None):
        super().__init__()
        _check_string("export name", export_name)
        for name in meta_contexts:
            _check_string("meta context", name)
        self.export_name = export_name
        self.want_structured = structured_replies
        self.want_tls = tls
        self.meta_contexts = tuple(meta_contexts)
        if role is not None and role not in ROLES:
            raise LocalProtocolError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        self.identify = identify  # ask the server for its instance identity (NBD_OPT_LIST_META_CONTEXT)
        self.role = role  # told to the server in the same listing
        self.instance: str | None = None
        self.structured_replies = False
        self.ready: Ready | None = None
        self._option: int | None = None  # the option whose replies we are waiting for
        self._plan: list[int] = []  # options still to negotiate, in order
        self._context_ids: dict[int, str] = {}
        self._info: dict[str, int] = {}
        self._next_handle = 1
        self._inflight: dict[int, _InFlight] = {}
        self._chunk: tuple | None = None  # a parsed structured chunk header waiting for its payload

    # handshake
    def next_event(self):
        while True:
            if self.state is State.TRANSMISSION:
                event = self._next_reply()
            elif self.state is State.OPTIONS:
                event = self._next_option_reply()
            elif self.state is State.GREETING:
                event = self._greeting()
            else:
                return NEED_DATA
            if event is not None:
                return event

    def _greeting(self):
        raw = self._take(18)
        if raw is None:
            return self._end_of_input()
        try:
            greeting = wire.Greeting.parse(raw)
        except ConstructError:
            raise RemoteProtocolError("the peer is not a fixed newstyle NBD server (bad greeting)") from None
        if not greeting.flags.FIXED_NEWSTYLE:
            raise RemoteProtocolError("the server does not support the fixed newstyle handshake")
        flags = ClientFlag.C_FIXED_NEWSTYLE | (ClientFlag.C_NO_ZEROES if greeting.flags.NO_ZEROES else 0)
        self._out += U32.pack(flags)
        self._transition(_Greeted)
        self._plan = [Option.STARTTLS] if self.want_tls else []
        if self.identify or self.role:
            self._plan.append(Option.LIST_META_CONTEXT)
        if self.want_structured:
            self._plan.append(Option.STRUCTURED_REPLY)
            if self.meta_contexts:
                self._plan.append(Option.SET_META_CONTEXT)
        self._plan.append(Option.GO)
        self._send_next_option()
        return None

    def send(self, event: Event) -> bytes:
        """Only TLSEstablished is sent as an event; requests use read()/block_status()/cache()."""
        if type(event) is not TLSEstablished:
            raise LocalProtocolError(f"send() takes TLSEstablished only, not {type(event).__name__}")
        self._transition(TLSEstablished)
        self._send_next_option()
        return b""

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._option = option
        self._out += wire.OptionRequestHeader.build(dict(option=option, length=len(data))) + data

    def _send_next_option(self) -> None:
        """Negotiate in order: STARTTLS, LIST_META_CONTEXT (identity), STRUCTURED_REPLY, SET_META_CONTEXT (if
        structured), GO."""
        option = self._plan.pop(0)
        if option == Option.SET_META_CONTEXT and not self.structured_replies:
            option = self._plan.pop(0)
        if option == Option.LIST_META_CONTEXT:
            queries = ([IDENTITY_PREFIX] if self.identify else []) + ([ROLE_PREFIX + self.role] if self.role else [])
            data = wire.MetaContextRequest.build(dict(name=self.export_name, queries=queries))
        elif option == Option.SET_META_CONTEXT:
            data = wire.MetaContextRequest.build(dict(name=self.export_name, queries=list(self.meta_contexts)))
        elif option == Option.GO:
            data = wire.InfoRequest.build(dict(name=self.export_name, requests=[Info.BLOCK_SIZE]))
        else:
            data = b""
        self._send_option(option, data)

    def _next_option_reply(self):
        if len(self._buf) < 20:
            return self._end_of_input()
        try:
            header = wire.OptionReplyHeader.parse(bytes(self._buf[:20]))
        except ConstructError:
            raise RemoteProtocolError("bad option reply magic") from None
        if header.length > MAX_OPTION_DATA:
            raise RemoteProtocolError(f"option reply of {header.length} bytes is too big")
        if len(self._buf) < 20 + header.length:
            return self._end_of_input()
        payload = bytes(self._buf[20 : 20 + header.length])
        del self._buf[: 20 + header.length]
        option, reply = int(header.option), int(header.reply)
        if option != self._option:
            raise RemoteProtocolError(f"reply to {_option_name(option)} while waiting for {_option_name(self._option)}")
        if wire.reply_is_error(reply):
            return self._option_failed(option, reply, payload)
        try:
            return self._option_replied(option, reply, payload)
        except (ConstructError, UnicodeDecodeError) as exc:
            raise RemoteProtocolError(f"malformed reply to {_option_name(option)}: {exc}") from None

    def _option_failed(self, option: int, reply: int, payload: bytes):
        message = payload.decode("utf-8", "replace")
        if option in (Option.STRUCTURED_REPLY, Option.SET_META_CONTEXT, Option.LIST_META_CONTEXT):
            self._send_next_option()  # all optional: carry on without them
            return None
        try:
            reply_name = f"NBD_REP_{Reply(reply).name}"
        except ValueError:
            reply_name = f"error {reply:#x}"
        raise RemoteProtocolError(f"server refused {_option_name(option)} for export {self.export_name!r}: "
                                  f"{reply_name}" + (f" ({message})" if message else ""), hint=reply)

    def _option_replied(self, option: int, reply: int, payload: bytes):
        if option == Option.STARTTLS:
            if reply != Reply.ACK:
                raise RemoteProtocolError("unexpected reply to NBD_OPT_STARTTLS")
            if self._buf:
                raise RemoteProtocolError("server sent data after accepting STARTTLS")
            self._transition(StartTLS)
            return StartTLS()
        if option == Option.STRUCTURED_REPLY:
            if reply != Reply.ACK:
                raise RemoteProtocolError("unexpected reply to NBD_OPT_STRUCTURED_REPLY")
            self.structured_replies = True
            self._send_next_option()
            return None
        if option == Option.LIST_META_CONTEXT:
            if reply == Reply.META_CONTEXT:
                name = wire.MetaContextReply.parse(payload).name
                if name.startswith(IDENTITY_PREFIX):
                    instance = name.removeprefix(IDENTITY_PREFIX)
                    try:
                        check_instance_id(instance)
                    except LocalProtocolError:
                        raise RemoteProtocolError(f"the server reported a malformed instance id {instance!r:.60}"
                                                  ) from None
                    if self.instance is not None and self.instance != instance:
                        raise RemoteProtocolError("the server reported two different instance ids")
                    self.instance = instance
            elif reply == Reply.ACK:
                self._send_next_option()
            else:
                raise RemoteProtocolError(f"unexpected reply type {reply} to NBD_OPT_LIST_META_CONTEXT")
            return None
        if option == Option.SET_META_CONTEXT:
            if reply == Reply.META_CONTEXT:
                context = wire.MetaContextReply.parse(payload)
                self._context_ids[context.context_id] = context.name
            elif reply == Reply.ACK:
                self._send_next_option()
            else:
                raise RemoteProtocolError(f"unexpected reply type {reply} to NBD_OPT_SET_META_CONTEXT")
            return None
        # NBD_OPT_GO
        if reply == Reply.INFO:
            self._go_info(payload)
            return None
        if reply != Reply.ACK:
            raise RemoteProtocolError(f"unexpected reply type {reply} to NBD_OPT_GO")
        if "size" not in self._info:
            raise RemoteProtocolError("server finished NBD_OPT_GO without NBD_INFO_EXPORT")
        self.ready = Ready(
            size=self._info["size"],
            transmission_flags=self._info["flags"],
            min_block=self._info.get("minimum", 1),
            preferred_block=min(self._info.get("preferred", PAGE_SIZE), MAX_BLOCK),
            max_block=min(self._info.get("maximum", MAX_BLOCK), MAX_BLOCK),
            structured_replies=self.structured_replies,
            base_allocation=BASE_ALLOCATION in self._context_ids.values(),
            instance=self.instance,
        )
        self._transition(Ready)
        return self.ready

    def _go_info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise RemoteProtocolError("NBD_REP_INFO without an info type")
        info = int.from_bytes(payload[:2], "big")
        if info == Info.EXPORT:
            parsed = wire.InfoExport.parse(payload)
            self._info["size"] = parsed.size
            self._info["flags"] = int.from_bytes(payload[10:12], "big")
        elif info == Info.BLOCK_SIZE:
            parsed = wire.InfoBlockSize.parse(payload)
            if not 1 <= parsed.minimum <= parsed.preferred <= parsed.maximum:
                raise RemoteProtocolError("server advertised inconsistent block sizes")
            if parsed.minimum > MAX_BLOCK:
                raise RemoteProtocolError(f"server's minimum block size {parsed.minimum} is above the largest "
                                          f"request this client makes ({MAX_BLOCK} bytes)")
            self._info.update(minimum=parsed.minimum, preferred=parsed.preferred, maximum=parsed.maximum)
        # NAME, DESCRIPTION and unknown info types are ignored.

    # transmission: requests
    def _request(self, event_type: type, command: int, offset: int, length: int, flags: int = 0
                 ) -> tuple[int, bytes]:
        if self.state is not State.TRANSMISSION:
            self._transition(event_type)  # raises: requests belong to transmission only
        ready = self.ready
        if offset + length > ready.size:
            raise LocalProtocolError(f"range {offset}+{length} is beyond the end of the export ({ready.size} bytes)")
        handle = self._next_handle
        self._next_handle = handle + 1 if handle < _U64_MAX else 1
        self._inflight[handle] = _InFlight(command, offset, length)
        return handle, REQUEST.pack(_REQUEST_MAGIC, flags, command, handle, offset, length)

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        _check_range(offset, length, self.ready.max_block if self.ready else MAX_BLOCK)
        return self._request(ReadRequest, _READ, offset, length)

    def block_status(self, offset: int, length: int, one_extent: bool = False) -> tuple[int, bytes]:
        _check_range(offset, length)
        if self.ready is None or not self.ready.base_allocation:
            raise LocalProtocolError("block status needs the base:allocation context, which was not negotiated")
        return self._request(BlockStatusRequest, Command.BLOCK_STATUS, offset, length,
                             CommandFlag.REQ_ONE if one_extent else 0)

    def cache(self, offset: int, length: int) -> tuple[int, bytes]:
        _check_range(offset, length)
        return self._request(CacheRequest, Command.CACHE, offset, length)

    def disconnect(self) -> bytes:
        self._transition(Disconnect)
        return REQUEST.pack(wire.REQUEST_MAGIC, 0, Command.DISC, 0, 0, 0)

    # transmission: replies
    def _next_reply(self):
        buf = self._buf
        if self._chunk is not None:
            return self._chunk_payload()
        if len(buf) < 4:
            return self._end_of_input()
        magic = U32.unpack_from(buf)[0]
        if magic == wire.SIMPLE_REPLY_MAGIC:
            return self._simple_reply()
        if magic == wire.STRUCTURED_REPLY_MAGIC:
            if len(buf) < 20:
                return self._end_of_input()
            if not self.structured_replies:
                raise RemoteProtocolError("structured reply chunk although structured replies were not negotiated")
            self._chunk = CHUNK_HEADER.unpack_from(buf)
            del buf[:20]
            return self._chunk_payload()
        raise RemoteProtocolError(f"bad reply magic {magic:#x}")

    def take_read_replies(self, data) -> tuple[int, list[tuple[int, int, int]]]:
        """The fast path for the commonest reply, used instead of receive_data() while the core holds no
        partial reply: take the leading complete successful READ replies (a simple reply, or one
        OFFSET_DATA chunk with DONE covering the whole read) off `data`. Returns (bytes taken,
        [(handle, start, stop)]), data[start:stop] being that read's payload; those requests are done.
        The first reply that is anything else (an error, holes, partial data, an unknown handle) and all
        after it are left for receive_data()."""
        if self.state is not State.TRANSMISSION or self._buf or self._chunk is not None:
            return 0, []
        taken = []
        pos, end = 0, len(data)
        while (reply := self._plain_read_reply_at(data, pos)) is not None and reply[2] <= end:
            handle, start, pos = reply
            del self._inflight[handle]
            taken.append(reply)
        return pos, taken

    def read_reply_size(self, data) -> int:
        """With the same precondition as take_read_replies(): if `data` starts with the header of a
        reply that method would take, the size of that whole reply (header and payload), else 0. A
        caller that holds such a partial reply can wait for the rest and present it all at once."""
        if self.state is not State.TRANSMISSION or self._buf or self._chunk is not None:
            return 0
        reply = self._plain_read_reply_at(data, 0)
        return 0 if reply is None else reply[2]

    def _plain_read_reply_at(self, data, pos: int) -> tuple[int, int, int] | None:
        """(handle, payload start, payload stop) of the successful whole-READ reply whose header is
        at data[pos:], which may end before the payload does; None if it is anything else."""
        if self.structured_replies:
            if len(data) - pos < OFFSET_DATA_HEADER.size:
                return None
            magic, flags, kind, handle, length, offset = OFFSET_DATA_HEADER.unpack_from(data, pos)
            request = self._inflight.get(handle)
            if (magic != _CHUNK_MAGIC or kind != _DATA or not flags & _DONE or request is None
                    or request.command != _READ or request.buffer is not None or request.error is not None
                    or length != request.length + 8 or offset != request.offset):
                return None
            return handle, pos + OFFSET_DATA_HEADER.size, pos + CHUNK_HEADER.size + length
        if len(data) - pos < SIMPLE_REPLY.size:
            return None
        magic, error, handle = SIMPLE_REPLY.unpack_from(data, pos)
        request = self._inflight.get(handle)
        if magic != _SIMPLE_MAGIC or error or request is None or request.command != _READ:
            return None
        return handle, pos + SIMPLE_REPLY.size, pos + SIMPLE_REPLY.size + request.length

    def _lookup_inflight(self, handle: int) -> _InFlight:
        request = self._inflight.get(handle)
        if request is None:
            raise RemoteProtocolError(f"reply for unknown handle {handle:#x}")
        return request

    def _simple_reply(self):
        buf = self._buf
        if len(buf) < 16:
            return self._end_of_input()
        _, error, handle = SIMPLE_REPLY.unpack_from(buf)
        request = self._lookup_inflight(handle)
        if error:
            del buf[:16]
            del self._inflight[handle]
            return RequestFailed(handle, error)
        if request.command == Command.READ:
            if self.structured_replies:
                raise RemoteProtocolError("simple reply with data to a READ after structured replies were agreed")
            if len(buf) < 16 + request.length:
                return self._end_of_input()
            data = bytes(buf[16 : 16 + request.length])
            del buf[: 16 + request.length]
            del self._inflight[handle]
            return ReadDone(handle, data)
        del buf[:16]
        del self._inflight[handle]
        if request.command == Command.BLOCK_STATUS:
            raise RemoteProtocolError("simple success reply to BLOCK_STATUS")
        return CacheDone(handle)

    def _chunk_payload(self):
        _, flags, chunk_type, handle, length = self._chunk
        request = self._lookup_inflight(handle)
        if length > MAX_CHUNK_PAYLOAD:
            raise RemoteProtocolError(f"structured reply chunk of {length} bytes is too big")
        if len(self._buf) < length:
            return self._end_of_input()
        if (chunk_type == _DATA and flags & _DONE and request.buffer is None and request.error is None
                and request.command == _READ
                and length == request.length + 8 and wire.U64.unpack_from(self._buf)[0] == request.offset):
            # The common reply: the whole read in one chunk. Take it without assembling.
            data = bytes(self._buf[8:length])
            del self._buf[:length]
            self._chunk = None
            del self._inflight[handle]
            return ReadDone(handle, data)
        payload = memoryview(self._buf)[:length]
        try:
            self._apply_chunk(request, chunk_type, payload)
        finally:
            payload.release()
        del self._buf[:length]
        self._chunk = None
        if not flags & _DONE:
            return None
        del self._inflight[handle]
        if request.error is not None:
            return RequestFailed(handle, *request.error)
        if request.command == _READ:
            if request.received != request.length:
                raise RemoteProtocolError(
                    f"READ {request.offset}+{request.length} finished with {request.received} bytes covered")
            return ReadDone(handle, bytes(request.buffer))
        if request.command == Command.BLOCK_STATUS:
            if not request.extents:
                raise RemoteProtocolError("BLOCK_STATUS finished without base:allocation extents")
            return BlockStatusDone(handle, request.extents)
        return CacheDone(handle)

    def _apply_chunk(self, request: _InFlight, chunk_type: int, payload: memoryview) -> None:
        if chunk_type == _DATA or chunk_type == _HOLE:
            if request.command != _READ:
                raise RemoteProtocolError("data chunk in the reply to a request that is not a READ")
            if chunk_type == _DATA:
                if len(payload) < 9:
                    raise RemoteProtocolError("OFFSET_DATA chunk too short")
                start, size = wire.U64.unpack_from(payload)[0], len(payload) - 8
            else:
                if len(payload) != 12:
                    raise RemoteProtocolError("OFFSET_HOLE chunk must be 12 bytes")
                start, size = wire.U64.unpack_from(payload)[0], U32.unpack_from(payload, 8)[0]
            rel = start - request.offset
            if rel < 0 or size == 0 or rel + size > request.length:
                raise RemoteProtocolError(f"chunk {start}+{size} lies outside READ {request.offset}+{request.length}")
            if request.buffer is None:
                request.buffer = bytearray(request.length)
            if chunk_type == _DATA:
                request.buffer[rel : rel + size] = payload[8:]
            request.received += size
        elif chunk_type == ChunkType.BLOCK_STATUS:
            if request.command != Command.BLOCK_STATUS or len(payload) < 12 or (len(payload) - 4) % 8:
                raise RemoteProtocolError("malformed BLOCK_STATUS chunk")
            context_id = U32.unpack_from(payload)[0]
            if self._context_ids.get(context_id) == BASE_ALLOCATION:
                words = [int.from_bytes(payload[i : i + 8], "big") for i in range(4, len(payload), 8)]
                extents = tuple((w >> 32, w & 0xFFFFFFFF) for w in words)
                if any(n == 0 for n, _ in extents):
                    raise RemoteProtocolError("zero-length block status extent")
                request.extents = extents
        elif chunk_type == ChunkType.ERROR or chunk_type == ChunkType.ERROR_OFFSET:
            if len(payload) < 6:
                raise RemoteProtocolError("error chunk too short")
            error = U32.unpack_from(payload)[0]
            msg_len = int.from_bytes(payload[4:6], "big")
            if 6 + msg_len > len(payload) or msg_len > MAX_STRING:
                raise RemoteProtocolError("error chunk message length is wrong")
            if error == 0:
                raise RemoteProtocolError("error chunk with error 0")
            request.error = (error, bytes(payload[6 : 6 + msg_len]).decode("utf-8", "replace"))
        elif chunk_type == ChunkType.NONE:
            if len(payload):
                raise RemoteProtocolError("NONE chunk with a payload")
        elif wire.chunk_is_error(chunk_type):
            request.error = (Errno.EIO, f"unknown error chunk type {chunk_type}")
        else:
            raise RemoteProtocolError(f"unknown structured reply chunk type {chunk_type}")
