"""What users type and every part shares: the page size, the one parser each for sizes, addresses and
listen addresses, and byte counts for people.

Each parser raises ValueError with a one-line message; command-line wrappers turn that into a usage
error, the plugin prefixes the key's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PAGE_SIZE = 4096  # bytes in a guest page, a swap slot, and a marker page

_SIZE = re.compile(r"(0x[0-9a-f]+|\d+)(?:([kmgt])i?b?|b)?", re.IGNORECASE)
_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str) -> int:
    """Bytes from '268435456', '0x10000000', '256M', '256MiB', '1g', '4KB' or '4096B' (binary multiples)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (use bytes, 0xHEX, or a K/M/G/T suffix, e.g. 256M)")
    return int(match[1], 0) << _SHIFT.get((match[2] or "").lower(), 0)


def parse_address(text: str) -> int:
    """A start address: decimal or 0xHEX, not negative."""
    digits = text.strip()
    if not re.fullmatch(r"0x[0-9a-f]+|\d+", digits, re.IGNORECASE):
        raise ValueError(f"address must be a number like 0x7f0000000000 (0xHEX or decimal), got {text!r}")
    value = int(digits, 0)
    if value >= 1 << 64:
        raise ValueError(f"address {text!r} is beyond 64 bits")
    return value


@dataclass(frozen=True)
class ListenAddress:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"tcp:[{self.host}]:{self.port}" if ":" in self.host else f"tcp:{self.host}:{self.port}"


def parse_listen(spec: str, kinds: tuple[str, ...] = ("unix", "tcp")) -> ListenAddress:
    """'unix:PATH', 'tcp:HOST:PORT', or bare 'HOST:PORT' / ':PORT' (meaning 127.0.0.1); an IPv6 HOST is
    written in brackets, [::1]:PORT. Only the `kinds` given ("unix", "tcp") are accepted."""
    forms = ["unix:PATH"] * ("unix" in kinds) + ["tcp:HOST:PORT", "HOST:PORT", ":PORT"] * ("tcp" in kinds)
    usage = f"use {', '.join(forms[:-1])} or {forms[-1]}" if len(forms) > 1 else f"use {forms[0]}"
    kind, colon, rest = spec.partition(":")
    if kind == "unix" and colon:
        if "unix" not in kinds or not rest:
            raise ValueError(f"not a listen address: {spec!r} ({usage})")
        return ListenAddress("unix", path=rest)
    explicit = kind == "tcp" and bool(colon)
    host, colon, port = (rest if explicit else spec).rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if ("tcp" not in kinds or not colon or not port.isdigit() or (explicit and not host)
            or ((":" in host or "[" in host) and not bracketed and not explicit)):
        raise ValueError(f"not a listen address: {spec!r} ({usage})")
    if int(port) > 65535:
        raise ValueError(f"port {port} out of range 0..65535 in {spec!r}")
    return ListenAddress("tcp", host=(host[1:-1] if bracketed else host) or "127.0.0.1", port=int(port))


def parse_tcp_listen(spec: str) -> ListenAddress:
    """A TCP address only ('tcp:HOST:PORT', 'HOST:PORT'), with a port other than 0."""
    address = parse_listen(spec, kinds=("tcp",))
    if address.port == 0:
        raise ValueError(f"port 0 in {spec!r}: give the port to use")
    return address


def parse_number(text: str, unit: str, zero_ok: bool = False) -> float:
    """A finite number above 0 (or at least 0 with `zero_ok`) of `unit`, e.g. '2.5' seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 <= value if zero_ok else 0 < value) or value == float("inf"):
        raise ValueError(f"want a number of {unit} >= 0, got {text!r}" if zero_ok else
                         f"want a positive number of {unit}, got {text!r}")
    return value


def bracket(host: str) -> str:
    """HOST as it goes before :PORT ([v6])."""
    return f"[{host}]" if ":" in host else host


def human_bytes(count: float) -> str:
    """A byte count for people: '512 B', '68.0 MiB', '1.0 GiB' (binary units, one decimal)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, unit = float(count), 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {units[unit]}"
