"""Write the seed corpus fuzz/corpus/TARGET/ from real, valid exchanges (python -m fuzz.make_corpus).

The NBD seeds are the byte streams of a ClientConnection and a ServerConnection talking to each other
(each prefixed by the two configuration bytes fuzz/targets.py reads), plus hand-built client streams
for what our own client never sends (EXPORT_NAME, LIST, INFO, ABORT, writes, trims, flush, disconnect).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from nbd_postcopy.nbd import wire
from nbd_postcopy.nbd.protocol import (
    NEED_DATA,
    BlockStatusReply,
    BlockStatusRequest,
    CacheReply,
    CacheRequest,
    ClientConnection,
    ReadReply,
    ReadRequest,
    Ready,
    ServerConnection,
    StartTLS,
    TLSEstablished,
)
from nbd_postcopy.nbd.wire import REQUEST, Command, Info, Option

from fuzz.targets import _KEY, EXPORTS, IMAGE, PAGE

CORPUS = Path(__file__).resolve().parent / "corpus"


def exchange(structured: bool, tls: bool, identify: bool, meta: bool) -> tuple[bytes, bytes]:
    """(client bytes, server bytes) of a whole session: handshake, a few requests, disconnect."""
    client = ClientConnection("disk", structured_replies=structured, tls=tls, identify=identify,
                              meta_contexts=("base:allocation",) if meta else ())
    server = ServerConnection(EXPORTS, tls="allow" if tls else "none")
    to_server, to_client = bytearray(), bytearray()
    outstanding = 0
    for _ in range(200):
        out = client.data_to_send()
        to_server += out
        if out:  # (b"" would mean EOF)
            server.receive_data(out)
        replies = bytearray()
        while (event := server.next_event()) is not NEED_DATA:
            if isinstance(event, StartTLS):
                server.send(TLSEstablished())
            elif isinstance(event, ReadRequest):
                replies += server.send(ReadReply(event.handle, IMAGE[event.offset : event.offset + event.length]))
            elif isinstance(event, CacheRequest):
                replies += server.send(CacheReply(event.handle))
            elif isinstance(event, BlockStatusRequest):
                replies += server.send(BlockStatusReply(event.handle, ((PAGE, 3), (PAGE, 0))))
        out = server.data_to_send() + replies
        to_client += out
        if out:
            client.receive_data(out)
        while (event := client.next_event()) is not NEED_DATA:
            if isinstance(event, StartTLS):
                client.send(TLSEstablished())
            elif isinstance(event, Ready):
                for offset, length in ((0, 512), (PAGE, 2 * PAGE), (3 * PAGE, PAGE)):
                    _, request = client.read(offset, length)
                    to_server += request
                    server.receive_data(request)
                    outstanding += 1
                if event.base_allocation:
                    _, request = client.block_status(PAGE, 2 * PAGE)
                    to_server += request
                    server.receive_data(request)
                    outstanding += 1
                _, request = client.cache(100, 3)
                to_server += request
                server.receive_data(request)
                outstanding += 1
            else:
                outstanding -= 1
        if client.ready is not None and outstanding == 0:
            to_server += client.disconnect()
            return bytes(to_server), bytes(to_client)
    raise RuntimeError("the exchange did not finish")


def option(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", wire.IHAVEOPT, code, len(data)) + data


def request(command: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(wire.REQUEST_MAGIC, flags, command, handle, offset, length)


def handmade_client_streams() -> list[tuple[int, bytes]]:
    """(config byte, client stream) for what our client does not send."""
    go = wire.InfoRequest.build(dict(name="disk", requests=[Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]))
    meta = wire.MetaContextRequest.build(dict(name="disk", queries=["base:allocation", "x-nbd-postcopy:"]))
    transmission = (request(Command.READ, 1, 0, PAGE) + request(Command.WRITE, 2, 0, 8) + b"8 bytes!"
                    + request(Command.TRIM, 3, 0, PAGE) + request(Command.FLUSH, 4, 0, 0)
                    + request(Command.BLOCK_STATUS, 5, 0, 2 * PAGE, wire.CommandFlag.REQ_ONE)
                    + request(Command.READ, 6, 0, 0) + request(Command.READ, 7, 1 << 40, 512)
                    + request(99, 8, 0, 1) + request(Command.CACHE, 9, 0, 3 * PAGE)
                    + request(Command.READ, 10, 2 * PAGE, 2 * PAGE) + request(Command.DISC, 0, 0, 0))
    fixed = struct.pack(">I", 1)
    no_zeroes = struct.pack(">I", 3)
    return [
        (0, no_zeroes + option(Option.LIST) + option(Option.INFO, go) + option(Option.EXPORT_NAME, b"disk") + transmission),
        (4, fixed + option(Option.EXPORT_NAME, b"") + transmission),
        (0, no_zeroes + option(Option.STRUCTURED_REPLY) + option(Option.LIST_META_CONTEXT, meta)
         + option(Option.SET_META_CONTEXT, meta) + option(Option.GO, go) + transmission),
        (1, no_zeroes + option(Option.STARTTLS) + option(Option.STRUCTURED_REPLY) + option(Option.GO, go) + transmission),
        (2, no_zeroes + option(Option.GO, go) + option(Option.STARTTLS) + option(Option.GO, go) + transmission),
        (0, no_zeroes + option(Option.PEEK_EXPORT) + option(Option.ABORT)),
        (0, no_zeroes + option(Option.GO, wire.InfoRequest.build(dict(name="small", requests=[]))) + request(Command.READ, 1, 0, 1000)
         + request(Command.READ, 2, 0, 5000) + request(Command.WRITE, 3, 0, 1 << 20)),
    ]


def device_scripts() -> list[bytes]:
    """Operation scripts for the device target (see fuzz.targets.device)."""
    return [
        bytes([0, 1, 3, 4, 5, 6, 5, 1, 0, 0, 64, 0, 6, 0, 5, 1, 0, 0, 64, 0]),  # map 1..3, read, arm, read
        bytes([0, 2, 0, 9, 2, 5, 1, 7, 1, 6, 0, 1, 0, 5, 2, 0, 0, 0x10, 0]),  # marker, data over it, forged marker
        bytes([0, 3, 1, 2, 3, 2, 0, 0x10, 0, 0x30, 0, 0xAB, 1, 4, 5, 3, 0, 0, 0x30, 0]),  # unaligned over a marker
        bytes([0, 4, 0, 3, 4, 4, 0, 0, 0x20, 0, 5, 3, 0, 0, 0x40, 0, 7, 0, 6, 0, 5, 4, 0, 0, 0x10, 0]),  # trim, zero pages
        bytes([1, 5, 1, 5, 1, 1, 4, 2, 1, 7, 5, 2, 9, 5, 0, 0, 0x20, 0]),  # foreign, forged, tail data
        bytes([2, 0, 0, 0x55, 4, 0, 0, 0, 0x10, 0, 5, 0, 0, 0, 0x10, 0]),  # slot 0: written over, then trimmed
    ]


def control_streams() -> list[bytes]:
    return [b"status\n", b"status\narm\nstatus\n", b"frobnicate\nbroken\n", b"x" * 2000 + b"\nstatus\n", b"status"]


def write(target: str, seeds: list[bytes]) -> None:
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (directory / hashlib.sha1(seed).hexdigest()[:16]).write_bytes(seed)


def main() -> None:
    server_seeds, client_seeds = [], []
    for structured in (False, True):
        for tls in (False, True):
            for identify in (False, True):
                for meta in (False, True):
                    if meta and not structured:
                        continue
                    to_server, to_client = exchange(structured, tls, identify, meta)
                    server_config = 1 if tls else 0
                    client_config = structured | tls << 1 | identify << 2 | meta << 3
                    for chunk in (0, 7):
                        server_seeds.append(bytes([server_config, chunk]) + to_server)
                        client_seeds.append(bytes([client_config, chunk]) + to_client)
                    client_seeds.append(bytes([client_config | 16, 0]) + to_client)  # without the fast path
    server_seeds += [bytes([config, 0]) + stream for config, stream in handmade_client_streams()]
    write("nbd_server", server_seeds)
    write("nbd_client", client_seeds)
    write("device", device_scripts())
    write("control", control_streams())
    assert _KEY  # the device seeds assume fuzz.targets' key and geometry


if __name__ == "__main__":
    main()
