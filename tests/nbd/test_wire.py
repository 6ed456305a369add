"""Every wire structure both ways (parse == object, build == bytes, sizeof), and the struct twins."""

from __future__ import annotations

import pytest
from construct import ConstError, Container, StreamError

from nbd_postcopy.nbd import wire
from nbd_postcopy.nbd.wire import ChunkFlag, ChunkType, Command, CommandFlag, Errno, Info, Option, Reply


def flags_of(value: int, flag_type) -> dict:
    return {f.name: bool(value & f) for f in flag_type}


# (construct declaration, object to build, exact bytes, fixed size or None)
CASES = [
    (wire.Greeting, dict(flags=dict(FIXED_NEWSTYLE=True, NO_ZEROES=True)),
     b"NBDMAGICIHAVEOPT\x00\x03", 18),
    (wire.ClientFlags, dict(flags=dict(C_FIXED_NEWSTYLE=True)), b"\x00\x00\x00\x01", 4),
    (wire.OptionRequestHeader, dict(option=Option.GO, length=6),
     b"IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x06", 16),
    (wire.OptionReplyHeader, dict(option=Option.LIST, reply=Reply.ERR_UNSUP, length=0),
     bytes.fromhex("0003e889045565a9") + b"\x00\x00\x00\x03\x80\x00\x00\x01\x00\x00\x00\x00", 20),
    (wire.InfoRequest, dict(name="ram", requests=[Info.BLOCK_SIZE, Info.NAME]),
     b"\x00\x00\x00\x03ram\x00\x02\x00\x03\x00\x01", None),
    (wire.MetaContextRequest, dict(name="", queries=["base:allocation"]),
     b"\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x0fbase:allocation", None),
    (wire.InfoExport, dict(size=1 << 30, flags=dict(HAS_FLAGS=True, READ_ONLY=True)),
     b"\x00\x00" + (1 << 30).to_bytes(8, "big") + b"\x00\x03", 12),
    (wire.InfoName, dict(name="ram"), b"\x00\x01ram", None),
    (wire.InfoDescription, dict(description="guest"), b"\x00\x02guest", None),
    (wire.InfoBlockSize, dict(minimum=1, preferred=4096, maximum=1 << 25),
     b"\x00\x03\x00\x00\x00\x01\x00\x00\x10\x00\x02\x00\x00\x00", 14),
    (wire.ServerReply, dict(name="ram", description="d"), b"\x00\x00\x00\x03ramd", None),
    (wire.MetaContextReply, dict(context_id=1, name="base:allocation"), b"\x00\x00\x00\x01base:allocation", None),
    (wire.ExportNameReply, dict(size=4096, flags=dict(HAS_FLAGS=True)), b"\x00" * 6 + b"\x10\x00\x00\x01", 10),
    (wire.Request, dict(flags=dict(FUA=True), type=Command.READ, handle=7, offset=4096, length=512),
     bytes.fromhex("25609513") + b"\x00\x01\x00\x00" + (7).to_bytes(8, "big") + (4096).to_bytes(8, "big")
     + (512).to_bytes(4, "big"), 28),
    (wire.SimpleReply, dict(error=Errno.EPERM, handle=9),
     bytes.fromhex("67446698") + b"\x00\x00\x00\x01" + (9).to_bytes(8, "big"), 16),
    (wire.StructuredReplyHeader, dict(flags=dict(DONE=True), type=ChunkType.OFFSET_HOLE, handle=3, length=12),
     bytes.fromhex("668e33ef") + b"\x00\x01\x00\x02" + (3).to_bytes(8, "big") + b"\x00\x00\x00\x0c", 20),
    (wire.OffsetDataChunk, dict(offset=8192, data=b"abc"), (8192).to_bytes(8, "big") + b"abc", None),
    (wire.OffsetHoleChunk, dict(offset=8192, length=4096), (8192).to_bytes(8, "big") + b"\x00\x00\x10\x00", 12),
    (wire.ErrorChunk, dict(error=Errno.EINVAL, message="bad"), b"\x00\x00\x00\x16\x00\x03bad", None),
    (wire.BlockStatusChunk, dict(context_id=1, descriptors=[dict(length=4096, flags=dict(HOLE=True, ZERO=True))]),
     b"\x00\x00\x00\x01\x00\x00\x10\x00\x00\x00\x00\x03", None),
]


def _normalise(value):
    """construct parses into Containers and ListContainers with enum strings; compare plainly."""
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if hasattr(value, "intvalue"):  # an Enum member parses to an EnumIntegerString
        return value.intvalue
    if isinstance(value, int):
        return int(value)
    return value


CASE_IDS = [next(name for name, value in vars(wire).items() if value is case[0]) for case in CASES]


