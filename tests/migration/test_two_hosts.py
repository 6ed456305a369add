"""Migration between two hosts: `nbd-postcopy receive` in one network namespace, `nbd-postcopy migrate --to`
in another, each beside its own QEMU (TCG), over a veth link; with and without TLS."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbd_postcopy.testbench.guest import Failure, PassOk, prepare_guest
from nbd_postcopy.testbench.vm import Vm
from tests.conftest import wait_for_path
from tests.netns import two_hosts

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
            sent = subprocess.run([*src.enter, *CLI, "migrate", "--source-qmp", source.extra_qmp_paths[0],
                                   "--to", f"tcp:{dst.address}:{CHANNEL_PORT}", *certs.get("src", []),
                                   "--work-dir", run_dir / "snd"], capture_output=True, text=True, timeout=300)
            assert sent.returncode == 0, sent.stdout + sent.stderr
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
