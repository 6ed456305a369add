"""The sans-I/O protocol core driven with no sockets: handshakes, transmission, errors, both roles.

Covers nbd/protocol.py, server_core.py, client_core.py and zeros.py (zero_runs)."""

from __future__ import annotations

import os
import random

import pytest

from nbd_postcopy.nbd import wire
from nbd_postcopy.nbd.client_core import ClientConnection
from nbd_postcopy.nbd.protocol import (
    MAX_BLOCK,
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
    LocalProtocolError,
    ReadDone,
    ReadReply,
    ReadRequest,
    Ready,
    RemoteProtocolError,
    RequestFailed,
    StartTLS,
    State,
    TLSEstablished,
    TransmissionStarted,
    check_instance_id,
)
from nbd_postcopy.nbd.server_core import ServerConnection
from nbd_postcopy.nbd.wire import ChunkType, Command, CommandFlag, Errno, Info, Option, Reply
from nbd_postcopy.nbd.zeros import zero_runs

SIZE = 1 << 20
EXPORT = ExportInfo("ram", SIZE, description="test ram")


def make_image() -> bytearray:
    rng = random.Random(7)
    image = bytearray(rng.randbytes(SIZE))
    image[8192:20480] = bytes(12288)  # three zero pages
    image[SIZE - 4096 :] = bytes(4096)
    return image


IMAGE = make_image()


def new_server(tls: str = "none") -> ServerConnection:
    return ServerConnection({"ram": EXPORT}, "ram", tls=tls)


def events(conn) -> list:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
    return out


# --- a raw client speaking bytes, to reach every server path -----------------------------------
def option(opt: int, data: bytes = b"") -> bytes:
    return wire.OptionRequestHeader.build(dict(option=opt, length=len(data))) + data


def go_data(name: str = "ram", infos=(Info.BLOCK_SIZE,)) -> bytes:
    return wire.InfoRequest.build(dict(name=name, requests=list(infos)))


def meta_data(name: str = "ram", queries=("base:allocation",)) -> bytes:
    return wire.MetaContextRequest.build(dict(name=name, queries=list(queries)))


def parse_option_replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while raw:
        header = wire.OptionReplyHeader.parse(raw[:20])
        out.append((int(header.option), int(header.reply), raw[20 : 20 + header.length]))
        raw = raw[20 + header.length :]
    return out


def greeted(tls: str = "none", flags: int = 3) -> ServerConnection:
    server = new_server(tls)
    greeting = server.data_to_send()
    assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
    server.receive_data(flags.to_bytes(4, "big"))
    assert events(server) == []
    assert server.state is State.OPTIONS
    return server


