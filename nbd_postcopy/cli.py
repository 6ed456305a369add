"""The `nbd-postcopy` command: one subcommand per job, each defined next to the code it drives.

Every module named in COMMANDS provides:
    HELP: str                      one line for the command list
    DESCRIPTION: str               the subcommand's --help text (may hold examples)
    configure_parser(parser)       adds the subcommand's options
    run(args) -> int               does the work; returns the exit status
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from . import __version__
from .common.command import CommandError

COMMANDS = {
    "serve": "nbd_postcopy.source.cli",
    "stage": "nbd_postcopy.host.stage_cli",
    "complete": "nbd_postcopy.host.complete_cli",
    "swap": "nbd_postcopy.host.swap_cli",
    "migrate": "nbd_postcopy.migration.cli",
    "receive": "nbd_postcopy.migration.receive_cli",
    "snapshot": "nbd_postcopy.migration.snapshot_cli",
    "restore": "nbd_postcopy.migration.restore_cli",
    "demo": "nbd_postcopy.testbench.demo",
    "plugin-path": "nbd_postcopy.device.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbd-postcopy",
        description="Postcopy live migration that uses kernel swap over an NBD export as the page-fault hook.",
        epilog="Run 'nbd-postcopy COMMAND --help' for the options and examples of each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # not built yet
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.configure_parser(p)
        p.set_defaults(_run=module.run)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`, a service manager's stop), handled as Ctrl-C is: the command undoes what it
    started (migrate and receive roll back, staging and completion leave nothing half done)."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # (one started with SIGTERM ignored keeps ignoring it)
        signal.signal(signal.SIGTERM, _terminate)  # (serve installs its own handler in its event loop)
    try:
        return args._run(args) or 0
    except CommandError as exc:
        print(f"nbd-postcopy {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"nbd-postcopy {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"nbd-postcopy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the package's copy of this module, so that subcommands raise the same CommandError class.
    from nbd_postcopy.cli import main as package_main

    sys.exit(package_main())
