"""plugin/postcopy.py in real nbdkit, against the real source server (`nbd-postcopy serve`), driven by
python3-libnbd; and one real kernel swap round trip (nbdfuse + loop + swapon)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import nbd
import pytest

from nbd_postcopy.common.units import PAGE_SIZE
from nbd_postcopy.device import swapheader
from nbd_postcopy.device.config import PluginConfig
from nbd_postcopy.device.control import request
from nbd_postcopy.device.markers import MarkerCodec
from nbd_postcopy.common.units import parse_size
from tests.conftest import PLUGIN, wait_for_path
from tests.servers import free_tcp_port, serve, stop, write_image
from tests.swapdev import thread_affinities

P = PAGE_SIZE
PAGES = 1024  # a 4 MiB guest
ZERO_RANGE = (100 * P, 20 * P)  # guest pages 100..119 are a hole in the source image
SAME_SOURCE = ("--instance-id", "source-1")  # a page server restarted on the same RAM keeps its identity


@pytest.fixture
def key_file(run_dir) -> Path:
    path = run_dir / "key"
    path.write_bytes(os.urandom(32))
    return path


@pytest.fixture
def image(run_dir) -> Path:
    path = run_dir / "ram.img"
    write_image(path, PAGES * P, holes=[ZERO_RANGE])
    return path


@pytest.fixture
def source(run_dir, image):
    """The real source server on a Unix socket in run_dir (restartable on the same path)."""
    with serve("nbd-postcopy", run_dir, image=image) as server:
        yield server


class Plugin:
    """nbdkit running plugin/postcopy.py on a Unix socket; its stderr goes to a log file."""

    def __init__(self, processes, run_dir: Path, source_uri: str, key_file: Path, *extra: str,
                 nbdkit_options: tuple[str, ...] = ()):
        self.socket = run_dir / "dev.sock"
        self.control = run_dir / "ctl.sock"
        self.log = run_dir / "nbdkit.log"
        argv = [
            "nbdkit", "-f", *nbdkit_options, "-U", self.socket, "python", PLUGIN,
            f"source={source_uri}", f"pages={PAGES}", f"key={key_file}", f"control={self.control}",
            f"cache-dir={run_dir}", *extra,
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = processes.start(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for_path(self.control, proc=self.proc)
        self.codec = MarkerCodec(key_file.read_bytes())

    def connect(self) -> nbd.NBD:
        handle = nbd.NBD()
        handle.connect_unix(str(self.socket))
        return handle

    def status(self) -> dict:
        return request(str(self.control), "status")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def stage(plugin: Plugin, handle: nbd.NBD, mapping: dict[int, int]) -> None:
    for slot, guest in mapping.items():
        handle.pwrite(plugin.codec.page(guest), slot * P)


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)


def test_markers_then_reads_return_source_pages(processes, run_dir, source, image, key_file):
    plugin = Plugin(processes, run_dir, source.uri("unix"), key_file, "prefetch=off")
    data = image.read_bytes()
    handle = plugin.connect()
    assert handle.get_size() == (1 + PAGES + 4096) * P
    assert swapheader.parse(handle.pread(P, 0))["last_page"] == PAGES + 4096
    # a kernel readahead window: slots 1..8 hold guest 500..503, 7, 8, 102 (zero), 900
    mapping = {1: 500, 2: 501, 3: 502, 4: 503, 5: 7, 6: 8, 7: 102, 8: 900}
    stage(plugin, handle, mapping)
    assert handle.pread(P, 2 * P) == plugin.codec.page(501)  # not armed: the marker again
    assert plugin.status()["mapped"] == 8 and not plugin.status()["armed"]
    assert request(str(plugin.control), "arm") == {"ok": True, "armed": True}
    expected = b"".join(data[g * P : (g + 1) * P] for g in mapping.values())
    assert handle.pread(8 * P, P) == expected
    assert handle.pread(8 * P, P) == expected  # now local
    status = plugin.status()
    assert status["remaining"] == 0 and status["complete"] and status["source_connected"]
    assert status["fetched_demand"] == 7 and status["fetched_zero"] == 1  # guest page 102 is zeros
    handle.shutdown()


def test_demand_store_off_hands_pages_over_and_keeps_no_copy(processes, run_dir, source, image, key_file):
    plugin = Plugin(processes, run_dir, source.uri("unix"), key_file, "prefetch=off", "demand-store=off")
    data = image.read_bytes()
    handle = plugin.connect()
    mapping = {1: 500, 2: 501, 3: 102, 4: 900}  # guest page 102 is zeros
    stage(plugin, handle, mapping)
    request(str(plugin.control), "arm")
    blocks = page_file_blocks(plugin.proc.pid, run_dir)
    expected = b"".join(data[g * P : (g + 1) * P] for g in mapping.values())
    for _ in range(2):  # the second read fetches again: nothing was kept
        assert handle.pread(4 * P, P) == expected
    status = plugin.status()
    assert status["remaining"] == 4 and status["local"] == 0 and not status["complete"]
    assert status["fetched_demand"] == 3 and status["fetched_zero"] == 1  # pages, each counted once
    assert status["fetched_bytes"] == 2 * 4 * P  # but fetched twice
    assert page_file_blocks(plugin.proc.pid, run_dir) == blocks
    handle.shutdown()


def test_overlay_trim_and_unaligned_writes(processes, run_dir, source, key_file):
    plugin = Plugin(processes, run_dir, source.uri("unix"), key_file, "prefetch=off", "armed=yes")
    handle = plugin.connect()
    data = os.urandom(5 * P)
    handle.pwrite(data, 10 * P)
    handle.pwrite(b"hello", 12 * P + 4000)
    expected = bytearray(data)
    expected[2 * P + 4000 : 2 * P + 4005] = b"hello"
    assert handle.pread(5 * P, 10 * P) == bytes(expected)
    handle.trim(3 * P, 10 * P)
    assert handle.pread(3 * P, 10 * P) == bytes(3 * P)
    assert handle.pread(2 * P, 13 * P) == bytes(expected[3 * P :])
    status = plugin.status()
    assert status["overlay_pages"] == 2 and status["anomalies"] == 0
    handle.shutdown()


def page_file_mapping(pid: int, cache_dir: Path) -> dict[str, int]:
    """The smaps fields (kB) of the plugin's mapping of its page file (an unlinked file in cache_dir)."""
    fields: dict[str, int] = {}
    current = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5:  # a mapping's first line: range perms offset dev inode [path]
            current = len(head) >= 6 and head[5].startswith(str(cache_dir))
        elif current and line.endswith(" kB"):
            fields[head[0].rstrip(":")] = int(head[1])
    if not fields:
        raise AssertionError(f"no mapping of a file in {cache_dir} in /proc/{pid}/smaps")
    return fields