def request(command: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return wire.REQUEST.pack(wire.REQUEST_MAGIC, flags, command, handle, offset, length)


def in_transmission(structured: bool = True, meta: bool = True) -> ServerConnection:
    server = greeted()
    data = b""
    if structured:
        data += option(Option.STRUCTURED_REPLY)
        if meta:
            data += option(Option.SET_META_CONTEXT, meta_data())
    server.receive_data(data + option(Option.GO, go_data()))
    [started] = events(server)
    assert isinstance(started, TransmissionStarted)
    assert started.structured_replies is structured and started.base_allocation is (structured and meta)
    server.data_to_send()
    return server


# --- handshake ----------------------------------------------------------------------------------
def test_go_advertises_export_and_block_sizes():
    server = greeted()
    server.receive_data(option(Option.GO, go_data(infos=(Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION))))
    [event] = events(server)
    assert event == TransmissionStarted(EXPORT, False, False)
    replies = parse_option_replies(server.data_to_send())
    assert [r[1] for r in replies] == [Reply.INFO] * 4 + [Reply.ACK]
    export = wire.InfoExport.parse(replies[0][2])
    assert export.size == SIZE and export.flags.READ_ONLY and export.flags.SEND_CACHE
    sizes = wire.InfoBlockSize.parse(replies[1][2])
    assert (sizes.minimum, sizes.preferred, sizes.maximum) == (1, 4096, MAX_BLOCK)
    assert wire.InfoName.parse(replies[2][2]).name == "ram"
    assert wire.InfoDescription.parse(replies[3][2]).description == "test ram"
    assert server.state is State.TRANSMISSION


def test_default_export_name_is_accepted():
    server = greeted()
    server.receive_data(option(Option.GO, go_data(name="")))
    assert events(server)[0].export is EXPORT


def test_unknown_export_gets_err_unknown_and_negotiation_continues():
    server = greeted()
    server.receive_data(option(Option.GO, go_data(name="nope")) + option(Option.INFO, go_data()))
    assert events(server) == []
    replies = parse_option_replies(server.data_to_send())
    assert replies[0][:2] == (Option.GO, Reply.ERR_UNKNOWN)
    assert [r[1] for r in replies[1:]] == [Reply.INFO, Reply.INFO, Reply.ACK]
    assert server.state is State.OPTIONS  # INFO does not start transmission


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_option(no_zeroes):
    server = greeted(flags=3 if no_zeroes else 1)
    server.receive_data(option(Option.EXPORT_NAME, b"ram"))
    [event] = events(server)
    assert isinstance(event, TransmissionStarted)
    reply = server.data_to_send()
    assert len(reply) == (10 if no_zeroes else 134)
    assert wire.ExportNameReply.parse(reply[:10]).size == SIZE


def test_export_name_for_unknown_export_closes():
    server = greeted()
    server.receive_data(option(Option.EXPORT_NAME, b"other"))
    with pytest.raises(RemoteProtocolError) as info:
        events(server)
    assert info.value.hint == Reply.ERR_UNKNOWN


def test_list_abort_and_unknown_options():
    server = greeted()
    server.receive_data(option(Option.LIST) + option(99, b"xyz") + option(Option.PEEK_EXPORT) + option(Option.ABORT))
    assert events(server) == [Disconnect()]
    replies = parse_option_replies(server.data_to_send())
    assert replies[0][1] == Reply.SERVER and wire.ServerReply.parse(replies[0][2]).name == "ram"
    assert [r[:2] for r in replies[1:]] == [(Option.LIST, Reply.ACK), (99, Reply.ERR_UNSUP),
                                            (Option.PEEK_EXPORT, Reply.ERR_UNSUP), (Option.ABORT, Reply.ACK)]
    assert server.state is State.CLOSED


def test_option_data_that_is_too_big_is_refused_and_the_server_hangs_up():
    server = greeted()
    server.receive_data(wire.OptionRequestHeader.build(dict(option=Option.GO, length=0xFFFFFFFF)))
    with pytest.raises(RemoteProtocolError) as info:
        events(server)
    assert info.value.hint == Reply.ERR_TOO_BIG
    assert parse_option_replies(server.data_to_send())[0][:2] == (Option.GO, Reply.ERR_TOO_BIG)


def test_write_bigger_than_the_maximum_block_hangs_up():
    server = in_transmission()
    server.receive_data(request(Command.WRITE, 1, 0, MAX_BLOCK + 1))
    with pytest.raises(RemoteProtocolError, match="maximum block size"):
        events(server)


@pytest.mark.parametrize("payload", [b"\x00\x00\x00\x09ram", b"\x00\x00\x00\x03ram\x00\x05\x00\x03", b"\xff"])
def test_malformed_option_data_gets_err_invalid(payload):
    server = greeted()
    server.receive_data(option(Option.GO, payload))
    assert events(server) == []
    assert parse_option_replies(server.data_to_send())[0][1] == Reply.ERR_INVALID


def test_meta_context_rules():
    server = greeted()
    server.receive_data(option(Option.SET_META_CONTEXT, meta_data()))  # before STRUCTURED_REPLY
    server.receive_data(option(Option.LIST_META_CONTEXT, meta_data(queries=())))
    server.receive_data(option(Option.STRUCTURED_REPLY))
    server.receive_data(option(Option.SET_META_CONTEXT, meta_data(queries=("qemu:dirty-bitmap:x",))))
    server.receive_data(option(Option.SET_META_CONTEXT, meta_data(name="", queries=("base:allocation",))))
    assert events(server) == []
    replies = [r[:2] for r in parse_option_replies(server.data_to_send())]
    assert replies == [
        (Option.SET_META_CONTEXT, Reply.ERR_INVALID),
        (Option.LIST_META_CONTEXT, Reply.META_CONTEXT), (Option.LIST_META_CONTEXT, Reply.ACK),
        (Option.STRUCTURED_REPLY, Reply.ACK),
        (Option.SET_META_CONTEXT, Reply.ACK),
        (Option.SET_META_CONTEXT, Reply.META_CONTEXT), (Option.SET_META_CONTEXT, Reply.ACK),
    ]
    assert server.base_allocation


def test_starttls_without_tls_configured_is_unsupported():
    server = greeted()
    server.receive_data(option(Option.STARTTLS))
    assert events(server) == []
    assert parse_option_replies(server.data_to_send())[0][1] == Reply.ERR_UNSUP


def test_starttls_then_negotiation_continues():
    server = greeted(tls="allow")
    server.receive_data(option(Option.STARTTLS))
    assert events(server) == [StartTLS()]
    assert parse_option_replies(server.data_to_send()) == [(Option.STARTTLS, Reply.ACK, b"")]
    assert server.state is State.TLS_HANDSHAKE
    assert server.send(TLSEstablished()) == b""
    server.receive_data(option(Option.STARTTLS) + option(Option.GO, go_data()))
    assert isinstance(events(server)[0], TransmissionStarted)
    assert parse_option_replies(server.data_to_send())[0][1] == Reply.ERR_INVALID  # TLS already on


def test_tls_required_refuses_plaintext_options():
    server = greeted(tls="require")
    server.receive_data(option(Option.GO, go_data()) + option(Option.LIST) + option(Option.ABORT))
    assert events(server) == [Disconnect()]
    replies = [r[1] for r in parse_option_replies(server.data_to_send())]
    assert replies == [Reply.ERR_TLS_REQD, Reply.ERR_TLS_REQD, Reply.ACK]


def test_tls_required_export_name_in_plaintext_closes():
    server = greeted(tls="require")
    server.receive_data(option(Option.EXPORT_NAME, b"ram"))
    with pytest.raises(RemoteProtocolError):
        events(server)


def test_bytes_sent_after_starttls_are_an_attack():
    server = greeted(tls="allow")
    server.receive_data(option(Option.STARTTLS) + option(Option.LIST))
    with pytest.raises(RemoteProtocolError):
        events(server)


@pytest.mark.parametrize("flags, message", [(0, "fixed newstyle"), (1 | 8, "unknown handshake flags")])
def test_bad_client_flags(flags, message):
    server = new_server()
    server.receive_data(flags.to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match=message):
        server.next_event()


def test_garbage_instead_of_an_option_is_a_remote_error():
    server = greeted()
    server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(RemoteProtocolError, match="magic"):
        events(server)


def test_eof_in_the_middle_of_an_option_is_a_remote_error():
    server = greeted()
    server.receive_data(option(Option.GO, go_data())[:-1])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle"):
        server.next_event()


def test_eof_between_messages_is_connection_closed():
    server = greeted()
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()
    assert server.state is State.CLOSED
    assert server.next_event() is NEED_DATA


def test_server_rejects_bad_construction():
    with pytest.raises(LocalProtocolError):
        ServerConnection({"ram": EXPORT}, "missing")
    with pytest.raises(LocalProtocolError):
        ServerConnection({"ram": EXPORT}, "ram", tls="maybe")
    with pytest.raises(LocalProtocolError):
        ExportInfo("x" * 5000, 1)
    with pytest.raises(LocalProtocolError):
        ExportInfo("ram", 4096, min_block=8192)


# --- transmission (server) ----------------------------------------------------------------------
def test_read_with_simple_reply():
    server = in_transmission(structured=False)
    server.receive_data(request(Command.READ, 5, 4096, 100))
    [event] = events(server)
    assert event == ReadRequest(5, 4096, 100, 0)
    reply = server.send(ReadReply(5, IMAGE[4096:4196]))
    assert reply == wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, 5) + IMAGE[4096:4196]


