"""The migration driver's phases, their transition table and the failure policy, without QEMU."""

from pathlib import Path

import pytest

from nbd_postcopy.common.qmp import VmError
from nbd_postcopy.migration import destination as destination_module
from nbd_postcopy.migration import migrate as migrate_module
from nbd_postcopy.migration.destination import check_destination_alive
from nbd_postcopy.migration.migrate import (
    FAILURE_POLICY,
    FINAL,
    TRANSITIONS,
    MigrateError,
    MigrateOptions,
    Phase,
    PhaseError,
    Policy,
    _Migration,
)
from nbd_postcopy.migration.ram import RamRegion

SWITCHOVER_AND_BEFORE = [Phase.SERVING, Phase.ATTACHING, Phase.STAGING, Phase.ARMING, Phase.SWITCHING]


def test_every_phase_has_a_row_and_a_failure_policy():
    assert set(TRANSITIONS) == set(Phase) == set(FAILURE_POLICY)
    assert all(following <= set(Phase) for following in TRANSITIONS.values())
    assert FINAL == {Phase.DETACHED, Phase.ROLLED_BACK, Phase.FAILED}


def test_every_phase_reaches_an_end_and_every_phase_is_reachable():
    reachable, todo = {Phase.CHECKING}, [Phase.CHECKING]
    while todo:
        for following in TRANSITIONS[todo.pop()]:
            if following not in reachable:
                reachable.add(following)
                todo.append(following)
    assert reachable == set(Phase)
    for phase in Phase:
        ends, todo = set(), [phase]
        while todo:
            current = todo.pop()
            ends |= {current} & FINAL
            todo += TRANSITIONS[current]
        assert ends, f"{phase.name} never ends"


def test_rollback_is_the_policy_exactly_until_the_guest_resumes():
    assert [p for p in Phase if FAILURE_POLICY[p] is Policy.ROLL_BACK] == SWITCHOVER_AND_BEFORE
    assert all(Phase.ROLLED_BACK in TRANSITIONS[p] for p in SWITCHOVER_AND_BEFORE)
    # no way back once the guest runs at the destination
    after = {Phase.RESUMED, Phase.RELEASED, Phase.COMPLETED, Phase.DETACHED}
    assert all(Phase.ROLLED_BACK not in TRANSITIONS[p] for p in after)
    assert FAILURE_POLICY[Phase.RESUMED] is Policy.KEEP_SOURCE
    assert FAILURE_POLICY[Phase.RELEASED] is Policy.KEEP_DEVICE


class Recorder(_Migration):
    """A driver whose undo steps only record that they ran."""

    def __init__(self, tmp_path: Path, phase: Phase):
        super().__init__(MigrateOptions(tmp_path / "src.qmp", tmp_path / "dst.qmp", tmp_path / "work", quiet=True))
        self.phase = phase
        self.src_pid, self.dst_pid = 100, 200
        self.dst_ram = RamRegion(address=0x7F0000000000, length=1 << 20, path="")
        self.calls: list[str] = []

    def _roll_back(self, source, destination, cause):
        self.calls.append("roll back")

    def _stop_server(self):
        self.calls.append("stop server")

    def _detach(self):
        self.calls.append("detach")


@pytest.fixture
def driver(tmp_path):
    return lambda phase: Recorder(tmp_path, phase)


def test_the_happy_paths_are_legal(driver):
    for path in ([Phase.SERVING, Phase.ATTACHING, Phase.STAGING, Phase.ARMING, Phase.SWITCHING, Phase.RESUMED,
                  Phase.RELEASED, Phase.COMPLETED, Phase.DETACHED],
                 [Phase.SERVING, Phase.ATTACHING, Phase.STAGING, Phase.ARMING, Phase.SWITCHING, Phase.RESUMED,
                  Phase.COMPLETED, Phase.DETACHED]):
        migration = driver(Phase.CHECKING)
        for phase in path:
            migration._enter(phase)
        assert migration.phase is Phase.DETACHED


