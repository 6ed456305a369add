"""`nbd-postcopy demo`: boot a small guest, live-migrate it on this host through the whole stack, check it."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..common.command import CommandError
from .guest import Failure, GuestBuildError, PassOk, prepare_guest
from ..migration.migrate import MigrateError, MigrateOptions, migrate
from .vm import Vm, largest_gap, merged_heartbeats
from ..common.qmp import VmError

HELP = "boot a test guest and live-migrate it on this host with nbd-postcopy (no arguments needed)"
DESCRIPTION = """\
Boot a small Linux guest under QEMU (TCG) whose memory checker fills most of its RAM with a seeded
pattern and keeps verifying it, printing heartbeats. Then live-migrate it, on this host, to a second
QEMU through the whole nbd-postcopy stack: the source page server with its freeze gate, the postcopy
swap device (nbdkit plugin, nbdfuse, loop, swapon), staging of the destination RAM, QEMU's
x-ignore-shared migration of device state, demand faults and prefetch, completion, and release of the
source. Finally watch the guest verify all of its memory at the destination, print the migration report,
and remove everything the demo created.

The first run downloads the Debian cloud kernel package (apt-get download, not installed) and builds a
busybox initramfs; both are cached in /var/cache/nbd-postcopy/guest.

Needs root (swap, loop devices, FUSE) and no zswap.

Examples:
  nbd-postcopy demo
  nbd-postcopy demo --memory-mib 1024 --workload idle
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-mib", type=int, default=256, metavar="MIB",
                        help="guest RAM in MiB (default 256; at least 128)")
    parser.add_argument("--workload", choices=("write", "idle"), default="write",
                        help="write: the guest keeps rewriting part of its memory (default); "
                             "idle: it only reads and verifies")
    parser.add_argument("--passes", type=int, default=3, metavar="N",
                        help="full verification passes to wait for at the destination (default 3)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the guest's memory pattern")
    parser.add_argument("--keep-dir", action="store_true",
                        help="keep the demo's directory (consoles, logs) instead of removing it")


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CommandError("the demo needs root (swap devices, loop devices, FUSE): run it with sudo")
    if args.memory_mib < 128:
        raise CommandError("--memory-mib must be at least 128 (the guest kernel needs room to boot)")
    say("preparing the guest kernel and initramfs (cached after the first run)")
    try:
        image = prepare_guest()
    except GuestBuildError as exc:
        raise CommandError(str(exc)) from None
    run_dir = Path(tempfile.mkdtemp(prefix="nbdpc-demo-", dir="/tmp"))
    try:
        return _demo(image, run_dir, args)
    except (MigrateError, VmError) as exc:
        raise CommandError(f"{exc}\n(demo files: {run_dir})") from None
    finally:
        if not args.keep_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            say(f"demo files kept in {run_dir}")


def _demo(image, run_dir: Path, args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    append = f"memcheck.seed={seed} memcheck.mode={args.workload}"
    source = Vm(image, run_dir, name="source", memory_mib=args.memory_mib, ram="file", append=append, extra_qmp=1)
    destination = Vm(image, run_dir, name="destination", memory_mib=args.memory_mib, ram="ram", incoming=True,
                     append=append, extra_qmp=1)
    with source, destination:
        say(f"booting the source guest ({args.memory_mib} MiB, workload '{args.workload}', seed {seed})")
        first = source.console.wait_for(PassOk, timeout=120)[0]
        say(f"the guest filled and verified its memory (pass {first.number}); migrating")
        report = migrate(MigrateOptions(source.extra_qmp_paths[0], destination.extra_qmp_paths[0],
                                        run_dir / "migration"))
        say(f"watching the guest verify all of its memory {args.passes} times at the destination")
        after = destination.console.mark()
        destination.console.wait_for(PassOk, count=args.passes, after=after, timeout=60 + 30 * args.passes)
        failures = source.console.events(Failure) + destination.console.events(Failure)
        beats = merged_heartbeats(source.console, destination.console)
        stall = largest_gap(beats)
    print("\n" + report.summary())
    print(f"guest heartbeats:          {len(beats)}, largest gap {stall * 1000:.0f} ms")
    if failures:
        print(f"\nFAIL: the guest saw wrong memory {len(failures)} times, first: {failures[0].line}")
        return 1
    print(f"\nOK: the guest verified all {args.memory_mib} MiB {args.passes} times at the destination, "
          f"with no wrong page; the source was released and nothing is left behind.")
    return 0


def say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)