def parse_chunks(raw: bytes) -> list[tuple]:
    chunks = []
    while raw:
        _, flags, kind, handle, length = wire.CHUNK_HEADER.unpack_from(raw)
        chunks.append((flags, kind, handle, raw[20 : 20 + length]))
        raw = raw[20 + length :]
    return chunks


def test_structured_read_sends_holes_for_zero_pages():
    server = in_transmission()
    server.receive_data(request(Command.READ, 9, 4096, 5 * 4096))
    [event] = events(server)
    chunks = parse_chunks(server.send(ReadReply(9, IMAGE[4096 : 6 * 4096])))
    kinds = [(flags, kind) for flags, kind, _, _ in chunks]
    assert kinds == [(0, ChunkType.OFFSET_DATA), (0, ChunkType.OFFSET_HOLE), (0, ChunkType.OFFSET_DATA),
                     (1, ChunkType.NONE)]
    assert wire.OffsetDataChunk.parse(chunks[0][3]) == dict(offset=4096, data=IMAGE[4096:8192])
    hole = wire.OffsetHoleChunk.parse(chunks[1][3])
    assert (hole.offset, hole.length) == (8192, 12288)


def test_structured_read_of_one_data_run_is_a_single_chunk():
    server = in_transmission()
    server.receive_data(request(Command.READ, 1, 0, 4096))
    events(server)
    [(flags, kind, handle, payload)] = parse_chunks(server.send(ReadReply(1, IMAGE[:4096])))
    assert (flags, kind, handle) == (1, ChunkType.OFFSET_DATA, 1) and payload[8:] == IMAGE[:4096]


def test_block_status_reply_is_clipped_and_honours_req_one():
    server = in_transmission()
    server.receive_data(request(Command.BLOCK_STATUS, 3, 0, 10000) +
                        request(Command.BLOCK_STATUS, 4, 0, 10000, CommandFlag.REQ_ONE))
    assert events(server) == [BlockStatusRequest(3, 0, 10000, 0),
                              BlockStatusRequest(4, 0, 10000, CommandFlag.REQ_ONE)]
    extents = ((8192, 0), (12288, 3))
    [(_, kind, _, payload)] = parse_chunks(server.send(BlockStatusReply(3, extents)))
    status = wire.BlockStatusChunk.parse(payload)
    assert kind == ChunkType.BLOCK_STATUS and status.context_id == 1
    assert [d.length for d in status.descriptors] == [8192, 1808]
    [(_, _, _, payload)] = parse_chunks(server.send(BlockStatusReply(4, extents)))
    assert [d.length for d in wire.BlockStatusChunk.parse(payload).descriptors] == [8192]


def test_cache_and_flush_succeed():
    server = in_transmission()
    server.receive_data(request(Command.CACHE, 2, 0, SIZE) + request(Command.FLUSH, 3, 0, 0))
    assert events(server) == [CacheRequest(2, 0, SIZE)]
    assert server.data_to_send() == wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, 3)
    assert server.send(CacheReply(2)) == wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, 2)


