"""`nbd-postcopy restore`: resume a snapshot in a waiting QEMU, its RAM faulted in lazily."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..common.command import option_type
from .cli import in_work_dir
from .destination import DEVICE_KEY_HELP, PREFETCH_CPUS_HELP, check_prefetch_cpus, device_key
from .restore import RestoreOptions, restore

HELP = "resume a snapshot in a QEMU started with -incoming defer; its RAM arrives on demand"
DESCRIPTION = """\
Resume a snapshot (`nbd-postcopy snapshot`) in a QEMU that waits with -incoming defer and anonymous RAM
(memory-backend-ram) of the same size. The snapshot's checksums are checked first; a damaged snapshot,
or one whose memdev id, RAM size, machine type or vCPU count does not match the QEMU, is refused with
one line and nothing is started. Then, as for a migration: the snapshot's RAM file is served by a page
server, the guest RAM is staged onto a postcopy swap device and the device is armed; QEMU loads the
device state and the guest runs at once, faulting its pages in on demand while the prefetcher pulls
the rest; once every page is local the page server stops, completion pre-pages every page into the
guest and the device is detached.

Working-set replay: the device records the guest pages the restored guest demands first; the restore
saves them as DIR/workingset. The next restore of the same snapshot prefetches that set first, right
after arming (before and just after the resume). --no-replay ignores the record, --no-record leaves
DIR/workingset as it is. The report shows which applied.

Requirements: the same machine options as the snapshotted VM, RAM from memory-backend-ram with the
snapshot's memdev id, -incoming defer, -global apic-common.vapic=off, a QMP socket nobody else is
connected to; root, no zswap, nbdkit + nbdkit-plugin-python, nbdfuse, losetup.

Examples:
  qemu-system-x86_64 ... -object memory-backend-ram,id=ram0,size=1G -incoming defer -qmp unix:/run/vm.qmp,server=on,wait=off
  nbd-postcopy restore /var/lib/snapshots/vm1 --qmp /run/vm.qmp
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, metavar="DIR", help="the snapshot directory")
    parser.add_argument("--qmp", required=True, type=Path, metavar="SOCKET",
                        help="QMP Unix socket of the QEMU started with -incoming defer")
    parser.add_argument("--work-dir", type=Path, metavar="DIR",
                        help="directory for sockets, the key and the device state "
                             "(default: a new directory under $TMPDIR or /tmp, removed unless it holds a swap device)")
    parser.add_argument("--no-replay", action="store_true", help="do not prefetch the recorded working set first")
    parser.add_argument("--no-record", action="store_true", help="do not save the working set in DIR/workingset")
    parser.add_argument("--prefetch-cpus", type=option_type(check_prefetch_cpus), default="auto",
                        metavar="auto|all|LIST", help=PREFETCH_CPUS_HELP)
    parser.add_argument("--device-key", dest="device_keys", action="append", default=[],
                        type=option_type(device_key), metavar="KEY=VALUE", help=DEVICE_KEY_HELP)
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the final report")


def run(args: argparse.Namespace) -> int:
    report = in_work_dir(args.work_dir, "nbdpc-rst-", lambda work_dir: restore(RestoreOptions(
        args.directory, args.qmp, work_dir, replay=not args.no_replay, record=not args.no_record,
        prefetch_cpus=args.prefetch_cpus, device_keys=tuple(args.device_keys), quiet=args.quiet)))
    print(report.summary())
    return 0
