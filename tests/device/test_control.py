"""The control socket: one command per line, one JSON answer per line."""

from __future__ import annotations

import socket

import pytest

from nbd_postcopy.device.control import ControlError, ControlServer, request


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
