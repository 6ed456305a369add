"""The kernel lab itself (boots Debian 12's kernel, runs a command, returns its status and output, stops
QEMU), and the tests in tests/lab/, run inside it: one boot runs them all, one test here per module."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from nbd_postcopy.testbench.lab import LabTimeout, in_lab, prepare_lab, run_in_lab
from tests.swapdev import processes_mentioning

REPO = Path(__file__).resolve().parents[2]
LAB_TESTS = REPO / "tests" / "lab"
LAB_MODULES = sorted(p.stem for p in LAB_TESTS.glob("test_*.py"))
SUITE_TIME_LIMIT = 900.0

pytestmark = [
    pytest.mark.lab,
    pytest.mark.slow,
    pytest.mark.skipif(in_lab(), reason="the lab does not boot itself"),
]


@pytest.fixture(scope="module")
def lab_image():
    return prepare_lab()


def test_lab_runs_a_command_on_debian_12s_kernel(lab_image, run_dir):
    share = run_dir / "share"
    share.mkdir()
    lines = []
    command = (f"uname -r; echo to-stderr >&2; cat /sys/fs/cgroup/cgroup.controllers; "
               f"test -e /sys/module/nbd && echo nbd-loaded; echo written > {share}/out; "
               f"touch {REPO}/lab-was-here 2>/dev/null || echo root-is-read-only")
    result = run_in_lab(command, time_limit=180, image=lab_image, console_log=run_dir / "console.log",
                        shares=[share], on_line=lines.append)

    assert result.status == 0, result.output
    release, *rest = result.output.splitlines()
    assert release == lab_image.release and release.startswith("6.1."), result.output
    assert "to-stderr" in rest and "nbd-loaded" in rest and "root-is-read-only" in rest
    assert "memory" in rest[1].split()  # the memory controller on cgroup v2
    assert (share / "out").read_text() == "written\n"
    assert not (REPO / "lab-was-here").exists()
    assert release in lines  # the callback saw the console as it streamed
    assert release in (run_dir / "console.log").read_text()


def test_a_failing_commands_status_comes_back(lab_image, run_dir):
    result = run_in_lab(["sh", "-c", "echo failing; exit 7"], time_limit=180, image=lab_image,
                        console_log=run_dir / "console.log")
    assert (result.status, result.output) == (7, "failing")


def test_a_timeout_stops_qemu_and_leaves_no_process(lab_image, run_dir):
    before = set(processes_mentioning("nbdpc-lab-"))
    with pytest.raises(LabTimeout, match="did not end within 40s") as caught:
        run_in_lab("echo started; sleep 600", time_limit=40, image=lab_image, console_log=run_dir / "console.log")
    assert caught.value.output == "started"
    assert set(processes_mentioning("nbdpc-lab-")) <= before


# --- tests/lab/ inside the lab -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab_suite(lab_image, tmp_path_factory):
    """Run `pytest tests/lab` once inside the lab; yields (its output, junit testcases by module)."""
    share = tmp_path_factory.mktemp("lab-suite")
    junit = share / "junit.xml"
    result = run_in_lab(
        [REPO / ".venv" / "bin" / "python", "-m", "pytest", "tests/lab", "-p", "no:cacheprovider", "-q", "-ra",
         f"--junitxml={junit}"],
        time_limit=SUITE_TIME_LIMIT, image=lab_image, cwd=REPO, env={"PYTHONPATH": str(REPO)}, shares=[share],
        console_log=share / "console.log")
    cases: dict[str, list[ElementTree.Element]] = {}
    if junit.exists():
        for case in ElementTree.parse(junit).iter("testcase"):
            cases.setdefault(case.get("classname", "").split(".")[-1], []).append(case)
    return result, cases


@pytest.mark.root
@pytest.mark.parametrize("module", LAB_MODULES)
def test_in_the_lab(lab_suite, module):
    result, cases = lab_suite
    ran = cases.get(module, [])
    failed = [c.get("name") for c in ran if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c.get("name") for c in ran if c.find("skipped") is not None]
    assert ran and not failed and not skipped, (
        f"tests/lab/{module}.py inside the lab: ran {len(ran)}, failed {failed}, skipped {skipped}; "
        f"pytest exited {result.status}:\n{result.output}")
