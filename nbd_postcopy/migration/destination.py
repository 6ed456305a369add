"""The steps that the drivers of a migration (migrate.py, send.py, receive.py), a snapshot (snapshot.py)
and a restore (restore.py) share: talk to a QEMU, check a QEMU whose RAM is read from outside, attach
the swap device, wait for the prefetcher, read the fault latency, detach.

Each driver keeps its own steps' order and failure handling; these helpers do one step each and raise
MigrateError with a message for the user.
"""

from __future__ import annotations

import enum
import logging
import os
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, TextIO, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from ..common.linux import format_cpu_list, parse_cpu_list
from ..common.progress import Progress
from ..common.qmp import Qmp, VmError
from ..device.config import KEYS as PLUGIN_KEYS
from ..device.config import ConfigError, PluginConfig
from ..device.control import statuses_until_local
from ..host import attachment
from .ram import RamRegion, ram_region_of

log = logging.getLogger(__name__)

T = TypeVar("T")

PREFETCH_STALL_SECONDS = 5.0
QMP_LOSS_EXIT_WAIT = 5.0  # seconds to wait for a QEMU whose QMP connection dropped to exit


class MigrateError(Exception):
    """The migration failed or was refused; the message says at which step and what state remains."""


PREFETCH_CPUS_HELP = (
    "the CPUs the prefetch work runs on: the device's prefetcher thread, and on one host the page server too. "
    "auto (the default): the last CPU this process may use, if it may use two or more, so that the guest's vCPUs and its "
    "swap-ins keep the others; all: any CPU; or a list in the kernel's format (e.g. 3, or 2-3). Give migrations "
    "and restores that run at the same time on one host different CPUs")


# Plugin keys that --device-key may set on a migration's (or a restore's) device; the command sets the others.
DEVICE_KEYS = ("cache-dir", "warm", "demand-store", "headroom", "timeout", "label")
DEVICE_KEY_HELP = (
    "a plugin key for the destination device, KEY=VALUE, repeatable: " + ", ".join(f"{key}=" for key in DEVICE_KEYS)
    + " (README, \"The plugin\"; e.g. cache-dir=/srv/scratch for the page file, which grows to the guest's size, "
    "or warm=off)")


