"""Two test "hosts" on this machine: network namespaces joined by a veth pair (pyroute2).

    with two_hosts() as hosts:
        subprocess.run([*hosts.source.enter, "nbd-postcopy", "serve", ...])   # runs in the source's network
        hosts.destination.address                                           # 10.99.0.2

Name: netns pcs-XXXXXX / pcd-XXXXXX, veth pcsXXXXXX <-> pcdXXXXXX, 10.99.0.1/30 and 10.99.0.2/30
Scope: the `with` block.  Depends: root (CAP_NET_ADMIN, CAP_SYS_ADMIN).
Only the network namespace changes (`nsenter --net=...`, which execs the command: its PID is the
command's, so killing it by PID works); the mount namespace stays the host's, so swap, loop devices and
FUSE mounts stay visible. Removing a namespace removes its end of the veth pair and every qdisc on it:
`finally` removes both, whatever happened.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute, NetNS, netns


@dataclass(frozen=True)
class Host:
    netns: str
    interface: str
    address: str
    peer: str  # the other host's address

    @property
    def enter(self) -> list[str]:
        """Prefix a command with this to run it in this host's network (nsenter execs it)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--"]


@dataclass(frozen=True)
class Hosts:
    source: Host
    destination: Host


@contextlib.contextmanager
def two_hosts() -> Iterator[Hosts]:
    tag = uuid.uuid4().hex[:6]
    src, dst = Host(f"pcs-{tag}", f"pcs{tag}", "10.99.0.1", "10.99.0.2"), Host(f"pcd-{tag}", f"pcd{tag}",
                                                                                  "10.99.0.2", "10.99.0.1")
    created = []
    try:
        for host in (src, dst):
            netns.create(host.netns)
            created.append(host.netns)
        with IPRoute() as ip:
            ip.link("add", ifname=src.interface, kind="veth", peer={"ifname": dst.interface, "net_ns_fd": dst.netns})
            ip.link("set", index=ip.link_lookup(ifname=src.interface)[0], net_ns_fd=src.netns)
        for host in (src, dst):
            with NetNS(host.netns) as ns:
                index = ns.link_lookup(ifname=host.interface)[0]
                ns.addr("add", index=index, address=host.address, prefixlen=30)
                ns.link("set", index=index, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        yield Hosts(src, dst)
    finally:
        for name in created:
            netns.remove(name)


# --- three namespaces: source -- router -- destination, the router's egress shaped --------------


@dataclass(frozen=True)
class RoutedHosts(Hosts):
    """Two hosts joined through a router namespace whose egress on both sides is a tbf at `rate` bit/s."""

    router: str  # its netns
    to_destination: str  # the router's interface towards the destination (its tbf is the bottleneck)
    rate: int

    def sent_to_destination(self) -> tuple[int, int, int]:
        """Bytes and packets the link towards the destination has carried so far, and the packets it dropped
        (its tbf's counters: after segmentation, Ethernet headers included)."""
        with NetNS(self.router) as ns:
            for qdisc in ns.get_qdiscs(index=ns.link_lookup(ifname=self.to_destination)[0]):
                if qdisc["parent"] == 0xFFFFFFFF:  # the root: our tbf
                    stats = qdisc.get_attr("TCA_STATS")
                    return stats["bytes"], stats["packets"], stats["drop"]
        raise RuntimeError(f"no tbf on {self.to_destination} in {self.router}")


@contextlib.contextmanager
def routed_hosts(rate: int, queue_ms: float = 20.0) -> Iterator[RoutedHosts]:
    """source (10.99.1.1) -- router (10.99.1.2 | 10.99.2.1) -- destination (10.99.2.2), each link a veth
    pair, the router forwarding, and a tbf of `rate` bit/s (queue: `queue_ms` of data) on the router's
    egress towards each end: an emulated link that leaves the ends' own root qdiscs free (e.g. for
    `migrate --prefetch-bandwidth`). Names: netns pcs-/pcr-/pcd-XXXXXX; veths pcsXXXXXX <-> praXXXXXX,
    prbXXXXXX <-> pcdXXXXXX. The veths are created inside the namespaces, so removing the namespaces in
    `finally` removes every link and qdisc."""
    tag = uuid.uuid4().hex[:6]
    router = f"pcr-{tag}"
    src = Host(f"pcs-{tag}", f"pcs{tag}", "10.99.1.1", "10.99.2.2")
    dst = Host(f"pcd-{tag}", f"pcd{tag}", "10.99.2.2", "10.99.1.1")
    legs = [(src, f"pra{tag}", "10.99.1.2"), (dst, f"prb{tag}", "10.99.2.1")]  # end, router side, gateway
    created = []
    try:
        for name in (src.netns, router, dst.netns):
            netns.create(name)
            created.append(name)
        for end, router_side, gateway in legs:
            with NetNS(end.netns) as ns:
                ns.link("add", ifname=end.interface, kind="veth", peer={"ifname": router_side, "net_ns_fd": router})
                index = ns.link_lookup(ifname=end.interface)[0]
                ns.addr("add", index=index, address=end.address, prefixlen=30)
                ns.link("set", index=index, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                ns.route("add", dst=f"{end.peer}/32", gateway=gateway)
            with NetNS(router) as ns:
                index = ns.link_lookup(ifname=router_side)[0]
                ns.addr("add", index=index, address=gateway, prefixlen=30)
                ns.link("set", index=index, state="up")
                burst = max(rate // 8 // 1000, 64 << 10)  # a millisecond of data, at least one GSO packet
                ns.tc("add", "tbf", index, 0x10000, rate=f"{rate}bit", burst=burst, latency=int(queue_ms * 1000))  # microseconds
        subprocess.run(["nsenter", f"--net=/run/netns/{router}", "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                       check=True)
        yield RoutedHosts(src, dst, router, legs[1][1], rate)
    finally:
        for name in created:
            netns.remove(name)
