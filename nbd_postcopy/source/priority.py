"""Which traffic class a page server connection's replies go to: the socket's SO_PRIORITY, by the role the
client named in the handshake. The classes are those of the HTB tree that `shaping.py` installs under
`--prefetch-bandwidth` (HTB honours a priority that equals one of its class ids); without that tree the
priority changes nothing. This module is apart from shaping.py so that the page server does not import
pyroute2, whose import runs `uname -p` and `file` as child processes."""

from __future__ import annotations

import socket

HANDLE = 0x50430000  # the HTB root, "5043:", i.e. "PC"
ROOT_CLASS = HANDLE | 0x1
DEMAND_CLASS = HANDLE | 0x10
PREFETCH_CLASS = HANDLE | 0x20
_PRIORITIES = {"demand": DEMAND_CLASS, "prefetch": PREFETCH_CLASS}


def socket_priority(role: str | None) -> int | None:
    """The SO_PRIORITY that puts a connection of `role` into its class (None: leave the socket alone)."""
    return _PRIORITIES.get(role or "")


def set_socket_role(sock: socket.socket, role: str | None) -> None:
    priority = socket_priority(role)
    if priority is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, priority)