@pytest.mark.parametrize("start, illegal", [
    (Phase.CHECKING, Phase.SWITCHING), (Phase.CHECKING, Phase.ROLLED_BACK), (Phase.STAGING, Phase.SWITCHING),
    (Phase.RESUMED, Phase.ROLLED_BACK), (Phase.RELEASED, Phase.RESUMED), (Phase.DETACHED, Phase.FAILED),
    (Phase.ROLLED_BACK, Phase.SERVING), (Phase.SERVING, Phase.SERVING),
])
def test_an_illegal_transition_is_a_bug(driver, start, illegal):
    migration = driver(start)
    with pytest.raises(PhaseError, match=f"wrong migration phase: {start.name} -> {illegal.name}"):
        migration._enter(illegal)
    assert migration.phase is start


def test_a_failure_while_checking_is_raised_as_it_is(driver):
    migration = driver(Phase.CHECKING)
    migration._fail(None, None, MigrateError("the source QEMU is 'paused', not running"))  # returns: re-raise
    assert migration.phase is Phase.FAILED and migration.calls == []


@pytest.mark.parametrize("phase", SWITCHOVER_AND_BEFORE)
def test_a_failure_up_to_the_switchover_rolls_back(driver, phase):
    migration = driver(phase)
    with pytest.raises(MigrateError, match="boom\nrolled back: the source VM keeps running"):
        migration._fail(None, None, OSError("boom"))
    assert migration.phase is Phase.ROLLED_BACK and migration.calls == ["roll back"]
    migration = driver(phase)
    migration._fail(None, None, KeyboardInterrupt())  # rolled back, then Ctrl-C goes on as it is
    assert migration.phase is Phase.ROLLED_BACK and migration.calls == ["roll back"]


def test_a_failure_after_the_switchover_leaves_the_source_and_the_page_server(driver, monkeypatch):
    monkeypatch.setattr(migrate_module, "_exited", lambda pid: False)
    migration = driver(Phase.RESUMED)
    migration.server = type("Server", (), {"pid": 300})()
    with pytest.raises(MigrateError, match="completion failed after the switchover: boom.*page server \\(pid 300\\)"
                                           ".*retry with '.*detach mig"):
        migration._fail(None, None, OSError("boom"))
    assert migration.phase is Phase.FAILED and migration.calls == []


def test_a_gone_destination_after_the_switchover_removes_the_page_server_and_the_device(driver, monkeypatch):
    monkeypatch.setattr(migrate_module, "_exited", lambda pid: pid == 200)
    migration = driver(Phase.RESUMED)
    with pytest.raises(MigrateError, match="destination QEMU \\(pid 200\\) exited after the switchover"):
        migration._fail(None, None, OSError("boom"))
    assert migration.phase is Phase.FAILED and migration.calls == ["stop server", "detach"]


def test_a_failure_after_the_release_keeps_the_device(driver, monkeypatch):
    monkeypatch.setattr(migrate_module, "_exited", lambda pid: True)  # even then: the device holds every page
    migration = driver(Phase.RELEASED)
    with pytest.raises(MigrateError, match="after the source was released: boom.*left attached; retry with '"):
        migration._fail(None, None, OSError("boom"))
    assert migration.phase is Phase.FAILED and migration.calls == []


@pytest.mark.parametrize("phase", [Phase.COMPLETED, Phase.FAILED])
def test_a_failure_after_completion_or_already_reported_is_raised_as_it_is(driver, phase):
    migration = driver(phase)
    migration._fail(None, None, MigrateError("completion ended but the device still has 3 pages to fetch"))
    assert migration.phase is Phase.FAILED and migration.calls == []