def page_file_blocks(pid: int, cache_dir: Path) -> int:
    """The blocks allocated to the plugin's page file (the unlinked file in cache_dir that it holds open)."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        if os.readlink(fd).startswith(f"{cache_dir}/"):
            return os.stat(fd).st_blocks
    raise AssertionError(f"nbdkit {pid} holds no file in {cache_dir} open")


def test_page_file_reads_stay_unlocked_under_nbdkit_swap(processes, run_dir, source, key_file):
    """nbdkit --swap locks all its memory (mlockall, current and future mappings); the page file's
    read mapping must stay out of it, or reading a guest's pages would pin them all."""
    plugin = Plugin(processes, run_dir, source.uri("unix"), key_file, "prefetch=off", "armed=yes",
                    nbdkit_options=("--swap",))
    handle = plugin.connect()
    data = os.urandom(16 << 20)
    handle.pwrite(data, P)  # overlay in the page file
    assert handle.pread(len(data), P) == data  # read back through the mapping
    mapping = page_file_mapping(plugin.proc.pid, run_dir)
    assert mapping["Rss"] >= 16 << 10 and mapping["Locked"] == 0
    handle.shutdown()


def test_staging_warms_the_page_file_unlocked_under_nbdkit_swap(processes, run_dir, source, image, key_file):
    """warm=on (the default): the page file's pages of the staged slots are brought into memory before
    arming, through the same unlocked mapping (nbdkit --swap must not pin them), and reads after arming
    are right."""
    plugin = Plugin(processes, run_dir, source.uri("unix"), key_file, "prefetch=off", nbdkit_options=("--swap",))
    handle = plugin.connect()
    stage(plugin, handle, {slot: slot - 1 for slot in range(1, PAGES + 1)})
    wait_until(lambda: plugin.status()["page_file_warmed"] >= PAGES, what="page file warmed")
    mapping = page_file_mapping(plugin.proc.pid, run_dir)
    assert mapping["Rss"] >= PAGES * P >> 10 and mapping["Locked"] == 0
    request(str(plugin.control), "arm")
    assert handle.pread(64 * P, 100 * P) == image.read_bytes()[99 * P : 163 * P]
    handle.shutdown()