def errors_in(raw: bytes, structured: bool) -> list[tuple[int, int]]:
    """(handle, errno) of every error reply in `raw`."""
    out = []
    while raw:
        if structured:
            _, _, kind, handle, length = wire.CHUNK_HEADER.unpack_from(raw)
            assert kind == ChunkType.ERROR
            out.append((handle, int(wire.ErrorChunk.parse(raw[20 : 20 + length]).error)))
            raw = raw[20 + length :]
        else:
            _, error, handle = wire.SIMPLE_REPLY.unpack_from(raw)
            out.append((handle, error))
            raw = raw[16:]
    return out


@pytest.mark.parametrize("structured", [True, False])
def test_core_rejects_what_a_read_only_export_cannot_do(structured):
    server = in_transmission(structured=structured)
    data = (request(Command.WRITE, 1, 0, 4096) + bytes(4096)   # payload is skipped
            + request(Command.TRIM, 2, 0, 4096)
            + request(Command.WRITE_ZEROES, 3, 0, 4096)
            + request(Command.READ, 4, SIZE - 10, 11)           # beyond the end
            + request(Command.READ, 5, 0, 0)                    # empty
            + request(Command.READ, 6, 0, MAX_BLOCK + 1)        # too big
            + request(42, 7, 0, 1)                              # unknown command
            + request(Command.RESIZE, 8, 0, 0)
            + request(Command.READ, 9, 0, 4096))                # still in sync
    server.receive_data(data)
    assert events(server) == [ReadRequest(9, 0, 4096, 0)]
    assert errors_in(server.data_to_send(), structured) == [
        (1, Errno.EPERM), (2, Errno.EPERM), (3, Errno.EPERM), (4, Errno.EINVAL), (5, Errno.EINVAL),
        (6, Errno.EINVAL), (7, Errno.EINVAL), (8, Errno.EPERM)]


def test_block_status_without_meta_context_is_einval():
    server = in_transmission(meta=False)
    server.receive_data(request(Command.BLOCK_STATUS, 1, 0, 4096))
    assert events(server) == []
    assert errors_in(server.data_to_send(), True) == [(1, Errno.EINVAL)]


def test_write_payload_fed_byte_by_byte_keeps_the_stream_in_sync():
    server = in_transmission()
    data = request(Command.WRITE, 1, 0, 300) + os.urandom(300) + request(Command.READ, 2, 0, 1)
    seen = []
    for i in range(len(data)):
        server.receive_data(data[i : i + 1])
        seen += events(server)
    assert seen == [ReadRequest(2, 0, 1, 0)]


def test_error_reply_from_the_application():
    server = in_transmission()
    server.receive_data(request(Command.READ, 1, 0, 4096))
    events(server)
    assert errors_in(server.send(ErrorReply(1, Errno.EIO, "disk on fire")), True) == [(1, Errno.EIO)]


def test_bad_request_magic_is_a_remote_error():
    server = in_transmission()
    server.receive_data(b"\x00" * 28)
    with pytest.raises(RemoteProtocolError, match="magic"):
        server.next_event()


def test_duplicate_handle_in_flight_is_a_remote_error():
    server = in_transmission()
    server.receive_data(request(Command.READ, 1, 0, 1) + request(Command.READ, 1, 0, 1))
    with pytest.raises(RemoteProtocolError, match="in flight"):
        events(server)


def test_disconnect_then_replies_still_go_out():
    server = in_transmission()
    server.receive_data(request(Command.READ, 1, 0, 10) + request(Command.DISC, 2, 0, 0) + b"junk")
    assert events(server) == [ReadRequest(1, 0, 10, 0), Disconnect()]
    assert server.state is State.CLOSED
    assert server.send(ReadReply(1, IMAGE[:10]))


@pytest.mark.parametrize("make_event, message", [
    (lambda: ReadReply(99, b"x"), "no request"),
    (lambda: ReadReply(1, b"short"), "carries 5 bytes"),
    (lambda: CacheReply(1), "CACHE only"),
    (lambda: BlockStatusReply(1, ((4096, 0),)), "BLOCK_STATUS only"),
])
def test_wrong_replies_are_local_errors(make_event, message):
    server = in_transmission()
    server.receive_data(request(Command.READ, 1, 0, 4096))
    events(server)
    with pytest.raises(LocalProtocolError, match=message):
        server.send(make_event())


def test_reply_before_transmission_is_a_local_error():
    server = greeted()
    with pytest.raises(LocalProtocolError, match="not allowed in state options"):
        server.send(ReadReply(1, b"x"))


@pytest.mark.parametrize("make", [
    lambda: ReadRequest(1, 0, 0), lambda: ReadRequest(1, -1, 10), lambda: ReadRequest(1, 0, MAX_BLOCK + 1),
    lambda: ReadRequest(1 << 64, 0, 1), lambda: BlockStatusReply(1, ()), lambda: BlockStatusReply(1, ((0, 0),)),
    lambda: ErrorReply(1, 0), lambda: ErrorReply(1, 5, "x" * 5000),
])
def test_events_validate_themselves(make):
    with pytest.raises(LocalProtocolError):
        make()