@pytest.mark.parametrize("fails_at", ["send", "expect"])
def test_a_channel_lost_while_announcing_local_costs_only_the_release_confirmation(tmp_path, fails_at):
    """At `local` the guest needs nothing more from the source: a channel lost then (on sending `local` or
    waiting for `released`) makes Receiver._announce_local() report no confirmation, with a warning,
    instead of raising (receive then completes; no end-to-end test cuts the channel at that moment)."""
    import io

    from nbd_postcopy.migration import channel as ch
    from nbd_postcopy.migration.receive import ReceiveOptions, Receiver

    class LostChannel:
        def send(self, message_type, **fields):
            if fails_at == "send":
                raise ch.ChannelError("the sender closed the channel")

        def expect(self, message_type, timeout):
            raise ch.ChannelError("the sender closed the channel")

    out = io.StringIO()
    receiver = Receiver(ReceiveOptions(Path("/nonexistent.qmp"), "127.0.0.1", 0, tmp_path, stream=out))
    receiver.channel = LostChannel()
    assert receiver._announce_local() is False
    assert "did not confirm the source's release" in out.getvalue()


class _LostQmp:
    def status(self):
        raise VmError("query-status failed: Disconnected")


@pytest.mark.parametrize("exits", [True, False], ids=["exits", "stays"])
def test_a_destination_whose_qmp_drops_is_waited_for_and_reported_as_what_it_is(monkeypatch, exits):
    """QEMU drops its QMP connection a moment before its process is gone: check_destination_alive waits
    for the exit and reports it as one (so the drivers take the device down); a QEMU still there after
    the wait is reported as no longer answering QMP."""
    clock = {"checks": 0}

    def exited(pid):
        clock["checks"] += 1
        return exits and clock["checks"] > 2  # alive at first, gone a few looks later

    monkeypatch.setattr(destination_module, "exited", exited)
    monkeypatch.setattr(destination_module, "QMP_LOSS_EXIT_WAIT", 0.3)
    expected = "exited after the switchover" if exits else "no longer answers QMP after the switchover"
    with pytest.raises(MigrateError, match=f"destination QEMU \\(pid 200\\) {expected}"):
        check_destination_alive(_LostQmp(), 200)


def test_device_keys_are_checked_as_the_plugin_checks_them_and_given_once(tmp_path):
    assert destination_module.device_key("warm=off") == "warm=off"
    assert destination_module.device_key(f"cache-dir={tmp_path}") == f"cache-dir={tmp_path}"
    for text, message in [("warm", "give KEY=VALUE"), ("warm=maybe", "warm=maybe: must be one of on, off"),
                          ("source=nbd://x", "source= cannot be given here \\(the command sets it itself\\)"),
                          ("colour=red", "colour= cannot be given here \\(there is no such plugin key\\)"),
                          ("cache-dir=/no/such/dir", "not a writable directory")]:
        with pytest.raises(ValueError, match=message):
            destination_module.device_key(text)
    keys = ["source=x", "timeout=5"]
    assert destination_module.with_device_keys(keys, ("warm=off",)) == [*keys, "warm=off"]
    for extra in [("timeout=9",), ("warm=off", "warm=on")]:
        with pytest.raises(MigrateError, match="is given twice"):
            destination_module.with_device_keys(keys, extra)


def test_prefetch_cpus_auto_is_the_last_cpu_of_two_or_more(monkeypatch):
    monkeypatch.setattr(destination_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert destination_module.prefetch_cpus("auto") == {3}
    assert destination_module.prefetch_cpus("all") is None
    assert destination_module.prefetch_cpus("1-2") == {1, 2}
    with pytest.raises(destination_module.MigrateError, match="prefetch CPUs '9': CPU 9 is not one this process may use"):
        destination_module.prefetch_cpus("9")
    assert destination_module.serve_cpus_args(frozenset({3})) == ["--cpus", "3"]
    assert destination_module.serve_cpus_args(None) == []
    assert destination_module.prefetch_cpus_key(frozenset({1, 2})) == ["prefetch-cpus=1-2"]
    assert destination_module.prefetch_cpus_key(None) == []
    monkeypatch.setattr(destination_module.os, "sched_getaffinity", lambda pid: {5})
    assert destination_module.prefetch_cpus("auto") is None  # one CPU: nothing to leave the guest