def test_prefetcher_makes_everything_local(processes, run_dir, source, image, key_file):
    plugin = Plugin(processes, run_dir, source.uri("unix"), key_file)
    handle = plugin.connect()
    stage(plugin, handle, {slot: slot - 1 for slot in range(1, PAGES + 1)})
    request(str(plugin.control), "arm")
    wait_until(lambda: request(str(plugin.control), "wait-local")["complete"], what="prefetch completion")
    status = plugin.status()
    assert status["fetched_prefetch"] + status["fetched_demand"] == PAGES - 20  # zero pages are not fetched
    wait_until(lambda: "all pages are local: the source can be released" in plugin.log_text(), what="log line")
    stop(source)
    assert handle.pread(PAGES * P, P) == image.read_bytes()
    handle.shutdown()


def test_prefetch_cpus_pins_the_prefetcher_thread_and_nothing_else(processes, run_dir, source, image, key_file):
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    last = max(allowed)
    plugin = Plugin(processes, run_dir, source.uri("unix"), key_file, f"prefetch-cpus={last}")
    handle = plugin.connect()
    stage(plugin, handle, {slot: slot - 1 for slot in range(1, PAGES + 1)})
    request(str(plugin.control), "arm")
    wait_until(lambda: request(str(plugin.control), "wait-local")["complete"], what="prefetch completion")
    affinities = list(thread_affinities(plugin.proc.pid).values())
    assert affinities.count({last}) == 1, affinities  # the prefetcher
    assert all(cpus == allowed for cpus in affinities if cpus != {last}), affinities
    assert handle.pread(PAGES * P, P) == image.read_bytes()
    handle.shutdown()


def test_reads_wait_for_the_source_to_come_back(processes, run_dir, image, key_file):
    with serve("nbd-postcopy", run_dir, image=image, extra=SAME_SOURCE) as server:
        uri = server.uri("unix")
        plugin = Plugin(processes, run_dir, uri, key_file, "prefetch=off", "timeout=30")
        handle = plugin.connect()
        stage(plugin, handle, {1: 10, 2: 11})
        request(str(plugin.control), "arm")
    wait_until(lambda: not plugin.status()["source_connected"], what="source down")
    result = {}
    reader = threading.Thread(target=lambda: result.setdefault("data", handle.pread(2 * P, P)))
    reader.start()
    time.sleep(1.0)
    assert reader.is_alive()  # waiting, not failing
    with serve("nbd-postcopy", run_dir, image=image, extra=SAME_SOURCE):
        reader.join(20)
        assert result["data"] == image.read_bytes()[10 * P : 12 * P]
        status = plugin.status()
        assert status["source_connected"] and status["reconnects"] == 1 and status["outage_seconds"] > 1.0
    log = plugin.log_text()
    assert "source connection is down" in log and "source connection is up" in log
    handle.shutdown()


def test_source_down_past_the_timeout_is_eio(processes, run_dir, image, key_file):
    with serve("nbd-postcopy", run_dir, image=image, extra=SAME_SOURCE) as server:
        plugin = Plugin(processes, run_dir, server.uri("unix"), key_file, "prefetch=off", "timeout=1", "armed=yes")
        handle = plugin.connect()
        stage(plugin, handle, {1: 10})
    started = time.monotonic()
    with pytest.raises(nbd.Error) as failure:
        handle.pread(P, P)
    assert failure.value.errnum == errno.EIO
    assert 0.9 < time.monotonic() - started < 10
    assert plugin.status()["source_errors"] == 1
    assert "demand fetch of 1 pages (guest pages 10..) failed: SourceUnavailable" in plugin.log_text()
    with serve("nbd-postcopy", run_dir, image=image, extra=SAME_SOURCE):
        wait_until(lambda: plugin.status()["source_connected"], what="reconnect")
        assert handle.pread(P, P) == image.read_bytes()[10 * P : 11 * P]
    handle.shutdown()