@pytest.mark.parametrize("declaration, obj, raw, size", CASES, ids=CASE_IDS)
def test_round_trip(declaration, obj, raw, size):
    assert declaration.build(obj) == raw
    parsed = declaration.parse(raw)
    built_again = declaration.build(parsed)
    assert built_again == raw
    for key, value in obj.items():
        got = parsed[key]
        if isinstance(value, dict):  # FlagsEnum: every flag set in obj is set in parsed, nothing else
            assert {k for k, v in got.items() if v is True and not k.startswith("_")} == {
                k for k, v in value.items() if v}
        else:
            assert _normalise(got) == _normalise(value)
    if size is not None:
        assert declaration.sizeof() == size


def test_bad_magic_is_rejected():
    with pytest.raises(ConstError):
        wire.Request.parse(b"\x00" * 28)
    with pytest.raises(ConstError):
        wire.Greeting.parse(b"NBDMAGICIHAVEOPX\x00\x03")


def test_truncated_input_is_rejected():
    with pytest.raises(StreamError):
        wire.Request.parse(wire.Request.build(dict(flags=0, type=0, handle=1, offset=0, length=1))[:27])


def test_unknown_enum_value_parses_as_plain_int():
    """Why server_core.py validates command types itself."""
    raw = wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, 99, 1, 0, 1)
    parsed = wire.Request.parse(raw)
    assert parsed.type == 99 and not hasattr(parsed.type, "name")
    assert 99 not in {int(c) for c in Command}


@pytest.mark.parametrize("flags, command, handle, offset, length", [
    (0, Command.READ, 1, 0, 4096),
    (CommandFlag.REQ_ONE, Command.BLOCK_STATUS, (1 << 64) - 1, (1 << 63) - 1, (1 << 32) - 1),
    (CommandFlag.FUA | CommandFlag.NO_HOLE, Command.WRITE, 0xDEADBEEF, 1 << 40, 1),
])
def test_request_struct_twin_agrees(flags, command, handle, offset, length):
    declared = wire.Request.build(dict(flags=flags_of(flags, CommandFlag), type=command, handle=handle,
                                       offset=offset, length=length))
    fast = wire.REQUEST.pack(wire.REQUEST_MAGIC, flags, command, handle, offset, length)
    assert fast == declared
    parsed = wire.Request.parse(fast)
    assert wire.REQUEST.unpack(declared) == (wire.REQUEST_MAGIC, flags, command, parsed.handle, parsed.offset,
                                             parsed.length)


@pytest.mark.parametrize("error, handle", [(0, 1), (Errno.EINVAL, (1 << 64) - 1)])
def test_simple_reply_struct_twin_agrees(error, handle):
    declared = wire.SimpleReply.build(dict(error=error, handle=handle))
    assert wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, error, handle) == declared


@pytest.mark.parametrize("flags, chunk_type, length", [
    (ChunkFlag.DONE, ChunkType.OFFSET_DATA, 4104),
    (0, ChunkType.OFFSET_HOLE, 12),
    (ChunkFlag.DONE, ChunkType.ERROR, 6),
    (ChunkFlag.DONE, ChunkType.BLOCK_STATUS, 12),
])
def test_chunk_header_struct_twins_agree(flags, chunk_type, length):
    handle = 0x1122334455667788
    declared = wire.StructuredReplyHeader.build(dict(flags=flags_of(flags, ChunkFlag), type=chunk_type,
                                                     handle=handle, length=length))
    assert wire.CHUNK_HEADER.pack(wire.STRUCTURED_REPLY_MAGIC, flags, chunk_type, handle, length) == declared
    if chunk_type == ChunkType.OFFSET_DATA:
        fast = wire.OFFSET_DATA_HEADER.pack(wire.STRUCTURED_REPLY_MAGIC, flags, chunk_type, handle, length, 4096)
        assert fast == declared + wire.OffsetDataChunk.build(dict(offset=4096, data=b""))
    if chunk_type == ChunkType.OFFSET_HOLE:
        fast = wire.OFFSET_HOLE.pack(wire.STRUCTURED_REPLY_MAGIC, flags, chunk_type, handle, length, 4096, 512)
        assert fast == declared + wire.OffsetHoleChunk.build(dict(offset=4096, length=512))


def test_constants_match_the_spec():
    assert wire.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert wire.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert Reply.ERR_TLS_REQD == 0x80000005 and wire.reply_is_error(Reply.ERR_UNSUP)
    assert ChunkType.ERROR == 0x8001 and wire.chunk_is_error(ChunkType.ERROR_OFFSET)
    assert not wire.chunk_is_error(ChunkType.OFFSET_HOLE)
    assert isinstance(wire.Greeting.parse(b"NBDMAGICIHAVEOPT\x00\x01"), Container)
