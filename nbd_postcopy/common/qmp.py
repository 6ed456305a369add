"""A synchronous QMP client for the whole product, on qemu.qmp (the QEMU project's own library).

`Qmp` runs qemu.qmp's asyncio client on an event loop in a thread of its own, so events are collected
(and timestamped) while the caller does something else, and any thread may send commands. It works
against any QEMU that has a QMP socket nobody else is connected to.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

log = logging.getLogger(__name__)

MIGRATION_DONE = ("completed", "failed", "cancelled")
HANDSHAKE_TIMEOUT = 5.0  # seconds for QEMU's greeting and capabilities negotiation


class VmError(Exception):
    """QEMU failed, stopped unexpectedly, or did not do what was asked in time."""


class QmpError(VmError):
    """A QMP command failed; the message names the command and QEMU's error."""


class QmpNotListening(VmError):
    """Nothing listens on the QMP socket (yet): the socket file is missing or the connection is refused."""


# --- QMP ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QmpEvent:
    name: str
    data: dict[str, Any]
    host_time: float  # time.monotonic() when the event arrived
    qemu_time: float | None = None  # the wall-clock time QEMU stamped it with (seconds since the epoch)


def seconds_between(first: QmpEvent, second: QmpEvent) -> float:
    """Seconds from `first` to `second`, two events of QEMUs on the same host: by QEMU's own stamps when
    both have one (the arrival of an event can lag: a source's STOP has arrived after the destination's
    RESUME), else by arrival."""
    if first.qemu_time is not None and second.qemu_time is not None:
        return second.qemu_time - first.qemu_time
    return second.host_time - first.host_time