# --- the client core, against the server core in memory ------------------------------------------
class Pair:
    """A client core and a server core joined in memory; the server answers from IMAGE."""

    def __init__(self, client: ClientConnection, server: ServerConnection | None = None, byte_by_byte=False):
        self.client, self.server = client, server or new_server()
        self.byte_by_byte = byte_by_byte
        self.parked: list = []  # server requests not answered yet (to answer out of order)
        self.client_events: list = []
        self.server_events: list = []

    def _feed(self, conn, data: bytes) -> None:
        if self.byte_by_byte:
            for i in range(len(data)):
                conn.receive_data(data[i : i + 1])
                self._drain(conn)
        else:
            conn.receive_data(data)

    def _drain(self, conn) -> None:
        bucket = self.client_events if conn is self.client else self.server_events
        while (event := conn.next_event()) is not NEED_DATA:
            bucket.append(event)
            if isinstance(event, (ReadRequest, BlockStatusRequest, CacheRequest)):
                self.parked.append(event)

    def pump(self, hold: bool = False) -> None:
        moved = True
        while moved:
            moved = False
            for src, dst in ((self.server, self.client), (self.client, self.server)):
                data = src.data_to_send()
                if data:
                    self._feed(dst, data)
                    moved = True
                self._drain(dst)
            if not hold and self.parked:
                random.Random(len(self.parked)).shuffle(self.parked)
                for event in self.parked:
                    self.client.receive_data(self.server.send(self.answer(event)))
                self.parked.clear()
                moved = True

    @staticmethod
    def answer(event):
        if isinstance(event, ReadRequest):
            return ReadReply(event.handle, IMAGE[event.offset : event.offset + event.length])
        if isinstance(event, BlockStatusRequest):
            runs = zero_runs(IMAGE[event.offset : event.offset + event.length])
            return BlockStatusReply(event.handle, tuple((e - s, 3 if z else 0) for s, e, z in runs))
        return CacheReply(event.handle)

    def send(self, data: bytes) -> None:
        self._feed(self.server, data)


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_client_and_server_cores_talk(structured, byte_by_byte):
    pair = Pair(ClientConnection("ram", structured_replies=structured), byte_by_byte=byte_by_byte)
    pair.pump()
    [ready] = pair.client_events
    assert ready == Ready(SIZE, EXPORT.flags, 1, 4096, MAX_BLOCK, structured, structured)
    handles = {}
    for offset, length in [(0, 4096), (4096, 5 * 4096), (SIZE - 5000, 5000), (12345, 1), (0, SIZE)]:
        handle, data = pair.client.read(offset, length)
        handles[handle] = (offset, length)
        pair.send(data)
    pair.pump()
    done = {e.handle: e for e in pair.client_events[1:]}
    assert set(done) == set(handles)
    for handle, (offset, length) in handles.items():
        assert isinstance(done[handle], ReadDone) and bytes(done[handle].data) == IMAGE[offset : offset + length]
    handle, data = pair.client.cache(0, SIZE)
    pair.send(data)
    pair.pump()
    assert pair.client_events[-1] == CacheDone(handle)
    if structured:
        handle, data = pair.client.block_status(0, 24576)
        pair.send(data)
        pair.pump()
        assert pair.client_events[-1] == BlockStatusDone(handle, ((8192, 0), (12288, 3), (4096, 0)))
    pair.send(pair.client.disconnect())
    pair.pump()
    assert pair.server_events[-1] == Disconnect() and pair.client.state is State.CLOSED


def test_client_sees_errors_as_request_failed():
    pair = Pair(ClientConnection(""))
    pair.pump()
    handle, data = pair.client.read(0, 4096)
    pair.send(data)
    pair.pump(hold=True)
    [event] = pair.parked
    pair.client.receive_data(pair.server.send(ErrorReply(event.handle, Errno.EIO, "gone")))
    assert pair.client.next_event() == RequestFailed(handle, Errno.EIO, "gone")


def test_client_with_tls_emits_start_tls():
    pair = Pair(ClientConnection("ram", tls=True), new_server(tls="require"))
    pair.pump()
    assert pair.client_events == [StartTLS()] and pair.server_events == [StartTLS()]
    pair.server.send(TLSEstablished())
    pair.client.send(TLSEstablished())
    pair.pump()
    assert isinstance(pair.client_events[-1], Ready)


def test_client_request_bounds_are_local_errors():
    pair = Pair(ClientConnection("ram", structured_replies=False))
    with pytest.raises(LocalProtocolError):
        pair.client.read(0, 1)  # not connected yet
    pair.pump()
    with pytest.raises(LocalProtocolError, match="beyond the end"):
        pair.client.read(SIZE - 1, 2)
    with pytest.raises(LocalProtocolError):
        pair.client.read(0, MAX_BLOCK + 1)
    with pytest.raises(LocalProtocolError, match="base:allocation"):
        pair.client.block_status(0, 4096)


