"""`nbd-postcopy migrate`: live-migrate a running QEMU VM to a waiting destination QEMU on this host."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from ..common.command import CommandError
from .migrate import MigrateError, MigrateOptions, migrate
from .ram import RAM_ID

HELP = "live-migrate a QEMU VM: device state through QEMU, RAM through the postcopy swap device"
DESCRIPTION = """\
Live-migrate a running QEMU VM to a destination QEMU that waits with -incoming defer. QEMU's own stream
carries device state only (x-ignore-shared); guest RAM arrives through kernel swap: the destination's
RAM is staged onto a postcopy swap device whose nbdkit plugin fetches each page from the source on first
touch, while a prefetcher pulls the rest. The guest resumes at the destination right after the source
stops; the source QEMU quits once every page is local.

Requirements:
  source       RAM on a shared backend with id ram0 (or --memdev), e.g.
                 -machine memory-backend=ram0
                 -object memory-backend-file,id=ram0,size=1G,mem-path=/dev/shm/vm.ram,share=on
               or memory-backend-memfd,id=ram0,size=1G,share=on
  destination  the same machine options, RAM from memory-backend-ram (id ram0), -incoming defer
  both         -global apic-common.vapic=off, and a QMP socket nobody else is connected to
               (QEMU serves one client per QMP socket: add a second -qmp for this tool)
  host         root, no zswap, nbdkit + nbdkit-plugin-python, nbdfuse, losetup

If anything fails before the destination resumes, the migration is rolled back: the source keeps
running. After that point the guest needs the source until every page is local; a failure then leaves
the source, the page server and the swap device running and prints the command that finishes the job.

Examples:
  nbd-postcopy migrate --source-qmp /run/vm-src.qmp --destination-qmp /run/vm-dst.qmp
  nbd-postcopy migrate --source-qmp src.qmp --destination-qmp dst.qmp --keep-source --work-dir /run/mig1
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source-qmp", required=True, type=Path, metavar="SOCKET",
                        help="QMP Unix socket of the running source QEMU")
    parser.add_argument("--destination-qmp", required=True, type=Path, metavar="SOCKET",
                        help="QMP Unix socket of the destination QEMU (started with -incoming defer)")
    parser.add_argument("--memdev", default=RAM_ID, metavar="ID",
                        help=f"id of the memory backend holding guest RAM on both sides (default {RAM_ID})")
    parser.add_argument("--work-dir", type=Path, metavar="DIR",
                        help="directory for sockets, the migration key and the device state "
                             "(default: a new directory under /tmp, removed after a successful migration)")
    parser.add_argument("--keep-source", action="store_true",
                        help="do not quit the source QEMU after every page is local")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the final report")


def run(args: argparse.Namespace) -> int:
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="nbdpc-mig-", dir="/tmp"))
    options = MigrateOptions(args.source_qmp, args.destination_qmp, work_dir, memdev=args.memdev,
                             release_source=not args.keep_source, quiet=args.quiet)
    try:
        report = migrate(options)
    except MigrateError as exc:
        raise CommandError(f"{exc}\n(work directory kept: {work_dir})") from None
    if args.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(report.summary())
    return 0
