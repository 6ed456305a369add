"""The control socket: one command per line, one JSON answer per line."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest

from nbd_postcopy.device.control import MAX_LINE, ControlError, ControlServer, request, statuses_until_local


@pytest.fixture
def control(run_dir):
    state = {"armed": False}

    def arm():
        state["armed"] = True
        return {"ok": True, "armed": True}

    def broken():
        raise RuntimeError("boom")

    server = ControlServer(str(run_dir / "ctl.sock"), {"status": lambda: dict(state), "arm": arm, "broken": broken})
    server.start()
    try:
        yield server
    finally:
        server.close()


def test_status_and_arm(control):
    assert request(control.path, "status") == {"armed": False}
    assert request(control.path, "arm") == {"ok": True, "armed": True}
    assert request(control.path, "status") == {"armed": True}


def test_unknown_and_failing_commands(control):
    answer = request(control.path, "frobnicate")
    assert "unknown command 'frobnicate'" in answer["error"] and "arm, broken, status" in answer["error"]
    assert request(control.path, "broken") == {"error": "broken failed: RuntimeError: boom"}


def test_several_commands_on_one_connection(control):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(control.path)
        sock.settimeout(5)
        sock.sendall(b"status\narm\nstatus\n")
        reader = sock.makefile("rb")
        answers = [reader.readline() for _ in range(3)]
    assert answers == [b'{"armed": false}\n', b'{"ok": true, "armed": true}\n', b'{"armed": true}\n']


def test_stale_socket_is_replaced_and_live_one_refused(run_dir, control):
    with pytest.raises(FileExistsError, match="in use"):
        ControlServer(control.path, {})
    stale = run_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    server = ControlServer(str(stale), {"status": dict})
    server.start()
    try:
        assert request(str(stale), "status") == {}
    finally:
        server.close()
    assert not stale.exists()


def test_request_to_missing_socket(run_dir):
    with pytest.raises(ControlError, match="No such file"):
        request(str(run_dir / "none.sock"), "status")


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(path)
    return sock


def test_connections_beyond_the_limit_are_refused(run_dir, caplog):
    server = ControlServer(str(run_dir / "ctl.sock"), {"status": dict}, max_connections=2)
    server.start()
    held = [_connect(server.path) for _ in range(2)]
    try:
        for sock in held:  # both are served (and so counted) before the next ones arrive
            sock.sendall(b"status\n")
            assert sock.makefile("rb").readline() == b"{}\n"
        with caplog.at_level(logging.WARNING, logger="nbd_postcopy.device.control"):
            for _ in range(3):
                answer = request(server.path, "status")
                assert answer == {"error": "too many control connections (at most 2)"}
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1  # rate-limited
        held.pop().close()
        deadline = time.monotonic() + 5
        while (answer := request(server.path, "status")) != {} and time.monotonic() < deadline:
            time.sleep(0.02)  # the closed connection's thread ends soon after
        assert answer == {}
    finally:
        for sock in held:
            sock.close()
        server.close()


def test_idle_connection_is_closed(run_dir, caplog):
    caplog.set_level(logging.WARNING, logger="nbd_postcopy.device.control")
    server = ControlServer(str(run_dir / "ctl.sock"), {"status": dict}, idle_timeout=0.3)
    server.start()
    try:
        with _connect(server.path) as busy, _connect(server.path) as idle:
            started = time.monotonic()
            reader = busy.makefile("rb")
            for _ in range(3):  # a line in time keeps a connection open
                busy.sendall(b"status\n")
                assert reader.readline() == b"{}\n"
                time.sleep(0.15)
            assert idle.recv(100) == b""  # closed by the server meanwhile
            assert 0.25 < time.monotonic() - started < 3
            assert any("idle for 0.3s" in r.getMessage() for r in caplog.records)
    finally:
        server.close()


def test_overlong_line_is_answered_and_closed(control):
    with _connect(control.path) as sock:
        sock.sendall(b"x" * (MAX_LINE + 10) + b"\nstatus\n")
        reader = sock.makefile("rb")
        assert json.loads(reader.readline()) == {"error": f"command longer than {MAX_LINE} bytes"}
        assert reader.readline() == b""


def test_statuses_until_local_stops_when_every_page_is_local_or_progress_stalls():
    asked = []
    answers = iter([{"remaining": 5}, {"remaining": 3}, {"remaining": 3}, {"remaining": 0}])
    statuses = statuses_until_local(lambda command: asked.append(command) or next(answers), stall_seconds=60)
    assert [status["remaining"] for status in statuses] == [5, 3, 3, 0]
    assert asked == ["status", "wait-local", "wait-local", "wait-local"]
    # no progress since the previous status, and a stall allowance already spent: it gives up there
    stuck = list(statuses_until_local(lambda command: {"remaining": 7}, stall_seconds=-1))
    assert [status["remaining"] for status in stuck] == [7, 7]