# --- the client core against hand-made (misbehaving) servers -------------------------------------
def client_at_options(**kwargs) -> ClientConnection:
    client = ClientConnection("ram", **kwargs)
    client.receive_data(b"NBDMAGICIHAVEOPT\x00\x03")
    assert client.next_event() is NEED_DATA
    return client


def option_reply(opt: int, reply: int, payload: bytes = b"") -> bytes:
    return wire.OptionReplyHeader.build(dict(option=opt, reply=reply, length=len(payload))) + payload


def go_replies(size: int = SIZE) -> bytes:
    return (option_reply(Option.GO, Reply.INFO, wire.InfoExport.build(dict(size=size, flags=3)))
            + option_reply(Option.GO, Reply.ACK))


def test_client_falls_back_when_structured_replies_are_refused():
    client = client_at_options()
    sent = client.data_to_send()
    assert sent[:4] == b"\x00\x00\x00\x03" and parse_request_option(sent[4:]) == Option.STRUCTURED_REPLY
    client.receive_data(option_reply(Option.STRUCTURED_REPLY, Reply.ERR_UNSUP))
    assert client.next_event() is NEED_DATA
    assert parse_request_option(client.data_to_send()) == Option.GO  # no SET_META_CONTEXT without structured
    client.receive_data(go_replies())
    ready = client.next_event()
    assert ready.size == SIZE and not ready.structured_replies and not ready.base_allocation


def parse_request_option(raw: bytes) -> int:
    return int(wire.OptionRequestHeader.parse(raw[:16]).option)


def test_client_reports_a_refused_export_clearly():
    client = client_at_options(structured_replies=False)
    client.data_to_send()
    client.receive_data(option_reply(Option.GO, Reply.ERR_UNKNOWN, b"no such export"))
    with pytest.raises(RemoteProtocolError, match="ERR_UNKNOWN.*no such export") as info:
        client.next_event()
    assert info.value.hint == Reply.ERR_UNKNOWN


@pytest.mark.parametrize("greeting", [b"NBDMAGIC" + b"\x00" * 10, b"HTTP/1.1 400 Bad Request"[:18]])
def test_client_rejects_a_bad_greeting(greeting):
    client = ClientConnection("ram")
    client.receive_data(greeting)
    with pytest.raises(RemoteProtocolError, match="greeting"):
        client.next_event()


def ready_client(structured: bool = True) -> ClientConnection:
    client = client_at_options(structured_replies=structured, meta_contexts=())
    client.data_to_send()
    if structured:
        client.receive_data(option_reply(Option.STRUCTURED_REPLY, Reply.ACK))
        client.next_event()
        client.data_to_send()
    client.receive_data(go_replies())
    assert isinstance(client.next_event(), Ready)
    return client


def chunk(flags: int, kind: int, handle: int, payload: bytes) -> bytes:
    return wire.CHUNK_HEADER.pack(wire.STRUCTURED_REPLY_MAGIC, flags, kind, handle, len(payload)) + payload


@pytest.mark.parametrize("reply, message", [
    (lambda h: chunk(1, ChunkType.OFFSET_DATA, h + 1, wire.U64.pack(0) + b"x"), "unknown handle"),
    (lambda h: chunk(1, ChunkType.OFFSET_DATA, h, wire.U64.pack(4096) + b"x"), "outside"),
    (lambda h: chunk(1, ChunkType.OFFSET_DATA, h, wire.U64.pack(0) + b"x" * 10), "covered"),
    (lambda h: chunk(1, ChunkType.OFFSET_HOLE, h, wire.U64.pack(0) + b"\x00\x00\x00\x20"), "outside"),
    (lambda h: chunk(1, 77, h, b""), "unknown structured reply chunk type"),
    (lambda h: chunk(1, ChunkType.NONE, h, b"x"), "NONE chunk"),
    (lambda h: wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, h) + b"x" * 16, "simple reply with data"),
    (lambda h: b"\xde\xad\xbe\xef" + b"\x00" * 16, "bad reply magic"),
    (lambda h: chunk(1, ChunkType.OFFSET_DATA, h, b""), "too short"),
])
def test_client_rejects_bad_replies(reply, message):
    client = ready_client()
    handle, _ = client.read(0, 16)
    client.receive_data(reply(handle))
    with pytest.raises(RemoteProtocolError, match=message):
        while client.next_event() is not NEED_DATA:
            pass


def test_client_assembles_chunks_in_any_order_byte_by_byte():
    client = ready_client()
    handle, _ = client.read(4096, 12288)
    data = os.urandom(4096)
    raw = (chunk(0, ChunkType.OFFSET_DATA, handle, wire.U64.pack(12288) + data)
           + chunk(0, ChunkType.OFFSET_HOLE, handle, wire.U64.pack(4096) + (8192).to_bytes(4, "big"))
           + chunk(1, ChunkType.NONE, handle, b""))
    seen = []
    for i in range(len(raw)):
        client.receive_data(raw[i : i + 1])
        seen += events(client)
    assert seen == [ReadDone(handle, bytearray(8192) + data)]


