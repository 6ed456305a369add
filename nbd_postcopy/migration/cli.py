"""`nbd-postcopy migrate`: live-migrate a running QEMU VM to a waiting destination QEMU, on this host
(--destination-qmp) or on another host where `nbd-postcopy receive` waits (--to)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from ..common.command import CommandError, option_type
from ..common.units import parse_tcp_listen
from ..source.shaping import parse_rate
from .channel import ChannelError, TlsFiles
from .destination import DEVICE_KEY_HELP, PREFETCH_CPUS_HELP, check_prefetch_cpus, device_key
from .migrate import MigrateError, MigrateOptions, migrate
from .send import SendOptions, migrate_to
from .ram import RAM_ID

T = TypeVar("T")

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

To another host: run `nbd-postcopy receive --qmp DST.qmp --listen tcp:ADDR:PORT` there first, then here
  nbd-postcopy migrate --source-qmp SRC.qmp --to tcp:ADDR:PORT [--tls-cert F --tls-key F --tls-ca F]
The page server listens on --page-listen (default: this host's address towards ADDR, a free port). With
certificates (all three: this host's certificate and key, and the CA both hosts' certificates are signed
by), the control channel, the page stream and QEMU's own migration stream are all TLS, and a peer whose
certificate is not signed by that CA is refused. --prefetch-bandwidth RATE (e.g. 800mbit) caps prefetch
replies on the egress interface (--interface, default: the route to ADDR) with an HTB tree, so demand
faults never queue behind them; it is removed on every exit. If the page server dies after the switchover
it is restarted at once on the same RAM, port and identity, and the destination reconnects.

Examples:
  nbd-postcopy migrate --source-qmp /run/vm-src.qmp --destination-qmp /run/vm-dst.qmp
  nbd-postcopy migrate --source-qmp /run/vm-src.qmp --to tcp:10.0.0.2:7777 --tls-cert host.pem \
      --tls-key host-key.pem --tls-ca ca.pem --prefetch-bandwidth 800mbit
  nbd-postcopy migrate --source-qmp src.qmp --destination-qmp dst.qmp --keep-source --work-dir /run/mig1
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source-qmp", required=True, type=Path, metavar="SOCKET",
                        help="QMP Unix socket of the running source QEMU")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--destination-qmp", type=Path, metavar="SOCKET",
                       help="QMP Unix socket of the destination QEMU on this host (started with -incoming defer)")
    where.add_argument("--to", type=option_type(parse_tcp_listen), metavar="tcp:HOST:PORT",
                       help="the `nbd-postcopy receive` waiting on another host")
    tls = parser.add_argument_group("two hosts (--to)")
    tls.add_argument("--tls-cert", metavar="F", help="this host's certificate (PEM), signed by --tls-ca")
    tls.add_argument("--tls-key", metavar="F", help="its private key (PEM)")
    tls.add_argument("--tls-ca", metavar="F", help="the CA that signs both hosts' certificates (PEM)")
    tls.add_argument("--page-listen", type=option_type(parse_tcp_listen), metavar="tcp:ADDR:PORT",
                     help="where the page server listens (default: this host's address towards --to, a free port)")
    tls.add_argument("--prefetch-bandwidth", type=_rate, metavar="RATE",
                     help="cap prefetch replies at RATE (e.g. 800mbit) with HTB on the egress interface")
    tls.add_argument("--interface", metavar="DEV", help="the interface to shape (default: the route to --to)")
    parser.add_argument("--memdev", default=RAM_ID, metavar="ID",
                        help=f"id of the memory backend holding guest RAM on both sides (default {RAM_ID})")
    parser.add_argument("--work-dir", type=Path, metavar="DIR",
                        help="directory for sockets, the migration key and the device state "
                             "(default: a new directory under $TMPDIR or /tmp, removed unless it holds a swap device)")
    parser.add_argument("--prefetch-cpus", type=option_type(check_prefetch_cpus), metavar="auto|all|LIST",
                        help=PREFETCH_CPUS_HELP + " (with --to, give it to receive, where the prefetcher runs)")
    parser.add_argument("--device-key", dest="device_keys", action="append", default=[],
                        type=option_type(device_key), metavar="KEY=VALUE",
                        help=DEVICE_KEY_HELP + " (with --to, give it to receive, where the device is)")
    parser.add_argument("--keep-source", action="store_true",
                        help="do not quit the source QEMU after every page is local")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the final report")


def _rate(text: str) -> int:
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    if args.to is not None:
        return _run_to(args)
    if any((args.tls_cert, args.tls_key, args.tls_ca, args.page_listen, args.prefetch_bandwidth, args.interface)):
        raise CommandError("--tls-*, --page-listen, --prefetch-bandwidth and --interface go with --to")
    report = in_work_dir(args.work_dir, "nbdpc-mig-", lambda work_dir: migrate(MigrateOptions(
        args.source_qmp, args.destination_qmp, work_dir, memdev=args.memdev, release_source=not args.keep_source,
        prefetch_cpus=args.prefetch_cpus or "auto", device_keys=tuple(args.device_keys), quiet=args.quiet)))
    print(report.summary())
    return 0


def _run_to(args: argparse.Namespace) -> int:
    if args.prefetch_cpus or args.device_keys:
        raise CommandError("--prefetch-cpus and --device-key go with --destination-qmp; with --to, give them to "
                           "`nbd-postcopy receive`, where the device and its prefetcher run")
    try:
        tls = TlsFiles.from_options(args.tls_cert, args.tls_key, args.tls_ca)
    except ChannelError as exc:
        raise CommandError(str(exc)) from None
    if args.interface and not args.prefetch_bandwidth:
        raise CommandError("--interface goes with --prefetch-bandwidth")
    page_listen = (args.page_listen.host, args.page_listen.port) if args.page_listen else None
    report, details = in_work_dir(args.work_dir, "nbdpc-mig-", lambda work_dir: migrate_to(SendOptions(
        args.source_qmp, args.to.host, args.to.port, work_dir, tls=tls, page_listen=page_listen,
        prefetch_bandwidth=args.prefetch_bandwidth, interface=args.interface, memdev=args.memdev,
        release_source=not args.keep_source, quiet=args.quiet)), errors=(MigrateError, ChannelError))
    print(report.summary())
    print(f"source reconnects:         {details.get('reconnects', 0)} "
          f"({details.get('outage_seconds', 0.0):.1f} s without the source)")
    return 0


def in_work_dir(given: Path | None, prefix: str, work: Callable[[Path], T],
                errors: tuple[type[Exception], ...] = (MigrateError,)) -> T:
    """`work(work_dir)` in the --work-dir given or a new one (make_work_dir), released afterwards
    (release_work_dir); `errors` become a CommandError that also says where the work directory is."""
    work_dir = make_work_dir(given, prefix)
    try:
        result = work(work_dir)
    except errors as exc:
        raise CommandError(f"{exc}{release_work_dir(work_dir, given is None, failed=True)}") from None
    release_work_dir(work_dir, given is None, failed=False)
    return result


def make_work_dir(given: Path | None, prefix: str) -> Path:
    """The --work-dir given (made if missing), or a new one under $TMPDIR (default /tmp; keep it short: the
    directory holds Unix sockets)."""
    if given is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    if given.exists() and not given.is_dir():
        raise CommandError(f"--work-dir {given} exists and is not a directory")
    return given


def release_work_dir(work_dir: Path, made_here: bool, failed: bool) -> str:
    """Remove a work directory this run made, unless a swap device attached from it is still there (its
    state lives in it); returns the note for the error message."""
    if not made_here:
        return f"\n(work directory: {work_dir})" if failed else ""
    if (work_dir / "swap").exists():
        return f"\n(work directory kept, it holds the swap device's state: {work_dir})"
    shutil.rmtree(work_dir, ignore_errors=True)
    return ""
