"""The restore driver's failure handling by phase (migrate's FAILURE_POLICY), with its undo steps recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbd_postcopy.migration import restore as restore_module
from nbd_postcopy.migration.migrate import Phase
from nbd_postcopy.migration.ram import RamRegion
from nbd_postcopy.migration.restore import RestoreError, RestoreOptions, _Restore


class FakeQmp:
    def __init__(self, calls: list[str]):
        self.calls = calls

    def execute(self, command, **kwargs):
        self.calls.append(f"qmp {command}")


class Recorder(_Restore):
    def __init__(self, tmp_path: Path, phase: Phase):
        super().__init__(RestoreOptions(tmp_path / "snap", tmp_path / "dst.qmp", tmp_path / "work", quiet=True))
        self.phase = phase
        self.pid = 200
        self.ram = RamRegion(address=0x7F0000000000, length=1 << 20, path="")
        self.server = type("Server", (), {"pid": 300})()
        self.calls: list[str] = []

    def _stop_server(self):
        self.calls.append("stop server")

    def _detach(self):
        self.calls.append("detach")


@pytest.fixture
def driver(tmp_path, monkeypatch):
    monkeypatch.setattr(restore_module, "wait_gone", lambda pid, timeout: None)
    return lambda phase: Recorder(tmp_path, phase)


def test_a_refusal_while_checking_starts_and_undoes_nothing(driver):
    restore = driver(Phase.CHECKING)
    restore._fail(FakeQmp(restore.calls), RestoreError("the snapshot does not match"))  # returns: re-raise
    assert restore.phase is Phase.FAILED and restore.calls == []


@pytest.mark.parametrize("phase", [Phase.SERVING, Phase.ATTACHING, Phase.STAGING, Phase.ARMING, Phase.SWITCHING])
def test_a_failure_before_the_resume_quits_the_qemu_and_removes_everything(driver, phase):
    restore = driver(phase)
    with pytest.raises(RestoreError, match="boom\nrolled back: the QEMU was told to quit"):
        restore._fail(FakeQmp(restore.calls), OSError("boom"))
    assert restore.phase is Phase.ROLLED_BACK
    assert restore.calls == ["qmp quit", "stop server", "detach"]


def test_a_failure_after_the_resume_leaves_the_page_server_and_the_device(driver, monkeypatch):
    monkeypatch.setattr(restore_module, "exited", lambda pid: False)
    restore = driver(Phase.RESUMED)
    with pytest.raises(RestoreError, match="after the resume: boom.*page server \\(pid 300\\).*finish with '.*detach rst"):
        restore._fail(FakeQmp(restore.calls), OSError("boom"))
    assert restore.phase is Phase.FAILED and restore.calls == []


def test_a_gone_qemu_after_the_resume_removes_the_page_server_and_the_device(driver, monkeypatch):
    monkeypatch.setattr(restore_module, "exited", lambda pid: pid == 200)
    restore = driver(Phase.RESUMED)
    with pytest.raises(RestoreError, match="QEMU \\(pid 200\\) exited after the resume"):
        restore._fail(FakeQmp(restore.calls), OSError("boom"))
    assert restore.calls == ["stop server", "detach"]


def test_a_failure_once_every_page_is_local_keeps_the_device(driver, monkeypatch):
    monkeypatch.setattr(restore_module, "exited", lambda pid: True)  # even then: the device holds every page
    restore = driver(Phase.RELEASED)
    with pytest.raises(RestoreError, match="after every page was local: boom.*left attached; finish with '"):
        restore._fail(FakeQmp(restore.calls), OSError("boom"))
    assert restore.phase is Phase.FAILED and restore.calls == []