def test_client_error_chunk_and_unknown_error_types():
    client = ready_client()
    h1, _ = client.read(0, 16)
    h2, _ = client.read(0, 16)
    client.receive_data(chunk(1, ChunkType.ERROR, h1, wire.ErrorChunk.build(dict(error=Errno.EPERM, message="no")))
                        + chunk(1, 0x8000 | 77, h2, b""))
    assert events(client) == [RequestFailed(h1, Errno.EPERM, "no"), RequestFailed(h2, Errno.EIO,
                                                                                   "unknown error chunk type 32845")]


def test_client_eof_mid_reply_is_a_remote_error():
    client = ready_client(structured=False)
    handle, _ = client.read(0, 100)
    client.receive_data(wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, handle) + b"x" * 50)
    assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle"):
        client.next_event()


def test_client_simple_read_reply():
    client = ready_client(structured=False)
    handle, raw = client.read(8, 4)
    assert wire.Request.parse(raw).offset == 8
    client.receive_data(wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, handle) + b"abcd")
    assert client.next_event() == ReadDone(handle, b"abcd")


def test_zero_runs_finds_every_zero_page():
    assert zero_runs(b"") == []
    assert zero_runs(bytes(100)) == [(0, 100, True)]
    assert zero_runs(IMAGE[:6 * 4096]) == [(0, 8192, False), (8192, 20480, True), (20480, 24576, False)]
    page_with_late_byte = bytearray(4096)
    page_with_late_byte[4000] = 1
    assert zero_runs(bytes(4096) + page_with_late_byte + bytes(10)) == [
        (0, 4096, True), (4096, 8192, False), (8192, 8202, True)]


# --- the fast path for plain reads ---------------------------------------------------------------
def test_take_plain_read_takes_only_what_the_slow_path_would_answer_plainly():
    server = in_transmission()
    good = request(Command.READ, 1, 4096, 4096)
    assert server.take_plain_read(good) == (1, 4096, 4096)
    assert server.take_plain_read(b"xx" + good, 2) == (1, 4096, 4096)
    refused = [
        good[:27],  # not whole
        request(Command.CACHE, 1, 0, 4096),
        request(Command.READ, 1, 0, 4096, flags=CommandFlag.FUA),
        request(Command.READ, 1, SIZE - 4096, 8192),  # past the end
        request(Command.READ, 1, 0, 0),
        request(Command.READ, 1, 0, MAX_BLOCK + 1),
        b"\0" * 4 + good[4:],  # bad magic
    ]
    for data in refused:
        assert server.take_plain_read(data) is None, data
    server.receive_data(request(Command.READ, 7, 0, 4096))  # in flight at the core
    assert server.take_plain_read(request(Command.READ, 7, 0, 4096)) is None
    server.receive_data(good[:10])  # the core holds a partial request
    assert server.take_plain_read(good) is None
    assert greeted().take_plain_read(good) is None  # not in transmission yet


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_plain_read_reply_is_what_send_gives(structured):
    fast, slow = in_transmission(structured), in_transmission(structured)
    for offset, length in [(0, 4096), (8192, 3 * 4096), (100, 5000)]:  # data, holes, unaligned
        data = bytes(IMAGE[offset : offset + length])
        handle, *_ = fast.take_plain_read(request(Command.READ, 9, offset, length))
        slow.receive_data(request(Command.READ, 9, offset, length))
        [event] = events(slow)
        assert b"".join(map(bytes, fast.plain_read_reply(handle, offset, data))) == slow.send(ReadReply(9, data))


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_take_read_replies_leaves_anything_unusual_to_the_core(structured):
    pair = Pair(ClientConnection("ram", structured_replies=structured))
    pair.pump()
    client = pair.client
    plain, data = client.read(0, 4096)
    pair.send(data)
    failing, data = client.read(4096, 4096)
    pair.send(data)
    pair.pump(hold=True)
    first, second = pair.parked
    answers = pair.server.send(pair.answer(first)) + pair.server.send(ErrorReply(second.handle, Errno.EIO, "bad"))
    taken, replies = client.take_read_replies(answers)
    [(handle, start, stop)] = replies
    assert handle == plain and answers[start:stop] == IMAGE[:4096]
    client.receive_data(answers[taken:])  # the error reply goes the slow way
    [failed] = events(client)
    assert isinstance(failed, RequestFailed) and failed.handle == failing
    assert client.take_read_replies(answers[:10]) == (0, [])  # unknown handle / partial: nothing taken


