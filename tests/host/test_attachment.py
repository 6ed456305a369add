"""The attachment API (nbd_postcopy.host.attachment): the state record, the undo order, stop signals, and
attach / detach on the real device in-process (test_setup_swap.py runs the same code through the script).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nbd_postcopy.common.units import human_bytes
from nbd_postcopy.host import attachment
from nbd_postcopy.host.attachment import (
    Attachment,
    AttachmentError,
    AttachOptions,
    CollectingReporter,
    Interrupted,
    Settings,
    State,
    Target,
    UsageError,
    stop_signals_raise,
)
from tests.swapdev import (
    assert_nothing_left,
    attached_postcopy_swap,
    detach_left_behind,
    in_proc_swaps,
    is_mounted,
    loop_backing_file,
    path_without,
    process_matches,
    swaps_line,
)

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (swap, loop devices, FUSE)")

AWKWARD = "/tmp/a dir/it's \"quoted\" $HOME `id` \\ back\nslash ü*?[x]"


def awkward_state(state_dir: Path) -> State:
    return State(name="vm1", state_dir=str(state_dir), transport="fuse", device="/dev/loop3",
                 loop_device="/dev/loop3", fuse_dir=AWKWARD + "/fuse", fuse_disk=AWKWARD + "/fuse/disk",
                 socket=AWKWARD + "/nbdkit.sock", control="", supervisor_pid=4240, nbdkit_pid=4242, nbdfuse_pid=None,
                 priority=100, discard=False, size_bytes=71303168, standin=False, attached_at="2026-01-02T03:04:05Z",
                 plugin_args=["python", AWKWARD + "/postcopy.py", "source=nbd+unix:///?socket=/x y", "", "key=a'b"])


# --- the state record -----------------------------------------------------------------------------------


def test_state_json_round_trip(tmp_path):
    state = awkward_state(tmp_path)
    state.save()
    assert State.load(tmp_path) == state
    data = json.loads((tmp_path / "state.json").read_text())
    assert data["nbdfuse_pid"] is None and data["discard"] is False and data["plugin_args"][3] == ""
    assert not list(tmp_path.glob("*.tmp"))


def sourced(state_dir: Path, names: list[str]) -> tuple[dict[str, str], list[str]]:
    """What bash makes of STATE/state: the variables, and the plugin_args array."""
    script = ('. "$1/state" && shift && for v in "$@"; do printf "%s=%s\\0" "$v" "${!v}"; done; '
              'printf "plugin_args\\0"; for a in "${plugin_args[@]}"; do printf "%s\\0" "$a"; done')
    out = subprocess.run(["bash", "-c", script, "bash", str(state_dir), *names], capture_output=True, check=True,
                         env={"PATH": os.environ["PATH"]}).stdout.decode()
    items = out.split("\0")[:-1]
    marker = items.index("plugin_args")
    return dict(item.split("=", 1) for item in items[:marker]), items[marker + 1:]


def test_the_shell_file_sources_to_the_same_values(tmp_path):
    State(name="plain", state_dir=str(tmp_path), transport="fuse").save()
    names = [line.split("=", 1)[0] for line in (tmp_path / "state").read_text().splitlines()[1:-1]]
    # The variables README.md documents, in its order, then plugin_args=( ... ).
    assert names == ["name", "state_dir", "transport", "device", "loop_device", "nbd_device", "fuse_dir",
                     "fuse_disk", "socket", "control", "supervisor_pid", "nbdkit_pid", "nbdfuse_pid", "priority",
                     "discard", "size_bytes", "standin", "attached_at"]
    state = awkward_state(tmp_path)
    state.save()
    values, plugin_args = sourced(tmp_path, names)
    assert values["fuse_dir"] == AWKWARD + "/fuse" and values["socket"] == AWKWARD + "/nbdkit.sock"
    assert values["nbdfuse_pid"] == "" and values["nbd_device"] == "" and values["control"] == ""
    assert (values["nbdkit_pid"], values["priority"], values["discard"], values["standin"]) == ("4242", "100", "0", "0")
    assert values["size_bytes"] == "71303168" and values["attached_at"] == "2026-01-02T03:04:05Z"
    assert plugin_args == state.plugin_args


def test_an_empty_plugin_args_array_sources(tmp_path):
    State(name="x", state_dir=str(tmp_path), transport="nbd").save()
    assert (tmp_path / "state").read_text().splitlines()[-1] == "plugin_args=( )"
    values, plugin_args = sourced(tmp_path, ["name", "supervisor_pid", "discard"])
    assert values == {"name": "x", "supervisor_pid": "", "discard": "1"} and plugin_args == []


def test_load_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError):
        State.load(tmp_path)
    (tmp_path / "state").write_text("name=old\n")  # an older setup-swap.sh wrote only this
    with pytest.raises(AttachmentError, match="older setup-swap.sh"):
        State.load(tmp_path)
    (tmp_path / "state.json").write_text("[1, 2]")
    with pytest.raises(AttachmentError, match="not an attachment record"):
        State.load(tmp_path)


def test_pids_the_record_lacks_come_from_the_supervisor(tmp_path):
    state = State(name="x", state_dir=str(tmp_path), transport="fuse")
    (tmp_path / "pids").write_text("supervisor_pid=10\nnbdkit_pid=11\nnbdfuse_pid=12\n")
    state.adopt_pids()
    assert (state.supervisor_pid, state.nbdkit_pid, state.nbdfuse_pid) == (10, 11, 12)


def test_target_file(tmp_path):
    path = Target(4242, 0x7F0000000000, 1 << 28).save(tmp_path)
    assert path.read_text() == "target_pid=4242\ntarget_address=0x7f0000000000\ntarget_length=268435456\n"
    assert Target.load(tmp_path) == Target(4242, 0x7F0000000000, 1 << 28)
    path.write_text("target_pid=1\n")
    with pytest.raises(ValueError, match="target_length"):
        Target.load(tmp_path)
    path.unlink()
    assert Target.load(tmp_path) is None


def test_record_target_finds_the_attachment_by_device(tmp_path):
    run_dir, device = tmp_path / "run", tmp_path / "disk"
    device.write_bytes(b"")
    state_dir = tmp_path / "vm1"
    state_dir.mkdir(parents=True)
    run_dir.mkdir()
    (run_dir / "vm1").symlink_to(state_dir)
    (run_dir / "broken").mkdir()  # no state: skipped
    State(name="vm1", state_dir=str(state_dir), transport="fuse", device=str(device)).save()
    settings = Settings(run_dir=run_dir)
    assert attachment.record_target(str(tmp_path / "." / "disk"), Target(1, 4096, 8192), settings) == \
        state_dir / "target"
    assert Target.load(state_dir) == Target(1, 4096, 8192)
    assert attachment.record_target("/dev/null", Target(1, 4096, 8192), settings) is None


def test_status_lists_entries_with_and_without_state(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "empty").mkdir(parents=True)
    (run_dir / "vm1").mkdir()
    State(name="vm1", state_dir=str(run_dir / "vm1"), transport="fuse", device="/dev/no-such-loop",
          nbdkit_pid=2**22 + 1, size_bytes=1 << 20).save()
    entries = attachment.status(settings=Settings(run_dir=run_dir))
    assert [e["name"] for e in entries] == ["empty", "vm1"]
    assert entries[0]["device"] == "" and entries[0]["priority"] is None and entries[0]["plugin"] is None
    vm1 = entries[1]
    assert vm1["swap_active"] is False and vm1["priority"] == 32767 and vm1["size_bytes"] == 1 << 20
    assert vm1["processes"]["nbdkit"] == {"pid": 2**22 + 1, "state": "dead", "locked_kib": None}
    assert vm1["processes"]["supervisor"] == {"pid": None, "state": ""}
    assert list(vm1) == ["name", "state_dir", "device", "transport", "size_bytes", "swap_active", "swap_size_kib",
                         "swap_used_kib", "priority", "processes", "control_socket", "plugin"]
    with pytest.raises(AttachmentError, match="vm2 is not attached"):
        attachment.status("vm2", Settings(run_dir=run_dir))


def test_options_are_checked():
    for options, message in [
        (AttachOptions(["a=b"], name="-x"), "bad name '-x'"),
        (AttachOptions(["a=b"], priority=32768), "bad --priority '32768': want 0..32767"),
        (AttachOptions(["a=b"], threads=65), "bad --threads '65': want 1..64"),
        (AttachOptions(["a=b"], transport="tcp"), "bad --transport 'tcp'"),
        (AttachOptions(["=b"]), "bad plugin argument '=b'"),
    ]:
        with pytest.raises(UsageError, match=message):
            options.check()
    AttachOptions(["a=b", "c-d=x=y"], name="vm1.a_b-c", priority=0, threads=64).check()


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 71303168, 1 << 30, 5 << 40, 3 << 50)] == \
        ["0 B", "1023 B", "1.0 KiB", "68.0 MiB", "1.0 GiB", "5.0 TiB", "3072.0 TiB"]


def test_detach_command():
    command = attachment.detach_command("vm1", 42, 0x7F0000000000, 4096)
    assert command.endswith("detach vm1 --pid 42 --address 0x7f0000000000 --length 4096")


# --- the undo order, and stop signals -------------------------------------------------------------------


def scripted_attachment(tmp_path, fail_at: str | None = None, signal_at: str | None = None):
    """An Attachment whose steps and undo steps only record themselves in `calls`."""
    report = CollectingReporter("setup-swap.sh")
    thing = Attachment(State(name="vm1", state_dir=str(tmp_path), transport="fuse"), Settings(run_dir=tmp_path),
                       report)
    calls: list[str] = []

    def step(name: str):
        def run(*args):
            calls.append(name)
            if name == "_make_state_dir":
                args[1].append(thing._remove_state_dir)
            if name == signal_at:
                signal.raise_signal(signal.SIGTERM)
            if name == fail_at:
                raise AttachmentError(f"{name} failed")
        return run

    for name in ("_make_state_dir", "_start_supervisor", "_connect", "_swapon", "_swapoff", "_disconnect",
                 "_unmount", "_stop_processes", "_remove_state_dir"):
        setattr(thing, name, step(name))
    return thing, calls, report


def test_a_failed_step_undoes_the_steps_before_it_in_reverse(tmp_path):
    thing, calls, report = scripted_attachment(tmp_path, fail_at="_swapon")
    with pytest.raises(AttachmentError, match="_swapon failed") as info:
        thing._attach(AttachOptions(["a=b"]))
    assert info.value.reported
    assert calls == ["_make_state_dir", "_start_supervisor", "_connect", "_swapon",
                     "_swapoff", "_disconnect", "_unmount", "_stop_processes", "_remove_state_dir"]
    assert report.lines == ["_swapon failed", "undoing the steps done so far", "undone; nothing is left behind"]

    thing, calls, report = scripted_attachment(tmp_path, fail_at="_start_supervisor")
    with pytest.raises(AttachmentError):
        thing._attach(AttachOptions(["a=b"]))
    assert calls == ["_make_state_dir", "_start_supervisor", "_unmount", "_stop_processes", "_remove_state_dir"]


def test_detach_runs_every_undo_step_in_the_same_order(tmp_path):
    thing, calls, report = scripted_attachment(tmp_path)
    thing.detach(complete=False)
    assert calls == ["_swapoff", "_disconnect", "_unmount", "_stop_processes", "_remove_state_dir"]
    assert report.lines == ["detached vm1"]


def test_a_stop_signal_lets_the_step_finish_then_rolls_back(tmp_path):
    thing, calls, report = scripted_attachment(tmp_path, signal_at="_start_supervisor")
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals_raise():
        with pytest.raises(Interrupted) as info:
            thing._attach(AttachOptions(["a=b"]))
        assert info.value.exit_status == 143
        assert calls == ["_make_state_dir", "_start_supervisor", "_unmount", "_stop_processes", "_remove_state_dir"]
        assert report.lines[-1] == "undone; nothing is left behind"
        with pytest.raises(Interrupted):  # outside a step: at once
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


# --- the real device, in-process --------------------------------------------------------------------------


def attach_in_process(run_dir: Path, name: str, keys: dict, settings: Settings | None = None,
                      **options) -> tuple[Attachment, CollectingReporter]:
    report = CollectingReporter("setup-swap.sh")
    plugin_keys = [f"{k}={v}" for k, v in keys.items()]
    done = attachment.attach(AttachOptions(plugin_keys, name=name, state_dir=run_dir / name, **options),
                             settings or Settings.from_environ(), report)
    return done, report


def refused(run_dir: Path, name: str, keys: dict, settings: Settings | None = None) -> str:
    with pytest.raises(AttachmentError) as info:
        attach_in_process(run_dir, name, keys, settings)
    return str(info.value)


@root
def test_refuses_when_zswap_is_on(run_dir, plugin_keys):
    switch = run_dir / "zswap-enabled"
    switch.write_text("Y\n")
    settings = Settings.from_environ({**os.environ, "NBD_POSTCOPY_ZSWAP_ENABLED": str(switch)})
    message = refused(run_dir, "tzswap", plugin_keys, settings)
    assert f"zswap is on ({switch} = Y)" in message
    assert "echo N > /sys/module/zswap/parameters/enabled" in message
    assert_nothing_left(run_dir / "tzswap", "tzswap")


@root
@pytest.mark.slow
def test_refuses_when_real_zswap_is_on(run_dir, plugin_keys, swap_lock):
    knob = Path("/sys/module/zswap/parameters/enabled")
    before = knob.read_text().strip()
    try:
        knob.write_text("Y")
        message = refused(run_dir, "tzswap2", plugin_keys)
    finally:
        knob.write_text(before)
    assert f"zswap is on ({knob} = Y)" in message
    assert_nothing_left(run_dir / "tzswap2", "tzswap2")


@root
def test_refuses_when_a_tool_is_missing(run_dir, plugin_keys, monkeypatch):
    monkeypatch.setenv("PATH", path_without(run_dir, "nbdfuse", "fusermount3"))
    assert "missing tool(s): nbdfuse fusermount3" in refused(run_dir, "ttool", plugin_keys)
    assert_nothing_left(run_dir / "ttool", "ttool")


@root
@pytest.mark.slow
def test_refuses_a_taken_name(run_dir, plugin_keys, swap_lock):
    name = f"t{os.getpid()}d"
    with attached_postcopy_swap(run_dir, plugin_keys, name=name) as swap:
        message = refused(run_dir, name, plugin_keys)
        assert f"the name '{name}' is taken" in message and f"see 'setup-swap.sh status {name}'" in message
        assert not (run_dir / name).exists()
        # The first attachment is untouched.
        assert swaps_line(swap.device)
        assert process_matches(swap.nbdkit_pid, "nbdkit")
    assert_nothing_left(swap.state_dir, name)


@root
@pytest.mark.slow
def test_stand_in_plugin_round_trip(run_dir, swap_lock):
    """The testing aid: a stand-in nbdkit plugin, mkswap'd; attach, status and detach in-process."""
    settings = Settings.from_environ({**os.environ, "NBD_POSTCOPY_NBDKIT_PLUGIN": "memory size=16M"})
    name = f"t{os.getpid()}m"
    swap, report = attach_in_process(run_dir, name, {}, settings, priority=123, discard=False)
    try:
        assert report.lines == [f"attached {name}: {swap.state.device} (swap priority 123, 16.0 MiB, "
                                f"nbdkit pid {swap.state.nbdkit_pid})"]
        assert swap.state.plugin_args == ["memory", "size=16M"] and swap.state.control == ""
        assert Attachment.load(run_dir / name).state == swap.state
        (entry,) = attachment.status(name, settings)
        assert entry["swap_active"] and entry["priority"] == 123 and entry["plugin"] is None
        assert entry["processes"]["nbdfuse"]["state"] == "alive"
    finally:
        attachment.detach(name, complete=False, settings=settings, report=report)
    assert report.lines[-1] == f"detached {name}: {swap.state.device}"
    assert_nothing_left(run_dir / name, name)


