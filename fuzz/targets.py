"""Fuzz targets: one function per target, each taking the fuzzer's bytes and checking invariants.

    nbd_server   ServerConnection fed arbitrary client bytes (handshake, options, requests, the
                 take_plain_read fast path); what it emits must parse as valid NBD and answer only
                 requests it received, each once.
    nbd_client   ClientConnection fed arbitrary server bytes (greeting, option replies, simple and
                 structured replies, the take_read_replies/read_reply_size fast path); it may only
                 complete requests it made, each once, with the right amount of data.
    device       Device.write/trim/read_into/arm driven by an operation script, checked against a
                 model: a mapped slot reads as its marker (unarmed) or its guest page (armed), written
                 data reads back exactly, trimmed slots read zeros, no read shows another slot's bytes.
    control      the control socket's line protocol: one JSON object per line, for any input.

In all of them only ProtocolError (for the NBD cores) may escape; anything else is a finding. The
first two input bytes of the NBD targets choose a configuration and how the stream is cut into
pieces (see chunks()); the rest is the peer's byte stream. fuzz/make_corpus.py writes valid seeds.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile

from nbd_postcopy.nbd import wire
from nbd_postcopy.nbd.client_core import ClientConnection
from nbd_postcopy.nbd.protocol import (
    NEED_DATA,
    BlockStatusDone,
    BlockStatusReply,
    BlockStatusRequest,
    CacheDone,
    CacheReply,
    CacheRequest,
    ConnectionClosed,
    Disconnect,
    ErrorReply,
    ExportInfo,
    ProtocolError,
    ReadDone,
    ReadReply,
    ReadRequest,
    Ready,
    RequestFailed,
    StartTLS,
    State,
    TLSEstablished,
    TransmissionStarted,
)
from nbd_postcopy.nbd.server_core import ServerConnection
from nbd_postcopy.nbd.wire import CHUNK_HEADER, REQUEST, SIMPLE_REPLY, ChunkType, Command, Info, Option, Reply

PAGE = 4096
MAX_EVENTS = 2000  # events handled per input, so one input cannot run for long


class Finding(AssertionError):
    """An invariant does not hold: a bug in the code under test (or in the harness)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Finding(message)


