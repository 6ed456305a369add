"""Bad input to the commands: one clear line, a non-zero status, no traceback, and nothing left behind."""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "nbd_postcopy.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, status: int, text: str) -> None:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr and text in result.stderr, result.stderr
    if status == 1:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture
def not_qmp(run_dir: Path):
    """A Unix socket whose server accepts and says nothing (not QEMU)."""
    path = run_dir / "silent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        yield path
    finally:
        server.close()
        for conn, _ in accepted:
            conn.close()


def test_migrate_with_missing_qmp_sockets_says_it_once_and_leaves_no_work_directory(run_dir):
    result = subprocess.run([*CLI, "migrate", "--source-qmp", str(run_dir / "nope.qmp"), "--destination-qmp",
                             str(run_dir / "x.qmp")], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, TMPDIR=str(run_dir)))
    one_line_error(result, 1, "cannot talk to the source QEMU")
    assert glob.glob(f"{run_dir}/nbdpc-mig-*") == []


def test_migrate_to_a_socket_that_is_not_qmp(not_qmp, run_dir):
    result = run("migrate", "--source-qmp", str(not_qmp), "--destination-qmp", str(run_dir / "x.qmp"), timeout=60)
    one_line_error(result, 1, f"cannot talk to the source QEMU: no QMP handshake on {not_qmp}")


def test_migrate_work_dir_that_is_a_file(run_dir):
    afile = run_dir / "afile"
    afile.write_text("")
    result = run("migrate", "--source-qmp", "a", "--destination-qmp", "b", "--work-dir", str(afile))
    one_line_error(result, 1, f"--work-dir {afile} exists and is not a directory")


@pytest.mark.parametrize("args, text", [
    (["migrate", "--source-qmp", "a", "--destination-qmp", "b", "--prefetch-cpus", "4095"],
     "argument --prefetch-cpus: CPU 4095 is not one this process may use"),
    (["migrate", "--source-qmp", "a", "--destination-qmp", "b", "--prefetch-cpus", "most"],
     "argument --prefetch-cpus: 'most' is not a CPU list (e.g. 1, or 0-3,6); or give auto or all"),
    (["receive", "--qmp", "a", "--listen", "tcp:127.0.0.1:1", "--prefetch-cpus", "2-1"],
     "argument --prefetch-cpus: '2-1': the range runs backwards"),
])
def test_prefetch_cpus_it_may_not_use_are_usage_errors(args, text):
    one_line_error(run(*args), 2, text)


@pytest.mark.parametrize("option", [["--prefetch-cpus", "0"], ["--device-key", "warm=off"]])
def test_prefetch_cpus_or_device_keys_with_to_say_where_they_go(option):
    result = run("migrate", "--source-qmp", "a", "--to", "tcp:127.0.0.1:1", *option)
    one_line_error(result, 1, "--prefetch-cpus and --device-key go with --destination-qmp; with --to, give them "
                              "to `nbd-postcopy receive`, where the device and its prefetcher run")


@pytest.mark.parametrize("command", [["migrate", "--source-qmp", "a", "--destination-qmp", "b"],
                                     ["receive", "--qmp", "a", "--listen", "tcp:127.0.0.1:1"],
                                     ["restore", "dir", "--qmp", "a"]])
@pytest.mark.parametrize("key, text", [
    ("demand-store=yes", "argument --device-key: demand-store=yes: must be one of on, off"),
    ("key=/etc/passwd", "argument --device-key: key= cannot be given here (the command sets it itself); "
                        "--device-key takes cache-dir, warm, demand-store, headroom, timeout, label"),
])
def test_a_bad_device_key_is_a_usage_error(command, key, text):
    one_line_error(run(*command, "--device-key", key), 2, text)


def test_restore_of_a_directory_that_is_no_snapshot_says_so_before_it_talks_to_qemu(run_dir):
    (run_dir / "empty").mkdir()
    result = subprocess.run([*CLI, "restore", str(run_dir / "empty"), "--qmp", str(run_dir / "x.qmp")],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, TMPDIR=str(run_dir)))
    one_line_error(result, 1, f"{run_dir / 'empty'} is not a snapshot: it has no manifest.json")
    assert glob.glob(f"{run_dir}/nbdpc-rst-*") == []


def test_snapshot_with_a_missing_qmp_socket_writes_nothing(run_dir):
    result = run("snapshot", "--qmp", str(run_dir / "nope.qmp"), "--to", str(run_dir / "snap"))
    one_line_error(result, 1, "cannot talk to the snapshotted QEMU")
    assert sorted(p.name for p in run_dir.iterdir()) == []


@pytest.mark.parametrize("rate", ["0", "nan", "-3", "inf"])
def test_complete_refuses_a_bad_rate(rate):
    result = run("complete", "--pid", "1", "--address", "0x1000", "--length", "4096", "--rate-mib", rate)
    one_line_error(result, 2, f"argument --rate-mib: want a positive number of MiB/s, got '{rate}'")


def test_serve_a_directory(run_dir):
    result = run("serve", "--file", str(run_dir), "--listen", f"unix:{run_dir}/s.sock")
    one_line_error(result, 1, f"source file {run_dir} is a directory")


@pytest.mark.parametrize("args, status, text", [
    (["--address", "0x100000000000000000000"], 1, "address '0x100000000000000000000' is beyond 64 bits"),
    (["--metrics-listen", "127.0.0.1:70000"], 2, "port 70000 out of range"),
])
def test_serve_addresses_out_of_range(run_dir, args, status, text):
    base = ["--pid", str(subprocess.os.getpid()), "--address", "0x1000", "--length", "4096"]
    if args[0] == "--address":
        base = ["--pid", str(subprocess.os.getpid()), *args, "--length", "4096"]
        args = []
    result = run("serve", *base, *args, "--listen", f"unix:{run_dir}/s.sock")
    one_line_error(result, status, text)
