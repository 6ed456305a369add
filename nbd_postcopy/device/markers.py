"""Keyed marker pages: how the stager tells the device which guest page a swap slot holds.

A marker is a 4 KiB page that starts with a 48-byte header:

    magic (8) | migration id (16) | guest page index (u64 LE, 8) | MAC (16)

The MAC is HMAC-SHA256 over the first 32 bytes, truncated to 16 bytes, keyed with the secret that only
the stager and the device share. The rest of the page is zero. A page whose header does not verify is
ordinary data, never a mapping.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from pathlib import Path

from ..common.units import PAGE_SIZE

MAGIC = b"NBDPCMK\x01"
HEADER = struct.Struct("<8s16sQ16s")
HEADER_SIZE = HEADER.size  # 48
MIN_KEY_BYTES = 16
_TAIL = bytes(PAGE_SIZE - HEADER_SIZE)


class KeyFileError(ValueError):
    """The key file is unusable."""


def load_key(path: str | Path) -> bytes:
    """Read a key file (raw random bytes, e.g. `head -c 32 /dev/urandom > key`)."""
    try:
        key = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(
            f"key file {path} holds {len(key)} bytes; it needs at least {MIN_KEY_BYTES} random bytes "
            f"(make one with: head -c 32 /dev/urandom > {path})"
        )
    return key


def migration_id_for(key: bytes) -> bytes:
    """The 16-byte migration id both sides derive from the shared key."""
    return hashlib.sha256(b"nbd-postcopy migration id\0" + key).digest()[:16]


class MarkerCodec:
    """Builds and checks marker pages for one key and migration id."""

    __slots__ = ("_key", "migration_id", "_prefix")

    def __init__(self, key: bytes, migration_id: bytes | None = None):
        if len(key) < MIN_KEY_BYTES:
            raise KeyFileError(f"marker key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self.migration_id = migration_id if migration_id is not None else migration_id_for(key)
        if len(self.migration_id) != 16:
            raise ValueError("migration id must be 16 bytes")
        self._prefix = MAGIC + self.migration_id

    @classmethod
    def from_file(cls, path: str | Path) -> "MarkerCodec":
        return cls(load_key(path))

    def _mac(self, signed: bytes) -> bytes:
        return hmac.digest(self._key, signed, "sha256")[:16]

    def header(self, page_index: int) -> bytes:
        signed = self._prefix + page_index.to_bytes(8, "little")
        return signed + self._mac(signed)

    def page(self, page_index: int) -> bytes:
        """The full 4 KiB marker page for a guest page index."""
        return self.header(page_index) + _TAIL

    def parse(self, page) -> int | None:
        """The guest page index if `page` (bytes or memoryview, >= 48 bytes) is a valid marker of ours."""
        if bytes(page[:8]) != MAGIC:
            return None
        head = bytes(page[:HEADER_SIZE])
        signed, mac = head[:32], head[32:]
        if signed[8:24] != self.migration_id:
            return None
        if not hmac.compare_digest(mac, self._mac(signed)):
            return None
        return int.from_bytes(signed[24:32], "little")


def looks_like_marker(page) -> bool:
    """True if the page carries the marker magic, whether or not it verifies (for anomaly reports)."""
    return bytes(page[:8]) == MAGIC
