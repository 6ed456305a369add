"""The freeze gate: no page leaves the source server until the source memory can no longer change.

A closed gate holds every READ, BLOCK_STATUS and CACHE. It opens once, for good, by `open()`: the
server calls it on SIGUSR1, and `watch_qmp()` calls it when the source QEMU reports that its guest is
stopped (paused, postmigrate or finish-migrate).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

log = logging.getLogger(__name__)

FROZEN_STATES = frozenset({"paused", "postmigrate", "finish-migrate"})


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


class QMPError(Exception):
    pass


class _QMP:
    """Just enough of a QMP client: greeting, capabilities, commands; events are skipped."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._id = 0

    async def _message(self) -> dict:
        line = await self._reader.readline()
        if not line:
            raise QMPError("QMP connection closed")
        return json.loads(line)

    async def command(self, name: str) -> dict:
        self._id += 1
        self._writer.write(json.dumps({"execute": name, "id": self._id}).encode() + b"\n")
        await self._writer.drain()
        while True:
            message = await self._message()
            if message.get("id") != self._id:
                continue  # an asynchronous event
            if "error" in message:
                raise QMPError(f"{name}: {message['error'].get('desc', message['error'])}")
            return message.get("return", {})

    async def handshake(self) -> None:
        greeting = await self._message()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting!r:.200}")
        await self.command("qmp_capabilities")


async def watch_qmp(gate: Gate, socket_path: str, poll_interval: float = 0.1) -> None:
    """Open `gate` once the QEMU behind the QMP socket reports a stopped guest. Retries until then."""
    delay = poll_interval
    while not gate.is_open:
        writer = None
        try:
            reader, writer = await asyncio.open_unix_connection(socket_path)
            qmp = _QMP(reader, writer)
            await qmp.handshake()
            log.info("freeze gate watching QEMU over QMP socket %s", socket_path)
            delay = poll_interval
            while True:
                status = (await qmp.command("query-status")).get("status", "")
                if status in FROZEN_STATES:
                    gate.open(f"QEMU at {socket_path} reports status {status!r}")
                    return
                await asyncio.sleep(poll_interval)
        except (OSError, QMPError, ValueError) as exc:
            log.warning("freeze gate: QMP socket %s: %s; retrying in %.1fs", socket_path, exc, delay)
        finally:
            if writer is not None:
                writer.close()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
