"""The project as an installed package: a non-editable `pip install` of a copy of the checkout into a fresh
venv gives a working `nbd-postcopy` (migrate included) and an nbdkit plugin file that nbdkit loads.

Depends: /usr/bin/python3 with venv, pip and setuptools (Debian's python3-venv), the Debian packages of the
declared dependencies (python3-construct, python3-prometheus-client, python3-pyroute2), nbdkit with its
python plugin. qemu.qmp is not a Debian package: the fresh venv borrows the one this test runs with, and asks
PyPI only if there is none.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from nbd_postcopy.cli import main as cli_main
from nbd_postcopy.device import plugin_path
from tests.conftest import PLUGIN, REPO

SYSTEM_PYTHON = "/usr/bin/python3"
# The declared dependencies that come from Debian's packages (the venv sees them via --system-site-packages).
SYSTEM_MODULES = ["construct", "prometheus_client", "pyroute2"]
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache")


def test_plugin_path_is_the_packaged_plugin_file():
    path = plugin_path()
    assert path.is_absolute() and path.is_file()
    assert path == (REPO / "nbd_postcopy" / "device" / "nbdkit_plugin.py").resolve()
    assert PLUGIN.resolve() == path  # plugin/postcopy.py in the checkout is a link to it


def test_plugin_path_command_prints_it(capsys):
    assert cli_main(["plugin-path"]) == 0
    assert capsys.readouterr().out == f"{plugin_path()}\n"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH (the test run's own may point at the checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    """Run argv from a neutral cwd and without PYTHONPATH; fail with its output if it fails."""
    kwargs.setdefault("cwd", "/")
    kwargs.setdefault("env", clean_env())
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def importable(python: Path, module: str) -> bool:
    result = subprocess.run([str(python), "-c", f"import {module}"], cwd="/", env=clean_env(), capture_output=True)
    return result.returncode == 0


def provide_qemu_qmp(python: Path, site_packages: Path, borrowed: Path) -> None:
    """Make qemu.qmp importable in the venv without the network when this interpreter has it: link its
    package (and metadata) into `borrowed` and put that directory on the venv's path with a .pth file."""
    if importable(python, "qemu.qmp"):
        return
    spec = importlib.util.find_spec("qemu.qmp")
    if spec is None or spec.origin is None:
        run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "qemu.qmp"])
        return
    qemu_dir = Path(spec.origin).parent.parent
    borrowed.mkdir()
    (borrowed / "qemu").symlink_to(qemu_dir)
    for metadata in qemu_dir.parent.glob("qemu_qmp-*.dist-info"):
        (borrowed / metadata.name).symlink_to(metadata)
    (site_packages / "nbd-postcopy-test-qemu-qmp.pth").write_text(f"{borrowed}\n")


@pytest.mark.slow
def test_non_editable_install_in_a_fresh_venv():
    if not Path(SYSTEM_PYTHON).exists() or shutil.which("nbdkit") is None:
        pytest.skip("needs /usr/bin/python3 and nbdkit")
    tmp = Path(tempfile.mkdtemp(prefix="nbdpc-install-", dir="/tmp"))
    try:
        source = tmp / "source"  # a copy, so that the checkout is not what gets imported
        shutil.copytree(REPO, source, symlinks=True, ignore=COPY_IGNORE)
        venv = tmp / "venv"
        run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", venv])
        python = venv / "bin" / "python"
        site_packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                             .stdout.strip())
        for module in SYSTEM_MODULES:
            assert importable(python, module), f"the fresh venv cannot import {module} from Debian's packages"
        provide_qemu_qmp(python, site_packages, tmp / "borrowed")
        run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
             "--no-build-isolation", source])
        shutil.rmtree(source)  # nothing may still need the tree it was installed from

        imported = run([python, "-c", "import nbd_postcopy; print(nbd_postcopy.__file__)"]).stdout.strip()
        assert Path(imported).is_relative_to(site_packages), imported
        command = venv / "bin" / "nbd-postcopy"
        assert "migrate" in run([command, "--help"]).stdout
        assert "--source-qmp" in run([command, "migrate", "--help"]).stdout
        plugin = Path(run([command, "plugin-path"]).stdout.strip())
        assert plugin.is_file() and plugin.is_relative_to(site_packages), plugin
        assert (site_packages / "nbd_postcopy" / "testbench" / "data" / "memcheck.c").is_file()

        dump = run(["nbdkit", "python", plugin, "--dump-plugin"], env=clean_env(PYTHONPATH=str(site_packages))).stdout
        assert "postcopy_key_source=" in dump
        guest = run([python, "-c", "from nbd_postcopy.testbench.guest import memcheck_source; "
                     "print(len(memcheck_source()))"])
        assert int(guest.stdout) > 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