class Script:
    """The fuzzer's bytes as a small script: a reader of ints and slices that yields zeros when empty."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, nbytes: int) -> int:
        return int.from_bytes(bytes(self.byte() for _ in range(nbytes)), "big")

    def take(self, n: int) -> bytes:
        piece = self.data[self.pos : self.pos + n]
        self.pos += len(piece)
        return piece

    def rest(self) -> bytes:
        return self.take(len(self.data))

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


FRAMED = 0xFF  # the chunking byte that means "the stream is framed: a 2-byte length before each piece"


def chunks(script: Script, size: int):
    """The rest of the script as the pieces the transport delivers, then b"" for EOF: all at once (size
    0), `size` bytes at a time, or (size FRAMED) as framed by the script itself, so that pieces can
    follow message boundaries as real reads often do."""
    if size == FRAMED:
        while not script.done:
            piece = script.take(script.int(2))
            if piece:
                yield piece
    else:
        stream = script.rest()
        size = size or len(stream) or 1
        for i in range(0, len(stream), size):
            yield stream[i : i + size]
    yield b""


def frame(pieces) -> bytes:
    """The framed form of a list of pieces (for seeds)."""
    return b"".join(len(piece).to_bytes(2, "big") + piece for piece in pieces)


# An image with data pages, zero pages and pages whose first word is zero, so reads cover zero_runs().
def _make_image(pages: int) -> bytes:
    out = bytearray()
    for page in range(pages):
        kind = page % 4
        if kind == 0:
            out += bytes([page + 1]) * PAGE
        elif kind == 1:
            out += bytes(PAGE)
        elif kind == 2:
            out += bytes(PAGE - 1) + b"\x01"
        else:
            out += bytes(8) + bytes([page]) * (PAGE - 8)
    return bytes(out)


IMAGE = _make_image(8)
EXPORTS = {
    "disk": ExportInfo("disk", size=len(IMAGE) - 100, description="the disk", instance="src-1.a_b"),
    "small": ExportInfo("small", size=1000, min_block=1, preferred_block=512, max_block=4096),
}


# --- nbd_server ------------------------------------------------------------------------------------
class _Requests:
    """The client's requests, parsed independently of the core from the transmission-phase stream.

    Each is [handle, command, offset, length, flags, answered, by_app, bytes covered]: by_app marks the
    requests the core handed to the application as events (the application answers those; the core
    answers the rest itself, at once)."""

    def __init__(self, stream: bytearray, start: int):
        self.stream = stream
        self.pos = start
        self.seen: list[list] = []

    def parse_up_to(self, end: int) -> None:
        while end - self.pos >= REQUEST.size:
            magic, flags, command, handle, offset, length = REQUEST.unpack_from(self.stream, self.pos)
            if magic != wire.REQUEST_MAGIC:
                self.pos = 1 << 40  # the core gives up here: nothing after counts
                return
            self.seen.append([handle, command, offset, length, flags, False, False, 0])
            self.pos += REQUEST.size + (length if command == Command.WRITE else 0)

    def handed_out(self, handle: int) -> None:
        """The core just returned the last request parsed as an event."""
        check(bool(self.seen) and self.seen[-1][0] == handle and not self.seen[-1][6],
              f"a request event for handle {handle:#x} that is not the request just received")
        self.seen[-1][6] = True

    def answer(self, handle: int, by_app: bool, commands=None) -> list:
        for request in self.seen:
            if request[0] == handle and not request[5] and request[6] == by_app and (
                    commands is None or request[1] in commands):
                request[5] = True
                return request
        raise Finding(f"a reply for handle {handle:#x}, which no unanswered request carries")


def _check_option_replies(out: bytes, export_name_reply: bool, tls_required: bool) -> None:
    """The server's handshake output: greeting, option replies, and the NBD_OPT_EXPORT_NAME reply. With
    TLS required, nothing but errors and the ACKs of STARTTLS and ABORT comes before TLS."""
    check(len(out) >= 18, "handshake output shorter than the greeting")
    magic, opt, flags = struct.unpack_from(">QQH", out)
    check(magic == wire.NBDMAGIC and opt == wire.IHAVEOPT and flags == 3, "bad greeting")
    pos = 18
    known = {int(r) for r in Reply}
    while len(out) - pos >= 20 and struct.unpack_from(">Q", out, pos)[0] == wire.OPTION_REPLY_MAGIC:
        _, option, reply, length = struct.unpack_from(">QIII", out, pos)
        payload = out[pos + 20 : pos + 20 + length]
        check(len(payload) == length, "option reply cut short")
        check(reply in known, f"unknown option reply type {reply:#x}")
        pos += 20 + length
        if tls_required:
            check(reply & (1 << 31) or reply == Reply.ACK and option in (Option.STARTTLS, Option.ABORT),
                  f"option reply {reply:#x} to option {option} before TLS, although TLS is required")
            tls_required = not (reply == Reply.ACK and option == Option.STARTTLS)
        if reply == Reply.ACK:
            check(not payload, "ACK with a payload")
        elif reply == Reply.SERVER:
            check(option == Option.LIST, "NBD_REP_SERVER outside NBD_OPT_LIST")
            (n,) = struct.unpack_from(">I", payload)
            check(4 + n <= len(payload), "NBD_REP_SERVER name length beyond its payload")
            payload.decode("utf-8")
        elif reply == Reply.INFO:
            check(option in (Option.INFO, Option.GO), "NBD_REP_INFO outside INFO/GO")
            (info,) = struct.unpack_from(">H", payload)
            if info == Info.EXPORT:
                check(len(payload) == 12, "NBD_INFO_EXPORT length")
            elif info == Info.BLOCK_SIZE:
                check(len(payload) == 14, "NBD_INFO_BLOCK_SIZE length")
                lo, pref, hi = struct.unpack_from(">III", payload, 2)
                check(1 <= lo <= pref <= hi, "inconsistent block sizes")
            else:
                check(info in (Info.NAME, Info.DESCRIPTION), f"unknown info type {info}")
                payload[2:].decode("utf-8")
        elif reply == Reply.META_CONTEXT:
            check(option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT), "META_CONTEXT outside meta options")
            check(len(payload) > 4, "META_CONTEXT without a name")
            payload[4:].decode("utf-8")
        else:  # an error: a message
            check(len(payload) <= wire.MAX_STRING, "error message too long")
            payload.decode("utf-8")
    rest = len(out) - pos
    check(not (rest and tls_required), "an NBD_OPT_EXPORT_NAME reply before TLS, although TLS is required")
    if export_name_reply:
        check(rest in (10, 134), f"NBD_OPT_EXPORT_NAME reply of {rest} bytes")
    else:
        check(rest == 0, f"{rest} bytes of handshake output that are no option reply")


def _check_replies(out: bytes, requests: _Requests, structured: bool, from_core: bool) -> None:
    """Whole transmission replies: each answers an unanswered request with that handle, exactly once."""
    pos = 0
    open_chunks: dict[int, list] = {}  # handle -> request whose structured reply has not ended
    while pos < len(out):
        check(len(out) - pos >= 4, "a partial reply")
        (magic,) = struct.unpack_from(">I", out, pos)
        if magic == wire.SIMPLE_REPLY_MAGIC:
            check(len(out) - pos >= 16, "a partial simple reply")
            _, error, handle = SIMPLE_REPLY.unpack_from(out, pos)
            pos += 16
            if error:
                check(error in {int(e) for e in wire.Errno}, f"unknown errno {error}")
                requests.answer(handle, not from_core)
                continue
            request = requests.answer(handle, not from_core, (Command.READ, Command.CACHE, Command.FLUSH))
            if request[1] == Command.READ:
                check(not structured, "a simple READ reply after structured replies were agreed")
                check(len(out) - pos >= request[3], "a simple READ reply without all its data")
                pos += request[3]
            continue
        check(magic == wire.STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}")
        check(structured, "a structured reply chunk that was not negotiated")
        check(len(out) - pos >= 20, "a partial chunk header")
        _, flags, kind, handle, length = CHUNK_HEADER.unpack_from(out, pos)
        payload = out[pos + 20 : pos + 20 + length]
        check(len(payload) == length, "a chunk without all its payload")
        pos += 20 + length
        check(flags & ~1 == 0, f"unknown chunk flags {flags:#x}")
        request = open_chunks.get(handle)
        if request is None:
            request = requests.answer(handle, not from_core)
            open_chunks[handle] = request
        if kind in (ChunkType.OFFSET_DATA, ChunkType.OFFSET_HOLE):
            check(request[1] == Command.READ, "a data chunk for a request that is not a READ")
            if kind == ChunkType.OFFSET_DATA:
                check(length > 8, "OFFSET_DATA without data")
                start, size = struct.unpack_from(">Q", payload)[0], length - 8
            else:
                check(length == 12, "OFFSET_HOLE length")
                start, size = struct.unpack_from(">QI", payload)
            check(request[2] <= start and start + size <= request[2] + request[3] and size,
                  "a chunk outside its READ")
            request[7] += size
        elif kind == ChunkType.BLOCK_STATUS:
            check(request[1] == Command.BLOCK_STATUS and length >= 12 and (length - 4) % 8 == 0, "bad BLOCK_STATUS chunk")
            words = struct.unpack_from(f">{(length - 4) // 4}I", payload, 4)
            lengths = words[0::2]
            check(all(lengths) and sum(lengths) <= request[3], "block status extents beyond the request")
            check(not request[4] & wire.CommandFlag.REQ_ONE or len(lengths) == 1, "REQ_ONE with several extents")
        elif kind == ChunkType.ERROR:
            check(length >= 6, "short error chunk")
            error, n = struct.unpack_from(">IH", payload)
            check(error != 0 and 6 + n == length, "bad error chunk")
            payload[6:].decode("utf-8")
        else:
            check(kind == ChunkType.NONE and length == 0 and flags & 1, f"unexpected chunk type {kind}")
        if flags & 1:
            del open_chunks[handle]
            if request[1] == Command.READ and kind != ChunkType.ERROR:
                check(request[7] == request[3], f"READ reply covers {request[7]} of {request[3]} bytes")
    check(not open_chunks, "a structured reply without its DONE chunk")


def nbd_server(data: bytes) -> None:
    script = Script(data)
    config, chunk_size = script.byte(), script.byte()
    tls = ("none", "allow", "require", "none")[config & 3]
    default = "disk" if config & 4 else None
    policy = (config >> 3) & 3  # how the harness answers: in order, reversed, with errors, at the end
    core = ServerConnection(EXPORTS, default_export=default, tls=tls)
    stream = bytearray()
    handshake = bytearray(core.data_to_send())
    requests: _Requests | None = None
    pending: list = []
    events = 0
    export_name = False

    def answer(event) -> bytes:
        if policy == 2 and event.handle % 3 == 0:
            return core.send(ErrorReply(event.handle, wire.Errno.EIO, "no"))
        if isinstance(event, ReadRequest):
            return b"".join(bytes(p) for p in core.send_parts(ReadReply(event.handle, IMAGE[event.offset : event.offset + event.length])))
        if isinstance(event, CacheRequest):
            return core.send(CacheReply(event.handle))
        return core.send(BlockStatusReply(event.handle, ((min(event.length, PAGE), 3), (1 << 31, 0))))

    def flush_answers(final: bool) -> None:
        if policy == 3 and not final:
            return
        order = pending[::-1] if policy == 1 else list(pending)
        pending.clear()
        for event in order:
            _check_replies(answer(event), requests, core.structured_replies, from_core=False)

    try:
        for piece in chunks(script, chunk_size):
            if core.state is State.TRANSMISSION and piece:  # the fast path, as source/server.py uses it
                pos = 0
                while (taken := core.take_plain_read(piece, pos)) is not None:
                    handle, offset, length = taken
                    stream += piece[pos : pos + REQUEST.size]
                    requests.parse_up_to(len(stream))
                    requests.handed_out(handle)
                    pos += REQUEST.size
                    reply = b"".join(bytes(p) for p in core.plain_read_reply(handle, offset, IMAGE[offset : offset + length]))
                    _check_replies(reply, requests, core.structured_replies, from_core=False)
                piece = piece[pos:]
            stream += piece
            core.receive_data(piece)
            while events < MAX_EVENTS:
                was_transmission = core.state in (State.TRANSMISSION, State.CLOSED) and requests is not None
                event = core.next_event()
                out = core.data_to_send()
                if requests is not None:
                    requests.parse_up_to(len(stream) - len(core._buf))
                    if isinstance(event, (ReadRequest, CacheRequest, BlockStatusRequest)):
                        requests.handed_out(event.handle)
                if was_transmission:
                    _check_replies(out, requests, core.structured_replies, from_core=True)
                else:
                    handshake += out
                if event is NEED_DATA:
                    break
                events += 1
                if isinstance(event, StartTLS):
                    check(core.send(TLSEstablished()) == b"", "TLSEstablished produced bytes")
                elif isinstance(event, TransmissionStarted):
                    check(core.tls_active or tls != "require", "transmission without TLS, although TLS is required")
                    export_name = core.export is event.export and not (handshake.rfind(
                        struct.pack(">QI", wire.OPTION_REPLY_MAGIC, Option.GO)) > 0 and handshake.endswith(
                        struct.pack(">II", Reply.ACK, 0)))
                    requests = _Requests(stream, len(stream) - len(core._buf))
                    requests.parse_up_to(len(stream) - len(core._buf))
                elif isinstance(event, (ReadRequest, CacheRequest, BlockStatusRequest)):
                    check(core.state is State.TRANSMISSION, "a request outside transmission")
                    pending.append(event)
                elif isinstance(event, (Disconnect, ConnectionClosed)):
                    break
            flush_answers(final=False)
        if requests is not None:
            flush_answers(final=True)
    except ProtocolError:
        pass
    _check_option_replies(bytes(handshake), export_name, tls == "require")


# --- nbd_client ------------------------------------------------------------------------------------
def issue_requests(core: ClientConnection, ready: Ready, one_extent: bool = False) -> list[tuple]:
    """The requests the client harness makes once the export is open (make_corpus.py makes the same):
    [(handle, kind, offset, length, request bytes)]."""
    made = []
    for offset, length in ((0, 512), (PAGE, 2 * PAGE), (3 * PAGE, PAGE)):
        if offset + length <= ready.size and length <= ready.max_block:
            made.append((*core.read(offset, length), "read", offset, length))
    if ready.base_allocation and 3 * PAGE <= ready.size:
        made.append((*core.block_status(PAGE, 2 * PAGE, one_extent), "block_status", PAGE, 2 * PAGE))
    if 103 <= ready.size:
        made.append((*core.cache(100, 3), "cache", 100, 3))
    return [(handle, kind, offset, length, raw) for handle, raw, kind, offset, length in made]


def nbd_client(data: bytes) -> None:
    script = Script(data)
    config, chunk_size = script.byte(), script.byte()
    core = ClientConnection("disk", structured_replies=bool(config & 1), tls=bool(config & 2),
                            identify=bool(config & 4), meta_contexts=("base:allocation",) if config & 8 else ())
    use_fast_path = not config & 16
    made: dict[int, tuple] = {}  # handle -> (kind, offset, length)
    done: set[int] = set()
    held = b""
    events = 0

    def request_some(ready: Ready) -> None:
        for handle, kind, offset, length, _ in issue_requests(core, ready, one_extent=bool(config & 32)):
            made[handle] = (kind, offset, length)

    def finish(handle: int, kind: str | None) -> tuple:
        check(handle in made, f"a reply event for handle {handle:#x}, never requested")
        check(handle not in done, f"handle {handle:#x} completed twice")
        done.add(handle)
        request = made[handle]
        check(kind is None or request[0] == kind, f"a {kind} completion for a {request[0]} request")
        return request

    def pump() -> bool:
        nonlocal events
        while events < MAX_EVENTS:
            event = core.next_event()
            core.data_to_send()
            if event is NEED_DATA:
                return True
            events += 1
            if isinstance(event, StartTLS):
                core.send(TLSEstablished())
            elif isinstance(event, Ready):
                check(core.state is State.TRANSMISSION and 1 <= event.min_block <= event.preferred_block <= event.max_block,
                      f"Ready with block sizes {event.min_block}, {event.preferred_block}, {event.max_block}")
                request_some(event)
            elif isinstance(event, ReadDone):
                request = finish(event.handle, "read")
                check(len(event.data) == request[2], "ReadDone with the wrong amount of data")
            elif isinstance(event, BlockStatusDone):
                finish(event.handle, "block_status")
                check(len(event.extents) > 0 and all(n > 0 for n, _ in event.extents), "bad extents")
            elif isinstance(event, CacheDone):
                finish(event.handle, "cache")
            elif isinstance(event, RequestFailed):
                finish(event.handle, None)
                check(event.errno != 0, "RequestFailed with errno 0")
            elif isinstance(event, ConnectionClosed):
                return False
        return False

    try:
        for piece in chunks(script, chunk_size):
            if not piece:  # EOF: whatever was held goes to the core first
                if held:
                    core.receive_data(held)
                    held = b""
                core.receive_data(b"")
                pump()
                break
            if use_fast_path and core.state is State.TRANSMISSION:  # as nbd/client.py uses it
                buf = held + piece
                held = b""
                taken, replies = core.take_read_replies(buf)
                check(0 <= taken <= len(buf), "take_read_replies took more than it was given")
                for handle, start, stop in replies:
                    request = finish(handle, "read")
                    check(stop - start == request[2] and stop <= taken, "fast-path READ with the wrong amount of data")
                rest = buf[taken:]
                size = core.read_reply_size(rest) if rest else 0
                if len(rest) < size:
                    held = rest
                    continue
                piece = rest
            core.receive_data(piece)
            if not pump():
                break
    except ProtocolError:
        pass


# --- device ------------------------------------------------------------------------------------------
class _FakeSource:
    """Guest pages from a fixed image (the device's PageSource interface); `down` makes it fail."""

    size = 0
    connected = True

    def __init__(self, image: bytes):
        self.image = image
        self.down = False
        self.before_reply = None  # called once inside read_many, as if another request came meanwhile

    def _check(self):
        if self.down:
            raise ConnectionError("the fake source is down")

    def read_many(self, ranges, timeout):
        self._check()
        if self.before_reply:
            self.before_reply()
        return [self.image[offset : offset + length] for offset, length in ranges]

    def read_many_into(self, ranges, views, timeout):
        self._check()
        for view, (offset, length) in zip(views, ranges, strict=True):
            view[:] = self.image[offset : offset + length]

    def block_status(self, offset, length, timeout):
        self._check()
        return [(PAGE, 3 if not any(self.image[o : o + PAGE]) else 0) for o in range(offset, offset + length, PAGE)]


_DEVICE_PAGES, _DEVICE_HEADROOM = 12, 4
_KEY = b"fuzz-key-0123456789abcdef"
_device_cache_dir = None


def _device_parts():
    global _device_cache_dir
    from nbd_postcopy.device.markers import MarkerCodec

    if _device_cache_dir is None:
        _device_cache_dir = tempfile.gettempdir()  # the page file is O_TMPFILE: nothing is left behind
    image = bytes(((page * 7 + i) % 251 + 1) if page % 3 else 0 for page in range(_DEVICE_PAGES) for i in range(PAGE))
    return MarkerCodec(_KEY), MarkerCodec(b"another-key-0123456789"), image


_DEVICE_PARTS = None


def device(data: bytes) -> None:
    """Operations: 0 marker write, 1 foreign/forged marker, 2 data write, 3 unaligned write, 4 trim,
    5 read, 6 arm, 7 by the slot byte mod 4: learn zero pages, take the source down/up, a prefetch step,
    a prefetch step with a write or trim landing while its fetch is in flight. Every read is
    checked against the model; a read or write may fail only while the source is down, and a failed
    write changes nothing."""
    global _DEVICE_PARTS
    from nbd_postcopy.device.device import Device, DeviceIOError
    from nbd_postcopy.device.markers import HEADER_SIZE

    if _DEVICE_PARTS is None:
        _DEVICE_PARTS = _device_parts()
    codec, foreign, image = _DEVICE_PARTS
    script = Script(data)
    dev = Device(_DEVICE_PAGES, codec, headroom=_DEVICE_HEADROOM, cache_dir=_device_cache_dir, timeout=1.0)
    try:
        source = _FakeSource(image)
        dev.demand_source = source
        slots = dev.slots
        model: list = [None] * slots  # None: zeros; ("map", guest); ("data", bytes); slot 0 starts as the header
        model[0] = ("data", bytes(dev.header))

        def expected(slot: int) -> bytes:
            entry = model[slot]
            if entry is None:
                return bytes(PAGE)
            if entry[0] == "data":
                return entry[1]
            guest = entry[1]
            return image[guest * PAGE : (guest + 1) * PAGE] if dev.armed else codec.page(guest)

        def store(slot: int, page: bytes) -> None:
            guest = codec.parse(page) if slot else None
            if guest is not None and (page[HEADER_SIZE:] != bytes(PAGE - HEADER_SIZE) or guest >= _DEVICE_PAGES):
                guest = None
            model[slot] = ("map", guest) if guest is not None else ("data", page)

        ops = 0
        while not script.done and ops < 64:
            ops += 1
            op, slot = script.byte() & 7, script.byte() % slots
            if op in (0, 1, 2):
                count = min(script.byte() % 4 + 1, slots - slot)
                pages = []
                for i in range(count):
                    guest = script.byte() % (_DEVICE_PAGES + 2)
                    if op == 0:
                        page = codec.page(guest)
                    elif op == 1:
                        page = bytearray((foreign.page(guest), codec.page(guest))[guest & 1])
                        how = script.byte() & 3
                        if how == 1:
                            page[script.byte() % HEADER_SIZE] ^= 1 << (script.byte() & 7)  # a forged header
                        elif how == 2:
                            page[HEADER_SIZE + script.byte()] = script.byte() | 1  # data after the header
                        page = bytes(page)
                    else:
                        page = bytes([script.byte()]) * PAGE
                    pages.append(page)
                dev.write(b"".join(pages), slot * PAGE)
                for i, page in enumerate(pages):
                    store(slot + i, page)
            elif op == 3:
                offset = slot * PAGE + script.int(2) % PAGE
                length = min(script.int(2) % (3 * PAGE) + 1, dev.size - offset)
                payload = bytes([script.byte()]) * length
                if script.byte() & 1:  # splice in (part of) a valid marker
                    marker = codec.page(script.byte() % _DEVICE_PAGES)
                    payload = marker[: min(length, len(marker))] + payload[len(marker):]
                before = b"".join(expected(s) for s in range(slot, (offset + length - 1) // PAGE + 1))
                after = bytearray(before)
                start = offset - slot * PAGE
                after[start : start + length] = payload
                try:
                    dev.write(payload, offset)
                except DeviceIOError:  # a partial page that needed a fetch: nothing may have changed
                    check(source.down, "a write failed although the source is up")
                    continue
                for i in range(len(after) // PAGE):
                    store(slot + i, bytes(after[i * PAGE : (i + 1) * PAGE]))
            elif op == 4:
                offset = slot * PAGE + script.int(2) % PAGE
                length = min(script.int(2) % (4 * PAGE), dev.size - offset)
                dev.trim(offset, length)
                for s in range(-(-offset // PAGE), (offset + length) // PAGE):
                    model[s] = ("data", bytes(dev.header)) if s == 0 else None  # slot 0 reads as the header again
            elif op == 5:
                offset = slot * PAGE + script.int(2) % PAGE
                length = min(script.int(2) % (4 * PAGE), dev.size - offset)
                try:
                    got = dev.read(offset, length)
                except DeviceIOError:
                    check(source.down, "a read failed although the source is up")
                    continue
                want = b"".join(expected(s) for s in range(slot, (offset + length - 1) // PAGE + 1)) if length else b""
                start = offset - slot * PAGE
                if got != want[start : start + length]:
                    bad = next(i for i in range(length) if got[i] != want[start + i])
                    raise Finding(f"read at {offset}+{length}: byte {bad} (slot {(offset + bad) // PAGE}) is "
                                  f"{got[bad]}, the model says {want[start + bad]} ({model[(offset + bad) // PAGE]!r:.40})")
            elif op == 6:
                dev.arm()
            elif slot & 3 == 1:
                source.down = not source.down
            elif source.down:
                continue
            elif slot & 3 == 0:
                dev.learn_zero_pages(source, timeout=1.0)
            else:  # a prefetch step; with slot & 3 == 3 a write or trim lands while the fetch is in flight
                runs = dev.pending_runs(script.byte() % slots, slots, 1 + script.byte() % 3, 1 + script.byte() % 4)
                if not runs:
                    continue
                if slot & 3 == 3:
                    target = runs[0].slot + script.byte() % runs[0].count
                    kind, guest = script.byte() % 3, script.byte() % _DEVICE_PAGES

                    def meanwhile():
                        source.before_reply = None
                        if kind == 2:
                            dev.trim(target * PAGE, PAGE)
                            model[target] = None
                        else:
                            page = codec.page(guest) if kind == 0 else bytes([guest + 1]) * PAGE
                            dev.write(page, target * PAGE)
                            store(target, page)

                    source.before_reply = meanwhile
                dev.fetch(runs, source, "prefetch", 1.0)
            check(0 <= dev.remaining <= dev.mapped <= slots and dev.overlay_pages >= 0, "counters out of range")
        mapped = sum(1 for entry in model if entry and entry[0] == "map")
        overlay = sum(1 for entry in model[1:] if entry and entry[0] == "data")
        check(dev.mapped == mapped, f"device says {dev.mapped} mapped slots, the model {mapped}")
        check(dev.overlay_pages - dev._overlay.get(0) == overlay, "overlay count differs from the model")
    finally:
        dev.close()


# --- control ---------------------------------------------------------------------------------------
def control(data: bytes) -> None:
    """_Connection.handle over an in-memory stream: one JSON object per complete line, then it stops."""
    from nbd_postcopy.device import control as control_module

    def broken():
        raise RuntimeError("boom")

    server = control_module._Server.__new__(control_module._Server)
    server.handlers = {"status": lambda: {"armed": False, "n": 1}, "arm": lambda: {"ok": True}, "broken": broken}
    connection = control_module._Connection.__new__(control_module._Connection)
    connection.server = server
    connection.rfile = io.BufferedReader(io.BytesIO(data))
    connection.wfile = io.BytesIO()
    connection.handle()
    lines = connection.wfile.getvalue().split(b"\n")
    check(lines[-1] == b"", "an answer that does not end with a newline")
    answers = [json.loads(line) for line in lines[:-1]]
    check(all(isinstance(a, dict) for a in answers), "an answer that is not a JSON object")
    sent = [line + b"\n" for line in data.split(b"\n")]
    sent[-1] = sent[-1][:-1]  # the last piece has no newline
    complete = sent if sent[-1] else sent[:-1]
    long_line = next((i for i, line in enumerate(complete) if len(line) > control_module.MAX_LINE), None)
    want = len(complete) if long_line is None else long_line + 1
    check(len(answers) == want, f"{len(answers)} answers to {want} lines")


TARGETS = {"nbd_server": nbd_server, "nbd_client": nbd_client, "device": device, "control": control}
