"""The Linux swap header that the device serves in slot 0, so `swapon` works without `mkswap`.

Layout of page 0 (the kernel's `union swap_header`, `info` view, all fields little-endian u32):

    bytes 0..1023      boot bits (zero)
    1024  version      1
    1028  last_page    index of the last usable page (slots - 1)
    1032  nr_badpages  0
    1036  uuid         16 bytes
    1052  label        16 bytes (volume name, NUL padded)
    4086  magic        "SWAPSPACE2" in the last 10 bytes of the page
"""

from __future__ import annotations

import struct
import uuid as uuid_module

from ..common.units import PAGE_SIZE

MAGIC = b"SWAPSPACE2"
VERSION = 1
INFO = struct.Struct("<III16s16s")  # version, last_page, nr_badpages, uuid, label
INFO_OFFSET = 1024
LABEL_BYTES = 16
MIN_SLOTS = 2  # the header plus one usable page


def build(slots: int, uuid: uuid_module.UUID, label: str = "") -> bytes:
    """The 4 KiB header page of a swap area `slots` pages long (slot 0 included)."""
    if slots < MIN_SLOTS or slots > 1 << 32:
        raise ValueError(f"a swap area needs between {MIN_SLOTS} and 2**32 pages, got {slots}")
    encoded_label = label.encode()
    if len(encoded_label) > LABEL_BYTES:
        raise ValueError(f"swap label {label!r} is longer than {LABEL_BYTES} bytes")
    page = bytearray(PAGE_SIZE)
    INFO.pack_into(page, INFO_OFFSET, VERSION, slots - 1, 0, uuid.bytes, encoded_label)
    page[-len(MAGIC):] = MAGIC
    return bytes(page)


def parse(page: bytes) -> dict:
    """The fields of a header page (for tests and status reports); raises ValueError if not one."""
    if len(page) != PAGE_SIZE or page[-len(MAGIC):] != MAGIC:
        raise ValueError("not a SWAPSPACE2 header page")
    version, last_page, nr_badpages, raw_uuid, label = INFO.unpack_from(page, INFO_OFFSET)
    return {
        "version": version,
        "last_page": last_page,
        "nr_badpages": nr_badpages,
        "uuid": uuid_module.UUID(bytes=raw_uuid),
        "label": label.rstrip(b"\0").decode(errors="replace"),
    }