TARGET_CHILD = r"""
import ctypes, mmap, sys
size = 1 << 20
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf[:] = b"x" * size
address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
print(hex(address), size, flush=True)
sys.stdin.read()
"""


@root
@pytest.mark.slow
def test_detach_runs_completion_for_the_recorded_target(run_dir, plugin_keys, swap_lock):
    """detach reads STATE/target (written by the stager) and completes that range first. The device is
    not armed, so completion refuses: detach warns and goes on (swapoff reads the rest in)."""
    target = subprocess.Popen([sys.executable, "-c", TARGET_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    name = f"t{os.getpid()}c"
    state_dir = run_dir / name
    try:
        address, length = target.stdout.readline().split()
        swap, report = attach_in_process(run_dir, name, plugin_keys)
        assert attachment.record_target(swap.state.device, Target(target.pid, int(address, 16), int(length))) == \
            state_dir / "target"
        attachment.detach(name, report=report)
        assert f"completing: nbd-postcopy complete --pid {target.pid} --address {address} --length {length}" \
            f" --control {state_dir / 'control.sock'}" in report.lines
        assert any(line.startswith("warning: completion failed (") and "is not armed" in line
                   for line in report.lines)
        assert report.lines[-1] == f"detached {name}: {swap.state.device}"
    finally:
        attachment.detach(name, complete=False)
        target.stdin.close()
        target.wait(10)
    assert_nothing_left(state_dir, name)


@root
@pytest.mark.slow
def test_detach_stops_at_a_failing_swapoff(run_dir, plugin_keys, swap_lock, monkeypatch):
    """swapoff failing (e.g. ENOMEM) must leave the device and nbdkit alone: the pages are still needed."""
    bin_dir = Path(path_without(run_dir, "swapoff"))
    (bin_dir / "swapoff").write_text("#!/bin/sh\necho \"swapoff: $1: swapoff failed: Cannot allocate memory\" >&2\n"
                                     "exit 255\n")
    (bin_dir / "swapoff").chmod(0o755)
    with attached_postcopy_swap(run_dir, plugin_keys) as swap:
        report = CollectingReporter("setup-swap.sh")
        with monkeypatch.context() as patch:
            patch.setenv("PATH", str(bin_dir))
            with pytest.raises(AttachmentError, match=f"{swap.name} is only partly detached; fix the above and "
                                                      f"run: setup-swap.sh detach {swap.name}"):
                attachment.detach(swap.name, complete=False, report=report)
        assert (f"swapoff {swap.device} failed: swapoff: {swap.device}: swapoff failed: Cannot allocate memory. "
                "Nothing else was touched") in report.text
        assert in_proc_swaps(swap.device)
        assert loop_backing_file(swap.device) == str(swap.fuse_dir / "disk")
        assert is_mounted(swap.fuse_dir)
        assert process_matches(swap.nbdkit_pid, "nbdkit") and process_matches(swap.supervisor_pid, "supervisor")
    assert_nothing_left(swap.state_dir, swap.name)


@root
def test_detach_of_an_entry_without_state_removes_it(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "half").mkdir(parents=True)
    report = CollectingReporter()
    attachment.detach("half", settings=Settings(run_dir=run_dir), report=report)
    assert report.lines == ["detached half (it had no state: nothing was running)"]
    assert not (run_dir / "half").exists()


@root
def test_detach_leaves_an_entry_whose_state_went_missing_under_a_mount_alone(tmp_path):
    """No state record, but something still mounted in the state directory: a person must look."""
    run_dir = tmp_path / "run"
    mount_point = run_dir / "lost" / "fuse"
    mount_point.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "none", str(mount_point)], check=True)
    try:
        with pytest.raises(AttachmentError, match=f"lost has no state record .* {mount_point} is still mounted"):
            attachment.detach("lost", settings=Settings(run_dir=run_dir), report=CollectingReporter())
        assert is_mounted(mount_point)
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@root
@pytest.mark.slow
def test_run_dir_takes_down_an_attachment_left_behind(run_dir, plugin_keys, swap_lock):
    """A driver that fails, or a process a test kills, can leave its device attached; the run_dir fixture
    detaches every attachment whose state lies under it, so none spills into later tests."""
    name = f"t{os.getpid()}l"
    state_dir = run_dir / "receiver-work" / name
    state_dir.parent.mkdir()
    swap, _ = attach_in_process(state_dir.parent, name, plugin_keys)
    try:
        assert in_proc_swaps(swap.state.device)
        (run_dir / "unrelated").mkdir()
        (run_dir / "unrelated" / "state.json").write_text("{}")  # not an attachment's record: left alone
        assert detach_left_behind(run_dir) == [name]
        assert not in_proc_swaps(swap.state.device)
        assert detach_left_behind(run_dir) == []
    finally:
        attachment.detach(name, complete=False)
    assert_nothing_left(state_dir, name)
