"""Sans-I/O NBD protocol core: what both roles share (fixed newstyle handshake, then transmission).

No sockets here, in the manner of h11: feed received bytes with `receive_data(data)` (b"" means EOF),
pull events with `next_event()` until it returns `NEED_DATA`, turn your own events into bytes with
`send(event)`, and write out whatever the core answered by itself with `data_to_send()`.

This module holds the limits, errors, checks, `ExportInfo`, the events, the states and the `Connection`
base; the roles are `ServerConnection` (server_core.py) and `ClientConnection` (client_core.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..common.units import PAGE_SIZE
from .wire import MAX_STRING, CommandFlag, Option, TransmissionFlag

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
U64_MAX = (1 << 64) - 1
_OFFSET_MAX = (1 << 63) - 1


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


def check_string(what: str, value: str) -> None:
    """A string the protocol carries: at most MAX_STRING bytes of UTF-8, no NUL."""
    if len(value.encode("utf-8")) > MAX_STRING:
        raise LocalProtocolError(f"{what} is longer than {MAX_STRING} bytes")
    if "\0" in value:
        raise LocalProtocolError(f"{what} contains a NUL character")


def check_range(offset: int, length: int, max_length: int = (1 << 32) - 1) -> None:
    """A request's range: a 63-bit offset and a length of 1..max_length."""
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
    if not 0 <= handle <= U64_MAX:
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
        check_string("export name", self.name)
        check_string("export description", self.description)
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
        check_range(self.offset, self.length, MAX_BLOCK)


@dataclass(frozen=True, slots=True)
class CacheRequest(Event):
    handle: int
    offset: int
    length: int

    def __post_init__(self):
        _check_handle(self.handle)
        check_range(self.offset, self.length)


@dataclass(frozen=True, slots=True)
class BlockStatusRequest(Event):
    handle: int
    offset: int
    length: int
    flags: int = 0

    def __post_init__(self):
        _check_handle(self.handle)
        check_range(self.offset, self.length)

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
        check_string("error message", self.message)


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


class Greeted(Event):
    """Internal to the cores: the greeting exchange finished."""

    __slots__ = ()


_REPLY_EVENTS = (ReadReply, BlockStatusReply, CacheReply, ErrorReply)
_REQUEST_EVENTS = (ReadRequest, CacheRequest, BlockStatusRequest)

SERVER_TRANSITIONS: dict[tuple[State, type], State] = {
    (State.GREETING, Greeted): State.OPTIONS,
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
    (State.GREETING, Greeted): State.OPTIONS,
    (State.OPTIONS, StartTLS): State.TLS_HANDSHAKE,
    (State.TLS_HANDSHAKE, TLSEstablished): State.OPTIONS,
    (State.OPTIONS, Ready): State.TRANSMISSION,
    (State.TRANSMISSION, Disconnect): State.CLOSED,
    **{(State.TRANSMISSION, e): State.TRANSMISSION for e in _REQUEST_EVENTS},
    **{(s, ConnectionClosed): State.CLOSED for s in State},
}


class Connection:
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


def option_name(option: int) -> str:
    """The option's name for messages: NBD_OPT_GO, or "option 99" for one this core does not know."""
    try:
        return f"NBD_OPT_{Option(option).name}"
    except ValueError:
        return f"option {option}"