class Qmp:
    """A QMP connection usable from synchronous code and from any thread.

    Events are kept in arrival order. `mark()` returns a position in that list; `wait_event(...,
    after=mark)` then finds only events that arrived after it, so no event is lost between a command
    and the wait for its consequence.
    """

    def __init__(self, socket_path: Path | str, timeout: float = 10.0, name: str = "qmp"):
        self.socket_path = Path(socket_path)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{name}-loop", daemon=True)
        self._thread.start()
        self._events: list[QmpEvent] = []
        self._changed = threading.Condition()
        self._callbacks: list[Callable[[QmpEvent], None]] = []
        for module in ("protocol", "qmp_client"):  # qemu.qmp logs every failed attempt; our error says it once
            logging.getLogger(f"qemu.qmp.{module}.{name}").setLevel(logging.CRITICAL)
        try:
            self._client: QMPClient = self._call(self._connect(name, timeout), timeout + HANDSHAKE_TIMEOUT + 1)
        except BaseException:
            self._stop_loop()
            raise

    async def _connect(self, name: str, timeout: float) -> QMPClient:
        client = QMPClient(name)
        deadline = time.monotonic() + timeout
        while True:
            try:
                # Timed out here, not in _call: the aborted handshake is then cleaned up on this loop.
                await asyncio.wait_for(client.connect(str(self.socket_path)), HANDSHAKE_TIMEOUT)
                break
            except asyncio.TimeoutError:
                raise VmError(f"no QMP handshake on {self.socket_path} within {HANDSHAKE_TIMEOUT:g}s") from None
            except ConnectError as exc:
                # QEMU creates the socket file with bind() a moment before it listen()s.
                if not isinstance(exc.exc, (ConnectionRefusedError, FileNotFoundError)):
                    raise VmError(f"cannot connect to QMP socket {self.socket_path}: {exc}") from None
                if time.monotonic() > deadline:
                    raise QmpNotListening(f"cannot connect to QMP socket {self.socket_path}: {exc}") from None
                await asyncio.sleep(0.01)
        self._pump = asyncio.ensure_future(self._pump_events(client.events))
        return client

    async def _pump_events(self, listener) -> None:
        async for message in listener:
            stamp = message.get("timestamp") or {}
            qemu_time = stamp["seconds"] + stamp["microseconds"] / 1e6 if "seconds" in stamp else None
            event = QmpEvent(message["event"], dict(message.get("data", {})), time.monotonic(), qemu_time)
            for callback in list(self._callbacks):
                try:
                    callback(event)
                except Exception:
                    log.exception("QMP event callback %r failed on %s", callback, event.name)
            with self._changed:
                self._events.append(event)
                self._changed.notify_all()

    def _call(self, coroutine, timeout: float | None) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def execute(self, command: str, timeout: float | None = 30.0, **arguments: Any) -> Any:
        """Run one QMP command; argument names use '_' for '-' (x_ignore_shared -> x-ignore-shared)."""
        args = {k.replace("_", "-"): v for k, v in arguments.items()}
        try:
            return self._call(self._client.execute(command, args or None), timeout)
        except ExecuteError as exc:
            raise QmpError(f"QMP {command} failed: {exc} ({exc.error_class})") from None
        except QMPError as exc:
            raise QmpError(f"QMP {command} failed: {exc!r} (has QEMU exited?)") from None
        except TimeoutError:
            raise QmpError(f"QMP {command} got no answer within {timeout}s") from None

    def peer_pid(self) -> int:
        """The PID of the QEMU at the other end of the socket (SO_PEERCRED), for a VM we did not start."""
        sock = self._client._writer.get_extra_info("socket")  # qemu.qmp exposes no public accessor
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]

    # events

    def on_event(self, callback: Callable[[QmpEvent], None]) -> None:
        """Call `callback(event)` for every later event, in the QMP thread (keep it short)."""
        self._callbacks.append(callback)

    def mark(self) -> int:
        with self._changed:
            return len(self._events)

    def events(self, after: int = 0) -> list[QmpEvent]:
        with self._changed:
            return self._events[after:]

    def wait_event(
        self,
        name: str,
        match: Callable[[QmpEvent], bool] | None = None,
        after: int = 0,
        timeout: float = 30.0,
    ) -> QmpEvent:
        """The first event called `name` (and satisfying `match`) at or after position `after`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self._events[after:]:
                    if event.name == name and (match is None or match(event)):
                        return event
                after = len(self._events)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise VmError(f"no QMP event {name} on {self.socket_path} within {timeout}s")
                self._changed.wait(remaining)

    # migration helpers

    def status(self) -> str:
        return self.execute("query-status")["status"]

    def set_capabilities(self, **capabilities: bool) -> None:
        """E.g. set_capabilities(x_ignore_shared=True, postcopy_ram=True, events=True)."""
        caps = [{"capability": k.replace("_", "-"), "state": v} for k, v in capabilities.items()]
        self.execute("migrate-set-capabilities", capabilities=caps)

    def set_parameters(self, **parameters: Any) -> None:
        self.execute("migrate-set-parameters", **parameters)

    def migrate_incoming(self, uri: str) -> None:
        self.execute("migrate-incoming", uri=uri)

    def migrate(self, uri: str) -> None:
        self.execute("migrate", uri=uri)

    def start_postcopy(self) -> None:
        self.execute("migrate-start-postcopy")

    def query_migrate(self) -> dict[str, Any]:
        return self.execute("query-migrate")

    def wait_migration(self, statuses: Iterable[str] = MIGRATION_DONE, after: int = 0, timeout: float = 60.0) -> str:
        """Wait for a MIGRATION event (needs capability events=on) with one of `statuses`; return it."""
        wanted = set(statuses)
        event = self.wait_event("MIGRATION", lambda e: e.data.get("status") in wanted, after, timeout)
        return event.data["status"]

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._call(self._disconnect(), 5.0)
            except (QMPError, EOFError, OSError, TimeoutError):
                pass  # QEMU already gone: nothing to say goodbye to
            self._stop_loop()

    async def _disconnect(self) -> None:
        self._pump.cancel()
        await self._client.disconnect()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()
