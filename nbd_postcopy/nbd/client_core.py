"""The client role of the sans-I/O NBD protocol core (see protocol.py for how a core is driven).

`ClientConnection` negotiates structured replies, `base:allocation` and an export with NBD_OPT_GO,
then turns `read()`/`block_status()`/`cache()` into request bytes and replies into
`ReadDone`/`BlockStatusDone`/`CacheDone`/`RequestFailed` events.
"""

from __future__ import annotations

from dataclasses import dataclass

from construct import ConstructError

from ..common.units import PAGE_SIZE
from . import wire
from .protocol import (
    CLIENT_TRANSITIONS,
    IDENTITY_PREFIX,
    MAX_BLOCK,
    MAX_CHUNK_PAYLOAD,
    MAX_OPTION_DATA,
    NEED_DATA,
    ROLES,
    ROLE_PREFIX,
    U64_MAX,
    BlockStatusDone,
    BlockStatusRequest,
    CacheDone,
    CacheRequest,
    Connection,
    Disconnect,
    Event,
    Greeted,
    LocalProtocolError,
    ReadDone,
    ReadRequest,
    Ready,
    RemoteProtocolError,
    RequestFailed,
    StartTLS,
    State,
    TLSEstablished,
    check_instance_id,
    check_range,
    check_string,
    option_name,
)
from .wire import (
    BASE_ALLOCATION,
    CHUNK_DATA,
    CHUNK_DONE,
    CHUNK_HEADER,
    CHUNK_HOLE,
    CMD_READ,
    MAX_STRING,
    OFFSET_DATA_HEADER,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U32,
    ChunkType,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    Info,
    Option,
    Reply,
)


@dataclass(slots=True)
class _InFlight:
    command: int
    offset: int
    length: int
    buffer: bytearray | None = None
    received: int = 0
    extents: tuple = ()
    error: tuple[int, str] | None = None


class ClientConnection(Connection):
    """The client side: fixed newstyle handshake with NBD_OPT_GO, then pipelined requests."""

    _transitions = CLIENT_TRANSITIONS

    def __init__(self, export_name: str, structured_replies: bool = True, tls: bool = False,
                 meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,), identify: bool = False,
                 role: str | None = None):
        super().__init__()
        check_string("export name", export_name)
        for name in meta_contexts:
            check_string("meta context", name)
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
        self._transition(Greeted)
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
            raise RemoteProtocolError(f"reply to {option_name(option)} while waiting for {option_name(self._option)}")
        if wire.reply_is_error(reply):
            return self._option_failed(option, reply, payload)
        try:
            return self._option_replied(option, reply, payload)
        except (ConstructError, UnicodeDecodeError) as exc:
            raise RemoteProtocolError(f"malformed reply to {option_name(option)}: {exc}") from None

    def _option_failed(self, option: int, reply: int, payload: bytes):
        message = payload.decode("utf-8", "replace")
        if option in (Option.STRUCTURED_REPLY, Option.SET_META_CONTEXT, Option.LIST_META_CONTEXT):
            self._send_next_option()  # all optional: carry on without them
            return None
        try:
            reply_name = f"NBD_REP_{Reply(reply).name}"
        except ValueError:
            reply_name = f"error {reply:#x}"
        raise RemoteProtocolError(f"server refused {option_name(option)} for export {self.export_name!r}: "
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
        self._next_handle = handle + 1 if handle < U64_MAX else 1
        self._inflight[handle] = _InFlight(command, offset, length)
        return handle, REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        check_range(offset, length, self.ready.max_block if self.ready else MAX_BLOCK)
        return self._request(ReadRequest, CMD_READ, offset, length)

    def block_status(self, offset: int, length: int, one_extent: bool = False) -> tuple[int, bytes]:
        check_range(offset, length)
        if self.ready is None or not self.ready.base_allocation:
            raise LocalProtocolError("block status needs the base:allocation context, which was not negotiated")
        return self._request(BlockStatusRequest, Command.BLOCK_STATUS, offset, length,
                             CommandFlag.REQ_ONE if one_extent else 0)

    def cache(self, offset: int, length: int) -> tuple[int, bytes]:
        check_range(offset, length)
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
            if (magic != STRUCTURED_REPLY_MAGIC or kind != CHUNK_DATA or not flags & CHUNK_DONE or request is None
                    or request.command != CMD_READ or request.buffer is not None or request.error is not None
                    or length != request.length + 8 or offset != request.offset):
                return None
            return handle, pos + OFFSET_DATA_HEADER.size, pos + CHUNK_HEADER.size + length
        if len(data) - pos < SIMPLE_REPLY.size:
            return None
        magic, error, handle = SIMPLE_REPLY.unpack_from(data, pos)
        request = self._inflight.get(handle)
        if magic != SIMPLE_REPLY_MAGIC or error or request is None or request.command != CMD_READ:
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
        if (chunk_type == CHUNK_DATA and flags & CHUNK_DONE and request.buffer is None and request.error is None
                and request.command == CMD_READ
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
        if not flags & CHUNK_DONE:
            return None
        del self._inflight[handle]
        if request.error is not None:
            return RequestFailed(handle, *request.error)
        if request.command == CMD_READ:
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
        if chunk_type == CHUNK_DATA or chunk_type == CHUNK_HOLE:
            if request.command != CMD_READ:
                raise RemoteProtocolError("data chunk in the reply to a request that is not a READ")
            if chunk_type == CHUNK_DATA:
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
            if chunk_type == CHUNK_DATA:
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
