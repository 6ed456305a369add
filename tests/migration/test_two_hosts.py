"""Migration between two hosts: `nbd-postcopy receive` in one network namespace, `nbd-postcopy migrate --to`
in another, each beside its own QEMU (TCG), over a veth link; with and without TLS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pyroute2 import NetNS

from nbd_postcopy.testbench.guest import Failure, PassOk, prepare_guest
from nbd_postcopy.testbench.vm import Vm
from tests.netns import two_hosts
from tests.swapdev import AffinityWatch

MIB = 1 << 20
CLI = [sys.executable, "-m", "nbd_postcopy.cli"]
CHANNEL_PORT = 7777

pytestmark = [pytest.mark.slow, pytest.mark.root]


@pytest.fixture(scope="module")
def guest_image():
    return prepare_guest()


def make_certificates(directory: Path, hosts: dict[str, str], ca_name: str = "ca") -> dict[str, list[str]]:
    """A CA and, for each name -> IP address, a certificate for that address. Returns the three
    --tls-* options per name."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", f"{ca_name}-key.pem", "-out", f"{ca_name}-cert.pem", "-days", "2",
            "-subj", f"/CN=nbd-postcopy test {ca_name}")
    options = {}
    for name, address in hosts.items():
        (directory / f"{name}.ext").write_text(f"subjectAltName=IP:{address}\n")
        openssl("req", *ec, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca_name}-cert.pem", "-CAkey", f"{ca_name}-key.pem",
                "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2", "-extfile", f"{name}.ext")
        options[name] = ["--tls-cert", str(directory / f"{name}-cert.pem"), "--tls-key",
                         str(directory / f"{name}-key.pem"), "--tls-ca", str(directory / f"{ca_name}-cert.pem")]
    return options


def wait_for_line(path: Path, text: str, proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        assert proc.poll() is None, f"exited {proc.returncode}: {path.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"{text!r} not in {path} within {timeout}s"
        time.sleep(0.05)


def _nothing_left(run_dir) -> None:
    with open("/proc/swaps") as swaps:
        assert str(run_dir) not in swaps.read()
    assert str(run_dir) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    with open("/proc/mounts") as mounts:
        assert str(run_dir) not in mounts.read()


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "clear"])
def test_migrate_the_checker_guest_to_another_host(guest_image, run_dir, processes, swap_lock, tls):
    append = "memcheck.seed=23 memcheck.mode=write"
    with two_hosts() as hosts:
        src, dst = hosts.source, hosts.destination
        certs = make_certificates(run_dir / "tls", {"src": src.address, "dst": dst.address}) if tls else {}
        source = Vm(guest_image, run_dir, name="src", memory_mib=192, ram="file", append=append, extra_qmp=1,
                    wrapper=src.enter)
        destination = Vm(guest_image, run_dir, name="dst", memory_mib=192, ram="ram", incoming=True, append=append,
                         extra_qmp=1, wrapper=dst.enter)
        with source, destination:
            source.console.wait_for(PassOk, timeout=60)
            log = run_dir / "receive.log"
            with open(log, "wb") as out:
                receiver = processes.start([*dst.enter, *CLI, "receive", "--qmp", destination.extra_qmp_paths[0],
                                            "--listen", f"tcp:{dst.address}:{CHANNEL_PORT}", *certs.get("dst", []),
                                            "--work-dir", run_dir / "rcv"], stdout=out, stderr=subprocess.STDOUT)
            wait_for_line(log, "waiting for a sender", receiver)
            shaping = [] if tls else ["--prefetch-bandwidth", "4gbit"]  # installed, and removed again
            with AffinityWatch(str(run_dir)) as watch:
                sent = subprocess.run([*src.enter, *CLI, "migrate", "--source-qmp", source.extra_qmp_paths[0],
                                       "--to", f"tcp:{dst.address}:{CHANNEL_PORT}", *certs.get("src", []), *shaping,
                                       "--work-dir", run_dir / "snd"], capture_output=True, text=True, timeout=300)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            watch.check_auto(page_server_too=False)  # receive pins its prefetcher; the source's server is not pinned
            if shaping:
                assert f"prefetch replies capped at 4000 Mbit/s on {src.interface}" in sent.stderr
                with NetNS(src.netns) as ns:
                    index = ns.link_lookup(ifname=src.interface)[0]
                    assert [q["handle"] for q in ns.get_qdiscs(index=index) if q["parent"] == 0xFFFFFFFF] == [0]
            assert "total to source release:" in sent.stdout and "pages prefetched:" in sent.stdout
            assert receiver.wait(120) == 0, log.read_text(errors="replace")
            assert ("(TLS)" in sent.stderr) is tls and ("run in clear" in sent.stderr) is (not tls)
            source.wait_exit(10)
            after = destination.console.mark()
            passes = destination.console.wait_for(PassOk, count=2, after=after, timeout=60)
            assert len(passes) == 2
            assert source.console.events(Failure) == [] and destination.console.events(Failure) == []
            assert destination.qmp.status() == "running"
    _nothing_left(run_dir)


