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
from nbd_postcopy.nbd.client_core import ClientConnection
from nbd_postcopy.nbd.protocol import (
    NEED_DATA,
    BlockStatusReply,
    BlockStatusRequest,
    CacheReply,
    CacheRequest,
    ErrorReply,
    ReadReply,
    ReadRequest,
    Ready,
    StartTLS,
    TLSEstablished,
)
from nbd_postcopy.nbd.server_core import ServerConnection
from nbd_postcopy.nbd.wire import REQUEST, Command, Info, Option

from fuzz.targets import _DEVICE_PAGES, EXPORTS, FRAMED, IMAGE, PAGE, frame, issue_requests

CORPUS = Path(__file__).resolve().parent / "corpus"


def exchange(structured: bool, tls: bool, identify: bool, meta: bool, fail: bool = False
             ) -> tuple[list[bytes], list[bytes]]:
    """(client pieces, server pieces) of a whole session: handshake, a few requests, disconnect; each
    piece is what one side had to send at one time."""
    client = ClientConnection("disk", structured_replies=structured, tls=tls, identify=identify,
                              meta_contexts=("base:allocation",) if meta else ())
    server = ServerConnection(EXPORTS, tls="allow" if tls else "none")
    to_server, to_client = [], []
    outstanding = 0
    for _ in range(200):
        out = client.data_to_send()
        if out:
            to_server.append(out)  # (b"" would mean EOF)
            server.receive_data(out)
        replies = bytearray()
        while (event := server.next_event()) is not NEED_DATA:
            if isinstance(event, StartTLS):
                server.send(TLSEstablished())
            elif fail and getattr(event, "handle", 1) % 2 == 0:
                replies += server.send(ErrorReply(event.handle, wire.Errno.EIO, "failed" if structured else ""))
            elif isinstance(event, ReadRequest):
                replies += server.send(ReadReply(event.handle, IMAGE[event.offset : event.offset + event.length]))
            elif isinstance(event, CacheRequest):
                replies += server.send(CacheReply(event.handle))
            elif isinstance(event, BlockStatusRequest):
                replies += server.send(BlockStatusReply(event.handle, ((PAGE, 3), (PAGE, 0))))
        out = server.data_to_send() + replies
        if out:
            to_client.append(out)
            client.receive_data(out)
        while (event := client.next_event()) is not NEED_DATA:
            if isinstance(event, StartTLS):
                client.send(TLSEstablished())
            elif isinstance(event, Ready):
                for _, _, _, _, raw in issue_requests(client, event):
                    to_server.append(raw)
                    server.receive_data(raw)
                    outstanding += 1
            else:
                outstanding -= 1
        if client.ready is not None and outstanding == 0:
            to_server.append(client.disconnect())
            return to_server, to_client
    raise RuntimeError("the exchange did not finish")