def device_key(text: str) -> str:
    """A --device-key KEY=VALUE, checked as the plugin checks its keys; ValueError says what is wrong."""
    key, equals, value = text.partition("=")
    if not equals:
        raise ValueError(f"{text!r}: give KEY=VALUE, e.g. warm=off")
    if key not in DEVICE_KEYS:
        why = "the command sets it itself" if key in PLUGIN_KEYS else "there is no such plugin key"
        raise ValueError(f"{key}= cannot be given here ({why}); --device-key takes {', '.join(DEVICE_KEYS)}")
    try:
        PluginConfig().set(key, value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return text


def with_device_keys(keys: list[str], extra: tuple[str, ...]) -> list[str]:
    """The command's own plugin `keys`, then the user's --device-key ones (each key at most once)."""
    given = {key.partition("=")[0] for key in keys}
    for item in extra:
        key = item.partition("=")[0]
        if key in given:
            raise MigrateError(f"--device-key {item}: {key}= is given twice (by another --device-key, or by an "
                               "option of the command)")
        given.add(key)
    return [*keys, *extra]


def prefetch_cpus(choice: str = "auto") -> frozenset[int] | None:
    """The CPU set that --prefetch-cpus `choice` names, or None for any CPU (docs/DESIGN.md, "Decisions":
    on two CPUs, confining the prefetch work to one left the guest enough of the other). MigrateError if
    `choice` names none."""
    if choice == "auto":
        allowed = os.sched_getaffinity(0)
        return frozenset({max(allowed)}) if len(allowed) >= 2 else None
    if choice == "all":
        return None
    try:
        return parse_cpu_list(choice)
    except ValueError as exc:
        raise MigrateError(f"prefetch CPUs {choice!r}: {exc}") from None


def check_prefetch_cpus(choice: str) -> str:
    """For argparse: `choice` if prefetch_cpus() takes it (else its ValueError)."""
    if choice not in ("auto", "all"):
        try:
            parse_cpu_list(choice)
        except ValueError as exc:
            raise ValueError(f"{exc}; or give auto or all") from None
    return choice


def prefetch_cpus_key(cpus: frozenset[int] | None) -> list[str]:
    """The plugin key for `cpus` (none for any CPU)."""
    return [f"prefetch-cpus={format_cpu_list(cpus)}"] if cpus else []


def serve_cpus_args(cpus: frozenset[int] | None) -> list[str]:
    """The page server's options for `cpus` (none for any CPU), on the host that runs the guest."""
    return ["--cpus", format_cpu_list(cpus)] if cpus else []


def connect(path: Path, role: str) -> Qmp:
    try:
        return Qmp(path, name=role)
    except VmError as exc:
        raise MigrateError(f"cannot talk to the {role} QEMU: {exc}") from None


def drive(path: Path, role: str, run: Callable[[Qmp], T], fail: Callable[[Qmp, BaseException], None]) -> T:
    """Connect to the QEMU at `path` and `run(qmp)`; on any failure `fail(qmp, exc)` first (it may raise
    an error of its own), then the failure goes on. The connection is closed either way."""
    qmp = connect(path, role)
    try:
        return run(qmp)
    except BaseException as exc:
        fail(qmp, exc)
        raise
    finally:
        qmp.close()


def check_shared_ram(qmp: Qmp, pid: int, memdev: str, qemu: str = "the source QEMU",
                     owner: str = "the source") -> RamRegion:
    """The guest RAM of a running QEMU whose RAM is read from outside (a migration source, a VM to
    snapshot): it must be on a shared backend. `qemu` and `owner` name it in the messages."""
    if (state := qmp.status()) != "running":
        raise MigrateError(f"{qemu} (pid {pid}) is {state!r}, not running")
    if not memdev_property(qmp, memdev, "share"):
        raise MigrateError(f"{owner}'s memory backend {memdev!r} is not shared: start {owner} "
                           "with memory-backend-file or memory-backend-memfd and share=on (see the README)")
    try:
        return ram_region_of(pid, qmp, memdev)
    except VmError as exc:
        raise MigrateError(str(exc)) from None


def check_incoming_ram(qmp: Qmp, pid: int, memdev: str, qemu: str = "the destination QEMU") -> RamRegion:
    """The guest RAM of a QEMU waiting with -incoming defer, which staging writes: it must be anonymous
    memory (memory-backend-ram). `qemu` names it in the messages."""
    if (state := qmp.status()) != "inmigrate":
        raise MigrateError(f"{qemu} (pid {pid}) is {state!r}: start it with -incoming defer")
    try:
        ram = ram_region_of(pid, qmp, memdev)  # first: it says clearly when there is no such backend
    except VmError as exc:
        raise MigrateError(str(exc)) from None
    if memdev_property(qmp, memdev, "share"):
        raise MigrateError(f"{qemu}'s memory backend {memdev!r} is shared: use memory-backend-ram (anonymous memory)")
    if ram.path:
        raise MigrateError(f"{qemu}'s guest RAM is mapped from {ram.path}, not anonymous memory")
    return ram


def wait_migration_completed(qmp: Qmp, mark: int, timeout: float) -> None:
    """Wait for the outgoing migration started after event position `mark`; MigrateError unless it completed."""
    status = qmp.wait_migration(after=mark, timeout=timeout)
    if status != "completed":
        reason = qmp.query_migrate().get("error-desc", "QEMU gave no reason")
        raise MigrateError(f"QEMU's migration {status}: {reason}")


def memdev_property(qmp: Qmp, memdev: str, name: str):
    try:
        return qmp.execute("qom-get", path=f"/objects/{memdev}", property=name)
    except VmError as exc:
        raise MigrateError(f"cannot read {name} of memory backend {memdev!r}: {exc}") from None


def exited(pid: int) -> bool:
    """True once process `pid` has exited (a zombie counts: its memory is freed)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for process `pid` to exit; True if it has."""
    deadline = time.monotonic() + timeout
    while not exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def attach_device(keys: list[str], name: str, state_dir: Path) -> attachment.Attachment:
    """Attach the postcopy swap device with plugin `keys`; MigrateError with attach's own words if it fails."""
    report = attachment.CollectingReporter()
    try:
        return attachment.attach(attachment.AttachOptions(keys, name=name, state_dir=state_dir), report=report)
    except attachment.AttachmentError as exc:
        output = report.text if exc.reported else f"{exc}\n{report.text}"
        raise MigrateError(f"attaching the swap device failed:\n{output.strip()}") from None


def detach_device(name: str) -> bool:
    """Detach swap device `name` without completion; False (and the reason logged) if that failed."""
    report = attachment.CollectingReporter()
    try:
        attachment.detach(name, complete=False, report=report)
    except attachment.AttachmentError as exc:
        log.error("detaching %s failed: %s\n%s", name, exc, report.text)
        return False
    return True


def check_destination_alive(qmp: Qmp, pid: int) -> None:
    """Raise MigrateError unless the destination QEMU is alive and answers QMP.

    A QEMU that exits frees its memory and the kernel trims every slot it held, so its device then
    reports every page local: a driver that took that for "the source is no longer needed" would let
    the guest's last intact copy go. A QMP answer after the device's status proves that the QEMU was
    not dying when the status was read (docs/DESIGN.md, "A dead destination looks complete")."""
    if exited(pid):
        raise _destination_gone(pid)
    try:
        qmp.status()
    except VmError as exc:
        # A QEMU that is exiting drops its QMP connection a moment before its process is gone: wait for
        # that, so that the failure is reported (and handled: the device goes down) as the exit it is.
        if wait_gone(pid, QMP_LOSS_EXIT_WAIT):
            raise _destination_gone(pid) from None
        raise MigrateError(f"the destination QEMU (pid {pid}) no longer answers QMP after the switchover "
                           f"({exc})") from None


def _destination_gone(pid: int) -> MigrateError:
    return MigrateError(f"the destination QEMU (pid {pid}) exited after the switchover (a swap-in that fails, "
                        "e.g. one that waited longer than the device's timeout, kills the guest)")


def pages_without_fetch(status: dict) -> int:
    """Guest pages whose data never crossed the wire, from the device's `status`: the all-zero pages, settled
    from the source's block status before anything fetched them, or fetched as holes (no data on the wire).
    With the demand and prefetched pages they add up to the guest's pages."""
    return status["settled_zero"] + status["fetched_zero"]


def wait_for_prefetch(device: Callable[[str], dict], quiet: bool, stream: TextIO,
                      check_alive: Callable[[], None],
                      on_status: Callable[[dict], None] | None = None,
                      stall_seconds: float = PREFETCH_STALL_SECONDS) -> dict:
    """Let the device's prefetcher pull the pages before pre-paging them into the guest.

    Pre-paging at once competes with the guest's own faults for the device and stalls the guest
    (256 MiB guest here: largest heartbeat gap 2.3 s at once, 0.9 s after waiting); once the
    prefetcher is done, pre-paging only moves local pages. Stops waiting when the prefetcher makes
    no progress for `stall_seconds`: completion then fetches what is left itself. `device(command)`
    asks the device's control socket ("status", then "wait-local", which answers the moment every page
    is local); `check_alive()` raises if the guest's QEMU is gone (check_destination_alive), and runs
    after every status read; `on_status`, if given, sees every status read.
    Returns the last.
    """
    bar = None
    for status in statuses_until_local(device, stall_seconds):
        check_alive()  # after every read: "every page local" is also what a dead QEMU's trimmed slots look like
        if bar is None:
            total = status["remaining"]
            bar = Progress("fetching", total, quiet=quiet, stream=stream)
        if on_status is not None:
            on_status(status)
        bar.update(total - status["remaining"])
    if status["remaining"] > 0:
        bar.finish(f"no progress for {stall_seconds:g}s, completion fetches the rest")
    else:
        bar.finish(f"{status['fetched_demand']} on demand, {status['fetched_prefetch']} prefetched")
    return status


def fault_latency(metrics_port: int) -> tuple[float | None, float | None]:
    """p50 and p99 (ms, bucket upper bounds) of the device's demand fault latency, from its metrics."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    except OSError as exc:
        log.warning("cannot read the device's metrics: %s", exc)
        return None, None
    return histogram_quantiles(text, "nbd_postcopy_fault_seconds", (0.5, 0.99))


def histogram_quantiles(exposition: str, name: str, quantiles: tuple[float, ...]) -> tuple[float | None, ...]:
    """Upper bounds (ms) of the buckets holding each quantile of Prometheus histogram `name`."""
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(exposition):
        if family.name == name:
            buckets = sorted((float(s.labels["le"]), s.value) for s in family.samples if s.name == f"{name}_bucket")
    total = buckets[-1][1] if buckets else 0
    if not total:
        return tuple(None for _ in quantiles)
    return tuple(next(bound * 1000 for bound, count in buckets if count >= q * total) for q in quantiles)


class Narrator:
    """Prints a command's steps as "NAME: message" on self.stream, unless self.o.quiet."""

    name = "migrate"
    o: Any  # the command's options (with .quiet)
    stream: TextIO

    def say(self, message: str) -> None:
        if not self.o.quiet:
            print(f"{self.name}: {message}", file=self.stream, flush=True)


class StepDriver(Narrator):
    """A driver whose phases (an IntEnum) follow one another in order (the two halves of a two-host
    migration)."""

    phase: enum.IntEnum

    def _enter(self, phase: enum.IntEnum) -> None:
        if phase != self.phase + 1:
            raise AssertionError(f"{self.name}: wrong phase {phase.name} after {self.phase.name}")  # a bug here
        self.phase = phase