# --- the source's identity (x-nbd-postcopy:instance=ID) ------------------------------------------
def test_list_meta_context_reports_the_instance_id_only_when_asked():
    server = ServerConnection({"ram": ExportInfo("ram", SIZE, instance="src-1")}, "ram")
    server.data_to_send()
    server.receive_data((3).to_bytes(4, "big"))
    for queries in (("x-nbd-postcopy:",), ("x-nbd-postcopy:instance=",), (), ("base:allocation",)):
        server.receive_data(option(Option.LIST_META_CONTEXT, meta_data(queries=queries)))
    server.receive_data(option(Option.STRUCTURED_REPLY))
    server.receive_data(option(Option.SET_META_CONTEXT, meta_data(queries=("x-nbd-postcopy:instance=src-1",))))
    assert events(server) == []
    replies = parse_option_replies(server.data_to_send())
    names = [(opt, wire.MetaContextReply.parse(data).name) for opt, reply, data in replies if reply == Reply.META_CONTEXT]
    assert names == [
        (Option.LIST_META_CONTEXT, "x-nbd-postcopy:instance=src-1"),
        (Option.LIST_META_CONTEXT, "x-nbd-postcopy:instance=src-1"),
        (Option.LIST_META_CONTEXT, "base:allocation"), (Option.LIST_META_CONTEXT, "x-nbd-postcopy:instance=src-1"),
        (Option.LIST_META_CONTEXT, "base:allocation"),
    ]  # and SET never selects it: it is not a block status context
    assert not server.base_allocation


@pytest.mark.parametrize("structured", [True, False])
def test_client_learns_the_instance_id(structured):
    server = ServerConnection({"ram": ExportInfo("ram", SIZE, instance="src-1")}, "ram")
    pair = Pair(ClientConnection("ram", structured_replies=structured, identify=True), server)
    pair.pump()
    [ready] = pair.client_events
    assert ready.instance == "src-1" and ready.base_allocation is structured


def test_client_without_an_instance_id_from_the_server():
    pair = Pair(ClientConnection("ram", identify=True))
    pair.pump()
    assert pair.client_events[0].instance is None


def test_client_refuses_a_malformed_instance_id():
    client = client_at_options(identify=True)
    sent = client.data_to_send()
    assert parse_request_option(sent[4:]) == Option.LIST_META_CONTEXT
    bad = wire.MetaContextReply.build(dict(context_id=0, name="x-nbd-postcopy:instance=a b"))
    client.receive_data(option_reply(Option.LIST_META_CONTEXT, Reply.META_CONTEXT, bad))
    with pytest.raises(RemoteProtocolError, match="malformed instance id"):
        client.next_event()


def test_a_server_that_refuses_the_listing_is_still_usable():
    client = client_at_options(identify=True, structured_replies=False)
    client.data_to_send()
    client.receive_data(option_reply(Option.LIST_META_CONTEXT, Reply.ERR_UNSUP))
    assert client.next_event() is NEED_DATA
    assert parse_request_option(client.data_to_send()) == Option.GO
    client.receive_data(go_replies())
    assert client.next_event().instance is None


@pytest.mark.parametrize("instance", ["", "a b", "x" * 129, "é", "a/b"])
def test_bad_instance_ids_are_local_errors(instance):
    with pytest.raises(LocalProtocolError, match="instance id"):
        check_instance_id(instance)
    if instance:
        with pytest.raises(LocalProtocolError):
            ExportInfo("ram", SIZE, instance=instance)


@pytest.mark.parametrize("identify", [True, False])
def test_client_names_its_role_in_the_listing(identify):
    server = ServerConnection({"ram": ExportInfo("ram", SIZE, instance="src-1")}, "ram")
    pair = Pair(ClientConnection("ram", identify=identify, role="prefetch"), server)
    pair.pump()
    assert server.client_role == "prefetch"
    assert pair.client_events[0].instance == ("src-1" if identify else None)


def test_unknown_roles_are_refused_by_the_client_and_ignored_by_the_server():
    with pytest.raises(LocalProtocolError, match="role must be one of demand, prefetch"):
        ClientConnection("ram", role="bulk")
    server = greeted()
    server.receive_data(option(Option.LIST_META_CONTEXT, meta_data(queries=("x-nbd-postcopy:role=bulk",))))
    assert events(server) == [] and server.client_role is None


@pytest.mark.parametrize("minimum, preferred, maximum, error", [
    (64 << 20, 64 << 20, 64 << 20, "minimum block size 67108864 is above the largest request"),
    (512, 64 << 20, 1 << 30, None),  # clamped to what the client reads: min <= preferred <= max still
])
def test_client_block_sizes_beyond_its_largest_read(minimum, preferred, maximum, error):
    """Found by fuzzing (fuzz/targets.py nbd_client): a server's block sizes above 32 MiB gave a Ready
    whose minimum or preferred block size exceeded its maximum."""
    client = client_at_options(structured_replies=False)
    client.data_to_send()
    sizes = wire.InfoBlockSize.build(dict(minimum=minimum, preferred=preferred, maximum=maximum))
    client.receive_data(option_reply(Option.GO, Reply.INFO, sizes) + go_replies())
    if error:
        with pytest.raises(RemoteProtocolError, match=error):
            client.next_event()
        return
    ready = client.next_event()
    assert (ready.min_block, ready.preferred_block, ready.max_block) == (512, MAX_BLOCK, MAX_BLOCK)