def test_a_restarted_source_with_another_image_is_refused_and_never_read(processes, run_dir, image, key_file):
    """Another machine's RAM of the same size, served at the same address: the device refuses it (logged,
    counted), the read waits and fails with EIO at the timeout, and not one byte is read from it."""
    other = run_dir / "other.img"
    other.write_bytes(bytes(reversed(image.read_bytes())))
    with serve("nbd-postcopy", run_dir, image=image) as server:
        plugin = Plugin(processes, run_dir, server.uri("unix"), key_file, "prefetch=off", "timeout=3", "armed=yes")
        handle = plugin.connect()
        stage(plugin, handle, {1: 10, 2: 11})
        assert handle.pread(P, P) == image.read_bytes()[10 * P : 11 * P]
    wait_until(lambda: not plugin.status()["source_connected"], what="source down")
    port = free_tcp_port()
    with serve("nbd-postcopy", run_dir, image=other, extra=("--metrics-listen", f"127.0.0.1:{port}")):
        with pytest.raises(nbd.Error) as failure:
            handle.pread(P, 2 * P)
        assert failure.value.errnum == errno.EIO
        status = plugin.status()
        assert status["source_refusals"] >= 1 and not status["source_connected"] and status["remaining"] == 1
        served = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "nbd_postcopy_server_read_bytes_total 0.0" in served
    assert "is not the same source (instance id" in plugin.log_text()
    with serve("nbd-postcopy", run_dir, image=other):
        with pytest.raises(nbd.Error):  # still refused: no restart of another source is ever accepted
            handle.pread(P, 2 * P)
    handle.shutdown()


def test_a_pinned_source_id_refuses_any_other_server(processes, run_dir, image, key_file):
    with serve("nbd-postcopy", run_dir, image=image, extra=("--instance-id", "vm1-ram")) as server:
        plugin = Plugin(processes, run_dir, server.uri("unix"), key_file, "prefetch=off", "armed=yes",
                        "source-id=vm1-ram")
        handle = plugin.connect()
        stage(plugin, handle, {1: 10})
        assert handle.pread(P, P) == image.read_bytes()[10 * P : 11 * P]
        handle.shutdown()
    with serve("nbd-postcopy", run_dir, image=image) as server:
        failed = run_plugin_config(f"source={server.uri('unix')}", f"pages={PAGES}", f"key={key_file}",
                                   "source-id=vm1-ram", socket=str(run_dir / "pinned.sock"))
    assert failed.returncode != 0 and "is not the same source (instance id" in failed.stderr, failed.stderr


def test_metrics_pass_promtool(processes, run_dir, source, key_file):
    port = free_tcp_port()
    plugin = Plugin(processes, run_dir, source.uri("unix"), key_file, "prefetch=off", f"metrics=127.0.0.1:{port}")
    handle = plugin.connect()
    stage(plugin, handle, {1: 1, 2: 2, 3: 3})
    request(str(plugin.control), "arm")
    handle.pread(3 * P, P)
    handle.pread(P, 500 * P)  # never-written slots: an anomaly
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples['nbd_postcopy_pages_fetched_total{reason="demand"}']) == 3
    assert float(samples["nbd_postcopy_fault_seconds_count"]) == 1
    assert float(samples["nbd_postcopy_pages_mapped"]) == 3
    assert float(samples["nbd_postcopy_complete"]) == 1
    assert float(samples['nbd_postcopy_anomalies_total{kind="unmapped_read"}']) == 1
    handle.shutdown()


def test_control_socket_unknown_command(processes, run_dir, source, key_file):
    plugin = Plugin(processes, run_dir, source.uri("unix"), key_file, "prefetch=off")
    assert "unknown command 'frob'" in request(str(plugin.control), "frob")["error"]


