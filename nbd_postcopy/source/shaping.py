"""Keep demand replies ahead of prefetch replies on the source host's egress interface (pyroute2, HTB).

    with PrefetchShaping("eth0", parse_rate("800mbit")):
        ...  # serve; prefetch replies are capped at 800 Mbit/s, demand replies are not

On a real link the prefetcher's bulk replies fill the NIC's queue, and a demand fault's reply would wait
behind megabytes of them. This installs, as the interface's root qdisc:

    HTB 5043: (default 5043:10)
      class 5043:1   rate = ceil = LINK_CEIL
        class 5043:10  demand and everything unclassified: prio 0, rate = ceil = LINK_CEIL
        class 5043:20  prefetch: prio 1, rate = ceil = RATE

The page server puts each connection's socket into a class with SO_PRIORITY, which HTB honours when it
equals one of its class ids (`priority.py`); the plugin names each connection's role in the
handshake. It refuses without CAP_NET_ADMIN, or when the interface already has a root qdisc that someone
configured (a default root qdisc, handle 0:, is replaced and comes back by itself), and it removes
exactly what it installed. See docs/DESIGN.md, "Demand before prefetch on the wire".
"""

from __future__ import annotations

import errno
import re
import struct

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from .priority import DEMAND_CLASS, HANDLE, PREFETCH_CLASS, ROOT_CLASS

LINK_CEIL = 32_000_000_000  # bits/s: above any link we shape, and within HTB's 32-bit byte rate
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(bit|bps)?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class ShapingError(Exception):
    """Shaping could not be installed (or removed); the message says why and what to do."""


def parse_rate(text: str) -> int:
    """'800mbit', '1gbit', '500M' (bits), '100mbps' (bytes, as tc reads it) -> bits per second."""
    match = _RATE.match(text)
    if not match:
        raise ValueError(f"bad rate {text!r}: use e.g. 800mbit, 1gbit or 100mbps")
    value = float(match[1]) * _SCALE[match[2].lower()] * (8 if (match[3] or "").lower() == "bps" else 1)
    if not 8_000 <= value <= LINK_CEIL:
        raise ValueError(f"rate {text!r} is out of range (8kbit .. {LINK_CEIL // 10**9}gbit)")
    return int(value)


def interface_towards(address: str, netns: str | None = None) -> str:
    """The interface of the route to `address` (what --interface defaults to)."""
    with _netlink(netns) as ip:
        try:
            route = ip.route("get", dst=address)[0]
            return ip.get_links(route.get_attr("RTA_OIF"))[0].get_attr("IFLA_IFNAME")
        except (NetlinkError, IndexError) as exc:
            raise ShapingError(f"no route to {address} to shape: {exc}") from None


class PrefetchShaping:
    """The HTB tree on one interface, as a context manager: installed on enter, removed on exit."""

    def __init__(self, interface: str, rate: int, netns: str | None = None):
        self.interface = interface
        self.rate = rate
        self.netns = netns
        self.installed = False

    def __enter__(self) -> PrefetchShaping:
        self.install()
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def install(self) -> None:
        with _netlink(self.netns) as ip:
            index = self._index(ip)
            root = _root_qdisc(ip, index)
            if root is not None and root["handle"] != 0:
                kind = root.get_attr("TCA_KIND")
                raise ShapingError(
                    f"{self.interface} already has a root qdisc ({kind} {root['handle'] >> 16:x}:) that "
                    f"nbd-postcopy did not install; remove it (tc qdisc del dev {self.interface} root) or run "
                    "without --prefetch-bandwidth")
            try:
                ip.tc("add", "htb", index, HANDLE, default=DEMAND_CLASS & 0xFFFF)
                self.installed = True
                ip.tc("add-class", "htb", index, ROOT_CLASS, parent=HANDLE, rate=_bps(LINK_CEIL),
                      ceil=_bps(LINK_CEIL))
                ip.tc("add-class", "htb", index, DEMAND_CLASS, parent=ROOT_CLASS, rate=_bps(LINK_CEIL),
                      ceil=_bps(LINK_CEIL), prio=0)
                ip.tc("add-class", "htb", index, PREFETCH_CLASS, parent=ROOT_CLASS, rate=_bps(self.rate),
                      ceil=_bps(self.rate), prio=1)
            except (NetlinkError, OSError, ValueError, struct.error) as exc:
                if self.installed:
                    self.remove()
                if getattr(exc, "code", None) == errno.EPERM:
                    raise ShapingError("--prefetch-bandwidth needs CAP_NET_ADMIN (run as root)") from None
                raise ShapingError(f"installing HTB on {self.interface} failed: {exc}") from None

    def remove(self) -> None:
        """Delete our root qdisc (and with it our classes), and nothing else."""
        if not self.installed:
            return
        with _netlink(self.netns) as ip:
            try:
                index = self._index(ip)
            except ShapingError:
                self.installed = False  # the interface is gone, and our qdisc with it
                return
            root = _root_qdisc(ip, index)
            if root is not None and root["handle"] == HANDLE and root.get_attr("TCA_KIND") == "htb":
                try:
                    ip.tc("del", "htb", index, HANDLE)
                except NetlinkError as exc:
                    raise ShapingError(f"removing HTB from {self.interface} failed: {exc}") from None
        self.installed = False

    def _index(self, ip) -> int:
        found = ip.link_lookup(ifname=self.interface)
        if not found:
            raise ShapingError(f"no network interface {self.interface!r}" +
                               (f" in namespace {self.netns}" if self.netns else ""))
        return found[0]


def _root_qdisc(ip, index: int):
    for qdisc in ip.get_qdiscs(index=index):
        if qdisc["parent"] == 0xFFFFFFFF:  # TC_H_ROOT
            return qdisc
    return None


def _bps(bits: int) -> str:
    return f"{bits}bit"


def _netlink(netns: str | None):
    return NetNS(netns) if netns else IPRoute()
