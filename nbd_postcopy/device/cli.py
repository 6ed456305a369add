"""`nbd-postcopy plugin-path`: where the destination device's nbdkit plugin file is."""

from __future__ import annotations

import argparse

from ..common.command import CommandError
from . import plugin_path

HELP = "print the path of the destination device's nbdkit plugin file"
DESCRIPTION = """\
Print the absolute path of the nbdkit Python plugin that is the destination device (the file that
ships inside the installed package; in a checkout, plugin/postcopy.py links to it). nbdkit's embedded
Python must be able to import nbd_postcopy and its dependencies: in a venv, put its site-packages on
PYTHONPATH (scripts/install.sh does that for a checkout with a .pth file).

examples:
  nbdkit python "$(nbd-postcopy plugin-path)" --dump-plugin
  nbdkit -U /run/vm1.sock python "$(nbd-postcopy plugin-path)" source=nbd://src:10809/ram pages=65536 key=/run/vm1.key
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    path = plugin_path()
    if not path.is_file():
        raise CommandError(f"the plugin file {path} is missing: reinstall nbd-postcopy")
    print(path)
    return 0
