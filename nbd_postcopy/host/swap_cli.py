"""`scripts/setup-swap.sh` and `nbd-postcopy swap`: attach, detach and report the postcopy swap device.

The command line over nbd_postcopy.host.attachment: options, help texts, messages and exit statuses
(0 success, 1 refused or failed, 2 bad usage, 128 + N after stop signal N) as README.md documents them
for scripts/setup-swap.sh, which runs `python -m nbd_postcopy.host.swap_cli --prog setup-swap.sh ARGS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from ..common.units import human_bytes
from .attachment import (
    MAX_PRIORITY,
    AttachmentError,
    AttachOptions,
    Interrupted,
    Reporter,
    Settings,
    Target,
    UsageError,
    attach,
    check_number,
    detach,
    status,
    stop_signals_raise,
)
from .stage_cli import parse_address, parse_size

COMMANDS = ("attach", "detach", "status")

# --- help ------------------------------------------------------------------------------------------------


def usage_main(prog: str, settings: Settings) -> str:
    return f"""\
Usage: {prog} COMMAND [OPTIONS]

Attach the nbd-postcopy device as a swap area, report on it, and take it down again.

Commands:
  attach   start nbdkit with plugin/postcopy.py, connect it as a block device, swapon it
  detach   run completion, swapoff, disconnect, stop nbdkit, remove the state
  status   show each attachment: device, size, swap use, priority, processes, plugin state

Run '{prog} COMMAND --help' for the options of each command.

How it fits together (destination host, as root):
  1. {prog} attach --name vm1 -- source=nbd://SRC:10809/ram pages=65536 key=/run/vm1.key
  2. nbd-postcopy stage --pid QEMU_PID ... --device /dev/loopN      (markers out to the device)
  3. the guest runs; swap-ins fetch pages from the source
  4. {prog} detach vm1 --pid QEMU_PID --address ADDR --length BYTES (pre-page the rest, tear down)

nbdkit runs with -f --swap (memory locked) under a small supervisor process
(python -m nbd_postcopy.host.supervisor), so the device outlives this command. Every attachment keeps
its state in a directory (default {settings.run_dir}/NAME): 'state.json' (the record), 'state' (the same,
shell-sourceable), 'log', 'pids', nbdkit.sock, control.sock and the FUSE mount fuse/disk.

Exit status: 0 success, 1 refused or failed (a message says why), 2 bad usage.
"""


def usage_attach(prog: str, settings: Settings) -> str:
    return f"""\
Usage: {prog} attach [--name NAME] [--priority N] [--transport auto|nbd|fuse]
                    [--state-dir DIR] [--threads N] [--no-discard] -- PLUGIN_KEY=VALUE...

Start nbdkit with plugin/postcopy.py and the given KEY=VALUE arguments under a supervisor, connect
the export as a block device and swapon it. Prints the name and the device:
  attached vm1: /dev/loop3 (swap priority 32767, 1.0 GiB, nbdkit pid 4242)

