"""`nbd-postcopy migrate --to`: the source half of a migration between two hosts (docs/DESIGN.md, "Two hosts").

  1. check the source QEMU (running, RAM on a shared backend); connect to the waiting `receive`; hello
  2. serve the source RAM on TCP (TLS with certificates) with the freeze gate closed, under a fixed
     instance id; optionally shape the egress (--prefetch-bandwidth); source
  3. the receiver attaches, stages and arms, and has its QEMU listen: ready
  4. QEMU sends device state straight to the destination QEMU (x-ignore-shared); the gate opens the
     moment the source stops (QMP STOP); resumed
  5. the page server is watched from now on: if it dies it is restarted at once on the same RAM, port and
     identity, and the device reconnects; progress until local
  6. release: quit the source QEMU (unless --keep-source), stop the page server; released; the receiver
     completes and detaches, and its done carries the report printed here.

Before the switchover any failure (or Ctrl-C) rolls back to a running source and tells the receiver to
roll back too. After it, the source and its page server stay up until every page is local; if the
channel breaks then, they are left running and the error says so.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..common.linux import free_port
from ..common.progress import Progress
from ..common.qmp import Qmp, QmpEvent, VmError
from ..common.units import bracket
from ..source.shaping import PrefetchShaping, ShapingError, interface_towards
from . import channel as ch
from .destination import StepDriver, check_shared_ram, wait_migration_completed
from .migrate import MigrateError, MigrationReport, _connect
from .pageserver import PageServerError, PageServerProcess
from .ram import RAM_ID, RamRegion

log = logging.getLogger(__name__)

READY_TIMEOUT = 900.0  # the receiver attaches and stages the whole RAM before it answers
MIGRATION_TIMEOUT = 300.0
RESUMED_TIMEOUT = 60.0
LOCAL_TIMEOUT = 24 * 3600.0  # every page local: as long as the link needs (progress arrives every second)
DONE_TIMEOUT = 600.0


class Phase(enum.IntEnum):
    STARTING = 0
    CONNECTED = 1
    SERVING = 2
    SWITCHING = 3  # QEMU sends the device state; the source stops during this phase
    RESUMED = 4  # the guest runs at the destination and needs this source until every page is local
    RELEASED = 5
    DONE = 6


@dataclass
class SendOptions:
    source_qmp: Path
    host: str  # the receiver, as given in --to tcp:HOST:PORT
    port: int
    work_dir: Path
    tls: ch.TlsFiles | None = None
    page_listen: tuple[str, int] | None = None  # default: this host's address towards HOST, a free port
    prefetch_bandwidth: int | None = None  # bits/s
    interface: str | None = None
    memdev: str = RAM_ID
    release_source: bool = True
    quiet: bool = False
    stream: TextIO | None = None


class Sender(StepDriver):
    name = "migrate"

    def __init__(self, options: SendOptions):
        self.o = options
        self.work = Path(options.work_dir)
        self.stream = options.stream if options.stream is not None else sys.stderr
        self.phase = Phase.STARTING
        self.channel: ch.Channel | None = None
        self.server: PageServerProcess | None = None

    def run(self) -> tuple[MigrationReport, dict]:
        self.work.mkdir(parents=True, exist_ok=True)
        qmp = _connect(self.o.source_qmp, "source")
        try:
            with contextlib.ExitStack() as stack:
                try:
                    return self._run(qmp, stack)
                except BaseException as exc:
                    self._fail(qmp, exc)
                    raise
        finally:
            if self.channel is not None:
                self.channel.close()
            qmp.close()

    def _run(self, qmp: Qmp, stack: contextlib.ExitStack) -> tuple[MigrationReport, dict]:
        src_pid = qmp.peer_pid()
        ram = self._check(qmp, src_pid)
        if self.o.tls is None:
            self.say("warning: no certificates: the control channel, the page stream and QEMU's migration "
                     "stream run in clear")
        self.channel = ch.connect(self.o.host, self.o.port, self.o.tls)
        chan = self.channel
        chan.send("hello", version=ch.PROTOCOL_VERSION, guest_bytes=ram.length, memdev=self.o.memdev)
        chan.expect("welcome", 30.0)
        self._enter(Phase.CONNECTED)
        self.say(f"connected to the receiver at {chan.peer}" + (" (TLS)" if chan.tls else ""))

        page_host, page_port = self.o.page_listen or (self._local_address(), 0)
        page_port = page_port or free_port(page_host)
        if self.o.prefetch_bandwidth:
            interface = self.o.interface or interface_towards(self.o.host)
            try:
                stack.enter_context(PrefetchShaping(interface, self.o.prefetch_bandwidth))
            except ShapingError as exc:
                raise MigrateError(str(exc)) from None
            self.say(f"prefetch replies capped at {self.o.prefetch_bandwidth / 1e6:g} Mbit/s on {interface}")
        self.server = PageServerProcess(ram.serve_args(src_pid), [f"tcp:{bracket(page_host)}:{page_port}"],
                                        self.work / "source-server.log", extra_args=self._server_tls_args())
        try:
            self.server.start()
        except PageServerError as exc:
            raise MigrateError(str(exc)) from None
        scheme = "nbds" if self.o.tls else "nbd"
        uri = f"{scheme}://{bracket(page_host)}:{page_port}/"
        self._enter(Phase.SERVING)
        self.say(f"serving the source RAM ({ram.length >> 20} MiB) on {uri}, gate closed, instance "
                 f"{self.server.instance}")
        chan.send("source", uri=uri, instance=self.server.instance)
        migration_port = chan.expect("ready", READY_TIMEOUT)["migration_port"]

        self.say("migrating device state (x-ignore-shared)")
        self._enter(Phase.SWITCHING)
        started, stop, info = self._switch_over(qmp, migration_port)
        chan.expect("resumed", RESUMED_TIMEOUT)
        resumed_at = time.monotonic()
        self._enter(Phase.RESUMED)
        self.server.watch()  # from now on a dead page server is restarted at once
        self.say(f"the guest runs at the destination ({(resumed_at - stop.host_time) * 1000:.1f} ms after the "
                 "source stopped)")
        self._wait_local(ram)
        released_at = self._release(qmp)
        self._enter(Phase.RELEASED)
        chan.send("released")
        report = chan.expect("done", DONE_TIMEOUT)["report"]
        self._enter(Phase.DONE)
        return MigrationReport(
            guest_bytes=report["guest_bytes"],
            stage_seconds=report["stage_seconds"],
            downtime_ms=info.get("downtime"),
            switchover_to_resume_ms=(resumed_at - stop.host_time) * 1000,
            complete_seconds=report["complete_seconds"],
            total_seconds=released_at - started,
            device_state_bytes=info.get("ram", {}).get("transferred", 0),
            pages_demand=report["pages_demand"],
            pages_prefetch=report["pages_prefetch"],
            pages_without_fetch=report["pages_without_fetch"],
            fault_p50_ms=report["fault_p50_ms"],
            fault_p99_ms=report["fault_p99_ms"],
            source_released=self.o.release_source,
        ), report

    # --- the steps -----------------------------------------------------------------------------------

    def _check(self, qmp: Qmp, src_pid: int) -> RamRegion:
        return check_shared_ram(qmp, src_pid, self.o.memdev)

    def _local_address(self) -> str:
        """This host's address on the route to the receiver (where the receiver can reach our page server)."""
        return self.channel.local_address()

    def _server_tls_args(self) -> list[str]:
        tls = self.o.tls
        if tls is None:
            return []
        return ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca), "--tls", "require"]

    def _switch_over(self, qmp: Qmp, port: int) -> tuple[float, QmpEvent, dict]:
        qmp.set_capabilities(x_ignore_shared=True, events=True)
        if (tls := self.o.tls) is not None:
            qmp.execute("object-add", qom_type="tls-creds-x509", id="nbdpc-tls", endpoint="client",
                        dir=str(tls.layout(self.work / "tls-client", "client")))
            qmp.set_parameters(tls_creds="nbdpc-tls", tls_hostname=self.o.host)
        mark = qmp.mark()
        server = self.server

        def open_gate(event: QmpEvent) -> None:
            if event.name == "STOP":
                server.open_gate()

        qmp.on_event(open_gate)
        started = time.monotonic()
        qmp.migrate(f"tcp:{bracket(self.o.host)}:{port}")
        wait_migration_completed(qmp, mark, MIGRATION_TIMEOUT)
        stop = qmp.wait_event("STOP", after=mark, timeout=10)
        return started, stop, qmp.query_migrate()

    def _wait_local(self, ram: RamRegion) -> None:
        bar = None
        deadline = time.monotonic() + LOCAL_TIMEOUT
        while True:
            message = self.channel.receive(max(1.0, deadline - time.monotonic()))
            if message.type == "local":
                break
            if message.type != "progress":
                raise MigrateError(f"the receiver sent {message.type} before every page was local")
            if bar is None:
                bar = Progress("fetching", message["pages"], quiet=self.o.quiet, stream=self.stream)
            bar.update(message["pages"] - message["remaining"])
            if not self.server.alive():
                self.say("the page server died; restarting it")
        if bar is not None:
            bar.update(bar.total)
            bar.finish("every page is local")

    def _release(self, qmp: Qmp) -> float:
        if self.o.release_source:
            qmp.execute("quit", timeout=10)
        self.server.stop()
        self.say("every page is local: the source " + ("was released" if self.o.release_source else
                                                         "is no longer needed (left running as asked)"))
        return time.monotonic()

    def _fail(self, qmp: Qmp, exc: BaseException) -> None:
        reason = str(exc) or type(exc).__name__
        if self.phase < Phase.RESUMED:
            self.say(f"failed ({reason}); rolling back: the source keeps running")
            if self.channel is not None and not isinstance(exc, ch.PeerFailed):
                with contextlib.suppress(ch.ChannelError):
                    self.channel.send("abort", reason=reason)
            with contextlib.suppress(VmError):
                if qmp.status() in ("postmigrate", "paused", "finish-migrate"):
                    qmp.execute("cont")
            if self.server is not None:
                self.server.stop()
            return
        if self.phase < Phase.RELEASED and isinstance(exc, ch.PeerFailed):
            # The receiver gave up after the switchover (its QEMU is gone): nothing fetches any more.
            if self.server is not None:
                self.server.stop()
            self.say(f"the destination gave up after the switchover: {reason}. The source QEMU is paused here; "
                     "the page server is stopped")
            return
        if self.phase < Phase.RELEASED:
            pid = self.server.pid if self.server is not None else None
            self.say(f"failed after the switchover ({reason}): the guest runs at the destination and needs this "
                     f"source until every page is there: the source QEMU and the page server (pid {pid}) stay up. "
                     "Quit them once the destination's 'receive' reports every page local.")


def migrate_to(options: SendOptions) -> tuple[MigrationReport, dict]:
    return Sender(options).run()
