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
