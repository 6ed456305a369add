"""The device's control socket: a Unix socket speaking one JSON line per command.

The client sends a command name on one line; the server answers one JSON object on one line and keeps
the connection open for more. Commands (see plugin/postcopy.py):

    status   the device state: {"armed", "pages", "slots", "mapped", "local", "overlay_pages",
             "remaining", "complete", "anomalies", "source_connected", "fetched_demand", ...}:
             README.md lists them all
    arm      start fetching from the source: {"ok": true, "armed": true}
    wait-local  the status, as soon as every page is local or after 0.2 s, whichever comes first
             (so a driver learns the moment it can release the source without polling)
    workingset  the guest pages demand-fetched first, in order (device/workingset.py):
             {"recorded": [page, ...], "limit", "replay" (pages given by replay=), "replayed" (of them
             mapped), "replay_done" (the prefetcher has fetched them)}

An unknown command gets {"error": "..."}. The socket is bounded, because every connection costs a
thread whose stack nbdkit --swap locks in memory: at most MAX_CONNECTIONS (8) connections at once (one
more is answered with one {"error": ...} line and closed), a connection that sends no complete line
for IDLE_TIMEOUT (60) seconds is closed, and so is one that sends a line longer than MAX_LINE bytes
(after an {"error": ...} answer). Refusals and timeouts are logged at most once per 10 seconds.
`request()` is the client side, for the stager, the attach script and the migration driver:

    >>> request("/run/nbd-postcopy/ctl.sock", "status")["remaining"]
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

from ..common.linux import remove_stale_socket
from ..common.ratelog import RateLimitedLog

log = logging.getLogger("nbd_postcopy.device.control")

MAX_LINE = 1024
MAX_CONNECTIONS = 8  # concurrent control connections; more are refused
IDLE_TIMEOUT = 60.0  # seconds a connection may wait for its next line (or take to read an answer)

Handler = Callable[[], dict]


class ControlError(Exception):
    """The control socket could not be reached or answered nonsense."""


class _Connection(socketserver.StreamRequestHandler):
    server: "_Server"

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # StreamRequestHandler applies it to the socket
        super().setup()

    def handle(self) -> None:
        try:
            while True:
                line = self.rfile.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_LINE:
                    self._reply({"error": f"command longer than {MAX_LINE} bytes"})
                    return
                self._reply(self.server.dispatch(line.decode(errors="replace").strip()))
        except TimeoutError:
            self.server.ratelog.warning("idle", "control connection idle for %gs: closed", self.server.idle_timeout)
        except OSError as exc:  # the client went away mid-answer
            log.debug("control connection failed: %s", exc)

    def _reply(self, answer: dict) -> None:
        self.wfile.write(json.dumps(answer).encode() + b"\n")
        self.wfile.flush()


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, handlers: dict[str, Handler], max_connections: int, idle_timeout: float):
        self.handlers = handlers
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.ratelog = RateLimitedLog(log)
        self._connections = 0
        self._count_lock = threading.Lock()
        super().__init__(path, _Connection)

    def process_request(self, request, client_address) -> None:
        with self._count_lock:
            refuse = self._connections >= self.max_connections
            if not refuse:
                self._connections += 1
        if not refuse:
            try:
                super().process_request(request, client_address)  # a thread per connection
            except BaseException:  # no thread started (serve_forever reports it and closes the socket)
                self._connection_ended()
                raise
            return
        self.ratelog.warning("refused", "control connection refused: %d connections are open", self.max_connections)
        try:
            request.settimeout(0.1)  # never let a refused client hold up the accepting thread
            request.sendall(json.dumps({"error": f"too many control connections (at most {self.max_connections})"}
                                       ).encode() + b"\n")
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_ended()

    def _connection_ended(self) -> None:
        with self._count_lock:
            self._connections -= 1

    def dispatch(self, command: str) -> dict:
        handler = self.handlers.get(command)
        if handler is None:
            return {"error": f"unknown command {command!r}; commands: {', '.join(sorted(self.handlers))}"}
        try:
            return handler()
        except Exception as exc:
            log.exception("control command %r failed", command)
            return {"error": f"{command} failed: {type(exc).__name__}: {exc}"}


class ControlServer:
    """Serves `handlers` ({command: function returning a dict}) on a Unix socket, on a daemon thread."""

    def __init__(self, path: str, handlers: dict[str, Handler], max_connections: int = MAX_CONNECTIONS,
                 idle_timeout: float = IDLE_TIMEOUT):
        self.path = path
        remove_stale_socket(path)
        self._server = _Server(path, handlers, max_connections, idle_timeout)
        os.chmod(path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def request(path: str, command: str, timeout: float = 5.0) -> dict:
    """Send one command to the control socket at `path` and return the decoded answer."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            try:
                sock.sendall(command.encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused (too many connections): its one-line answer may be waiting all the same
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(answer)
    except ValueError as exc:
        raise ControlError(f"control socket {path} answered {answer[:100]!r}, not JSON") from exc


def statuses_until_local(ask: Callable[[str], dict], stall_seconds: float) -> Iterator[dict]:
    """The device's status ("status" first, then "wait-local", which answers the moment every page is
    local, else within 0.2 s), one after another, until every mapped page is local or `remaining` has
    not moved for `stall_seconds`; the last one yielded tells which. `ask(command)` sends a command, e.g.
    `lambda command: request(path, command)`."""
    status = ask("status")
    last, since = None, time.monotonic()
    while True:
        yield status
        remaining = status["remaining"]
        if remaining == 0:
            return
        if remaining != last:
            last, since = remaining, time.monotonic()
        elif time.monotonic() - since > stall_seconds:
            return
        status = ask("wait-local")
