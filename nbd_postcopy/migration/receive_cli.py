"""`nbd-postcopy receive`: wait for a migration from another host (`nbd-postcopy migrate --to` there)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..common.command import CommandError, option_type
from ..common.units import parse_number, parse_tcp_listen
from .channel import ChannelError, TlsFiles
from .cli import make_work_dir, release_work_dir
from .destination import DEVICE_KEY_HELP, PREFETCH_CPUS_HELP, check_prefetch_cpus, device_key
from .migrate import MigrateError
from .ram import RAM_ID
from .receive import ReceiveOptions, receive

HELP = "wait for a migration from another host and run its destination half"
DESCRIPTION = """\
The destination half of a migration between two hosts. Start the destination QEMU with -incoming defer,
anonymous RAM (memory-backend-ram, the same size and id as the source's shared backend), the same machine
options and devices, -global apic-common.vapic=off and a QMP socket of its own; then run this, and on the
source host `nbd-postcopy migrate --source-qmp SRC.qmp --to tcp:ADDR:PORT`.

When the sender connects, this checks the VM's shape, generates the migration key (it never leaves this
host), attaches the postcopy swap device fetching from the sender's page server (refusing any other
server: the device is pinned to that server's instance id), stages and arms it, and lets QEMU take the
device state. After the switchover it reports progress to the sender, tells it when every page is here
(the sender then releases the source), pre-pages the rest, detaches the device, and exits 0.

With --tls-cert/--tls-key/--tls-ca (all three) the control channel, the page stream and QEMU's migration
stream are TLS, and only a sender whose certificate is signed by --tls-ca is accepted; plaintext is refused.
Without them everything runs in clear (a warning says so).

Ctrl-C, or any failure, before the guest resumes here rolls back: QEMU is told to quit, the device is
detached, and the sender keeps its source running. After that the device stays until every page is here.

Example:
  nbd-postcopy receive --qmp /run/vm1-dst.qmp --listen tcp:10.0.0.2:7777 \\
      --tls-cert host.pem --tls-key host-key.pem --tls-ca ca.pem
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qmp", required=True, type=Path, metavar="SOCKET",
                        help="QMP Unix socket of the destination QEMU (started with -incoming defer)")
    parser.add_argument("--listen", required=True, type=option_type(parse_tcp_listen), metavar="tcp:ADDR:PORT",
                        help="where to wait for the sender")
    parser.add_argument("--tls-cert", metavar="F", help="this host's certificate (PEM), signed by --tls-ca")
    parser.add_argument("--tls-key", metavar="F", help="its private key (PEM)")
    parser.add_argument("--tls-ca", metavar="F", help="the CA that signs both hosts' certificates (PEM)")
    parser.add_argument("--timeout", type=option_type(lambda text: parse_number(text, "seconds")), metavar="S",
                        help="seconds a swap-in waits for an unreachable source before it fails, which kills the "
                             "guest (the device's timeout=, default 60); keep it long in production")
    parser.add_argument("--prefetch-cpus", type=option_type(check_prefetch_cpus), default="auto",
                        metavar="auto|all|LIST", help=PREFETCH_CPUS_HELP)
    parser.add_argument("--device-key", dest="device_keys", action="append", default=[],
                        type=option_type(device_key), metavar="KEY=VALUE", help=DEVICE_KEY_HELP)
    parser.add_argument("--memdev", default=RAM_ID, metavar="ID",
                        help=f"id of the memory backend holding guest RAM (default {RAM_ID})")
    parser.add_argument("--work-dir", type=Path, metavar="DIR",
                        help="directory for the key, the device state and certificates "
                             "(default: a new directory under $TMPDIR or /tmp, removed unless it holds a swap device)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the final report")


def run(args: argparse.Namespace) -> int:
    try:
        tls = TlsFiles.from_options(args.tls_cert, args.tls_key, args.tls_ca)
    except ChannelError as exc:
        raise CommandError(str(exc)) from None
    work_dir = make_work_dir(args.work_dir, "nbdpc-rcv-")
    options = ReceiveOptions(args.qmp, args.listen.host, args.listen.port, work_dir, tls=tls, memdev=args.memdev, quiet=args.quiet,
                             timeout=args.timeout, prefetch_cpus=args.prefetch_cpus,
                             device_keys=tuple(args.device_keys))
    try:
        report = receive(options)
    except (MigrateError, ChannelError) as exc:
        raise CommandError(f"{exc}{release_work_dir(work_dir, args.work_dir is None, failed=True)}") from None
    release_work_dir(work_dir, args.work_dir is None, failed=False)
    print(f"received {report['guest_bytes'] >> 20} MiB: {report['pages_demand']} pages on demand, "
          f"{report['pages_prefetch']} prefetched, {report['pages_without_fetch']} zero; every page is local "
          f"{report['resume_to_local_seconds']:.2f} s after the resume; completion {report['complete_seconds']:.2f} s; "
          f"{report['reconnects']} reconnects")
    return 0
