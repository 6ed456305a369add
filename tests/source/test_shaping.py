"""Prefetch shaping (pyroute2 HTB) on a real interface in two test hosts (network namespaces), and the page
server putting each connection into its class by the role the client names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import NetNS

from nbd_postcopy.nbd.client import SourceClient
from nbd_postcopy.source.priority import DEMAND_CLASS, HANDLE, PREFETCH_CLASS, socket_priority
from nbd_postcopy.source.shaping import PrefetchShaping, ShapingError, interface_towards, parse_rate
from tests.netns import two_hosts
from tests.servers import write_image

pytestmark = pytest.mark.root


def root_qdisc(host) -> tuple[str, int]:
    with NetNS(host.netns) as ns:
        index = ns.link_lookup(ifname=host.interface)[0]
        [root] = [q for q in ns.get_qdiscs(index=index) if q["parent"] == 0xFFFFFFFF]
        return root.get_attr("TCA_KIND"), root["handle"]


def class_bytes(host) -> dict[int, int]:
    with NetNS(host.netns) as ns:
        index = ns.link_lookup(ifname=host.interface)[0]
        return {c["handle"]: c.get_nested("TCA_STATS2", "TCA_STATS_BASIC")["bytes"] for c in ns.get_classes(index=index)}


def test_parse_rate():
    assert parse_rate("800mbit") == 800_000_000 and parse_rate("1gbit") == 10**9 and parse_rate("1G") == 10**9
    assert parse_rate("100mbps") == 800_000_000 and parse_rate("64kbit") == 64_000
    for bad in ("fast", "0", "100tbit", "-5mbit", ""):
        with pytest.raises(ValueError, match="rate"):
            parse_rate(bad)
    assert socket_priority("demand") == DEMAND_CLASS and socket_priority("prefetch") == PREFETCH_CLASS
    assert socket_priority(None) is None


def test_installed_and_removed_exactly():
    with two_hosts() as hosts:
        src = hosts.source
        assert root_qdisc(src)[1] == 0  # the default root qdisc
        assert interface_towards(src.peer, netns=src.netns) == src.interface
        with PrefetchShaping(src.interface, parse_rate("200mbit"), netns=src.netns) as shaping:
            assert root_qdisc(src) == ("htb", HANDLE)
            assert set(class_bytes(src)) == {HANDLE | 1, DEMAND_CLASS, PREFETCH_CLASS}
            assert shaping.installed
        assert root_qdisc(src)[1] == 0  # back to the default
        shaping.remove()  # a second removal does nothing


def test_refuses_a_root_qdisc_it_did_not_install_and_leaves_it_alone():
    with two_hosts() as hosts:
        src = hosts.source
        with NetNS(src.netns) as ns:
            index = ns.link_lookup(ifname=src.interface)[0]
            ns.tc("add", "tbf", index, 0x10000, rate="1gbit", burst=256 * 1024, latency="50ms")
        with pytest.raises(ShapingError, match=rf"{src.interface} already has a root qdisc \(tbf 1:\)"):
            PrefetchShaping(src.interface, parse_rate("200mbit"), netns=src.netns).install()
        assert root_qdisc(src) == ("tbf", 0x10000)
        with pytest.raises(ShapingError, match="no network interface 'nope0'"):
            PrefetchShaping("nope0", parse_rate("200mbit"), netns=src.netns).install()


def test_a_failure_while_installing_removes_what_was_installed(monkeypatch):
    with two_hosts() as hosts:
        src = hosts.source
        shaping = PrefetchShaping(src.interface, parse_rate("200mbit"), netns=src.netns)
        shaping.rate = 10**15  # beyond HTB's rate field: the last class fails
        with pytest.raises(ShapingError):
            shaping.install()
        assert root_qdisc(src)[1] == 0 and not shaping.installed


@pytest.mark.slow
def test_the_server_puts_each_connection_in_its_class(processes, run_dir):
    """serve in the source host, clients in the destination host naming their role: the bytes of each
    role's replies are counted in its own HTB class on the source's interface."""
    image = Path("/var/tmp") / f"{run_dir.name}-shaping.img"
    write_image(image, 8 << 20)
    try:
        with two_hosts() as hosts:
            src, dst = hosts.source, hosts.destination
            serve = processes.start([*src.enter, sys.executable, "-m", "nbd_postcopy.cli", "serve", "--file", image,
                                     "--listen", f"tcp:{src.address}:10809"], stderr=subprocess.DEVNULL)
            with PrefetchShaping(src.interface, parse_rate("1gbit"), netns=src.netns):
                code = ("import sys; from nbd_postcopy.nbd.client import SourceClient as C\n"
                        "c = C(sys.argv[1], role=sys.argv[2], connect_timeout=10)\n"
                        "[c.read(i << 20, 1 << 20) for i in range(int(sys.argv[3]))]; c.close()")
                uri = f"nbd://{src.address}:10809"
                for role, mib in (("prefetch", 6), ("demand", 2)):
                    subprocess.run([*dst.enter, sys.executable, "-c", code, uri, role, str(mib)], check=True,
                                   timeout=60)
                counted = class_bytes(src)
            assert counted[PREFETCH_CLASS] > 6 << 20  # (plus headers)
            assert 2 << 20 < counted[DEMAND_CLASS] < 3 << 20
            assert serve.poll() is None
    finally:
        image.unlink(missing_ok=True)
