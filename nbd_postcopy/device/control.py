"""The device's control socket: a Unix socket speaking one JSON line per command.

The client sends a command name on one line; the server answers one JSON object on one line and keeps
the connection open for more. Commands (see plugin/postcopy.py):

    status   the device state: {"armed", "pages", "slots", "mapped", "local", "overlay_pages",
             "remaining", "complete", "anomalies", "source_connected", "fetched_demand", ...}
    arm      start fetching from the source: {"ok": true, "armed": true}

An unknown command gets {"error": "..."}. `request()` is the client side, for the stager, the attach
script and the migration driver:

    >>> request("/run/nbd-postcopy/ctl.sock", "status")["remaining"]
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable

from ..common.linux import remove_stale_socket

log = logging.getLogger("nbd_postcopy.device.control")

MAX_LINE = 1024

Handler = Callable[[], dict]


class ControlError(Exception):
    """The control socket could not be reached or answered nonsense."""


class _Connection(socketserver.StreamRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE:
                self._reply({"error": f"command longer than {MAX_LINE} bytes"})
                return
            self._reply(self.server.dispatch(line.decode(errors="replace").strip()))

    def _reply(self, answer: dict) -> None:
        self.wfile.write(json.dumps(answer).encode() + b"\n")
        self.wfile.flush()


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, handlers: dict[str, Handler]):
        self.handlers = handlers
        super().__init__(path, _Connection)

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

    def __init__(self, path: str, handlers: dict[str, Handler]):
        self.path = path
        remove_stale_socket(path)
        self._server = _Server(path, handlers)
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
            sock.sendall(command.encode() + b"\n")
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