Options:
  --name NAME          attachment name, [A-Za-z0-9][A-Za-z0-9_.-]* up to 32 characters
                       (default: the first free postcopyN)
  --priority N         swap priority 0..{MAX_PRIORITY} (default {MAX_PRIORITY}: the highest, so that
                       staging's MADV_PAGEOUT lands on this device and nowhere else)
  --transport T        auto (default): kernel nbd (nbd-client) when the nbd module exists,
                       otherwise fuse; fuse: nbdfuse STATE/fuse/disk + losetup --direct-io=on
  --state-dir DIR      keep the state here instead of {settings.run_dir}/NAME (must not exist yet;
                       its path must be short: it holds Unix sockets)
  --threads N          nbdkit threads per connection (default 4). Every thread stack is locked
                       in memory, so keep this small.
  --no-discard         swapon without --discard=pages (by default freed swap slots reach the
                       plugin as NBD TRIM, which frees the slot and its overlay)

Plugin keys (after --) go to plugin/postcopy.py as they are, e.g. source=URI pages=N key=FILE.
control=STATE/control.sock is added unless you give control=. Unknown keys are refused by the plugin.

Refuses when: not root; zswap is on (it would keep swapped-out pages in RAM and the device would
never see them); a tool is missing (nbdkit and its python plugin, losetup, swapon, swapoff, and
nbdfuse + fusermount3 or nbd-client for the transport); the name is taken. If any step fails, every
step done so far is undone in reverse order, and nothing is left behind.

The fuse transport needs loop direct I/O: without it the loop device's page cache answers
swap-ins with the staging markers instead of asking nbdkit, and the guest reads garbage. attach
checks /sys/block/loopN/loop/dio = 1 and refuses otherwise.

Testing aid: NBD_POSTCOPY_NBDKIT_PLUGIN="memory size=256M" runs that nbdkit plugin instead of
plugin/postcopy.py (keys after -- are appended, no control= is added) and writes a swap header
with mkswap, because a stand-in does not make its own.

Example:
  {prog} attach --name vm1 -- source=nbd+unix:///ram?socket=/run/src.sock pages=65536 key=/run/vm1.key
"""


def usage_detach(prog: str, settings: Settings) -> str:
    return f"""\
Usage: {prog} detach NAME [--no-complete] [--pid PID --address ADDR --length BYTES]

Take the attachment down, in this order:
  1. completion: what nbd-postcopy complete --pid PID --address ADDR --length BYTES does, pre-paging
     every page still on the device into the target process (skipped with --no-complete or when no
     target is known; a failure is a warning). The target comes from the options, else from
     STATE/target (target_pid=, target_address=, target_length=), which the stager may write.
  2. swapoff (reads every remaining slot in; may take a while, and fails with ENOMEM if the pages
     do not fit in memory: then nothing else is touched and you can retry)
  3. losetup -d (fuse) or nbd-client -d (nbd)
  4. fusermount3 -u STATE/fuse
  5. stop the supervisor (SIGTERM) and wait for nbdkit to exit
  6. remove the state directory

Every step checks first whether there is anything to undo, so detach can be re-run after a partial
failure. Exit status 0 only when nothing remains (also when NAME is not attached at all).

Example:
  {prog} detach vm1 --pid 4242 --address 0x7f0000000000 --length 268435456
"""


def usage_status(prog: str, settings: Settings) -> str:
    return f"""\
Usage: {prog} status [NAME] [--json]

For each attachment (or just NAME): device, size, swap used and priority (from /proc/swaps),
whether the supervisor, nbdkit and nbdfuse are alive, nbdkit's locked memory, and the plugin's
control 'status' (armed, mapped, remaining, complete) when its control socket answers.
--json prints a JSON array with one object per attachment.

Exit status: 0, or 1 when NAME is not attached.
"""


USAGES: dict[str, Callable[[str, Settings], str]] = {
    "attach": usage_attach,
    "detach": usage_detach,
    "status": usage_status,
}

# --- the commands ----------------------------------------------------------------------------------------


class ConsoleReporter(Reporter):
    """Lines for people: results on stdout; errors and warnings on stderr as 'PROG: COMMAND: ...'."""

    def __init__(self, prog: str, command: str):
        super().__init__(prog, progress=sys.stderr)
        self.command = command

    def info(self, message: str) -> None:
        print(message, flush=True)

    def warning(self, message: str) -> None:
        print(f"{self.prog}: {self.command}: warning: {message}", file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        print(f"{self.prog}: {self.command}: {message}", file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    """argparse for the options; its errors become UsageError with the script's own wording."""

    def __init__(self) -> None:
        super().__init__(add_help=False, allow_abbrev=False)
        self.add_argument("-h", "--help", action="store_true")

    def error(self, message: str):
        if message.startswith("argument ") and message.endswith(": expected one argument"):
            option = message.removeprefix("argument ").removesuffix(": expected one argument").split("/")[-1]
            raise UsageError(f"{option} needs a value")
        raise UsageError(message)


def _split_plugin_keys(argv: list[str], value_options: set[str]) -> tuple[list[str], list[str]]:
    """The options before the first `--` (that is not an option's value) and the plugin keys after it."""
    i = 0
    while i < len(argv):
        if argv[i] == "--":
            return argv[:i], argv[i + 1:]
        i += 2 if argv[i] in value_options else 1
    return argv, []


def cmd_attach(argv: list[str], report: ConsoleReporter, settings: Settings) -> int:
    parser = _Parser()
    for option in ("--name", "--priority", "--transport", "--state-dir", "--threads"):
        parser.add_argument(option)
    parser.add_argument("--no-discard", action="store_true")
    before, keys = _split_plugin_keys(argv, {"--name", "--priority", "--transport", "--state-dir", "--threads"})
    args, extra = parser.parse_known_args(before)
    if args.help:
        print(usage_attach(report.prog, settings), end="")
        return 0
    if extra:
        raise UsageError(f"unknown option '{extra[0]}' (plugin keys go after --)")
    options = AttachOptions(
        plugin_keys=keys,
        name=args.name,
        priority=MAX_PRIORITY if args.priority is None else args.priority,
        transport=args.transport or "auto",
        state_dir=args.state_dir,
        threads=4 if args.threads is None else args.threads,
        discard=not args.no_discard,
    )
    options.check()  # the numbers as given (check_number takes their text)
    options.priority, options.threads = int(options.priority), int(options.threads)
    attach(options, settings, report)
    return 0


def cmd_detach(argv: list[str], report: ConsoleReporter, settings: Settings) -> int:
    parser = _Parser()
    parser.add_argument("--no-complete", action="store_true")
    for option in ("--pid", "--address", "--length"):
        parser.add_argument(option)
    args, extra = _parse_names(parser, argv)
    if args.help:
        print(usage_detach(report.prog, settings), end="")
        return 0
    if len(extra) != 1:
        raise UsageError(f"give exactly one NAME (see '{report.prog} status')")
    name = extra[0]
    given = [value for value in (args.pid, args.address, args.length) if value is not None]
    if given and len(given) != 3:
        raise UsageError("--pid, --address and --length go together")
    target = None
    if given:
        target = Target(_parse("--pid", args.pid, lambda text: check_number("--pid", text, 1, 2**22)),
                        _parse("--address", args.address, parse_address),
                        _parse("--length", args.length, parse_size))
    detach(name, complete=not args.no_complete, target=target, settings=settings, report=report)
    return 0


def _parse_names(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options and the NAMEs; an option the parser does not know is a usage error (unless --help)."""
    args, names = parser.parse_known_args(argv)
    unknown = [word for word in names if word.startswith("-")]
    if unknown and not args.help:
        raise UsageError(f"unknown option '{unknown[0]}'")
    return args, names


def _parse(option: str, text: str, parse: Callable[[str], int]) -> int:
    try:
        return parse(text)
    except (argparse.ArgumentTypeError, UsageError, ValueError):
        raise UsageError(f"bad {option} '{text}'") from None


def cmd_status(argv: list[str], report: ConsoleReporter, settings: Settings) -> int:
    parser = _Parser()
    parser.add_argument("--json", action="store_true")
    args, extra = _parse_names(parser, argv)
    if args.help:
        print(usage_status(report.prog, settings), end="")
        return 0
    if len(extra) > 1:
        raise UsageError("give at most one NAME")
    entries = status(extra[0] if extra else None, settings)
    if args.json:
        print(json.dumps(entries, separators=(",", ":")))
    elif not entries:
        print("no postcopy swap device is attached")
    else:
        for entry in entries:
            print(format_status(entry))
    return 0


def format_status(entry: dict) -> str:
    """One attachment's status for people (several lines)."""
    size = "size unknown" if entry["size_bytes"] is None else human_bytes(entry["size_bytes"])
    lines = [f"{entry['name']}: {entry['device'] or 'no device'} ({entry['transport'] or '?'}, {size})"]
    if entry["swap_active"]:
        used, size = human_bytes(entry["swap_used_kib"] * 1024), human_bytes(entry["swap_size_kib"] * 1024)
        lines.append(f"  swap: active, priority {entry['priority']}, used {used} of {size}")
    else:
        lines.append("  swap: not active")

    def process(role: str) -> str:
        p = entry["processes"][role]
        return f"{role} {p['pid'] if p['pid'] is not None else '?'} {p['state'] or 'unknown'}"

    locked = entry["processes"]["nbdkit"]["locked_kib"]
    line = f"  processes: {process('supervisor')}, {process('nbdkit')}"
    if locked is not None:
        line += f" (locked {human_bytes(locked * 1024)})"
    if entry["transport"] == "fuse":
        line += f", {process('nbdfuse')}"
    lines.append(line)
    plugin = entry["plugin"]
    if plugin is not None:
        keys = [key for key in ("armed", "mapped", "remaining", "complete") if key in plugin]
        shown = ", ".join(f"{key} {plugin[key]}" for key in keys)
        lines.append(f"  plugin: {shown}")
    else:
        lines.append(f"  plugin: control socket {entry['control_socket'] or '(none)'} not answering")
    lines.append(f"  state: {entry['state_dir']}")
    return "\n".join(lines)


RUNNERS = {"attach": cmd_attach, "detach": cmd_detach, "status": cmd_status}


def main(argv: list[str] | None = None, prog: str = "setup-swap.sh") -> int:
    """Run one command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = Settings.from_environ()
    command = argv[0] if argv else ""
    if command in ("-h", "--help", "help"):
        print(usage_main(prog, settings), end="")
        return 0
    if not command:
        print(usage_main(prog, settings), end="", file=sys.stderr)
        return 2
    if command not in RUNNERS:
        print(f"{prog}: unknown command '{command}' (want attach, detach or status; see --help)", file=sys.stderr)
        return 2
    report = ConsoleReporter(prog, command)
    try:
        with stop_signals_raise():
            return RUNNERS[command](argv[1:], report, settings)
    except UsageError as exc:
        print(f"{prog}: {command}: {exc}", file=sys.stderr)
        print(f"Run '{prog} {command} --help' for usage.", file=sys.stderr)
        return 2
    except AttachmentError as exc:
        if not exc.reported:
            report.error(str(exc))
        return 1
    except Interrupted as exc:
        return exc.exit_status


# --- `nbd-postcopy swap` ---------------------------------------------------------------------------------

HELP = "attach the postcopy device as swap, take it down, report (as scripts/setup-swap.sh)"
DESCRIPTION = usage_main("nbd-postcopy swap", Settings.from_environ()).split("\n", 2)[2]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("arguments", nargs=argparse.REMAINDER, metavar="COMMAND [OPTIONS]",
                   help="attach, detach or status and their options ('nbd-postcopy swap COMMAND --help')")


def run(args: argparse.Namespace) -> int:
    return main(args.arguments, prog="nbd-postcopy swap")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    name = "nbd-postcopy swap"
    if arguments[:1] == ["--prog"] and len(arguments) >= 2:  # scripts/setup-swap.sh names itself
        name, arguments = arguments[1], arguments[2:]
    sys.exit(main(arguments, prog=name))
