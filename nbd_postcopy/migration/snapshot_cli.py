"""`nbd-postcopy snapshot`: save a running QEMU VM (device state and sparse RAM) for a lazy restore."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..common.command import CommandError
from .destination import MigrateError
from .ram import RAM_ID
from .snapshot import SnapshotOptions, snapshot
from .snapshotdir import SnapshotError

HELP = "save a running QEMU VM to a directory that `restore` resumes lazily"
DESCRIPTION = """\
Save a running QEMU VM into a new snapshot directory: pause the guest, save its device state (QEMU's
migration stream with x-ignore-shared, so without RAM) to DIR/state, copy its RAM while it is still
paused into the sparse file DIR/ram (zero pages are holes), then resume the guest (--keep-running) or
quit QEMU once the snapshot is whole. DIR/manifest.json, written last, holds the sizes, the SHA-256 of
both files, the machine options a restoring QEMU must match (machine type, RAM size, vCPUs) and the
timings. The snapshot is built in DIR.partial-XXXX beside DIR and renamed into place, so DIR is either
absent or whole; on a failure the partial directory is removed and a running guest resumes.

Requirements: the VM's RAM on a shared backend with id ram0 (or --memdev), as for a migration source:
  -machine memory-backend=ram0
  -object memory-backend-file,id=ram0,size=1G,mem-path=/dev/shm/vm.ram,share=on
(or memory-backend-memfd,share=on); a QMP socket nobody else is connected to; -global
apic-common.vapic=off (as for `migrate`). The guest is paused for the device state and the RAM copy:
the report says how long.

Examples:
  nbd-postcopy snapshot --qmp /run/vm.qmp --to /var/lib/snapshots/vm1
  nbd-postcopy snapshot --qmp /run/vm.qmp --to /var/lib/snapshots/vm1-noon --keep-running
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qmp", required=True, type=Path, metavar="SOCKET", help="QMP Unix socket of the running QEMU")
    parser.add_argument("--to", required=True, type=Path, metavar="DIR",
                        help="the snapshot directory to create (must not exist, or be empty)")
    parser.add_argument("--memdev", default=RAM_ID, metavar="ID",
                        help=f"id of the memory backend holding guest RAM (default {RAM_ID})")
    parser.add_argument("--keep-running", action="store_true", help="resume the guest afterwards instead of quitting QEMU")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the final report")


def run(args: argparse.Namespace) -> int:
    options = SnapshotOptions(args.qmp, args.to, memdev=args.memdev, keep_running=args.keep_running, quiet=args.quiet)
    try:
        report = snapshot(options)
    except (MigrateError, SnapshotError) as exc:
        raise CommandError(str(exc)) from None
    print(report.summary())
    return 0
