"""NBD wire format: every constant and structure, declared once.

Values follow the NBD protocol specification (NetworkBlockDevice/nbd, doc/proto.md). The structures are
declared with `construct`; the three headers on the per-request path (request, simple reply, structured
reply chunk) also have `struct.Struct` twins, which the tests check byte for byte against the
declarations, because construct costs about 12 us per parse there and `struct` 0.1 us.
"""

from __future__ import annotations

import enum
import struct

from construct import (

    Const,
    Enum,
    FlagsEnum,
    GreedyBytes,
    GreedyRange,
    GreedyString,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    PrefixedArray,
    Struct,
)

# --- magics -------------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", also the option request magic
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- limits -------------------------------------------------------------------------------------
MAX_STRING = 4096  # the spec's bound on names, descriptions and messages
EXPORT_NAME_PADDING = bytes(124)  # after the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Reply(enum.IntEnum):
    """Option reply types; the ones with the top bit set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9
    ERR_EXT_HEADER_REQD = _REP_ERR | 10


def reply_is_error(reply_type: int) -> bool:
    return bool(reply_type & _REP_ERR)


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class Errno(enum.IntEnum):
    """Error values on the wire (they match Linux errno numbers)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class ChunkFlag(enum.IntFlag):
    DONE = 1 << 0


_ERROR_CHUNK = 1 << 15


class ChunkType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = _ERROR_CHUNK | 1
    ERROR_OFFSET = _ERROR_CHUNK | 2


# Plain ints for the per-request paths of both cores (enum member lookups and flag arithmetic cost
# microseconds there).
CMD_READ = int(Command.READ)
CHUNK_DONE = int(ChunkFlag.DONE)
CHUNK_NONE, CHUNK_DATA, CHUNK_HOLE = int(ChunkType.NONE), int(ChunkType.OFFSET_DATA), int(ChunkType.OFFSET_HOLE)


def chunk_is_error(chunk_type: int) -> bool:
    return bool(chunk_type & _ERROR_CHUNK)


class StateFlag(enum.IntFlag):
    """Block status flags of the base:allocation context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"

# --- handshake ----------------------------------------------------------------------------------
Greeting = Struct(
    "nbdmagic" / Const(NBDMAGIC, Int64ub),
    "ihaveopt" / Const(IHAVEOPT, Int64ub),
    "flags" / FlagsEnum(Int16ub, HandshakeFlag),
)
ClientFlags = Struct("flags" / FlagsEnum(Int32ub, ClientFlag))
OptionRequestHeader = Struct(
    "magic" / Const(IHAVEOPT, Int64ub),
    "option" / Enum(Int32ub, Option),
    "length" / Int32ub,
)
OptionReplyHeader = Struct(
    "magic" / Const(OPTION_REPLY_MAGIC, Int64ub),
    "option" / Enum(Int32ub, Option),
    "reply" / Enum(Int32ub, Reply),
    "length" / Int32ub,
)
NbdString = PascalString(Int32ub, "utf8")  # a name with its 32-bit length in front

# NBD_OPT_INFO / NBD_OPT_GO request data: export name, then the NBD_INFO types the client wants.
InfoRequest = Struct("name" / NbdString, "requests" / PrefixedArray(Int16ub, Enum(Int16ub, Info)))
# NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT request data.
MetaContextRequest = Struct("name" / NbdString, "queries" / PrefixedArray(Int32ub, NbdString))

# NBD_REP_INFO payloads.
InfoExport = Struct(
    "info" / Const(Info.EXPORT, Int16ub),
    "size" / Int64ub,
    "flags" / FlagsEnum(Int16ub, TransmissionFlag),
)
InfoName = Struct("info" / Const(Info.NAME, Int16ub), "name" / GreedyString("utf8"))
InfoDescription = Struct("info" / Const(Info.DESCRIPTION, Int16ub), "description" / GreedyString("utf8"))
InfoBlockSize = Struct(
    "info" / Const(Info.BLOCK_SIZE, Int16ub),
    "minimum" / Int32ub,
    "preferred" / Int32ub,
    "maximum" / Int32ub,
)
# NBD_REP_SERVER payload (NBD_OPT_LIST): name, then an optional description filling the rest.
ServerReply = Struct("name" / NbdString, "description" / GreedyString("utf8"))
# NBD_REP_META_CONTEXT payload.
MetaContextReply = Struct("context_id" / Int32ub, "name" / GreedyString("utf8"))
# Reply to NBD_OPT_EXPORT_NAME (followed by EXPORT_NAME_PADDING unless NO_ZEROES was agreed).
ExportNameReply = Struct("size" / Int64ub, "flags" / FlagsEnum(Int16ub, TransmissionFlag))

# --- transmission -------------------------------------------------------------------------------
Request = Struct(
    "magic" / Const(REQUEST_MAGIC, Int32ub),
    "flags" / FlagsEnum(Int16ub, CommandFlag),
    "type" / Enum(Int16ub, Command),
    "handle" / Int64ub,
    "offset" / Int64ub,
    "length" / Int32ub,
)
SimpleReply = Struct(
    "magic" / Const(SIMPLE_REPLY_MAGIC, Int32ub),
    "error" / Enum(Int32ub, Errno),
    "handle" / Int64ub,
)
StructuredReplyHeader = Struct(
    "magic" / Const(STRUCTURED_REPLY_MAGIC, Int32ub),
    "flags" / FlagsEnum(Int16ub, ChunkFlag),
    "type" / Enum(Int16ub, ChunkType),
    "handle" / Int64ub,
    "length" / Int32ub,
)
OffsetDataChunk = Struct("offset" / Int64ub, "data" / GreedyBytes)
OffsetHoleChunk = Struct("offset" / Int64ub, "length" / Int32ub)
ErrorChunk = Struct("error" / Enum(Int32ub, Errno), "message" / PascalString(Int16ub, "utf8"))
BlockDescriptor = Struct("length" / Int32ub, "flags" / FlagsEnum(Int32ub, StateFlag))
BlockStatusChunk = Struct("context_id" / Int32ub, "descriptors" / GreedyRange(BlockDescriptor))

# --- fast twins of the hot headers (tests/nbd/test_wire.py checks them against the declarations) -----
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")  # chunk header + the data chunk's offset
OFFSET_HOLE = struct.Struct(">IHHQIQI")  # chunk header + hole offset and length
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

assert REQUEST.size == Request.sizeof() == 28
assert SIMPLE_REPLY.size == SimpleReply.sizeof() == 16
assert CHUNK_HEADER.size == StructuredReplyHeader.sizeof() == 20