def run_plugin_config(*params: str, socket: str = "/nonexistent/never.sock") -> subprocess.CompletedProcess:
    """nbdkit with the plugin and `params`, expected to fail at startup."""
    return subprocess.run(
        ["nbdkit", "-f", "-U", socket, "python", str(PLUGIN), *params],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize(
    "params, message",
    [
        (["bogus=1"], "unknown key 'bogus'; valid keys: source, pages, size, key"),
        (["pages=10"], "missing required key(s): source, key"),
        (["source=nbd+unix:///?socket=/x", "key=KEY"], "missing required key(s): pages (or size)"),
        (["pages=ten"], "pages=ten: not a non-negative integer"),
        (["size=12345"], "size=12345: must be a positive multiple of 4096"),
        (["pages=1", "size=4096"], "give either pages= or size=, not both"),
        (["key=SHORT"], "holds 8 bytes; it needs at least 16 random bytes"),
        (["key=/nonexistent/key"], "cannot read key file /nonexistent/key"),
        (["source=http://host/x"], "scheme must be one of nbd://"),
        (["timeout=-1"], "timeout=-1: must be a positive number of seconds"),
        (["prefetch=maybe"], "prefetch=maybe: must be one of on, off"),
        (["demand-store=yes"], "demand-store=yes: must be one of on, off"),
        (["label=" + "x" * 17], "longer than 16 bytes"),
        (["source-id=a b"], "source-id=a b: instance id 'a b': want 1..128 characters"),
        (["metrics=127.0.0.1:70000"], "metrics=127.0.0.1:70000: port 70000 out of range 0..65535"),
        (["control=/tmp/" + "x" * 120], "path longer than 107 bytes"),
        (["control=KEY"], "exists and is not a socket"),
        (["source=nbd+unix:///?socket=/x", "pages=10", "key=KEY", "prefetch=off", "replay=KEY"],
         "replay= needs the prefetcher, which prefetch=off turns off"),
        (["prefetch-cpus=one"], "prefetch-cpus=one: 'one' is not a CPU list (e.g. 1, or 0-3,6)"),
        (["prefetch-cpus=4095"], "prefetch-cpus=4095: CPU 4095 is not one this process may use"),
        (["source=nbd+unix:///?socket=/x", "pages=10", "key=KEY", "prefetch=off", "prefetch-cpus=0"],
         "prefetch-cpus= needs the prefetcher, which prefetch=off turns off"),
    ],
)
def test_config_errors_are_clear(run_dir, key_file, params, message):
    short = run_dir / "short"
    short.write_bytes(b"x" * 8)
    params = [p.replace("=KEY", f"={key_file}").replace("=SHORT", f"={short}") for p in params]
    result = run_plugin_config(*params)
    assert result.returncode != 0
    assert "nbdkit: postcopy: error: " in result.stderr and message in result.stderr, result.stderr


@pytest.mark.parametrize("keys, stored", [
    ([], False),  # the prefetcher stores the fault's neighbourhood, the page included
    (["prefetch=off"], True),
    (["prefetch=off", "demand-store=off"], False),
    (["demand-store=on"], True),
])
def test_demand_store_defaults_to_the_opposite_of_prefetch(key_file, keys, stored):
    config = PluginConfig()
    for item in ["source=nbd+unix:///?socket=/x", "pages=10", f"key={key_file}", *keys]:
        config.set(*item.split("=", 1))
    config.check_complete()
    assert config.demand_store is stored


def test_a_metrics_port_in_use_is_reported_with_the_key(run_dir, key_file):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_plugin_config(f"metrics=127.0.0.1:{port}", socket=str(run_dir / "dev.sock"))
    assert result.returncode != 0
    assert f"metrics=127.0.0.1:{port}: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert not (run_dir / "dev.sock").exists()  # refused before nbdkit made its socket


def test_dump_plugin_lists_keys():
    out = subprocess.run(["nbdkit", "python", str(PLUGIN), "--dump-plugin"], capture_output=True, text=True, check=True).stdout
    assert "postcopy_keys=source,pages,size,key,headroom,metrics,control,cache-dir,timeout,prefetch,armed,label,uuid,source-id,replay,warm,prefetch-cpus,demand-store" in out
    assert "thread_model=parallel" in out or "max_thread_model=parallel" in out


@contextlib.contextmanager
def kernel_swap(processes, run_dir: Path, plugin: Plugin):
    """nbdfuse + loop (direct I/O) + swapon over the plugin's export; all undone in finally."""
    mount = run_dir / "fuse"
    mount.mkdir()
    disk = mount / "disk"
    fuse = processes.start(["nbdfuse", disk, "--unix", plugin.socket])
    loop = None
    swapped = False
    try:
        wait_for_path(disk, proc=fuse)
        loop = subprocess.run(
            ["losetup", "--find", "--show", "--direct-io=on", disk], capture_output=True, text=True, check=True
        ).stdout.strip()
        subprocess.run(["swapon", "--priority", "-10", loop], check=True, capture_output=True, text=True)
        swapped = True
        yield loop
    finally:
        if swapped:
            subprocess.run(["swapoff", loop], check=False)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        subprocess.run(["fusermount3", "-u", mount], check=False, capture_output=True)
        fuse.wait(10)


@pytest.mark.slow
@pytest.mark.root
def test_swapon_accepts_the_plugins_own_header(processes, run_dir, source, key_file, swap_lock):
    plugin = Plugin(processes, run_dir, source.uri("unix"), key_file, "prefetch=off", "headroom=256")
    slots = 1 + PAGES + 256
    with kernel_swap(processes, run_dir, plugin) as loop:
        swaps = Path("/proc/swaps").read_text().splitlines()
        line = next(line.split() for line in swaps if line.startswith(loop + " "))
        assert int(line[2]) == (slots - 1) * P // 1024  # size in KiB: every slot but the header
    assert loop not in Path("/proc/swaps").read_text()


@pytest.mark.slow
def test_prometheus_scrapes_plugin_and_source(processes, run_dir, image, key_file):
    """A real Prometheus server scrapes the plugin and the source server; its HTTP API answers a query
    for the fetched-pages counter."""
    plugin_port, source_port, prometheus_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
    with serve("nbd-postcopy", run_dir, image=image, extra=["--metrics-listen", f"127.0.0.1:{source_port}"]) as server:
        plugin = Plugin(processes, run_dir, server.uri("unix"), key_file, "prefetch=off", f"metrics=127.0.0.1:{plugin_port}")
        handle = plugin.connect()
        stage(plugin, handle, {1: 1, 2: 2, 3: 3})
        request(str(plugin.control), "arm")
        handle.pread(3 * P, P)
        config = run_dir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n"
            f"  - job_name: device\n    static_configs:\n      - targets: ['127.0.0.1:{plugin_port}']\n"
            f"  - job_name: source\n    static_configs:\n      - targets: ['127.0.0.1:{source_port}']\n"
        )
        with open(run_dir / "prometheus.log", "wb") as log:
            processes.start(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={run_dir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def query(expr: str) -> list:
            url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                answer = json.loads(urllib.request.urlopen(url, timeout=5).read())
            except OSError:
                return []
            return answer["data"]["result"]

        demand = 'nbd_postcopy_pages_fetched_total{job="device",reason="demand"}'
        wait_until(lambda: query(demand) and query('up{job="source"}'), timeout=60, what="prometheus scrape")
        assert float(query(demand)[0]["value"][1]) == 3
        assert float(query('up{job="source"}')[0]["value"][1]) == 1
        handle.shutdown()


def test_unreachable_or_small_source_at_startup_is_a_clear_error(run_dir, image, key_file):
    result = run_plugin_config(
        f"source=nbd+unix:///?socket={run_dir}/none.sock", "pages=16", f"key={key_file}", "timeout=1",
        socket=str(run_dir / "a.sock"),
    )
    assert result.returncode != 0
    assert "nbdkit: postcopy: error: demand: cannot connect to nbd+unix:///?socket=" in result.stderr, result.stderr
    assert "within 1s" in result.stderr
    with serve("nbd-postcopy", run_dir, image=image) as server:
        result = run_plugin_config(
            f"source={server.uri('unix')}", f"pages={PAGES + 1}", f"key={key_file}", socket=str(run_dir / "b.sock")
        )
    assert result.returncode != 0
    assert f"holds {PAGES * P} bytes, less than pages={PAGES + 1}" in result.stderr, result.stderr


def test_parse_size():
    assert parse_size("4096") == 4096
    assert parse_size("256M") == parse_size("256MiB") == 256 << 20
    assert parse_size("1g") == 1 << 30 and parse_size("4k") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("12 apples")