# --- refusals ------------------------------------------------------------------------------------


def test_peers_from_another_ca_and_plaintext_are_refused(guest_image, run_dir, processes):
    with two_hosts() as hosts:
        src, dst = hosts.source, hosts.destination
        certs = make_certificates(run_dir / "tls", {"src": src.address, "dst": dst.address})
        other = make_certificates(run_dir / "other", {"src": src.address, "dst": dst.address}, ca_name="other")
        source = Vm(guest_image, run_dir, name="src", memory_mib=128, ram="file", extra_qmp=1, wrapper=src.enter)
        destination = Vm(guest_image, run_dir, name="dst", memory_mib=128, ram="ram", incoming=True, extra_qmp=1,
                         wrapper=dst.enter)
        with source, destination:
            log = run_dir / "receive.log"
            with open(log, "wb") as out:
                receiver = processes.start([*dst.enter, *CLI, "receive", "--qmp", destination.extra_qmp_paths[0],
                                            "--listen", f"tcp:{dst.address}:{CHANNEL_PORT}", *certs["dst"],
                                            "--work-dir", run_dir / "rcv"], stdout=out, stderr=subprocess.STDOUT)
            wait_for_line(log, "waiting for a sender", receiver)

            def send(*tls):
                return subprocess.run([*src.enter, *CLI, "migrate", "--source-qmp", source.extra_qmp_paths[0],
                                       "--to", f"tcp:{dst.address}:{CHANNEL_PORT}", *tls,
                                       "--work-dir", run_dir / "snd"], capture_output=True, text=True, timeout=60)

            foreign = send(*other["src"])  # a sender whose certificate another CA signed
            assert foreign.returncode == 1 and "nbd-postcopy migrate: error:" in foreign.stderr
            plain = send()  # no TLS at all
            assert plain.returncode == 1 and "nbd-postcopy migrate: error:" in plain.stderr
            wait_for_line(log, "refused a sender", receiver)
            assert log.read_text().count("refused a sender") == 2
            # and a receiver whose certificate another CA signed is refused by the sender
            # (SIGTERM, not Ctrl-C's SIGINT: a test run started in the background inherits SIGINT ignored)
            receiver.send_signal(signal.SIGTERM)
            assert receiver.wait(30) == 128 + signal.SIGTERM
            with open(run_dir / "receive2.log", "wb") as out:
                impostor = processes.start([*dst.enter, *CLI, "receive", "--qmp", destination.extra_qmp_paths[0],
                                            "--listen", f"tcp:{dst.address}:{CHANNEL_PORT}", *other["dst"],
                                            "--work-dir", run_dir / "rcv2"], stdout=out, stderr=subprocess.STDOUT)
            wait_for_line(run_dir / "receive2.log", "waiting for a sender", impostor)
            fooled = send(*certs["src"])
            assert fooled.returncode == 1 and "TLS with the receiver" in fooled.stderr, fooled.stderr
            impostor.send_signal(signal.SIGTERM)
            assert impostor.wait(30) == 128 + signal.SIGTERM
            assert source.qmp.status() == "running" and destination.qmp.status() == "inmigrate"
    _nothing_left(run_dir)


# --- outages after the switchover ------------------------------------------------------------------