def option(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", wire.IHAVEOPT, code, len(data)) + data


def request(command: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(wire.REQUEST_MAGIC, flags, command, handle, offset, length)


def handmade_client_streams() -> list[tuple[int, list[bytes]]]:
    """(config byte, client pieces) for what our client does not send."""
    go = wire.InfoRequest.build(dict(name="disk", requests=[Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]))
    meta = wire.MetaContextRequest.build(dict(name="disk", queries=["base:allocation", "x-nbd-postcopy:"]))
    transmission = [request(Command.READ, 1, 0, PAGE) + request(Command.READ, 11, PAGE, 3 * PAGE),
                    request(Command.WRITE, 2, 0, 8) + b"8 bytes!", request(Command.TRIM, 3, 0, PAGE),
                    request(Command.FLUSH, 4, 0, 0), request(Command.BLOCK_STATUS, 5, 0, 2 * PAGE, wire.CommandFlag.REQ_ONE),
                    request(Command.READ, 6, 0, 0) + request(Command.READ, 7, 1 << 40, 512),
                    request(99, 8, 0, 1) + request(Command.CACHE, 9, 0, 3 * PAGE),
                    request(Command.READ, 10, 2 * PAGE, 2 * PAGE, wire.CommandFlag.FUA), request(Command.DISC, 0, 0, 0)]
    fixed = struct.pack(">I", 1)
    no_zeroes = struct.pack(">I", 3)
    return [
        (0, [no_zeroes, option(Option.LIST), option(Option.INFO, go), option(Option.EXPORT_NAME, b"disk"), *transmission]),
        (4, [fixed + option(Option.EXPORT_NAME, b""), *transmission]),
        (0, [no_zeroes, option(Option.STRUCTURED_REPLY), option(Option.LIST_META_CONTEXT, meta),
             option(Option.SET_META_CONTEXT, meta), option(Option.GO, go), *transmission]),
        (1, [no_zeroes, option(Option.STARTTLS), option(Option.STRUCTURED_REPLY), option(Option.GO, go), *transmission]),
        (2, [no_zeroes + option(Option.GO, go), option(Option.STARTTLS), option(Option.GO, go), *transmission]),
        (0, [no_zeroes + option(Option.PEEK_EXPORT) + option(Option.ABORT)]),
        (0, [no_zeroes + option(Option.GO, wire.InfoRequest.build(dict(name="small", requests=[]))),
             request(Command.READ, 1, 0, 1000), request(Command.READ, 2, 0, 5000), request(Command.WRITE, 3, 0, 1 << 20)]),
    ]


def _pages(op: int, slot: int, *pages: bytes) -> bytes:
    return bytes([op, slot, len(pages) - 1]) + b"".join(pages)


def _range(op: int, slot: int, offset: int, length: int) -> bytes:
    return bytes([op, slot]) + offset.to_bytes(2, "big") + length.to_bytes(2, "big")


def device_scripts() -> list[bytes]:
    """Operation scripts for the device target (see fuzz.targets.device for the encoding)."""
    def marker(guest):
        return bytes([guest])

    def data(fill):
        return bytes([0, fill])

    arm, learn = bytes([6, 0]), bytes([7, 0])
    read_all = _range(5, 0, 0, 4 * PAGE - 1) + _range(5, 4, 0, 4 * PAGE - 1) + _range(5, 8, 0, 4 * PAGE - 1) + _range(5, 12, 0, 4 * PAGE - 1)
    staged = _pages(0, 1, *map(marker, (3, 4, 5, 9))) + _pages(0, 6, *map(marker, (0, 1, 11)))
    return [
        staged + read_all + arm + read_all,  # stage, read markers, arm, read guest pages
        staged + learn + arm + learn + read_all,  # zero pages learnt
        staged + _pages(2, 2, data(0xAB), data(0)) + read_all + arm + _pages(2, 7, data(7)) + read_all,  # data over markers
        staged + bytes([1, 3, 0, 4, 1, 5, 3]) + bytes([1, 4, 0, 5, 2, 9, 0x33]) + bytes([1, 5, 0, 6, 0]) + bytes([1, 9, 0, 20, 0])
        + read_all,  # forged header, data after the header, foreign key, guest beyond pages
        staged + _range(4, 1, 100, 3 * PAGE) + read_all + arm + _range(4, 6, 0, 2 * PAGE) + read_all,  # trims
        staged + bytes([3, 1, 0, 100, 0, 200, 0x5A, 0]) + bytes([3, 4, 0, 0, 0x10, 0, 0, 1, 9]) + read_all
        + arm + bytes([3, 6, 0x0F, 0xF0, 0x20, 0, 1, 0]) + read_all,  # unaligned writes, a marker spliced in
        _pages(2, 0, data(0x55)) + _range(5, 0, 0, 100) + _range(4, 0, 0, PAGE) + _range(5, 0, 0, PAGE),  # slot 0
        staged + arm + bytes([7, 1]) + read_all + bytes([3, 1, 0, 100, 0, 200, 0x5A, 0]) + read_all + bytes([7, 1])
        + bytes([3, 1, 0, 100, 0, 200, 0x5A, 0]) + read_all,  # the source down, then up again
        staged + arm + bytes([7, 3, 0, 2, 3, 1, 1, 4]) + bytes([7, 3, 0, 2, 3, 0, 2, 0]) + bytes([7, 3, 0, 2, 3, 0, 0, 7])
        + bytes([7, 2, 0, 2, 3]) + read_all,  # prefetch steps with data, a trim and a new marker landing meanwhile
        _pages(0, 3, marker(2)) + arm + _pages(0, 3, marker(2)) + _pages(0, 4, marker(_DEVICE_PAGES - 1)) + read_all,  # remap
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
                        server_seeds.append(bytes([server_config, chunk]) + b"".join(to_server))
                        client_seeds.append(bytes([client_config, chunk]) + b"".join(to_client))
                    server_seeds.append(bytes([server_config, FRAMED]) + frame(to_server))
                    client_seeds.append(bytes([client_config, FRAMED]) + frame(to_client))
                    client_seeds.append(bytes([client_config | 16, FRAMED]) + frame(to_client))  # no fast path
    for structured in (False, True):
        to_server, to_client = exchange(structured, False, False, structured, fail=True)
        client_seeds.append(bytes([structured | structured << 3, FRAMED]) + frame(to_client))
    for config, pieces in handmade_client_streams():
        server_seeds.append(bytes([config, 0]) + b"".join(pieces))
        server_seeds.append(bytes([config, FRAMED]) + frame(pieces))
    write("nbd_server", server_seeds)
    write("nbd_client", client_seeds)
    write("device", device_scripts())
    write("control", control_streams())


if __name__ == "__main__":
    main()
