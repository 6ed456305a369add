"""`nbd-postcopy receive`: the destination half of a migration between two hosts (docs/DESIGN.md, "Two hosts").

It waits on --listen for one `nbd-postcopy migrate --to`, for the destination QEMU behind --qmp (started
with -incoming defer and anonymous RAM), and then, over the control channel (migration/channel.py):

  hello      check the VM's shape: the same RAM size, the memdev, -incoming defer, anonymous RAM; welcome
  source     the sender's page server, gate closed: generate the migration key here (it never leaves this
             host), attach the device pinned to that server's identity (source-id=), stage the RAM, arm
  ready      QEMU listens for the device state (x-ignore-shared; TLS with certificates)
  resumed    the guest runs here; progress while the prefetcher pulls; local once every page is here
  released   the source is gone (or the channel is): completion, detach, done with the report

The phase decides what a failure does: before the guest resumes, everything is rolled back (QEMU told to
quit, the device detached, the sender told so that the source keeps running); after it, the guest needs
the source until every page is here, so the device stays and the error says how to finish.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import quote

from ..common.linux import free_port
from ..common.qmp import Qmp, QmpEvent, VmError
from ..common.units import bracket
from ..device.control import ControlError, request
from ..device.markers import MarkerCodec
from ..host import attachment
from ..host.completion import complete_range
from ..host.staging import stage_range
from . import channel as ch
from .destination import (
    MigrateError,
    StepDriver,
    attach_device,
    check_destination_alive,
    check_incoming_ram,
    connect,
    detach_device,
    exited,
    fault_latency,
    pages_without_fetch,
    prefetch_cpus,
    prefetch_cpus_key,
    wait_for_prefetch,
    wait_gone,
    with_device_keys,
)
from .ram import RAM_ID, RamRegion

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT = None  # wait for a sender as long as it takes (Ctrl-C stops)
STEP_TIMEOUT = 120.0  # seconds for the sender's next message while it works (migration of device state)
RELEASE_TIMEOUT = 30.0  # seconds to wait for the sender's "released" once every page is here


class Phase(enum.IntEnum):
    WAITING = 0
    CHECKED = 1
    ATTACHED = 2
    ARMED = 3
    LISTENING = 4
    RESUMED = 5  # from here on the guest runs here and needs the source until LOCAL
    LOCAL = 6
    DONE = 7


@dataclass
class ReceiveOptions:
    qmp: Path
    listen_host: str
    listen_port: int
    work_dir: Path
    tls: ch.TlsFiles | None = None
    memdev: str = RAM_ID
    timeout: float | None = None  # the plugin's timeout=: how long a swap-in waits for an unreachable source
    prefetch_cpus: str = "auto"  # where the prefetcher runs (destination.prefetch_cpus)
    device_keys: tuple[str, ...] = ()  # more plugin keys for the device (destination.DEVICE_KEYS)
    quiet: bool = False
    stream: TextIO | None = None


class Receiver(StepDriver):
    name = "receive"

    def __init__(self, options: ReceiveOptions):
        self.o = options
        self.work = Path(options.work_dir)
        self.stream = options.stream if options.stream is not None else sys.stderr
        self.phase = Phase.WAITING
        self.swap_name = f"rcv{uuid.uuid4().hex[:8]}"
        self.swap_state = self.work / "swap"
        self.metrics_port = free_port()
        self.channel: ch.Channel | None = None
        self.control: Path | None = None
        self.dst_pid = 0

    def run(self) -> dict:
        self.work.mkdir(parents=True, exist_ok=True)
        qmp = connect(self.o.qmp, "destination")
        try:
            with ch.Listener(self.o.listen_host, self.o.listen_port, self.o.tls) as listener:
                if self.o.tls is None:
                    self.say("warning: no certificates: the control channel, the page stream and QEMU's "
                             "migration stream run in clear")
                self.say(f"waiting for a sender on {self.o.listen_host}:{listener.address[1]}")
                self.channel = listener.accept(ACCEPT_TIMEOUT,
                                               on_refused=lambda why: self.say(f"refused a sender: {why}"))
            self.say(f"sender {self.channel.peer} connected" + (" (TLS)" if self.channel.tls else ""))
            try:
                return self._run(qmp)
            except BaseException as exc:
                self._fail(qmp, exc)
                raise
        finally:
            if self.channel is not None:
                self.channel.close()
            qmp.close()

    def _run(self, qmp: Qmp) -> dict:
        chan = self.channel
        hello = chan.expect("hello", STEP_TIMEOUT)
        dst_pid = self.dst_pid = qmp.peer_pid()
        ram = self._check(qmp, dst_pid, hello)
        chan.send("welcome", version=ch.PROTOCOL_VERSION)
        self._enter(Phase.CHECKED)

        source = chan.expect("source", STEP_TIMEOUT)
        key = self.work / "key"
        key.write_bytes(os.urandom(32))
        os.chmod(key, 0o600)
        device = self._attach(source["uri"], source["instance"], ram.length, key)
        self._enter(Phase.ATTACHED)
        self.say(f"staging {ram.length >> 20} MiB of guest RAM (QEMU pid {dst_pid}) onto {device}")
        stage = stage_range(dst_pid, ram.address, ram.length, MarkerCodec.from_file(key), device,
                            control=str(self.control), quiet=self.o.quiet, stream=self.stream)
        if not self._device("arm").get("armed"):
            raise MigrateError("the device did not arm")
        if not self._device("status").get("source_connected"):
            raise MigrateError("the device is not connected to the source's page server")
        self._enter(Phase.ARMED)

        port = self._listen_for_device_state(qmp)
        mark = qmp.mark()
        chan.send("ready", migration_port=port)
        self._enter(Phase.LISTENING)
        self.say(f"QEMU waits for the device state on port {port}")

        resume = self._wait_resumed(qmp, dst_pid, mark)
        self._enter(Phase.RESUMED)
        chan.send("resumed")
        self.say("the guest runs here; fetching the rest of its memory")
        self._wait_local(qmp, dst_pid)
        self._enter(Phase.LOCAL)
        local_at = time.monotonic()
        at_local = self._device("status")  # outages counted before the source goes away on purpose
        released = self._announce_local()
        completion = complete_range(dst_pid, ram.address, ram.length, control=str(self.control),
                                    quiet=self.o.quiet, stream=self.stream)
        status = self._device("status")
        faults = fault_latency(self.metrics_port)
        self._detach()
        self._enter(Phase.DONE)
        report = {
            "guest_bytes": ram.length,
            "stage_seconds": stage.seconds,
            "complete_seconds": completion.seconds,
            "resume_to_local_seconds": local_at - resume.host_time,
            "pages_demand": status["fetched_demand"],
            "pages_prefetch": status["fetched_prefetch"],
            "pages_without_fetch": pages_without_fetch(status),
            "fault_p50_ms": faults[0],
            "fault_p99_ms": faults[1],
            "reconnects": at_local["reconnects"],
            "outage_seconds": at_local["outage_seconds"],
            "source_released": released,
        }
        try:
            chan.send("done", report=report)
        except ch.ChannelError:
            pass
        self.say(f"done: every page is here and the device is detached ({completion.seconds:.2f} s of completion)")
        return report

    # --- the steps -----------------------------------------------------------------------------------

    def _announce_local(self) -> bool:
        """Tell the sender that every page is here and wait for it to release the source. A channel that
        fails now costs only that confirmation: the guest needs nothing more from the source, so receive
        completes either way. Returns whether the sender confirmed."""
        try:
            self.channel.send("local")
            self.channel.expect("released", RELEASE_TIMEOUT)
            return True
        except ch.ChannelError as exc:
            self.say(f"warning: the sender did not confirm the source's release ({exc}); every page is here, "
                     "so release the source by hand if it still runs")
            return False

    def _check(self, qmp: Qmp, dst_pid: int, hello: ch.Message) -> RamRegion:
        if hello["version"] != ch.PROTOCOL_VERSION:
            raise MigrateError(f"the sender speaks channel version {hello['version']}, this is "
                               f"{ch.PROTOCOL_VERSION}: use the same nbd-postcopy on both hosts")
        if hello["memdev"] != self.o.memdev:
            raise MigrateError(f"the sender migrates memory backend {hello['memdev']!r}, this side has "
                               f"--memdev {self.o.memdev!r}")
        ram = check_incoming_ram(qmp, dst_pid, self.o.memdev)
        if ram.length != hello["guest_bytes"]:
            raise MigrateError(f"guest RAM sizes differ: source {hello['guest_bytes']} bytes, "
                               f"destination {ram.length}")
        return ram

    def _attach(self, uri: str, instance: str, size: int, key: Path) -> str:
        if uri.startswith("nbds://"):
            if self.o.tls is None:
                raise MigrateError("the sender serves pages over TLS, but this side has no certificates")
            uri += "?tls-certificates=" + quote(str(self.o.tls.layout(self.work / "tls-client", "client")))
        elif self.o.tls is not None:
            raise MigrateError("the sender serves pages in clear, but TLS is configured here: refused")
        keys = [f"source={uri}", f"size={size}", f"key={key}", f"source-id={instance}",
                f"metrics=127.0.0.1:{self.metrics_port}"]
        if self.o.timeout is not None:
            keys.append(f"timeout={self.o.timeout:g}")
        keys += prefetch_cpus_key(prefetch_cpus(self.o.prefetch_cpus))
        self.say(f"attaching the swap device ({self.swap_name}), source {uri.split('?')[0]} (instance {instance})")
        swap = attach_device(with_device_keys(keys, self.o.device_keys), self.swap_name, self.swap_state)
        self.control = Path(swap.state.control)
        return swap.state.device

    def _listen_for_device_state(self, qmp: Qmp) -> int:
        qmp.set_capabilities(x_ignore_shared=True, events=True)
        if self.o.tls is not None:
            qmp.execute("object-add", qom_type="tls-creds-x509", id="nbdpc-tls", endpoint="server",
                        dir=str(self.o.tls.layout(self.work / "tls-server", "server")), verify_peer=True)
            qmp.set_parameters(tls_creds="nbdpc-tls")
        port = free_port(self.o.listen_host)
        qmp.migrate_incoming(f"tcp:{bracket(self.o.listen_host)}:{port}")
        return port

    def _wait_resumed(self, qmp: Qmp, dst_pid: int, mark: int) -> QmpEvent:
        """The guest runs here: QEMU's RESUME. The sender may say it failed first (PeerFailed)."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            try:
                return qmp.wait_event("RESUME", after=mark, timeout=0.2)
            except VmError:
                pass
            if exited(dst_pid):
                raise MigrateError("the destination QEMU exited while the device state arrived")
            if time.monotonic() > deadline:
                raise MigrateError(f"the guest did not resume within {STEP_TIMEOUT:g}s")
            if (message := self.channel.poll()) is not None:
                raise MigrateError(f"the sender sent {message.type} while QEMU waited for the device state")

    def _wait_local(self, qmp: Qmp, dst_pid: int) -> None:
        """Until every page is here (the sender's source is needed until then: no giving up on a stalled
        prefetcher), telling the sender how many pages remain about once a second."""
        next_report = 0.0

        def report_progress(status: dict) -> None:
            nonlocal next_report
            if status["remaining"] and time.monotonic() >= next_report:
                next_report = time.monotonic() + 1.0
                try:
                    self.channel.send("progress", remaining=status["remaining"], pages=status["pages"])
                except ch.ChannelError as exc:
                    log.warning("the channel to the sender is gone (%s); carrying on", exc)

        wait_for_prefetch(self._device, self.o.quiet, self.stream,
                          check_alive=lambda: check_destination_alive(qmp, dst_pid),
                          on_status=report_progress, stall_seconds=math.inf)

    def _device(self, command: str) -> dict:
        try:
            return request(str(self.control), command)
        except ControlError as exc:
            raise MigrateError(f"the device does not answer ({exc}); see {self.swap_state / 'log'}") from None

    def _detach(self) -> None:
        if not detach_device(self.swap_name):
            raise MigrateError(f"detaching {self.swap_name} failed (the reason is in the log above)")

    def _fail(self, qmp: Qmp, exc: BaseException) -> None:
        """Undo what the phase allows, tell the sender, and say what is left."""
        reason = str(exc) or type(exc).__name__
        if self.phase < Phase.RESUMED:
            self.say(f"failed ({reason}); rolling back: the source keeps running")
            if self.channel is not None:
                try:
                    self.channel.send("error", message=f"the destination rolled back: {reason}")
                except ch.ChannelError:
                    pass
            if self.phase >= Phase.ATTACHED:
                pid = self.dst_pid
                try:
                    qmp.execute("quit", timeout=5)
                except VmError:
                    pass
                wait_gone(pid, 15.0)  # its staged RAM must go before swapoff
                detach_device(self.swap_name)
            return
        qemu_gone = exited(self.dst_pid)
        if qemu_gone:  # nothing needs the device any more: take it down
            detach_device(self.swap_name)
            message = (f"the destination QEMU exited after the switchover ({reason}); the source QEMU is paused "
                       "with the guest's memory intact: the QMP command 'cont' resumes it there")
        else:
            message = f"the destination failed after the switchover: {reason}"
        if self.phase < Phase.DONE and self.channel is not None:
            try:
                self.channel.send("error", message=message)
            except ch.ChannelError:
                pass
        if qemu_gone:
            self.say(f"failed: {message}; the swap device is detached")
        else:
            self.say(f"failed after the switchover ({reason}): the guest runs here; the swap device "
                     f"{self.swap_name} stays attached. Finish with: {attachment.detach_command(self.swap_name)}")


def receive(options: ReceiveOptions) -> dict:
    return Receiver(options).run()


