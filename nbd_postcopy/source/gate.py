"""The freeze gate: no page leaves the source server until the source memory can no longer change.

A closed gate holds every READ, BLOCK_STATUS and CACHE. It opens once, for good, by `open()`: the
server calls it on SIGUSR1, and `watch_qmp()` calls it when the source QEMU reports that its guest is
stopped (a STOP event, or status paused, postmigrate or finish-migrate), through the product's one QMP
client (common.qmp, which runs in a thread of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable

from ..common.qmp import Qmp, QmpEvent, QmpNotListening, VmError

log = logging.getLogger(__name__)

FROZEN_STATES = frozenset({"paused", "postmigrate", "finish-migrate"})
POLL_INTERVAL = 0.5  # seconds between query-status, and between attempts to reach QEMU
QMP_NAME = "freeze-gate"  # the gate's QMP client (its thread and qemu.qmp's loggers carry the name)
REMINDER_INTERVAL = 30.0  # seconds between warnings that the gate still cannot watch QEMU


class Gate:
    def __init__(self, is_open: bool, on_open: Callable[[], None] | None = None):
        self._event = asyncio.Event()
        self._on_open = on_open
        if is_open:
            self._event.set()

    @property
    def is_open(self) -> bool:
        return self._event.is_set()

    def open(self, reason: str) -> None:
        if self._event.is_set():
            return
        log.warning("freeze gate open (%s): serving pages", reason)
        self._event.set()
        if self._on_open is not None:
            self._on_open()

    async def wait(self) -> None:
        await self._event.wait()


async def watch_qmp(gate: Gate, socket_path: str, poll_interval: float = POLL_INTERVAL) -> None:
    """Open `gate` once the QEMU behind the QMP socket stops its guest: at once on its STOP event, or when
    query-status (asked on connecting, then every `poll_interval` seconds) reports a frozen state. Until
    QEMU is there, and after it went away, tries again every `poll_interval` seconds."""
    warn = _Reminder(poll_interval)
    while not gate.is_open:
        try:
            qmp = await asyncio.to_thread(Qmp, socket_path, 0.0, QMP_NAME)
        except QmpNotListening:
            warn(f"waiting for QMP socket {socket_path} (QEMU not there yet)")
        except (VmError, TimeoutError, OSError) as exc:
            warn(str(exc) or f"cannot connect to QMP socket {socket_path}: {exc!r}")
        else:
            log.info("freeze gate watching QEMU over QMP socket %s", socket_path)
            warn.reset()
            try:
                await _watch(gate, qmp, socket_path, poll_interval)
            except VmError as exc:
                warn(f"QMP socket {socket_path}: {exc}")
            finally:
                await asyncio.to_thread(qmp.close)
        if not gate.is_open:
            await asyncio.sleep(poll_interval)


async def _watch(gate: Gate, qmp: Qmp, socket_path: str, poll_interval: float) -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def on_stop() -> None:  # on the server's loop
        gate.open(f"QEMU at {socket_path} reports a STOP event")
        stopped.set()

    def on_event(event: QmpEvent) -> None:  # in the QMP client's thread
        if event.name == "STOP" and not loop.is_closed():
            loop.call_soon_threadsafe(on_stop)

    qmp.on_event(on_event)
    while not gate.is_open:  # query-status also catches a guest stopped before we subscribed
        status = await asyncio.to_thread(qmp.status)
        if status in FROZEN_STATES:
            gate.open(f"QEMU at {socket_path} reports status {status!r}")
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopped.wait(), poll_interval)


class _Reminder:
    """The gate's warnings while it cannot watch QEMU: one when the situation changes, then a reminder
    at most every REMINDER_INTERVAL seconds, not a line per retry."""

    def __init__(self, poll_interval: float):
        self.poll_interval = poll_interval
        self.reset()

    def reset(self) -> None:
        self.last, self.since, self.said_at = "", 0.0, 0.0

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        if what != self.last:
            log.warning("freeze gate: %s; retrying every %g s; pages stay held until the source stops", what,
                        self.poll_interval)
            self.last, self.since, self.said_at = what, now, now
        elif now - self.said_at >= REMINDER_INTERVAL:
            log.warning("freeze gate: %s (for %.0f s now); retrying every %g s; pages stay held until the source "
                        "stops", what, now - self.since, self.poll_interval)
            self.said_at = now