class Migration:
    """receive and migrate --to running, the sender's output followed line by line."""

    def __init__(self, processes, run_dir: Path, hosts, source: Vm, destination: Vm, *receive_args: str):
        src, dst = hosts.source, hosts.destination
        self.log = run_dir / "receive.log"
        with open(self.log, "wb") as out:
            self.receiver = processes.start([*dst.enter, *CLI, "receive", "--qmp", destination.extra_qmp_paths[0],
                                             "--listen", f"tcp:{dst.address}:{CHANNEL_PORT}", "--work-dir",
                                             run_dir / "rcv", *receive_args], stdout=out, stderr=subprocess.STDOUT)
        wait_for_line(self.log, "waiting for a sender", self.receiver)
        self.sender = processes.start([*src.enter, *CLI, "migrate", "--source-qmp", source.extra_qmp_paths[0],
                                       "--to", f"tcp:{dst.address}:{CHANNEL_PORT}", "--work-dir", run_dir / "snd"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.switched_over = threading.Event()
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        for line in self.sender.stdout:
            self.lines.append(line)
            if "the guest runs at the destination" in line:
                self.switched_over.set()

    def output(self) -> str:
        return "".join(self.lines)

    def page_server_pid(self) -> int:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1])
                    cmdline = Path(entry, "cmdline").read_bytes().split(b"\0")
                except (OSError, IndexError):
                    continue
                if ppid == self.sender.pid and b"serve" in cmdline:
                    return int(entry.name)
        raise AssertionError("no page server under the sender")


def set_link(host, up: bool) -> None:
    with NetNS(host.netns) as ns:
        ns.link("set", index=ns.link_lookup(ifname=host.interface)[0], state="up" if up else "down")


def _vms(guest_image, run_dir, hosts, mib=192, append="memcheck.seed=31 memcheck.mode=write"):
    return (Vm(guest_image, run_dir, name="src", memory_mib=mib, ram="file", append=append, extra_qmp=1,
               wrapper=hosts.source.enter),
            Vm(guest_image, run_dir, name="dst", memory_mib=mib, ram="ram", incoming=True, append=append, extra_qmp=1,
               wrapper=hosts.destination.enter))


@pytest.mark.parametrize("outage", ["link_down_3s", "page_server_killed"])
def test_an_outage_after_the_switchover_costs_only_a_stall(guest_image, run_dir, processes, swap_lock, outage):
    with two_hosts() as hosts:
        source, destination = _vms(guest_image, run_dir, hosts)
        with source, destination:
            source.console.wait_for(PassOk, timeout=60)
            migration = Migration(processes, run_dir, hosts, source, destination)
            assert migration.switched_over.wait(120), migration.output()
            if outage == "link_down_3s":
                set_link(hosts.source, up=False)
                time.sleep(3)
                set_link(hosts.source, up=True)
            else:
                os.kill(migration.page_server_pid(), signal.SIGKILL)
            assert migration.sender.wait(180) == 0, migration.output()
            assert migration.receiver.wait(120) == 0, migration.log.read_text(errors="replace")
            if outage == "page_server_killed":
                assert "restarting it on the same RAM" in migration.output()
            passes = destination.console.wait_for(PassOk, count=2, after=destination.console.mark(), timeout=60)
            assert len(passes) == 2
            assert destination.console.events(Failure) == [] and source.console.events(Failure) == []
    _nothing_left(run_dir)


def test_a_link_down_past_the_timeout_ends_both_sides_as_documented(guest_image, run_dir, processes, swap_lock):
    """The device's reads give up after --timeout: the guest dies (an EIO on swap-in kills it), the receiver
    takes the device down and says so, the sender stops serving and leaves the paused source intact."""
    with two_hosts() as hosts:
        source, destination = _vms(guest_image, run_dir, hosts, append="memcheck.seed=37 memcheck.mode=write")
        with source, destination:
            source.console.wait_for(PassOk, timeout=60)
            migration = Migration(processes, run_dir, hosts, source, destination, "--timeout", "2")
            assert migration.switched_over.wait(120), migration.output()
            set_link(hosts.source, up=False)
            assert migration.receiver.wait(60) == 1
            set_link(hosts.source, up=True)
            assert migration.sender.wait(120) == 1
            receiver_log = migration.log.read_text(errors="replace")
            assert "the destination QEMU" in receiver_log and "exited after the switchover" in receiver_log
            assert "the destination gave up after the switchover" in migration.output()
            assert source.qmp.status() == "postmigrate"  # paused, its memory intact: 'cont' would resume it
    _nothing_left(run_dir)
